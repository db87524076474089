"""Stream a dealers' products file (.xlsx or .csv) row by row and validate every cell.

The header is checked once: a missing, misnamed or duplicated column raises `HeaderError` before any row is
read, because then no row can be trusted. After that, every data row comes out either as a `ProductRow` or as
a `RowFailure` naming its row, column and reason, so one bad row never stops the file. Headers may be English
or Portuguese and numbers may be in Brazilian format. Checks across rows (duplicates, unknown dealers) are the
caller's: this module sees one row at a time and never holds the file in memory.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from operations.infra.tabular import (
    UnreadableFile,
    cell_text,
    is_blank,
    open_records,
    parse_decimal,
    parse_whole,
    read_header,
)

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

MAX_SKU_LENGTH = 64
MAX_NAME_LENGTH = 300
MAX_PRICE = Decimal("9999999999.99")
MAX_STOCK = 2_147_483_647
CENT = Decimal("0.01")
_PRICE_LIMIT = MAX_PRICE + CENT / 2  # the smallest value that rounds above MAX_PRICE
_FLOAT_PRICE_LIMIT = 9_999_999_999.0  # number cells below it need no check but the rounding

# What `open_product_rows` raises when the file as a whole cannot be loaded: unsupported or unreadable file, empty
# file, not UTF-8 text, or a header with a missing or duplicated column (tabular's `HeaderError`, a subclass).
HeaderError = UnreadableFile


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
    DEALER_REMOVED = "dealer removed"  # deleted from the database while the file was read


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


@contextmanager
def open_product_rows(path: Path) -> Iterator[tuple[Header, Iterator[ProductRow | RowFailure]]]:
    """Give the file's header and its rows (validated, in file order, blank rows skipped) while it stays open.

    Raises `HeaderError` on entry when the file or its header is unusable. For a .csv file that is not UTF-8
    beyond its first block, the error comes from the row iterator instead.
    """
    path = Path(path)
    with open_records(path) as records:
        numbered = enumerate(records, start=1)
        indexes, extras = read_header(numbered, HEADER_ALIASES, REQUIRED_COLUMNS, path.name)
        header = Header({column: indexes[column] for column in REQUIRED_COLUMNS}, tuple(extras))
        yield header, _checked_rows(numbered, header)


def _checked_rows(
    numbered: Iterator[tuple[int, Sequence[object]]], header: Header
) -> Iterator[ProductRow | RowFailure]:
    used = (*header.indexes.values(), *(index for _, index in header.extra_columns))
    width = max(used) + 1
    at = header.indexes
    columns = (at["dealer_code"], at["sku"], at["name"], at["price"], at["stock"], header.extra_columns)
    for row_number, cells in numbered:
        if len(cells) < width:
            cells = (*cells, *(None,) * (width - len(cells)))
        if not all(is_blank(cells[index]) for index in used):
            yield _check_row(row_number, cells, columns)


def _text(value: object) -> str:
    return value.strip() if type(value) is str else cell_text(value)


def _check_row(row_number: int, cells: Sequence[object], columns: tuple) -> ProductRow | RowFailure:
    dealer_at, sku_at, name_at, price_at, stock_at, extra_columns = columns
    dealer_code, sku = _text(cells[dealer_at]), _text(cells[sku_at])
    try:
        return ProductRow(  # arguments are evaluated in order: the problem reported is the first in column order
            row_number,
            _non_empty(dealer_code, "dealer_code", Reason.EMPTY_DEALER_CODE),
            _bounded(sku, "sku", Reason.EMPTY_SKU, MAX_SKU_LENGTH, Reason.SKU_TOO_LONG),
            _bounded(_text(cells[name_at]), "name", Reason.EMPTY_NAME, MAX_NAME_LENGTH, Reason.NAME_TOO_LONG),
            _price(cells[price_at]),
            _stock(cells[stock_at]),
            {name: text for name, index in extra_columns if (text := _text(cells[index]))},
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
    if type(value) is float and 0 <= value < _FLOAT_PRICE_LIMIT:  # a number cell (not NaN, not infinite)
        return Decimal(repr(value)).quantize(CENT, rounding=ROUND_HALF_UP) if value else Decimal("0.00")
    text = cell_text(value)
    if not text:
        raise _CellError("price", Reason.EMPTY_PRICE)
    number = parse_decimal(value)
    if number is None:
        raise _CellError("price", Reason.PRICE_NOT_A_NUMBER, f"{text!r} is not a number")
    if number < 0:
        raise _CellError("price", Reason.NEGATIVE_PRICE, f"{text!r} is below zero")
    if number >= _PRICE_LIMIT:
        raise _CellError("price", Reason.PRICE_TOO_LARGE, f"{text!r} is above {MAX_PRICE:,}")
    return number.copy_abs().quantize(CENT, rounding=ROUND_HALF_UP)  # copy_abs: '-0' becomes 0.00


def _stock(value: object) -> int:
    if (type(value) is int or type(value) is float and value.is_integer()) and 0 <= value <= MAX_STOCK:
        return int(value)  # a whole number cell within bounds
    text = cell_text(value)
    if not text:
        raise _CellError("stock", Reason.EMPTY_STOCK)
    number = parse_whole(value)
    if number is None:
        raise _CellError("stock", Reason.STOCK_NOT_WHOLE, f"{text!r} is not a whole number")
    if number < 0:
        raise _CellError("stock", Reason.NEGATIVE_STOCK, f"{text!r} is below zero")
    if number > MAX_STOCK:
        raise _CellError("stock", Reason.STOCK_TOO_LARGE, f"{text!r} is above {MAX_STOCK:,}")
    return number
