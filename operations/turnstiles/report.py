"""The failures spreadsheet of `register-participants`: which participant could not be written on which turnstile.

Every failure is one (registration, turnstile, row, error) line of the "Failures" sheet (continued on
"Failures 2", ... past a sheet's row limit), and the "Summary" sheet counts them by turnstile, so an operator
sees at once whether one device or one participant is the problem. Failures are written as they come: a long
list never sits in memory.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import openpyxl

from operations.infra.tabular import (
    EXCEL_MAX_DATA_ROWS,
    add_counts_sheet,
    add_table_sheet,
    atomic_workbook_save,
    text_cell,
)

if TYPE_CHECKING:
    from openpyxl.cell import WriteOnlyCell
    from openpyxl.worksheet._write_only import WriteOnlyWorksheet

FAILURE_COLUMNS = ("Registration", "Turnstile", "Row", "Error")
FAILURE_SHEET = "Failures"
SUMMARY_SHEET = "Summary"
NO_TURNSTILE = "(no turnstile)"  # the Summary's name for failures not tied to one, such as a repeated registration
_COLUMN_WIDTHS = (20, 28, 9, 80)
_ROW_NUMBER = re.compile(r"[1-9]\d*")


def write_registration_failures(
    path: Path,
    failures: Iterable[tuple[str, str, str, str]],
    *,
    title: str,
    rows_per_sheet: int = EXCEL_MAX_DATA_ROWS,
) -> int:
    """Write `failures` as (registration, turnstile, row, error), in the order given, to the .xlsx at `path`,
    with `title` and the count per turnstile on the "Summary" sheet; return how many were written.

    A row that is a row number is written as a number (it sorts as one); every other value as text, so that a
    value like '=1+1' from the file stays what it was. The workbook is written beside `path` and moved over it.
    """
    if not 1 <= rows_per_sheet <= EXCEL_MAX_DATA_ROWS:
        raise ValueError(f"rows_per_sheet must be 1..{EXCEL_MAX_DATA_ROWS:,}, not {rows_per_sheet}")
    workbook = openpyxl.Workbook(write_only=True)
    by_turnstile: Counter[str] = Counter()
    sheet, rows_in_sheet = add_table_sheet(workbook, FAILURE_SHEET, FAILURE_COLUMNS, _COLUMN_WIDTHS), 0
    for registration, turnstile, row, error in failures:
        if rows_in_sheet == rows_per_sheet:
            sheet = add_table_sheet(
                workbook, f"{FAILURE_SHEET} {len(workbook.worksheets) + 1}", FAILURE_COLUMNS, _COLUMN_WIDTHS
            )
            rows_in_sheet = 0
        row_cell = int(row) if _ROW_NUMBER.fullmatch(row) else _text_or_empty(sheet, row)
        sheet.append([_text_or_empty(sheet, registration), _text_or_empty(sheet, turnstile), row_cell,
                      _text_or_empty(sheet, error)])
        rows_in_sheet += 1
        by_turnstile[turnstile] += 1
    counts = sorted(((turnstile or NO_TURNSTILE, n) for turnstile, n in by_turnstile.items()),
                    key=lambda item: (-item[1], item[0]))
    add_counts_sheet(workbook, SUMMARY_SHEET, title, counts, "failed registrations", ("Turnstile", "Failures"))
    atomic_workbook_save(workbook, path)
    return by_turnstile.total()


def read_registration_failures(path: Path) -> list[tuple[str, str, str, str]]:
    """The failures of every "Failures" sheet of a workbook written by `write_registration_failures`, in order."""
    failures: list[tuple[str, str, str, str]] = []
    workbook = openpyxl.load_workbook(path, read_only=True)
    try:
        for sheet in workbook.worksheets:
            if sheet.title.startswith(FAILURE_SHEET):
                for row in islice(sheet.iter_rows(values_only=True), 1, None):
                    cells = (*row, *(None,) * (len(FAILURE_COLUMNS) - len(row)))  # trailing empty cells are cut
                    failures.append(tuple("" if cell is None else str(cell) for cell in cells[:len(FAILURE_COLUMNS)]))
    finally:
        workbook.close()
    return failures


def _text_or_empty(sheet: WriteOnlyWorksheet, text: str) -> WriteOnlyCell | None:
    """An empty cell for '' (so that it reads back as ''), a `text_cell` otherwise."""
    return text_cell(sheet, text) if text else None
