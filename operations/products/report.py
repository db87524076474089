"""Failed rows of a products file, for the operators and for the flow in between.

`FailureLog` keeps the failures of a run on disk as they come (a big file's failures never sit in memory);
`write_failures_workbook` turns them into the .xlsx the operators open: every failure with its row, column and
reason, and a count by reason.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import fields
from functools import partial
from itertools import chain, islice, repeat
from pathlib import Path
from typing import BinaryIO

import openpyxl
import orjson
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
from openpyxl.utils import get_column_letter
from openpyxl.worksheet._write_only import WriteOnlyWorksheet

from operations.infra.sheet_xml import declare_dimension
from operations.infra.tabular import EXCEL_MAX_DATA_ROWS, add_counts_sheet, atomic_workbook_save, bold_cell
from operations.products.reader import RowFailure

FAILURE_COLUMNS = ("Row", "Dealer", "SKU", "Column", "Reason", "Detail")
FAILURE_SHEET = "Failures"
REASONS_SHEET = "Reasons"
_COLUMN_WIDTHS = (9, 14, 24, 13, 30, 60)
_FIELDS = tuple(field.name for field in fields(RowFailure))


def write_failures_workbook(
    path: Path, failures: Iterable[RowFailure], *, title: str, rows_per_sheet: int = 1_000_000
) -> dict[str, int]:
    """Write `failures`, in the order given, to the .xlsx at `path` and return the failures per reason.

    Sheets "Failures", "Failures 2", ... hold at most `rows_per_sheet` failures each; the last sheet, "Reasons",
    has `title` and the count of each reason, largest first. The workbook is written beside `path` and then
    moved over it, so that a failed or retried write never leaves half a file.

    The failures' rows are written as sheet XML (`_failure_rows`, ~10x faster than a cell object per value) into
    temporary files first, so that each sheet declares its size; openpyxl writes the rest of the workbook and
    the rows are spliced into its sheets as it saves them (operations/infra/sheet_xml.py).
    """
    if not 1 <= rows_per_sheet <= EXCEL_MAX_DATA_ROWS:
        raise ValueError(f"rows_per_sheet must be 1..{EXCEL_MAX_DATA_ROWS:,}, not {rows_per_sheet}")
    path, failures = Path(path), iter(failures)
    counts: Counter[str] = Counter()
    with ExitStack() as stack:
        sheets: list[tuple[BinaryIO, int]] = []  # each sheet's rows as XML, and how many
        batch = list(islice(failures, _XML_BLOCK_ROWS))
        while batch or not sheets:
            rows = stack.enter_context(tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES))
            written = 0
            while batch and written < rows_per_sheet:
                block, batch = batch[:rows_per_sheet - written], batch[rows_per_sheet - written:]
                counts.update(failure.reason for failure in block)
                rows.write(_failure_rows(block, first_row=written + 2))
                written += len(block)
                batch = batch or list(islice(failures, _XML_BLOCK_ROWS))
            sheets.append((rows, written))
        workbook = openpyxl.Workbook(write_only=True)
        spliced = {}
        for number, (rows, written) in enumerate(sheets, start=1):
            sheet = _failures_sheet(workbook, FAILURE_SHEET if number == 1 else f"{FAILURE_SHEET} {number}", written)
            spliced[sheet] = partial(_blocks, rows)
        by_count = dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
        add_counts_sheet(workbook, REASONS_SHEET, title, list(by_count.items()), "failed rows", ("Reason", "Rows"))
        atomic_workbook_save(workbook, path, spliced)
    return by_count


_XML_BLOCK_ROWS = 5_000
_SPOOL_BYTES = 16 * 2**20  # a sheet's rows stay in memory up to this size, then go to a temporary file
_TEXT_COLUMNS = tuple(get_column_letter(index) for index in range(2, len(FAILURE_COLUMNS) + 1))


def _xml_text(text: str) -> str:
    """`text` as the content of a `<t>` element, as openpyxl's `text_cell` would store it: the control
    characters Excel refuses as U+FFFD, at most 32,767 characters."""
    text = ILLEGAL_CHARACTERS_RE.sub("\ufffd", text)[:32_767]
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\r", "&#13;")


def _failure_rows(failures: list[RowFailure], first_row: int) -> bytes:
    """The `<row>` elements of `failures` on sheet rows `first_row`...: the row number as a number, the texts as
    inline strings (never a formula), empty texts as no cell."""
    rows = []
    for offset, failure in enumerate(failures):
        row = first_row + offset
        texts = (failure.dealer_code, failure.sku, failure.column, failure.reason, failure.detail)
        cells = "".join(f'<c r="{column}{row}" t="inlineStr"><is><t xml:space="preserve">{_xml_text(text)}</t></is></c>'
                        for column, text in zip(_TEXT_COLUMNS, texts) if text)
        rows.append(f'<row r="{row}"><c r="A{row}"><v>{int(failure.row_number)}</v></c>{cells}</row>')
    return "".join(rows).encode()


def _blocks(rows: BinaryIO) -> Iterator[bytes]:
    rows.seek(0)
    return iter(partial(rows.read, 1 << 20), b"")


def _failures_sheet(workbook: openpyxl.Workbook, name: str, rows: int) -> WriteOnlyWorksheet:
    """A "Failures" sheet of `rows` failures to come: bold frozen header row, column widths, its size declared
    (openpyxl's read-only loader trusts it)."""
    sheet = workbook.create_sheet(name)
    declare_dimension(sheet, f"A1:{get_column_letter(len(FAILURE_COLUMNS))}{rows + 1}")
    sheet.freeze_panes = "A2"
    for index, width in enumerate(_COLUMN_WIDTHS, start=1):
        sheet.column_dimensions[get_column_letter(index)].width = width
    sheet.append([bold_cell(sheet, heading) for heading in FAILURE_COLUMNS])
    return sheet


def read_failures_workbook(path: Path) -> list[RowFailure]:
    """The failures of every "Failures" sheet of a workbook written by `write_failures_workbook`, in order."""
    failures: list[RowFailure] = []
    workbook = openpyxl.load_workbook(path, read_only=True)
    try:
        for sheet in workbook.worksheets:
            if not sheet.title.startswith(FAILURE_SHEET):
                continue
            for row in islice(sheet.iter_rows(values_only=True), 1, None):
                if row and row[0] is not None:
                    texts = islice(chain(row[1:], repeat(None)), len(FAILURE_COLUMNS) - 1)  # trailing empties
                    failures.append(RowFailure(int(row[0]), *("" if text is None else str(text) for text in texts)))
    finally:
        workbook.close()
    return failures


class FailureLog:
    """An append-only JSON-lines file of `RowFailure`s, one a line, with the count per reason kept in memory.

    Opening a log that exists appends to it: its failures are counted first, and a last line torn by a crash
    is cut off. The file is opened at the first write; a pickled log holds only its path and counts.
    Read one back with `iter_failures`.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._counts: Counter[str] = Counter()
        self._file: BinaryIO | None = None
        if self.path.exists():
            self._count_existing()

    @property
    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    @property
    def total(self) -> int:
        return self._counts.total()

    def add(self, failure: RowFailure) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("ab")
        record = {name: getattr(failure, name) for name in _FIELDS}
        self._file.write(orjson.dumps(record) + b"\n")
        self._counts[failure.reason] += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> FailureLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, object]:
        if self._file is not None:
            self._file.flush()  # the copy's counts then match what the file holds
        return {"path": self.path, "counts": self._counts}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.path, self._counts, self._file = state["path"], state["counts"], None

    def _count_existing(self) -> None:
        complete = 0
        with self.path.open("rb+") as file:
            for line in file:
                if not line.endswith(b"\n"):
                    break
                self._counts[orjson.loads(line)["reason"]] += 1
                complete += len(line)
            if file.seek(0, os.SEEK_END) > complete:
                file.truncate(complete)


def iter_failures(path: Path) -> Iterator[RowFailure]:
    """The failures of a `FailureLog` file, in file order (a last line torn by a crash is left out)."""
    with Path(path).open("rb") as file:
        for line in file:
            if line.endswith(b"\n"):
                yield RowFailure(**orjson.loads(line))


class WorkbookInBackground:
    """The failures workbook of a run's read failures, written in a thread while the chunks load (openpyxl takes
    seconds for tens of thousands of failures, and nothing else needs them until the end). `use(path, extra)`
    then moves it to `path` when no chunk added failures (`extra` empty) and returns its counts per reason;
    otherwise, or when the write failed, it returns None and the caller writes the workbook itself."""

    def __init__(self, path: Path, failures: Iterable[RowFailure], *, title: str):
        self._path = Path(path).with_name(f".{Path(path).stem}-read-failures.xlsx")
        self._counts: dict[str, int] | None = None
        self._thread = threading.Thread(target=self._write, args=(failures, title), name="failures-workbook",
                                        daemon=True)
        self._thread.start()

    def _write(self, failures: Iterable[RowFailure], title: str) -> None:
        try:
            self._counts = write_failures_workbook(self._path, failures, title=title)
        except Exception:  # noqa: BLE001 - the caller writes the workbook itself, and meets the error there
            self._counts = None

    def use(self, path: Path, extra: list[RowFailure]) -> dict[str, int] | None:
        self._thread.join()
        try:
            if self._counts is None or extra:
                return None
            os.replace(self._path, path)
            return self._counts
        except OSError:
            return None
        finally:
            self._path.unlink(missing_ok=True)
