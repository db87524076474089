"""Cutting a products file into chunk files while it streams, checking what needs the whole file.

The file is read once, row by row. Rows that fail a cell check (reader.py), name an unknown dealer or repeat a
dealer's SKU already seen in the file (the first occurrence wins) go to the failure log; the others are
written, with their dealer's id and fingerprint, to numbered chunk files of `chunk_rows` rows in the text
format of the database's COPY (replaced atomically), which a chunk task sends as it is. Each chunk file is
handed out as soon as it is complete, so the database work starts while the rest of the file is still being
read, and no more than one chunk of rows is ever in memory (plus one small key per row to find repeats).
"""

from __future__ import annotations

import math
import os
import re
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from python_calamine import CalamineError, CalamineWorkbook

from operations.cancellation import StopCheck, never, raise_if_stopped
from operations.errors import UserError
from operations.products.reader import ProductRow, Reason, RowFailure, open_product_rows
from operations.products.report import FailureLog
from operations.products.store import CopyRows, copy_line

_XLSX_SAMPLE_BYTES = 256 * 1024
CHUNKS_PER_SLOT = 4  # chunks per task slot: enough to balance the workers, few enough to keep overhead low


class ProductsFileMissing(UserError, FileNotFoundError):
    """The products file named by the run is not a file on the machine that runs the flow."""


class ConnectionBudgetTooSmall(UserError, ValueError):
    """DATABASE_POOL_SIZE cannot give the flow and every chunk process a connection."""


def products_file(path: str) -> Path:
    """The products file at `path` (`~` expanded); raises ProductsFileMissing when it is not a file here."""
    source = Path(path).expanduser()
    if not source.is_file():
        raise ProductsFileMissing(f"products file {source} does not exist (or is not a file) on this machine")
    return source


def chunk_size(estimated_rows: int, slots: int, min_rows: int, max_rows: int) -> int:
    """Rows per chunk: CHUNKS_PER_SLOT chunks per task slot, within `min_rows`..`max_rows`."""
    wanted = math.ceil(max(1, estimated_rows) / (max(1, slots) * CHUNKS_PER_SLOT))
    return max(min_rows, min(max_rows, wanted))


def chunk_pool_size(pool_size: int, processes: int) -> int:
    """Connections of each chunk process's pool, so that they and the flow's one connection stay within
    DATABASE_POOL_SIZE together; raises ConnectionBudgetTooSmall when they cannot."""
    per_process = (pool_size - 1) // processes
    if per_process < 1:
        raise ConnectionBudgetTooSmall(
            f"DATABASE_POOL_SIZE={pool_size} cannot hold the flow's connection and one per chunk process "
            f"({processes}): set it to at least {processes + 1}, or use fewer Dask workers (DASK_N_WORKERS)"
        )
    return per_process


@dataclass(frozen=True, slots=True)
class ChunkFile:
    index: int
    path: Path
    rows: int
    first_row: int
    last_row: int


@dataclass
class SplitStats:
    """What the read of the file found; complete once `FileSplitter.chunks()` is exhausted."""

    rows: int = 0                 # data rows read (empty rows skipped)
    valid_rows: int = 0           # rows written to chunk files
    failed_rows: int = 0          # rows in the failure log
    chunks: int = 0
    read_seconds: float = 0.0     # reading, checking and writing chunk files, without the waits of the consumer
    extra_columns: list[str] = field(default_factory=list)


