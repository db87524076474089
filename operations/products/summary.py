"""What the process-products flow reports: each chunk's outcome, the run's totals, its log lines, the failures
table and the summary markdown, built as plain data from the chunks' reports (no Prefect, no service): the
flow only hands them to Prefect's `create_*_artifact` calls."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from operations.products.chunks import ChunkFile, SplitStats
from operations.products.outbox import PublishCounts
from operations.products.reader import RowFailure
from operations.products.store import RunFigures
from operations.products.report import WorkbookInBackground, iter_failures

READ_FAILURES = "read-failures.jsonl"  # rows that failed the checks while the file was read, in row order
_TOTALS = ("created", "updated", "unchanged", "published", "publish_deferred")


@dataclass
class ChunkReport:
    """What one chunk did, as the flow reports it."""

    index: int
    first_row: int
    last_row: int
    rows: int
    created: int
    updated: int
    unchanged: int
    published: int
    publish_deferred: int                  # committed messages left to the flow's final publish
    failures: list[RowFailure] = field(default_factory=list)
    publish_error: str = ""
    store_seconds: float = 0.0             # the chunk's transaction (compare, write, stage), all attempts
    publish_seconds: float = 0.0           # publishing its messages


@dataclass
class LoadResult:
    """What the chunk stage did."""

    stats: SplitStats
    reports: list[ChunkReport] = field(default_factory=list)
    failed_chunks: list[str] = field(default_factory=list)
    final_publish: PublishCounts = field(default_factory=PublishCounts)
    final_publish_error: str = ""
    cancelled: str = ""                    # why the run stopped early (the cancel), empty when it did not
    committed: RunFigures | None = None    # a cancelled run's changes as the database holds them
    chunks_not_loaded: int = 0             # chunks submitted but not loaded because of the cancel
    report_error: str = ""                 # why the failures spreadsheet could not be written
    same_as_run: str = ""                  # the earlier run of the same content this run's figures repeat
    read_failures_workbook: WorkbookInBackground | None = None  # the read failures' workbook, being written

    @property
    def messages_deferred(self) -> int:
        """Committed messages this run left in the outbox for the `publish-outbox` relay: those its chunks could
        not publish, when its final publish did not run (a cancel) or failed."""
        if self.committed is not None:
            return self.committed.unpublished
        if self.cancelled or self.final_publish_error:
            return sum(r.publish_deferred for r in self.reports)
        return 0


def read_line(stats: SplitStats, source: Path, rows_per_chunk: int) -> str:
    """The log line of the file's read."""
    return (
        f"read {stats.rows:,} rows of {source.name} in {stats.read_seconds:.1f} s: {stats.valid_rows:,} in "
        f"{stats.chunks} chunk(s) of up to {rows_per_chunk:,} rows, {stats.failed_rows:,} failed the checks"
    )


def chunk_line(report: ChunkReport) -> str:
    """The log line of a loaded chunk."""
    deferred = f", {report.publish_deferred} left to the final publish" if report.publish_deferred else ""
    return (
        f"rows {report.first_row}-{report.last_row}: {report.created} created, {report.updated} updated, "
        f"{report.unchanged} unchanged, {len(report.failures)} failed, {report.published} message(s) "
        f"published{deferred}"
    )


def failed_chunk(chunk: ChunkFile, error: BaseException) -> str:
    """How a chunk that was not loaded is named in the log, the summary and the run's failure."""
    return f"rows {chunk.first_row}-{chunk.last_row}: {type(error).__name__}: {error}"


def merged_failures(run_dir: Path, reports: list[ChunkReport]) -> Iterator[RowFailure]:
    """Every failure in row order: the checks' log (already in order) merged with the chunks' own."""
    from_chunks = sorted((f for r in reports for f in r.failures), key=lambda f: f.row_number)
    log = run_dir / READ_FAILURES
    return heapq.merge(iter_failures(log) if log.exists() else (), from_chunks, key=lambda f: f.row_number)


def run_summary(
    source: Path, run_key: str, result: LoadResult, by_reason: dict[str, int], failures_file: Path, elapsed: float
) -> dict:
    """The flow's return value: rows, successes, failures, unaccounted rows, offers and messages."""
    totals = {name: sum(getattr(r, name) for r in result.reports) for name in _TOTALS}
    final_published = result.final_publish.published + result.final_publish.already_in_stream
    if result.committed is not None:  # chunks may have committed without reporting before the run stopped
        totals.update(created=result.committed.created, updated=result.committed.updated,
                      published=result.committed.published)
        final_published = 0
    successes = totals["created"] + totals["updated"] + totals["unchanged"]
    failures = sum(by_reason.values())
    return {
        "run_key": run_key, "file": str(source), "rows": result.stats.rows, "successes": successes,
        "failures": failures, "unaccounted": result.stats.rows - successes - failures,
        **{k: totals[k] for k in ("created", "updated", "unchanged")},
        "messages_published": totals["published"] + final_published,
        "messages_deferred": result.messages_deferred,
        "chunks": result.stats.chunks, "chunks_loaded": len(result.reports),
        "failures_file": "" if result.report_error else str(failures_file), "failures_by_reason": by_reason,
        "read_seconds": round(result.stats.read_seconds, 2), "seconds": round(elapsed, 2),
        "store_seconds": round(sum(r.store_seconds for r in result.reports), 2),
        "publish_seconds": round(sum(r.publish_seconds for r in result.reports), 2),
        "cancelled": bool(result.cancelled), "same_as_run": result.same_as_run,
    }


