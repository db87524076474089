"""The dealers products files name: read from a .csv or .xlsx file (columns code and name) into the database."""

from __future__ import annotations

from pathlib import Path

from operations.infra.tabular import cell_text, open_records, read_header

DEALER_COLUMNS = {
    "code": ("code", "dealer_code", "dealer", "codigo", "codigo_revendedor", "cod_revendedor", "revendedor"),
    "name": ("name", "dealer_name", "nome", "razao_social", "nome_revendedor"),
}


def read_dealers_file(path: Path) -> list[tuple[str, str]]:
    """(code, name) of every dealer of the file; a missing column, an empty or repeated code is an error
    naming the row, before anything is written."""
    dealers: dict[str, str] = {}
    path = Path(path)
    with open_records(path) as records:
        numbered = enumerate(records, start=1)
        where, _ = read_header(numbered, DEALER_COLUMNS, tuple(DEALER_COLUMNS), path.name)
        for row_number, cells in numbered:
            code, name = (cell_text(cells[where[c]]) if where[c] < len(cells) else "" for c in ("code", "name"))
            if not code and not name:
                continue
            if not code:
                raise ValueError(f"{path.name}, row {row_number}: empty dealer code")
            if code in dealers:
                raise ValueError(f"{path.name}, row {row_number}: dealer code {code!r} repeated")
            dealers[code] = name
    return list(dealers.items())
