"""Flow `process-products`: a dealers' products file (.xlsx or .csv) loaded into the project database in
parallel chunks, every row a success or a reported failure, one message per staged change published to a
Redis stream exactly once.

Stages: check the request (the file, the database, the queue, the dealers and the connection budget fail
here); read the file once (a bad header fails the run as it is opened, before any row is written; an .xlsx
is opened only once, since openpyxl may scan a whole sheet to open it), cutting it into chunk files that are
mapped to chunk tasks as soon as each is complete (Dask process workers for large files, the flow's thread
pool for small ones); publish whatever the chunks left in the outbox; then write the failures spreadsheet
and the artifacts. The run ends Completed when every row is accounted for, even with failures, and Failed
only when the file could not be processed (a chunk that kept failing leaves its rows unaccounted).
"""

from __future__ import annotations

import heapq
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import as_completed
from prefect.runtime import flow_run
from pydantic import Field
from typing_extensions import Annotated

from blocks.products_queue import ProductsQueue
from flows.forms import form_field
from flows.task_runners import (
    LocalClusterInBackground,
    check_scheduler_reachable,
    cluster_shape,
    dask_task_runner,
    in_process_task_runner,
)
from operations.infra.database import project_engine
from operations.infra.links import output_link
from operations.products.chunks import FileSplitter, SplitStats, estimate_rows
from operations.products.outbox import PublishCounts
from operations.products.report import FailureLog, iter_failures, write_failures_workbook
from operations.products.store import dealer_ids
from operations.settings import Settings, get_settings
from tasks.products import ChunkReport, load_products_chunk, publish_pending_messages

PRODUCTS_FILE_PATTERN = r"^.+\.([xX][lL][sS][xX]|[cC][sS][vV])$"  # the UI and the API check it (JavaScript regex)
READ_FAILURES = "read-failures.jsonl"  # rows that failed the checks while the file was read, in row order
CHUNKS_PER_SLOT = 4  # chunks per task slot: enough to balance the workers, few enough to keep overhead low


class ConnectionBudgetTooSmall(ValueError):
    """DATABASE_POOL_SIZE cannot give the flow and every chunk process a connection."""


@dataclass
class LoadResult:
    """What the chunk stage did."""

    stats: SplitStats
    reports: list[ChunkReport] = field(default_factory=list)
    failed_chunks: list[str] = field(default_factory=list)
    final_publish: PublishCounts = field(default_factory=PublishCounts)
    final_publish_error: str = ""


def chunk_size(estimated_rows: int, slots: int, settings: Settings) -> int:
    """Rows per chunk: CHUNKS_PER_SLOT chunks per task slot, within the settings' bounds."""
    wanted = math.ceil(max(1, estimated_rows) / (max(1, slots) * CHUNKS_PER_SLOT))
    return max(settings.products_min_chunk_rows, min(settings.products_max_chunk_rows, wanted))


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


@flow(name="load-products", log_prints=False)
def load_products(
    source: Path,
    run_dir: Path,
    dealers: dict[str, int],
    rows_per_chunk: int,
    database_url: str,
    pool_size: int,
    run_key: str,
    queue: ProductsQueue,
    estimated_rows: int,
) -> LoadResult:
    """Read the file once, mapping each chunk file to a chunk task as soon as it is written; wait for every
    chunk; publish what they left in the outbox."""
    logger = get_run_logger()
    progress_id = create_progress_artifact(
        progress=0.0, key="products-progress", description=f"Rows of {source.name} accounted for (run {run_key})"
    )
    futures, chunk_of = [], {}
    (run_dir / READ_FAILURES).unlink(missing_ok=True)  # a re-run with the same run key starts its log afresh
    with FailureLog(run_dir / READ_FAILURES) as failures, \
            FileSplitter(source, run_dir / "chunks", dealers, rows_per_chunk, failures) as splitter:
        for chunk in splitter.chunks():
            future = load_products_chunk.submit(chunk, database_url, pool_size, run_key, queue)
            futures.append(future)
            chunk_of[id(future)] = chunk
        stats = splitter.stats
    logger.info(
        "read %s rows of %s in %.1f s: %s in %d chunk(s) of up to %s rows, %s failed the checks",
        f"{stats.rows:,}", source.name, stats.read_seconds, f"{stats.valid_rows:,}", stats.chunks,
        f"{rows_per_chunk:,}", f"{stats.failed_rows:,}",
    )
    result = LoadResult(stats)
    accounted = stats.failed_rows
    total = max(1, stats.rows)
    update_progress_artifact(progress_id, 100.0 * accounted / total)
    for future in as_completed(futures):
        report = future.result(raise_on_failure=False)  # the exception itself when the chunk failed
        if isinstance(report, ChunkReport):
            result.reports.append(report)
            accounted += report.rows
            update_progress_artifact(progress_id, 100.0 * accounted / total)
            logger.info(
                "rows %d-%d: %d created, %d updated, %d unchanged, %d failed, %d message(s) published%s",
                report.first_row, report.last_row, report.created, report.updated, report.unchanged,
                len(report.failures), report.published,
                f", {report.publish_deferred} left to the final publish" if report.publish_deferred else "",
            )
        else:
            chunk = chunk_of[id(future)]
            result.failed_chunks.append(f"rows {chunk.first_row}-{chunk.last_row}: {type(report).__name__}: {report}")
            logger.error("a chunk was not loaded: %s", result.failed_chunks[-1])
    final = publish_pending_messages.submit(database_url, queue).result(raise_on_failure=False)
    if isinstance(final, PublishCounts):
        result.final_publish = final
    else:
        result.final_publish_error = f"{type(final).__name__}: {final}"
    return result