def summary_line(summary: dict) -> str:
    """The run's one-line outcome."""
    return (
        f"{summary['rows']:,} rows processed - Successes: {summary['successes']:,}, "
        f"Failures: {summary['failures']:,}"
    )


def cancelled_message(source: Path, summary: dict, result: LoadResult) -> str:
    """What a cancelled run did before it stopped: the final state's message and the run's last log line."""
    return f"{source.name}: cancelled ({result.cancelled}) after " + _done_before_cancel(summary)


def _done_before_cancel(summary: dict) -> str:
    return (
        f"{summary['chunks_loaded']} chunk(s) reported of {summary['chunks']} cut from the {summary['rows']:,} "
        f"row(s) read: {summary['successes']:,} row(s) written ({summary['created']:,} created, {summary['updated']:,} "
        f"updated, {summary['unchanged']:,} unchanged), {summary['failures']:,} failed, "
        f"{summary['messages_published']:,} message(s) published, {summary['messages_deferred']:,} deferred to "
        "publish-outbox. A re-run with the same file completes it and changes nothing twice."
    )


def count_by_reason(failures: Iterable[RowFailure]) -> dict[str, int]:
    """Failed rows by reason (when the failures spreadsheet, which counts them too, could not be written)."""
    counts: dict[str, int] = {}
    for failure in failures:
        counts[failure.reason] = counts.get(failure.reason, 0) + 1
    return counts


def report_missing_message(source: Path, summary: dict, result: LoadResult) -> str:
    """The message of a run whose rows are all loaded and published but whose failures report could not be
    written."""
    return (
        f"{source.name}: every row is loaded ({summary['successes']:,} successes, {summary['failures']:,} failures) "
        f"and {summary['messages_published']:,} message(s) published, but the failures report could not be "
        f"written: {result.report_error}. Fix OUTPUT_DIR and re-run the same file: it changes nothing and writes "
        "the report."
    )


def reasons_table(by_reason: dict[str, int]) -> list[dict]:
    """Failed rows by reason, most frequent first (one `none` row when nothing failed)."""
    rows = [{"reason": reason, "rows": n} for reason, n in sorted(by_reason.items(), key=lambda kv: -kv[1])]
    return rows or [{"reason": "none", "rows": 0}]


def unfinished_message(source: Path, summary: dict, result: LoadResult) -> str | None:
    """Why the file was not fully processed (a chunk kept failing, rows unaccounted for), or None."""
    problems = [f"chunk not loaded: {error}" for error in result.failed_chunks]
    if summary["unaccounted"] and not result.failed_chunks:
        problems.append(f"{summary['unaccounted']:,} row(s) unaccounted for")
    if not problems:
        return None
    return (
        f"{source.name} was not fully processed ({summary['unaccounted']:,} of {summary['rows']:,} rows unaccounted "
        f"for; a re-run with the same file completes it): " + "; ".join(problems)
    )


def summary_markdown(
    source: Path, summary: dict, result: LoadResult, on_dask: bool, failures_link: str | None
) -> str:
    """The run's summary; the failures file is linked only when rows failed (`failures_link`)."""
    stats, unaccounted = result.stats, summary["unaccounted"]
    if result.cancelled:
        verdict = f"**Cancelled** ({result.cancelled}) after " + _done_before_cancel(summary)
    elif result.same_as_run:
        verdict = (f"The same content as run `{result.same_as_run}`, and no product, offer or dealer written since: "
                   "every row is as that run left it (its failures repeated), so the file was not read again.")
    elif not unaccounted:
        verdict = "Every row is accounted for: a success or a reported failure."
    else:
        verdict = f"**{unaccounted:,} row(s) unaccounted for**: {'; '.join(result.failed_chunks)}"
    deferred = summary["messages_deferred"]
    final_published = result.final_publish.published + result.final_publish.already_in_stream
    why = result.final_publish_error or "the run was cancelled"
    waiting_note = (f"; **{deferred:,} deferred** to the `publish-outbox` relay ({why})" if deferred else "")
    if result.report_error:
        failures = f"**The failures report could not be written**: {result.report_error}."
    elif summary["failures"] and failures_link:
        failures = (f"Failures: [{Path(summary['failures_file']).name}]({failures_link}); by reason in the "
                    "`products-failure-reasons` table.")
    else:
        failures = "No row failed."
    return f"""# Products file `{source.name}` (run `{summary['run_key']}`)

**{stats.rows:,} rows processed - Successes: {summary['successes']:,}, Failures: {summary['failures']:,}** in {summary['seconds']:.1f} s
({'Dask' if on_dask else 'in-process'}, {stats.chunks} chunk(s); reading and checking the file took
{stats.read_seconds:.1f} s of it).

{verdict}

| offers | rows |
|---|---|
| created | {summary['created']:,} |
| updated (changed price, stock, name or attributes) | {summary['updated']:,} |
| unchanged | {summary['unchanged']:,} |
| failed | {summary['failures']:,} |

Messages published to the stream: {summary['messages_published']:,} ({final_published:,} by the final publish, including any an
earlier run left){waiting_note}.

{failures}
"""
