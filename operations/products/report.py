"""Failed rows of a products file, for the operators and for the flow in between.

`FailureLog` keeps the failures of a run on disk as they come (a big file's failures never sit in memory);
`write_failures_workbook` turns them into the .xlsx the operators open: every failure with its row, column and
reason, and a count by reason.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import fields
from itertools import chain, islice, repeat
from pathlib import Path
from typing import BinaryIO

import openpyxl
import orjson

from operations.infra.tabular import (
    EXCEL_MAX_DATA_ROWS,
    add_counts_sheet,
    add_table_sheet,
    atomic_workbook_save,
    text_cell,
)
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
    """
    if not 1 <= rows_per_sheet <= EXCEL_MAX_DATA_ROWS:
        raise ValueError(f"rows_per_sheet must be 1..{EXCEL_MAX_DATA_ROWS:,}, not {rows_per_sheet}")
    path = Path(path)
    workbook = openpyxl.Workbook(write_only=True)
    counts: Counter[str] = Counter()
    sheet, rows_in_sheet = add_table_sheet(workbook, FAILURE_SHEET, FAILURE_COLUMNS, _COLUMN_WIDTHS), 0
    for failure in failures:
        if rows_in_sheet == rows_per_sheet:
            sheet = add_table_sheet(
                workbook, f"{FAILURE_SHEET} {len(workbook.worksheets) + 1}", FAILURE_COLUMNS, _COLUMN_WIDTHS
            )
            rows_in_sheet = 0
        texts = (failure.dealer_code, failure.sku, failure.column, failure.reason, failure.detail)
        sheet.append([failure.row_number, *(text_cell(sheet, text) if text else None for text in texts)])
        rows_in_sheet += 1
        counts[failure.reason] += 1
    by_count = dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
    add_counts_sheet(workbook, REASONS_SHEET, title, list(by_count.items()), "failed rows", ("Reason", "Rows"))
    atomic_workbook_save(workbook, path)
    return by_count


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