def estimate_rows(path: Path) -> int:
    """Data rows of the file, cheaply (it picks the task runner and the chunk size, nothing else), without
    loading the workbook: for .xlsx the sheet's recorded dimension, or the size of its XML over the size of its
    first rows; for .ods the same ratio; for .xls (65,536 rows at most) the sheet's height; for .csv the line
    count. A workbook that cannot be read counts 0 rows: the reader then says what is wrong with it."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".xls":
            with CalamineWorkbook.from_path(str(path)) as workbook:
                return max(0, workbook.get_sheet_by_index(0).height - 1)
        if suffix in (".xlsx", ".ods"):
            return _estimate_zipped_rows(path, suffix)
    except (CalamineError, zipfile.BadZipFile, KeyError):
        return 0
    with path.open("rb") as handle:
        return max(0, sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 20), b"")) - 1)


def _estimate_zipped_rows(path: Path, suffix: str) -> int:
    with zipfile.ZipFile(path) as archive:
        if suffix == ".ods":
            sheets, row_tag = [archive.getinfo("content.xml")], b"<table:table-row"
        else:
            sheets, row_tag = [info for info in archive.infolist() if info.filename.startswith("xl/worksheets/")
                               and info.filename.endswith(".xml")], b"<row "
        if not sheets:
            return 0
        sheet = max(sheets, key=lambda info: info.file_size)
        with archive.open(sheet) as handle:
            head = handle.read(_XLSX_SAMPLE_BYTES)
    dimension = re.search(rb'<dimension ref="[A-Z]+\d+:[A-Z]+(\d+)"', head) if suffix == ".xlsx" else None
    if dimension:
        return max(0, int(dimension.group(1)) - 1)
    rows = head.count(row_tag)
    return max(0, round(rows * sheet.file_size / max(1, len(head))) - 1)


def read_chunk(path: Path) -> CopyRows:
    """The rows of a chunk file, as the COPY lines the file holds."""
    data = path.read_bytes()
    return CopyRows(data, data.count(b"\n"))


class FileSplitter:
    """`with FileSplitter(...) as splitter:` opens the file and checks its header (HeaderError names the
    column); `splitter.chunks()` then yields the chunk files as they are written.

    Given `expected_rows` (the file's estimated rows) and the `slots` that load the chunks, the rows read past
    `expected_rows - slots x chunk_rows` are cut into chunks of half the size: the last chunks then finish
    together on every slot rather than one of them running alone at the end of the run."""

    def __init__(self, source: Path, chunk_dir: Path, dealers: dict[str, int], chunk_rows: int,
                 failures: FailureLog, *, expected_rows: int = 0, slots: int = 1):
        if chunk_rows < 1:
            raise ValueError("chunk_rows must be at least 1")
        self.source = source
        self.chunk_dir = chunk_dir
        self.dealers = dealers
        self.chunk_rows = chunk_rows
        self.failures = failures
        self._tail_from = expected_rows - max(1, slots) * chunk_rows if expected_rows > 0 else None
        self.stats = SplitStats()
        self._context = None
        self._rows: Iterator[ProductRow | RowFailure] | None = None

    def __enter__(self) -> FileSplitter:
        started = time.perf_counter()
        self._context = open_product_rows(self.source)
        header, self._rows = self._context.__enter__()
        self.stats.extra_columns = list(header.extras)
        self.stats.read_seconds += time.perf_counter() - started
        return self

    def __exit__(self, *exc_info) -> None:
        if self._context is not None:
            self._context.__exit__(*exc_info)

    def chunks(self, should_stop: StopCheck = never) -> Iterator[ChunkFile]:
        """The chunk files, each yielded once written; raises `Cancelled` before cutting the next one once
        `should_stop()` (the rows read so far are counted in `stats`)."""
        self.chunk_dir.mkdir(parents=True, exist_ok=True)
        stats, seen = self.stats, {}
        lines: list[bytes] = []
        first_row = last_row = 0
        cut_at = self._cut_size()
        started = time.perf_counter()
        for item in self._rows:
            stats.rows += 1
            failure = item if isinstance(item, RowFailure) else self._cross_row_failure(item, seen)
            if failure is not None:
                stats.failed_rows += 1
                self.failures.add(failure)
                continue
            if not lines:
                first_row = item.row_number
            lines.append(copy_line(len(lines), self.dealers[item.dealer_code], item))
            last_row = item.row_number
            if len(lines) == cut_at:
                raise_if_stopped(should_stop, f"the chunk of rows {first_row}-{last_row}")
                chunk = self._write_chunk(lines, first_row, last_row)
                lines, cut_at = [], self._cut_size()
                stats.read_seconds += time.perf_counter() - started
                yield chunk
                started = time.perf_counter()
        if lines:
            raise_if_stopped(should_stop, f"the chunk of rows {first_row}-{last_row}")
            chunk = self._write_chunk(lines, first_row, last_row)
            stats.read_seconds += time.perf_counter() - started
            yield chunk
        else:
            stats.read_seconds += time.perf_counter() - started

    def _cut_size(self) -> int:
        """Rows of the next chunk: half a chunk once the rows read reach the tail of the expected rows."""
        if self._tail_from is not None and self.stats.rows >= self._tail_from:
            return max(1, math.ceil(self.chunk_rows / 2))
        return self.chunk_rows

    def _cross_row_failure(self, row: ProductRow, seen: dict[tuple[str, str], int]) -> RowFailure | None:
        if row.dealer_code not in self.dealers:
            return RowFailure(row.row_number, row.dealer_code, row.sku, "dealer_code", Reason.UNKNOWN_DEALER,
                              f"no dealer with code {row.dealer_code!r}")
        first = seen.setdefault((row.dealer_code, row.sku), row.row_number)
        if first != row.row_number:
            return RowFailure(row.row_number, row.dealer_code, row.sku, "sku", Reason.REPEATED_SKU,
                              f"first at row {first}")
        return None

    def _write_chunk(self, lines: list[bytes], first_row: int, last_row: int) -> ChunkFile:
        index = self.stats.chunks
        path = self.chunk_dir / f"chunk-{index:05d}.copy"
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(b"".join(lines))
        os.replace(temporary, path)
        self.stats.chunks += 1
        self.stats.valid_rows += len(lines)
        return ChunkFile(index, path, len(lines), first_row, last_row)
