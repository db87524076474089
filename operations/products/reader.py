"""Stream a dealers' products file (.xlsx or .csv) row by row and validate every cell.

The header is checked once: a missing, misnamed or duplicated column raises `HeaderError` before any row is
read, because then no row can be trusted. After that, every data row comes out either as a `ProductRow` or as
a `RowFailure` naming its row, column and reason, so one bad row never stops the file. Headers may be English
or Portuguese and numbers may be in Brazilian format. Checks across rows (duplicates, unknown dealers) are the
caller's: this module sees one row at a time and never holds the file in memory.
"""

from __future__ import annotations

import csv
import re
import unicodedata
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import TextIO

import openpyxl
from openpyxl.utils.exceptions import InvalidFileException

REQUIRED_COLUMNS = ("dealer_code", "sku", "name", "price", "stock")

HEADER_ALIASES: dict[str, tuple[str, ...]] = {
    "dealer_code": (
        "dealer_code",
        "dealer",
        "dealer_id",
        "codigo_revendedor",
        "codigo_do_revendedor",
        "cod_revendedor",
        "revendedor",
        "codigo_concessionaria",
        "codigo_da_concessionaria",
        "concessionaria",
    ),
    "sku": ("sku", "codigo_produto", "codigo_do_produto", "cod_produto", "product_code"),
    "name": ("name", "product_name", "nome", "nome_do_produto", "descricao", "produto"),
    "price": ("price", "unit_price", "preco", "valor", "preco_unitario"),
    "stock": ("stock", "estoque", "quantidade", "quantidade_em_estoque", "qty", "quantity"),
}
_COLUMN_BY_ALIAS = {alias: column for column, aliases in HEADER_ALIASES.items() for alias in aliases}

MAX_SKU_LENGTH = 64
MAX_NAME_LENGTH = 300
MAX_PRICE = Decimal("9999999999.99")
MAX_STOCK = 2_147_483_647
CENT = Decimal("0.01")
_PRICE_LIMIT = MAX_PRICE + CENT / 2  # the smallest value that rounds above MAX_PRICE

SUFFIXES = (".xlsx", ".csv")
_CSV_DELIMITERS = (",", ";", "\t")


class Reason:
    """The failure categories (`RowFailure.reason`): short, stable strings that reports count."""

    EMPTY_DEALER_CODE = "empty dealer code"
    EMPTY_SKU = "empty SKU"
    SKU_TOO_LONG = "SKU too long"
    EMPTY_NAME = "empty name"
    NAME_TOO_LONG = "name too long"
    EMPTY_PRICE = "empty price"
    PRICE_NOT_A_NUMBER = "price not a number"
    NEGATIVE_PRICE = "negative price"
    PRICE_TOO_LARGE = "price too large"
    EMPTY_STOCK = "empty stock"
    STOCK_NOT_WHOLE = "stock not a whole number"
    NEGATIVE_STOCK = "negative stock"
    STOCK_TOO_LARGE = "stock too large"
    # Found by the caller's checks across rows; named here so that every module counts the same strings.
    UNKNOWN_DEALER = "unknown dealer"
    REPEATED_SKU = "SKU repeated for this dealer"


class HeaderError(ValueError):
    """The file as a whole cannot be loaded: unsupported or unreadable file, empty file, or a header with a
    missing or duplicated column. The message names the file and is meant for the operator."""


@dataclass(frozen=True, slots=True)
class Header:
    """Where the columns are: the 0-based index of each canonical column, and the extra columns (original
    header text, index) whose values become the rows' attributes."""

    indexes: dict[str, int]
    extra_columns: tuple[tuple[str, int], ...]

    @property
    def extras(self) -> list[str]:
        return [name for name, _ in self.extra_columns]


@dataclass(frozen=True, slots=True)
class ProductRow:
    """A valid row. `row_number` is the row as the spreadsheet shows it (the header is row 1)."""

    row_number: int
    dealer_code: str
    sku: str
    name: str
    price: Decimal
    stock: int
    attributes: dict[str, str]


@dataclass(frozen=True, slots=True)
class RowFailure:
    """A row that cannot be loaded. `column` is canonical, or '' when the problem is not about one column;
    `reason` is a `Reason` category and `detail` the specific text."""

    row_number: int
    dealer_code: str
    sku: str
    column: str
    reason: str
    detail: str = ""


def normalise_header(text: str) -> str:
    """'Preço Unitário ' -> 'preco_unitario': lower case, no accents, '_' for spaces, hyphens and dots."""
    decomposed = unicodedata.normalize("NFKD", text.strip().lower())
    unaccented = "".join(char for char in decomposed if not unicodedata.combining(char))
    return re.sub(r"[\s.\-_]+", "_", unaccented).strip("_")


@contextmanager
def open_product_rows(path: Path) -> Iterator[tuple[Header, Iterator[ProductRow | RowFailure]]]:
    """Give the file's header and its rows (validated, in file order, blank rows skipped) while it stays open.

    Raises `HeaderError` on entry when the file or its header is unusable. For a .csv file that is not UTF-8
    beyond its first block, the error comes from the row iterator instead.
    """
    path = Path(path)
    with open_records(path) as records:
        numbered = enumerate(records, start=1)
        header = _read_header(numbered, path.name)
        yield header, _checked_rows(numbered, header)