@flow(name="process-products", log_prints=False)
def process_products(
    file_path: Annotated[str, Field(min_length=1, max_length=4096, pattern=PRODUCTS_FILE_PATTERN)] = form_field(
        ..., "Products file",
        "Path of the .xlsx or .csv file on the machine that runs the flow (a shared folder on several machines). "
        "Header row: dealer code, SKU, name, price, stock; other columns are kept as attributes.",
    ),
    run_key: Annotated[str, Field(max_length=80, pattern=r"^[A-Za-z0-9_.-]*$")] = form_field(
        "", "Run key", "Names the run's output folder and is recorded on every row it writes. Empty: the flow run id."
    ),
    chunk_rows: Annotated[int, Field(ge=0, le=1_000_000)] = form_field(
        0, "Rows per chunk",
        "Rows of one chunk task (one transaction). 0: about four chunks per worker, between "
        "PRODUCTS_MIN_CHUNK_ROWS and PRODUCTS_MAX_CHUNK_ROWS.",
    ),
    queue_block: Annotated[str, Field(max_length=120)] = form_field(
        "", "Queue block",
        "Name of the ProductsQueue block (the Redis stream). Empty: PRODUCTS_QUEUE_BLOCK (products-queue), "
        "created on first use.",
    ),
) -> dict:
    """Load a dealers' products file into the project database and publish one message per change."""
    started = time.perf_counter()
    logger = get_run_logger()
    settings = get_settings()
    source = Path(file_path).expanduser()
    if not source.is_file():
        raise FileNotFoundError(f"products file {source} does not exist (or is not a file) on this machine")
    database_url, engine = project_engine(settings)
    queue = ProductsQueue.load_or_create_default(
        queue_block or settings.products_queue_block, settings.products_queue_block, settings
    )
    queue.ping()
    dealers = dealer_ids(engine)
    if not dealers:
        raise ValueError("no dealers in the database: load them first (python -m deployments.dealers load FILE)")
    run_key = run_key or str(flow_run.get_id() or "local")
    estimated = estimate_rows(source)
    on_dask = estimated >= settings.products_in_process_max_rows
    if on_dask and settings.dask_scheduler_address:
        check_scheduler_reachable(settings.dask_scheduler_address, settings.dask_connect_timeout_seconds)
    processes, slots = cluster_shape(settings) if on_dask else (1, settings.dask_n_workers)
    pool_size = chunk_pool_size(settings.database_pool_size, processes)
    rows_per_chunk = chunk_rows or chunk_size(estimated, slots, settings)
    run_dir = settings.output_dir / "products" / run_key
    logger.info(
        "run %s: %s (~%s rows), %d dealer(s), chunks of %s rows on %s, %d connection(s) per chunk process",
        run_key, source, f"{estimated:,}", len(dealers), f"{rows_per_chunk:,}",
        f"Dask ({processes} process(es), {slots} slot(s))" if on_dask else "the flow's thread pool", pool_size,
    )
    local_cluster = LocalClusterInBackground(settings) if on_dask and not settings.dask_scheduler_address else None
    try:
        if local_cluster is not None:
            runner = local_cluster.task_runner()
        else:
            runner = dask_task_runner(settings) if on_dask else in_process_task_runner(settings)
        result = load_products.with_options(task_runner=runner)(
            source, run_dir, dealers, rows_per_chunk, database_url, pool_size, run_key, queue, estimated
        )
    finally:
        if local_cluster is not None:
            local_cluster.close()
        shutil.rmtree(run_dir / "chunks", ignore_errors=True)
    summary = _report(source, run_dir, run_key, result, on_dask, time.perf_counter() - started)
    logger.info(
        "%s rows processed - Successes: %s, Failures: %s", f"{summary['rows']:,}", f"{summary['successes']:,}",
        f"{summary['failures']:,}",
    )
    problems = [f"chunk not loaded: {error}" for error in result.failed_chunks]
    if summary["unaccounted"] and not result.failed_chunks:
        problems.append(f"{summary['unaccounted']:,} row(s) unaccounted for")
    if problems:
        raise RuntimeError(
            f"{source.name} was not fully processed ({summary['unaccounted']:,} of {summary['rows']:,} rows "
            f"unaccounted for; a re-run with the same file completes it): " + "; ".join(problems)
        )
    if result.final_publish_error:
        logger.warning(
            "%d message(s) wait in the outbox (the stream could not be reached: %s); the next run publishes them",
            summary["messages_waiting"], result.final_publish_error,
        )
    return summary


