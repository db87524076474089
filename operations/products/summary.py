"""What the process-products flow reports: each chunk's outcome, the run's totals, its log lines, the failures
table and the summary markdown, built as plain data from the chunks' reports (no Prefect, no service): the
flow only hands them to Prefect's `create_*_artifact` calls."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from operations.products.chunks import ChunkFile, SplitStats
from operations.products.outbox import PublishCounts
from operations.products.reader import RowFailure
from operations.products.report import iter_failures

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


@dataclass
class LoadResult:
    """What the chunk stage did."""

    stats: SplitStats
    reports: list[ChunkReport] = field(default_factory=list)
    failed_chunks: list[str] = field(default_factory=list)
    final_publish: PublishCounts = field(default_factory=PublishCounts)
    final_publish_error: str = ""


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
    successes = totals["created"] + totals["updated"] + totals["unchanged"]
    failures = sum(by_reason.values())
    final_published = result.final_publish.published + result.final_publish.already_in_stream
    return {
        "run_key": run_key, "file": str(source), "rows": result.stats.rows, "successes": successes,
        "failures": failures, "unaccounted": result.stats.rows - successes - failures,
        **{k: totals[k] for k in ("created", "updated", "unchanged")},
        "messages_published": totals["published"] + final_published,
        "messages_waiting": totals["publish_deferred"] if result.final_publish_error else 0,
        "chunks": result.stats.chunks, "failures_file": str(failures_file), "failures_by_reason": by_reason,
        "read_seconds": round(result.stats.read_seconds, 2), "seconds": round(elapsed, 2),
    }


def summary_line(summary: dict) -> str:
    """The run's one-line outcome."""
    return (
        f"{summary['rows']:,} rows processed - Successes: {summary['successes']:,}, "
        f"Failures: {summary['failures']:,}"
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
    verdict = (
        "Every row is accounted for: a success or a reported failure." if not unaccounted
        else f"**{unaccounted:,} row(s) unaccounted for**: {'; '.join(result.failed_chunks)}"
    )
    waiting = summary["messages_waiting"]
    final_published = result.final_publish.published + result.final_publish.already_in_stream
    waiting_note = f"; **{waiting:,} wait in the outbox**: {result.final_publish_error}" if waiting else ""
    failures = (
        f"Failures: [{Path(summary['failures_file']).name}]({failures_link}); by reason in the "
        "`products-failure-reasons` table." if summary["failures"] and failures_link else "No row failed."
    )
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
