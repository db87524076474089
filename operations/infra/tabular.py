"""The spreadsheet and .csv files operators hand to the flows and get back from them, read and written one way.

Reading: `open_records` gives the raw cells of a file row by row: a workbook's sheet (.xlsx, .xls or .ods,
read by calamine, a Rust reader that loads a sheet about 17 times faster than openpyxl's read-only mode), or a
CSV file in UTF-8 with ',', ';' or tab between fields, streamed; `read_header` finds the header row and maps
its spellings (English or Portuguese; case, accents, spaces, hyphens and dots ignored) to the reader's
canonical columns; `cell_text`, `parse_decimal` and `parse_whole` turn cells into values, numbers in English or
Brazilian form. Anything that makes a whole file unusable raises `UnreadableFile` (`HeaderError` for the
header), with a message for the operator that names the file.

Writing (openpyxl; .xlsx and .csv): `text_cell` and `bold_cell` keep text as text in write-only workbooks,
`atomic_workbook_save` never leaves half a workbook behind, and `open_row_writer` writes sample files of
either kind.
"""

from __future__ import annotations

import csv
import os
import re
import unicodedata
import uuid
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import openpyxl
from openpyxl.utils import get_column_letter
from python_calamine import CalamineError, CalamineWorkbook, SheetTypeEnum
from openpyxl.cell import WriteOnlyCell
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
from openpyxl.styles import Font

from operations.errors import UserError
from operations.infra.sheet_xml import save_with_rows

if TYPE_CHECKING:
    from openpyxl.worksheet._write_only import WriteOnlyWorksheet

WORKBOOK_SUFFIXES = (".xlsx", ".xls", ".ods")
READ_SUFFIXES = (*WORKBOOK_SUFFIXES, ".csv")
WRITE_SUFFIXES = (".xlsx", ".csv")
# A path the reader accepts, as the UI and the API check it (a JavaScript regex: no inline flags).
READ_FILE_PATTERN = r"^.+\.([xX][lL][sS][xX]|[xX][lL][sS]|[oO][dD][sS]|[cC][sS][vV])$"
_ACTIVE_TAB = re.compile(rb'<(?:\w+:)?workbookView\b[^>]*\bactiveTab="(\d+)"')
EXCEL_MAX_DATA_ROWS = 1_048_575  # a sheet's 1,048,576 rows, less the header
_CSV_DELIMITERS = (",", ";", "\t")
_BOLD = Font(bold=True)


class UnreadableFile(UserError, ValueError):
    """The file as a whole cannot be read: unsupported type, not a workbook, not UTF-8 text, empty. The message
    names the file and is meant for the operator."""


class HeaderError(UnreadableFile):
    """The header has a required column missing, or two headers for one column: no row can be trusted."""


