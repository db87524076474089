"""The game sheets' rows written as XML straight from the numpy arrays, spliced into a workbook openpyxl writes.

openpyxl's `append` builds a cell object per value and serialises it through lxml: ~20k rows/s, most of a
large run. Here a block of rows becomes one string: small integers (numbers, sums, even counts) are looked
up among precomputed cells, ranks and row numbers formatted once per row, scores by `repr` (always a float in
the file: `1.0`, never `1`). openpyxl still writes everything else (Summary sheet, chart, styles, workbook
parts, and each game sheet's header, freeze pane, column widths and `<dimension>`): `RowsArchive` is the
zip file it saves into, and when openpyxl stores a game sheet's part it streams that sheet's rows in just
before `</sheetData>`, one block at a time, so memory stays bounded whatever the number of rows.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import openpyxl
from openpyxl.writer.excel import ExcelWriter

ROWS_PER_BLOCK = 20_000  # ~4 MB of XML per block for 6-number games
HIGHEST_NUMBER, MAX_NUMBERS_PER_GAME = 60, 20
# every value of the middle columns has a precomputed cell: numbers, even counts and sums (at most 20 x 60)
_CELLS = tuple(f"<c><v>{i}</v></c>" for i in range(HIGHEST_NUMBER * MAX_NUMBERS_PER_GAME + 1))
_SHEET_DATA_END = b"</sheetData>"


def game_rows(
    games: np.ndarray, scores: np.ndarray, first_rank: int, first_row: int, block_rows: int = ROWS_PER_BLOCK
) -> Iterator[bytes]:
    """`<row>` elements (UTF-8, in blocks of `block_rows` rows) of the columns Rank, N1..Nk, Sum, Evens, Score:
    ranks from `first_rank`, sheet rows numbered from `first_row`. Cells carry no `r`: the format makes it
    optional, and each row's cells are contiguous from column A."""
    if games.shape[1] > MAX_NUMBERS_PER_GAME:
        raise ValueError(f"games of at most {MAX_NUMBERS_PER_GAME} numbers, not {games.shape[1]}")
    cell = _CELLS.__getitem__
    for start in range(0, len(games), block_rows):
        g = games[start : start + block_rows].astype(np.int64)
        if g.size and (g.min() < 1 or g.max() > HIGHEST_NUMBER):
            raise ValueError(f"game numbers must be 1..{HIGHEST_NUMBER} (rows {start}..{start + len(g) - 1})")
        middle = np.column_stack([g, g.sum(axis=1), (g % 2 == 0).sum(axis=1)])
        row, rank = first_row + start, first_rank + start
        yield "".join(
            [
                f'<row r="{row + i}"><c><v>{rank + i}</v></c>{"".join(map(cell, values))}<c><v>{score!r}</v></c></row>'
                for i, (values, score) in enumerate(zip(middle.tolist(), scores[start : start + len(g)].tolist()))
            ]
        ).encode()


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