@contextmanager
def open_records(path: Path) -> Iterator[Iterator[Sequence[object]]]:
    """The raw cell values of an .xlsx (first sheet) or .csv file, row by row from row 1, while it stays open
    (other files with a header of their own, such as the dealers file, read through this too)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise HeaderError(f"{path.name}: unsupported file type {path.suffix!r}; save it as .xlsx or .csv")
    with _xlsx_records(path) if suffix == ".xlsx" else _csv_records(path) as records:
        yield records


@contextmanager
def _xlsx_records(path: Path) -> Iterator[Iterator[Sequence[object]]]:
    """The cell values of the workbook's first (active) sheet, row by row from row 1, gaps included."""
    try:
        workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except (InvalidFileException, zipfile.BadZipFile, KeyError) as exc:
        raise HeaderError(f"{path.name} is not a readable .xlsx workbook ({exc})") from exc
    try:
        sheet = workbook.active
        sheet.reset_dimensions()  # some writers store a wrong size, which would cut rows: read each one to its end
        yield sheet.iter_rows(values_only=True)
    finally:
        workbook.close()


@contextmanager
def _csv_records(path: Path) -> Iterator[Iterator[Sequence[object]]]:
    with path.open(encoding="utf-8-sig", newline="") as file:
        yield _decoded_csv(file, path.name)


def _decoded_csv(file: TextIO, file_name: str) -> Iterator[list[str]]:
    """CSV records, with the delimiter (',', ';' or tab: Brazilian Excel writes ';') the most frequent of the
    first non-blank line. A file that is not UTF-8 raises `HeaderError`, naming a row the bad bytes come after
    (text is decoded by blocks, so not always the row just before them)."""
    row = 0
    try:
        first_line = next((line for line in file if line.strip()), "")
        file.seek(0)
        delimiter = max(_CSV_DELIMITERS, key=first_line.count)
        for row, record in enumerate(csv.reader(file, delimiter=delimiter), start=1):
            yield record
    except UnicodeDecodeError as exc:
        where = f" after row {row}" if row else ""
        raise HeaderError(f"{file_name} is not UTF-8 text ({exc.reason}{where}); save it as 'CSV UTF-8'") from exc


def _read_header(numbered: Iterator[tuple[int, Sequence[object]]], file_name: str) -> Header:
    """The first non-blank row, as a `Header`."""
    for _, cells in numbered:
        if not all(_is_blank(cell) for cell in cells):
            return _parse_header(cells, file_name)
    raise HeaderError(f"{file_name} is empty: expected a header row with {', '.join(REQUIRED_COLUMNS)}")


def _parse_header(cells: Sequence[object], file_name: str) -> Header:
    indexes: dict[str, int] = {}
    extras: dict[str, int] = {}
    found: list[str] = []
    for index, cell in enumerate(cells):
        text = cell_text(cell)
        if not text:
            continue  # a column without a header is ignored, whatever it holds
        found.append(text)
        column = _COLUMN_BY_ALIAS.get(normalise_header(text))
        if column is None:
            if text in extras:
                raise HeaderError(f"{file_name}: the column {text!r} appears twice; keep one of them")
            extras[text] = index
        elif column in indexes:
            first = cell_text(cells[indexes[column]])
            raise HeaderError(f"{file_name}: columns {first!r} and {text!r} both mean {column!r}; keep one of them")
        else:
            indexes[column] = index
    missing = [column for column in REQUIRED_COLUMNS if column not in indexes]
    if missing:
        wanted = "; ".join(f"{column!r} (accepted: {', '.join(HEADER_ALIASES[column])})" for column in missing)
        raise HeaderError(
            f"{file_name}: missing column{'s' if len(missing) > 1 else ''} {wanted}; "
            f"headers found: {', '.join(map(repr, found)) or 'none'}. "
            "Case, accents, spaces, hyphens and dots in headers do not matter."
        )
    return Header(indexes={column: indexes[column] for column in REQUIRED_COLUMNS}, extra_columns=tuple(extras.items()))


def _checked_rows(
    numbered: Iterator[tuple[int, Sequence[object]]], header: Header
) -> Iterator[ProductRow | RowFailure]:
    used = (*header.indexes.values(), *(index for _, index in header.extra_columns))
    width = max(used) + 1
    for row_number, cells in numbered:
        if len(cells) < width:
            cells = (*cells, *(None,) * (width - len(cells)))
        if not all(_is_blank(cells[index]) for index in used):
            yield _check_row(row_number, cells, header)