@contextmanager
def open_records(path: Path) -> Iterator[Iterator[Sequence[object]]]:
    """The raw cell values of a workbook (.xlsx: its active sheet, as Excel opens it; .xls, .ods: the first)
    or of a .csv file, row by row from row 1 (the n-th row given is the sheet's row n), while it stays open.
    A workbook's empty cells are '' and its numbers floats.

    Raises `UnreadableFile` on entry for an unsupported or unreadable file. For a .csv file that is not UTF-8
    beyond its first block, the row iterator raises it instead.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in READ_SUFFIXES:
        raise UnreadableFile(
            f"{path.name}: unsupported file type {path.suffix!r}; save it as .xlsx, .xls, .ods or .csv"
        )
    with _workbook_records(path) if suffix in WORKBOOK_SUFFIXES else _csv_records(path) as records:
        yield records


@contextmanager
def _workbook_records(path: Path) -> Iterator[Iterator[Sequence[object]]]:
    """The cell values of the workbook's sheet, row by row from row 1, gaps included. calamine loads the
    whole sheet at once (the cells, not the file's XML), so the workbook is opened once and read once."""
    kind = path.suffix.lower()
    try:
        workbook = CalamineWorkbook.from_path(str(path))
        sheet = workbook.get_sheet_by_index(_sheet_index(path, workbook))
    except CalamineError as exc:
        raise UnreadableFile(f"{path.name} is not a readable {kind} workbook ({exc})") from exc
    try:
        yield _sheet_rows(sheet)
    finally:
        workbook.close()


def _sheet_index(path: Path, workbook: CalamineWorkbook) -> int:
    """The sheet openpyxl called active: an .xlsx file's `activeTab` (when it is a worksheet), else the first
    worksheet."""
    worksheets = [index for index, sheet in enumerate(workbook.sheets_metadata)
                  if sheet.typ == SheetTypeEnum.WorkSheet]
    if not worksheets:
        raise UnreadableFile(f"{path.name} has no worksheet")
    if path.suffix.lower() == ".xlsx":
        try:
            with zipfile.ZipFile(path) as archive:
                active = _ACTIVE_TAB.search(archive.read("xl/workbook.xml"))
        except (zipfile.BadZipFile, KeyError, OSError):
            active = None
        if active and int(active.group(1)) in worksheets:
            return int(active.group(1))
    return worksheets[0]


def _sheet_rows(sheet) -> Iterator[list[object]]:
    """The sheet's rows from row 1 and column A. calamine keeps the cells from the first one used: its rows
    come from row 1 (filled with '') in some versions and from the first row used in others, and its columns
    from the first column used, so both are put back where the sheet shows them."""
    if sheet.start is None:
        return
    first_row, first_column = sheet.start
    rows = sheet.iter_rows()
    if first_row:
        first = next(rows, None)
        if first is None:
            return
        if any(cell != "" for cell in first):  # rows start at the first row used: the rows above are empty
            yield from ([""] * sheet.width for _ in range(first_row))
        rows = _chain_one(first, rows)
    if first_column:
        padding = [""] * first_column
        rows = (padding + row for row in rows)
    yield from rows


def _chain_one(first: list[object], rest: Iterator[list[object]]) -> Iterator[list[object]]:
    yield first
    yield from rest


@contextmanager
def _csv_records(path: Path) -> Iterator[Iterator[Sequence[object]]]:
    with path.open(encoding="utf-8-sig", newline="") as file:
        yield _decoded_csv(file, path.name)


def _decoded_csv(file: TextIO, file_name: str) -> Iterator[list[str]]:
    """CSV records, with the delimiter (',', ';' or tab: Brazilian Excel writes ';') the most frequent of the
    first non-blank line. A file that is not UTF-8 raises `UnreadableFile`, naming a row the bad bytes come
    after (text is decoded by blocks, so not always the row just before them)."""
    row = 0
    try:
        first_line = next((line for line in file if line.strip()), "")
        file.seek(0)
        delimiter = max(_CSV_DELIMITERS, key=first_line.count)
        for row, record in enumerate(csv.reader(file, delimiter=delimiter), start=1):
            yield record
    except UnicodeDecodeError as exc:
        where = f" after row {row}" if row else ""
        raise UnreadableFile(f"{file_name} is not UTF-8 text ({exc.reason}{where}); save it as 'CSV UTF-8'") from exc


def read_header(
    numbered: Iterator[tuple[int, Sequence[object]]],
    aliases: dict[str, tuple[str, ...]],
    required: tuple[str, ...],
    file_name: str,
) -> tuple[dict[str, int], list[tuple[str, int]]]:
    """`map_header` of the first non-blank row of `numbered` (row number, cells), which is left at the first
    data row. A file with no such row raises `UnreadableFile`."""
    for _, cells in numbered:
        if not all(is_blank(cell) for cell in cells):
            return map_header(cells, aliases, required, file_name)
    raise UnreadableFile(f"{file_name} is empty: expected a header row with {', '.join(required)}")


def map_header(
    cells: Sequence[object], aliases: dict[str, tuple[str, ...]], required: tuple[str, ...], file_name: str
) -> tuple[dict[str, int], list[tuple[str, int]]]:
    """Where the columns are in a header row: the 0-based index of each canonical column found (a key of
    `aliases`, whose values are its accepted spellings after `normalise_header`), and the other columns as
    (header text, index), in file order. Cells without a header are ignored, whatever their column holds.

    Raises `HeaderError` for a column of `required` that is missing (naming the accepted spellings and the
    headers found), and for two headers meaning one column (two spellings of one canonical column, or one
    other header twice), since either could be the one meant.
    """
    column_by_alias = {alias: column for column, spellings in aliases.items() for alias in spellings}
    indexes: dict[str, int] = {}
    extras: dict[str, int] = {}
    found: list[str] = []
    for index, cell in enumerate(cells):
        text = cell_text(cell)
        if not text:
            continue
        found.append(text)
        column = column_by_alias.get(normalise_header(text))
        if column is None:
            if text in extras:
                raise HeaderError(f"{file_name}: the column {text!r} appears twice; keep one of them")
            extras[text] = index
        elif column in indexes:
            first = cell_text(cells[indexes[column]])
            raise HeaderError(f"{file_name}: columns {first!r} and {text!r} both mean {column!r}; keep one of them")
        else:
            indexes[column] = index
    missing = [column for column in required if column not in indexes]
    if missing:
        wanted = "; ".join(f"{column!r} (accepted: {', '.join(aliases[column])})" for column in missing)
        raise HeaderError(
            f"{file_name}: missing column{'s' if len(missing) > 1 else ''} {wanted}; "
            f"headers found: {', '.join(map(repr, found)) or 'none'}. "
            "Case, accents, spaces, hyphens and dots in headers do not matter."
        )
    return indexes, list(extras.items())


def normalise_header(text: str) -> str:
    """'Preço Unitário ' -> 'preco_unitario': lower case, no accents, '_' for spaces, hyphens and dots."""
    decomposed = unicodedata.normalize("NFKD", text.strip().lower())
    unaccented = "".join(char for char in decomposed if not unicodedata.combining(char))
    return re.sub(r"[\s.\-_]+", "_", unaccented).strip("_")


def cell_text(value: object) -> str:
    """A cell as stripped text; whole xlsx numbers lose their '.0' (a code typed as 123 is '123', not '123.0')."""
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def is_blank(value: object) -> bool:
    """True for an empty cell or one holding only spaces."""
    return value is None or (isinstance(value, str) and not value.strip())


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
# '1.234' fits both forms. As a decimal it is 1.234 (a lone dot is a decimal point, as in '19.90'); as a whole
# number, where three decimals make no sense, it is the Brazilian 1234.
_DECIMAL_FORMS = (_DOT_DECIMAL, _COMMA_DECIMAL)
_WHOLE_FORMS = (_COMMA_DECIMAL, _DOT_DECIMAL)
_SIGNED_TEXT = re.compile(r"([+-]?)(?:R\$)?(.*)", re.IGNORECASE | re.DOTALL)  # '-R$ 1.234,56' as Excel shows it
_SPACES = re.compile(r"\s+")


def parse_decimal(value: object) -> Decimal | None:
    """A cell as a finite Decimal, or None when it is not a number (empty, text, a boolean, NaN): xlsx numbers
    as they are, text in English ('1,234.56') or Brazilian ('R$ 1.234,56') form, a lone dot a decimal point."""
    return _number(value, _DECIMAL_FORMS)


def parse_whole(value: object) -> int | None:
    """A cell as a whole number (of any sign), or None when it is not one: xlsx numbers without a fraction
    ('5.0' too), text like `parse_decimal` but a lone dot followed by three digits groups thousands ('1.234')."""
    number = _number(value, _WHOLE_FORMS)
    if number is None or number != number.to_integral_value():
        return None
    return int(number)


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


def text_cell(sheet: WriteOnlyWorksheet, text: str) -> WriteOnlyCell:
    """Text, from an operator's file or about it, as a cell that stays text: a leading '=' does not make it a
    formula, and the control characters Excel refuses become U+FFFD."""
    cell = WriteOnlyCell(sheet, value=ILLEGAL_CHARACTERS_RE.sub("\ufffd", text))
    cell.data_type = "s"
    return cell


def bold_cell(sheet: WriteOnlyWorksheet, text: str) -> WriteOnlyCell:
    """A `text_cell` in bold, for headings."""
    cell = text_cell(sheet, text)
    cell.font = _BOLD
    return cell


def atomic_workbook_save(workbook: openpyxl.Workbook, path: Path, rows: dict | None = None) -> None:
    """Save `workbook` beside `path` and move it over `path`, so that a failed or retried write never leaves
    half a file (creating the folder if needed). `rows`: write-only sheets -> their row blocks as XML, spliced
    in as the workbook is saved (`operations.infra.sheet_xml.save_with_rows`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.tmp.xlsx")
    try:
        if rows is None:
            workbook.save(temporary)
        else:
            save_with_rows(workbook, temporary, rows)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


@contextmanager
def open_row_writer(path: Path, sheet_name: str) -> Iterator[Callable[[Sequence[object]], object]]:
    """An `append(row)` for a new .csv file (UTF-8) or for the sheet `sheet_name` of a new write-only workbook,
    by the suffix of `path`; the workbook is saved when the block ends without an error."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WRITE_SUFFIXES:
        raise ValueError(f"{path.name}: write .xlsx or .csv, not {path.suffix!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        with path.open("w", encoding="utf-8", newline="") as file:
            yield csv.writer(file).writerow
    else:
        workbook = openpyxl.Workbook(write_only=True)
        yield workbook.create_sheet(sheet_name).append
        workbook.save(path)


def add_table_sheet(
    workbook: openpyxl.Workbook, name: str, headings: Sequence[str], widths: Sequence[float]
) -> WriteOnlyWorksheet:
    """A write-only sheet with a bold, frozen header row and the given column widths."""
    sheet = workbook.create_sheet(name)
    sheet.freeze_panes = "A2"
    for index, width in enumerate(widths, start=1):
        sheet.column_dimensions[get_column_letter(index)].width = width
    sheet.append([bold_cell(sheet, heading) for heading in headings])
    return sheet


def add_counts_sheet(
    workbook: openpyxl.Workbook, name: str, title: str, counts: Sequence[tuple[str, int]], total_label: str,
    headings: tuple[str, str],
) -> None:
    """A summary sheet: the title, the total (`12 failed rows`), then a table of `counts` in the given order."""
    sheet = workbook.create_sheet(name)
    sheet.column_dimensions["A"].width = 40
    sheet.column_dimensions["B"].width = 12
    sheet.append([bold_cell(sheet, title)])
    if not counts:
        sheet.append(["No failures"])
        return
    sheet.append([f"{sum(n for _, n in counts):,} {total_label}"])
    sheet.append([])
    sheet.append([bold_cell(sheet, heading) for heading in headings])
    for key, count in counts:
        sheet.append([text_cell(sheet, key), count])
