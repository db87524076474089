"""The dealers products files name: read from a .csv or .xlsx file (columns code and name) into the database."""

from __future__ import annotations

from pathlib import Path

from operations.products.reader import HeaderError, cell_text, normalise_header, open_records

DEALER_COLUMNS = {
    "code": ("code", "dealer_code", "dealer", "codigo", "codigo_revendedor", "cod_revendedor", "revendedor"),
    "name": ("name", "dealer_name", "nome", "razao_social", "nome_revendedor"),
}


def read_dealers_file(path: Path) -> list[tuple[str, str]]:
    """(code, name) of every dealer of the file; a missing column, an empty or repeated code is an error
    naming the row, before anything is written."""
    dealers: dict[str, str] = {}
    with open_records(path) as records:
        header = next(records, None) or []
        names = [normalise_header(cell_text(cell)) for cell in header]
        where = {}
        for column, aliases in DEALER_COLUMNS.items():
            found = [i for i, name in enumerate(names) if name in aliases]
            if not found:
                raise HeaderError(f"{path.name}: missing column {column!r} (accepted: {', '.join(aliases)})")
            where[column] = found[0]
        for row_number, cells in enumerate(records, start=2):
            code, name = (cell_text(cells[where[c]]) if where[c] < len(cells) else "" for c in ("code", "name"))
            if not code and not name:
                continue
            if not code:
                raise ValueError(f"{path.name}, row {row_number}: empty dealer code")
            if code in dealers:
                raise ValueError(f"{path.name}, row {row_number}: dealer code {code!r} repeated")
            dealers[code] = name
    return list(dealers.items())