def _check_row(row_number: int, cells: Sequence[object], header: Header) -> ProductRow | RowFailure:
    at = header.indexes
    dealer_code, sku = cell_text(cells[at["dealer_code"]]), cell_text(cells[at["sku"]])
    try:
        return ProductRow(  # arguments are evaluated in order: the problem reported is the first in column order
            row_number=row_number,
            dealer_code=_non_empty(dealer_code, "dealer_code", Reason.EMPTY_DEALER_CODE),
            sku=_bounded(sku, "sku", Reason.EMPTY_SKU, MAX_SKU_LENGTH, Reason.SKU_TOO_LONG),
            name=_bounded(cell_text(cells[at["name"]]), "name", Reason.EMPTY_NAME, MAX_NAME_LENGTH, Reason.NAME_TOO_LONG),
            price=_price(cells[at["price"]]),
            stock=_stock(cells[at["stock"]]),
            attributes={name: text for name, index in header.extra_columns if (text := cell_text(cells[index]))},
        )
    except _CellError as error:
        return RowFailure(row_number, dealer_code, sku, error.column, error.reason, error.detail)


class _CellError(Exception):
    """One cell's problem, raised by the cell checks and turned into a `RowFailure`."""

    def __init__(self, column: str, reason: str, detail: str = "") -> None:
        super().__init__(column, reason, detail)
        self.column, self.reason, self.detail = column, reason, detail


def _non_empty(text: str, column: str, empty: str) -> str:
    if not text:
        raise _CellError(column, empty)
    return text


def _bounded(text: str, column: str, empty: str, limit: int, too_long: str) -> str:
    if len(_non_empty(text, column, empty)) > limit:
        raise _CellError(column, too_long, f"{len(text)} characters, at most {limit}")
    return text


def _price(value: object) -> Decimal:
    text = cell_text(value)
    if not text:
        raise _CellError("price", Reason.EMPTY_PRICE)
    number = _number(value, _PRICE_FORMS)
    if number is None:
        raise _CellError("price", Reason.PRICE_NOT_A_NUMBER, f"{text!r} is not a number")
    if number < 0:
        raise _CellError("price", Reason.NEGATIVE_PRICE, f"{text!r} is below zero")
    if number >= _PRICE_LIMIT:
        raise _CellError("price", Reason.PRICE_TOO_LARGE, f"{text!r} is above {MAX_PRICE:,}")
    return number.copy_abs().quantize(CENT, rounding=ROUND_HALF_UP)  # copy_abs: '-0' becomes 0.00


def _stock(value: object) -> int:
    text = cell_text(value)
    if not text:
        raise _CellError("stock", Reason.EMPTY_STOCK)
    number = _number(value, _STOCK_FORMS)
    if number is None or number != number.to_integral_value():
        raise _CellError("stock", Reason.STOCK_NOT_WHOLE, f"{text!r} is not a whole number")
    if number < 0:
        raise _CellError("stock", Reason.NEGATIVE_STOCK, f"{text!r} is below zero")
    if number > MAX_STOCK:
        raise _CellError("stock", Reason.STOCK_TOO_LARGE, f"{text!r} is above {MAX_STOCK:,}")
    return int(number)


@dataclass(frozen=True, slots=True)
class _NumberForm:
    """A way of writing numbers in text, and the translation that makes it a plain '1234.56'."""

    pattern: re.Pattern[str]
    to_plain: dict[int, str | None]


_DOT_DECIMAL = _NumberForm(  # 1234.56, .5, 1,234.56
    re.compile(r"\d+(?:\.\d+)?|\.\d+|\d{1,3}(?:,\d{3})+(?:\.\d+)?"), str.maketrans({",": None})
)
_COMMA_DECIMAL = _NumberForm(  # 19,90, 1.234,56, 1.234.567: a comma is decimal only when 1 or 2 digits follow
    re.compile(r"\d+,\d{1,2}|\d{1,3}(?:\.\d{3})+(?:,\d{1,2})?"), str.maketrans({".": None, ",": "."})
)
# '1.234' fits both forms. As a price it is 1.234 (a lone dot is a decimal point, as in '19.90'); as a stock,
# where three decimals make no sense, it is the Brazilian 1234.
_PRICE_FORMS = (_DOT_DECIMAL, _COMMA_DECIMAL)
_STOCK_FORMS = (_COMMA_DECIMAL, _DOT_DECIMAL)
_SIGNED_TEXT = re.compile(r"([+-]?)(?:R\$)?(.*)", re.IGNORECASE | re.DOTALL)  # '-R$ 1.234,56' as Excel shows it
_SPACES = re.compile(r"\s+")


def _number(value: object, forms: tuple[_NumberForm, ...]) -> Decimal | None:
    """A cell as a finite Decimal, or None: xlsx numbers as they are, text in the first form that fits."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = Decimal(str(value))  # str: 19.9 is Decimal('19.9'), not the float's binary expansion
        return number if number.is_finite() else None
    if not isinstance(value, str):
        return None
    sign, body = _SIGNED_TEXT.fullmatch(_SPACES.sub("", value)).groups()
    for form in forms:
        if form.pattern.fullmatch(body):
            return Decimal(sign + body.translate(form.to_plain))
    return None


def cell_text(value: object) -> str:
    """A cell as stripped text; whole xlsx numbers lose their '.0' (dealer code 123.0 is '123')."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _is_blank(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())