def _failures(run_dir: Path, reports: list[ChunkReport]):
    """Every failure in row order: the checks' log (already in order) merged with the chunks' own."""
    from_chunks = sorted((f for r in reports for f in r.failures), key=lambda f: f.row_number)
    log = run_dir / READ_FAILURES
    return heapq.merge(iter_failures(log) if log.exists() else (), from_chunks, key=lambda f: f.row_number)


def _report(source: Path, run_dir: Path, run_key: str, result: LoadResult, on_dask: bool, elapsed: float) -> dict:
    reports, stats = result.reports, result.stats
    workbook = run_dir / f"{source.stem}-failures.xlsx"
    by_reason = write_failures_workbook(
        workbook, _failures(run_dir, reports), title=f"Failures of {source.name} (run {run_key})"
    )
    totals = {name: sum(getattr(r, name) for r in reports)
              for name in ("created", "updated", "unchanged", "published", "publish_deferred")}
    successes = totals["created"] + totals["updated"] + totals["unchanged"]
    failures = sum(by_reason.values())
    final_published = result.final_publish.published + result.final_publish.already_in_stream
    published = totals["published"] + final_published
    waiting = 0 if not result.final_publish_error else totals["publish_deferred"]
    waiting_note = f"; **{waiting:,} wait in the outbox**: {result.final_publish_error}" if waiting else ""
    create_link_artifact(
        key="products-failures",
        link=output_link(workbook),
        link_text=workbook.name,
        description=f"{failures:,} failed row(s) of {source.name} (row, dealer, SKU, column, reason)",
    )
    create_table_artifact(
        key="products-failure-reasons",
        table=[{"reason": reason, "rows": n} for reason, n in sorted(by_reason.items(), key=lambda kv: -kv[1])]
        or [{"reason": "none", "rows": 0}],
        description=f"Failed rows of {source.name} by reason",
    )
    unaccounted = stats.rows - successes - failures
    verdict = (
        "Every row is accounted for: a success or a reported failure." if not unaccounted
        else f"**{unaccounted:,} row(s) unaccounted for**: {'; '.join(result.failed_chunks)}"
    )
    create_markdown_artifact(
        key="products-summary",
        markdown=f"""# Products file `{source.name}` (run `{run_key}`)

**{stats.rows:,} rows processed - Successes: {successes:,}, Failures: {failures:,}** in {elapsed:.1f} s
({'Dask' if on_dask else 'in-process'}, {stats.chunks} chunk(s); reading and checking the file took
{stats.read_seconds:.1f} s of it).

{verdict}

| offers | rows |
|---|---|
| created | {totals['created']:,} |
| updated (changed price, stock, name or attributes) | {totals['updated']:,} |
| unchanged | {totals['unchanged']:,} |
| failed | {failures:,} |

Messages published to the stream: {published:,} ({final_published:,} by the final publish, including any an
earlier run left){waiting_note}.

Failures: [{workbook.name}]({output_link(workbook)}); by reason in the `products-failure-reasons` table.
""",
        description=f"Summary of {source.name}",
    )
    return {
        "run_key": run_key, "file": str(source), "rows": stats.rows, "successes": successes, "failures": failures,
        "unaccounted": unaccounted, **{k: totals[k] for k in ("created", "updated", "unchanged")},
        "messages_published": published, "messages_waiting": waiting, "chunks": stats.chunks,
        "failures_file": str(workbook), "failures_by_reason": by_reason, "read_seconds": round(stats.read_seconds, 2),
        "seconds": round(elapsed, 2),
    }
