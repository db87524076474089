"""Rows written as XML by the caller, spliced into a workbook openpyxl writes.

openpyxl's `append` builds a cell object per value and serialises it through lxml: ~20k rows/s. A caller that
turns a block of rows into one XML string itself (the game sheets: `operations/lottery/sheet_xml.py`; the products
failures: `operations/products/report.py`) lets openpyxl write everything else (other sheets, styles, workbook
parts, and each such sheet's header, freeze pane, column widths and `<dimension>`): `RowsArchive` is the zip
file it saves into, and when openpyxl stores one of those sheets' part it streams that sheet's rows in just
before `</sheetData>`, one block at a time, so memory stays bounded whatever the number of rows.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import openpyxl
from openpyxl.writer.excel import ExcelWriter

_SHEET_DATA_END = b"</sheetData>"


class RowsArchive(zipfile.ZipFile):
    """The zip file openpyxl's `ExcelWriter` saves into, with the rows of some worksheets supplied from outside.

    openpyxl writes a write-only sheet to a temporary file and stores it with `archive.write(file, part)`;
    for a sheet given in `rows` that file (the sheet with its header rows only) is split at `</sheetData>`
    and the sheet's row blocks are streamed in between, compressed as they come.
    """

    def __init__(self, path: Path, rows: dict[object, Callable[[], Iterator[bytes]]], compresslevel: int):
        super().__init__(path, "w", zipfile.ZIP_DEFLATED, allowZip64=True, compresslevel=compresslevel)
        self._rows = rows

    def write(self, filename, arcname=None, compress_type=None, compresslevel=None):
        blocks = next((make for ws, make in self._rows.items() if ws.path[1:] == arcname), None)
        if blocks is None:
            return super().write(filename, arcname, compress_type, compresslevel)
        head, end, tail = Path(filename).read_bytes().rpartition(_SHEET_DATA_END)
        if not end:
            raise RuntimeError(f"openpyxl wrote {arcname} without </sheetData>: cannot place its rows")
        with self.open(arcname, "w", force_zip64=True) as part:
            part.write(head)
            for block in blocks():
                part.write(block)
            part.write(end + tail)


def save_with_rows(
    wb: openpyxl.Workbook, path: Path, rows: dict[object, Callable[[], Iterator[bytes]]], compresslevel: int = 1
) -> None:
    """Save a write-only workbook to `path`, the sheets keyed in `rows` getting those row blocks after the rows
    appended to them (their `dimension` is the caller's: see `declare_dimension`)."""
    ExcelWriter(wb, RowsArchive(path, rows, compresslevel)).save()  # closes the archive


def declare_dimension(ws, ref: str) -> None:
    """Have openpyxl write `<dimension ref=...>` for a write-only sheet (it writes none otherwise, and its
    read-only loader then scans the whole sheet to size it: ~5 s per 200,000 rows). Call before the first
    append: the element is written with the sheet's top."""
    ws.calculate_dimension = lambda: ref
