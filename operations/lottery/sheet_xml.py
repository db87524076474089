"""The game sheets' rows written as XML straight from the numpy arrays, spliced into a workbook openpyxl writes.

openpyxl's `append` builds a cell object per value and serialises it through lxml: ~20k rows/s, most of a
large run. Here a block of rows becomes one string: small integers (numbers, sums, even counts) are looked
up among precomputed cells, ranks and row numbers formatted once per row, scores by `repr` (always a float in
the file: `1.0`, never `1`). openpyxl still writes everything else (Summary sheet, chart, styles, workbook
parts, and each game sheet's header, freeze pane, column widths and `<dimension>`), and the rows are spliced in
as it saves each game sheet (`operations/infra/sheet_xml.py`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

ROWS_PER_BLOCK = 20_000  # ~4 MB of XML per block for 6-number games
HIGHEST_NUMBER, MAX_NUMBERS_PER_GAME = 60, 20
# every value of the middle columns has a precomputed cell: numbers, even counts and sums (at most 20 x 60)
_CELLS = tuple(f"<c><v>{i}</v></c>" for i in range(HIGHEST_NUMBER * MAX_NUMBERS_PER_GAME + 1))


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
