"""Flow `process-products`: a dealers' products file (.xlsx, .xls, .ods or .csv) loaded into the project
database in parallel chunks, every row a success or a reported failure, one message per staged change published
to a Redis stream exactly once.

Stages: check the request (the file, the database, the queue, the dealers and the connection budget fail here);
read the file once (a bad header fails the run as it is opened, before any row is written), cutting it into chunk
files that are mapped to chunk tasks as soon as each is complete (Dask process workers for large files, the flow's
thread pool for small ones; either runs them inside this flow run); publish whatever the chunks left in the outbox;
then write the failures spreadsheet and the artifacts (the failures linked only when rows failed). The run ends
Completed when every row is accounted for, even with failures, and Failed only when the file could not be processed
(a chunk that kept failing leaves its rows unaccounted); an expected user error (a missing file, a bad header, no
dealers) ends it Failed with one line, no traceback. A file fully loaded and published whose failures spreadsheet
cannot be written ends Failed with a message saying the rows are loaded and published.

Cancel: the run checks its state (tasks/cancellation.py) between chunks, while waiting for them and before the
final publish; once it is being cancelled (or got SIGTERM, which it only notes rather than letting Prefect
raise it at an arbitrary line) it cuts and starts no further chunk, lets the chunks
under way finish their transaction (CANCEL_GRACE_SECONDS), cancels the rest (on Dask: their futures, then the
cluster is closed) and skips the final publish: what the committed chunks could not publish is deferred to the
`publish-outbox` relay. It writes its summary (chunks loaded, rows, messages published and deferred) and ends
Cancelled with the same words; when the worker is the one that cancelled it, the worker's Cancelled stands.
"""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.context import SyncClientContext
from prefect.exceptions import Abort, TerminationSignal
from prefect.futures import PrefectFuture, wait
from prefect.runtime import flow_run
from prefect.states import Cancelled, Failed, State
from prefect.task_runners import TaskRunner
from pydantic import Field
from typing_extensions import Annotated

from blocks.products_queue import ProductsQueue
from flows.forms import form_field
from flows.outcomes import ends_failed_on_user_error
from flows.task_runners import (
    cancel_not_started,
    cancel_pending,
    LocalClusterInBackground,
    check_scheduler_reachable,
    cluster_shape,
    dask_task_runner,
    in_process_task_runner,
)
from operations.cancellation import Cancelled as OperationCancelled
from operations.cancellation import StopCheck, raise_if_stopped
from operations.infra.database import get_engine, project_engine
from operations.infra.heap import settled_heap
from operations.infra.links import output_base_url, output_link
from operations.infra.tabular import READ_FILE_PATTERN
from operations.products.chunks import (
    ChunkFile,
    FileSplitter,
    SplitStats,
    chunk_pool_size,
    chunk_size,
    estimate_rows,
    products_file,
)
from operations.products.loaded import (
    LoadedFile,
    copy_failures,
    database_now,
    failures_of,
    file_digest,
    record_path,
    save_record,
    unchanged_since,
)
from operations.products.outbox import PublishCounts
from operations.products.report import FailureLog, WorkbookInBackground, write_failures_workbook
from operations.products.store import RunFigures, known_dealers, run_figures
from operations.products.summary import (
    READ_FAILURES,
    ChunkReport,
    LoadResult,
    cancelled_message,
    chunk_line,
    count_by_reason,
    failed_chunk,
    merged_failures,
    read_line,
    reasons_table,
    report_missing_message,
    run_summary,
    summary_line,
    summary_markdown,
    unfinished_message,
)
from operations.settings import Settings, get_settings
from tasks.cancellation import run_stop_check, watch_termination
from tasks.products import load_products_chunk, publish_pending_messages
from tasks.retries import with_retries

PRODUCTS_FILE_PATTERN = READ_FILE_PATTERN  # .xlsx, .xls, .ods or .csv: the UI and the API check it
ProductsFilePath = Annotated[str, Field(min_length=1, max_length=4096, pattern=PRODUCTS_FILE_PATTERN)]
RunKey = Annotated[str, Field(max_length=80, pattern=r"^[A-Za-z0-9_.-]*$")]
ChunkRows = Annotated[int, Field(ge=0, le=1_000_000)]
BlockName = Annotated[str, Field(max_length=120)]
CANCEL_GRACE_SECONDS = 5  # a cancelled run waits this long for the chunks under way to finish their transaction
_FILE_PATH = form_field(
    ..., "Products file",
    "Path of the .xlsx, .xls, .ods or .csv file on the machine that runs the flow (a shared folder on several "
    "machines). Header row: dealer code, SKU, name, price, stock; other columns are kept as attributes.",
)
_RUN_KEY = form_field(
    "", "Run key", "Names the run's output folder and is recorded on every row it writes. Empty: the flow run id."
)
_CHUNK_ROWS = form_field(
    0, "Rows per chunk",
    "Rows of one chunk task (one transaction). 0: about four chunks per worker, between "
    "PRODUCTS_MIN_CHUNK_ROWS and PRODUCTS_MAX_CHUNK_ROWS.",
)
_QUEUE_BLOCK = form_field(
    "", "Queue block",
    "Name of the ProductsQueue block (the Redis stream). Empty: PRODUCTS_QUEUE_BLOCK (products-queue), "
    "created on first use.",
)


@flow(name="process-products", log_prints=False)
@ends_failed_on_user_error
async def process_products(
    file_path: ProductsFilePath = _FILE_PATH,
    run_key: RunKey = _RUN_KEY,
    chunk_rows: ChunkRows = _CHUNK_ROWS,
    queue_block: BlockName = _QUEUE_BLOCK,
) -> dict:
    """Load a dealers' products file into the project database and publish one message per change. `async def`
    for Prefect's async engine, which ends a run without waiting out its heartbeat thread's one-second sleep; the
    calls stay blocking and share one sync API client, as the sync engine's do."""
    watch_termination(forward=False)  # a SIGTERM stops the loops at their next check, with the run's report
    with SyncClientContext.get_or_create():
        return _process(file_path, run_key, chunk_rows, queue_block)


def _process(file_path: str, run_key: str, chunk_rows: int, queue_block: str) -> dict | State:
    """The run: check the request, load the file (or find it loaded already), publish, report."""
    started, logger, settings = time.perf_counter(), get_run_logger(), get_settings()
    output_base_url(settings)  # where a failures link will point: a missing OUTPUT_BASE_URL fails before any row
    source = products_file(file_path)
    database_url, engine = project_engine(settings)
    queue = _queue(queue_block, settings)
    dealers = known_dealers(engine)
    run_key = run_key or str(flow_run.get_id() or "local")
    load = _plan_load(source, database_url, dealers, run_key, queue, chunk_rows, settings)
    result = _unchanged_since_loaded(load, engine) or _load_chunks(load, settings)
    if result.cancelled:
        result.committed = _committed(engine, run_key)
    summary = _publish_report(load, result, time.perf_counter() - started)
    if result.cancelled:
        message = cancelled_message(source, summary, result)
        logger.warning("%s", message)
        return Cancelled(message=message)
    logger.info("%s", summary_line(summary))
    unfinished = unfinished_message(source, summary, result)
    if unfinished:
        raise RuntimeError(unfinished)
    if result.final_publish_error:
        logger.warning(
            "%d message(s) deferred to the publish-outbox relay (the stream could not be reached: %s)",
            summary["messages_deferred"], result.final_publish_error,
        )
    if result.report_error:
        message = report_missing_message(source, summary, result)
        logger.error("%s", message)
        return Failed(message=message)
    _remember_loaded(load, result, engine)
    return summary


def _load_chunks(load: _Load, settings: Settings) -> LoadResult:
    """Read the file into chunks loaded on the chosen runner; the chunk files are removed whatever happens."""
    try:
        with _chunk_task_runner(settings, load.on_dask) as runner, settled_heap():  # no collector pass over it all
            return _load(runner, load, with_retries(load_products_chunk, settings.products.task_retries),
                         run_stop_check())
    finally:
        shutil.rmtree(load.run_dir / "chunks", ignore_errors=True)


def _unchanged_since_loaded(load: _Load, engine) -> LoadResult | None:
    """The figures of the earlier complete run of the same content, when no product, offer or dealer was
    written since (operations/products/loaded.py): loading the file again would change nothing. None
    otherwise, and the file is loaded."""
    earlier = unchanged_since(load.record, engine, load.dealers)
    if earlier is None or not copy_failures(earlier, load.run_dir.parent / earlier.run_key, load.run_dir,
                                            READ_FAILURES, _failures_workbook(load).name):
        return None
    get_run_logger().info("%s: the same content as run %s, and the catalog unchanged since: not read again",
                          load.source, earlier.run_key)
    stats = SplitStats(rows=earlier.rows, valid_rows=earlier.valid_rows, failed_rows=earlier.failed_rows,
                       extra_columns=list(earlier.extra_columns))
    refused = failures_of(earlier)
    report = ChunkReport(index=0, first_row=0, last_row=0, rows=earlier.valid_rows, created=0, updated=0,
                         unchanged=earlier.valid_rows - len(refused), published=0, publish_deferred=0,
                         failures=refused)
    return LoadResult(stats, reports=[report], same_as_run=earlier.run_key)


def _remember_loaded(load: _Load, result: LoadResult, engine) -> None:
    """After a run that accounted for every row and published every message: the record that lets a run of
    the same content skip the load while the catalog stays as this run left it."""
    if result.same_as_run or result.messages_deferred:
        return
    refused = [[f.row_number, f.dealer_code, f.sku, f.column, f.reason, f.detail]
               for report in result.reports for f in report.failures]
    stats = result.stats
    loaded = LoadedFile(run_key=load.run_key, marks=[], rows=stats.rows, valid_rows=stats.valid_rows,
                        failed_rows=stats.failed_rows, chunks=stats.chunks, extra_columns=list(stats.extra_columns),
                        database_failures=refused, failures_file=_failures_workbook(load).name)
    try:
        save_record(load.record, engine, load.dealers, loaded, load.started_at)
    except Exception as exc:  # noqa: BLE001 - the run is done; without a record the next run loads the file
        get_run_logger().warning("could not record %s as loaded: %s", load.source, exc)


def _committed(engine, run_key: str) -> RunFigures | None:
    """A cancelled run's changes as the database holds them (chunks may have committed without reporting
    before the run stopped), or None when the database cannot say: the chunks' reports are used instead."""
    try:
        return run_figures(engine, run_key)
    except Exception as exc:  # noqa: BLE001 - the report must still be written
        get_run_logger().warning("could not read the run's changes back from the database: %s", exc)
        return None


def _queue(name: str, settings: Settings) -> ProductsQueue:
    queue = ProductsQueue.load_or_create_default(
        name or settings.products.queue_block, settings.products.queue_block, settings
    )
    queue.ping()
    return queue


@dataclass(frozen=True)
class _Load:
    """The planned chunk stage: the file, where it goes, how it is cut and where the chunks run."""

    source: Path
    run_dir: Path
    run_key: str
    dealers: dict[str, int]
    database_url: str
    queue: ProductsQueue
    rows_per_chunk: int
    expected_rows: int          # the estimate, when the chunk size is the flow's choice (0: as asked, every chunk)
    slots: int                  # task slots that load the chunks
    pool_size: int
    on_dask: bool
    record: Path                # where a complete run of this content is recorded (operations/products/loaded.py)
    started_at: object          # the database's clock when the run started


def _plan_load(
    source: Path, database_url: str, dealers: dict[str, int], run_key: str, queue: ProductsQueue,
    chunk_rows: int, settings: Settings,
) -> _Load:
    """Pick the runner, the chunk size and each chunk process's connections (ConnectionBudgetTooSmall when
    DATABASE_POOL_SIZE cannot hold them)."""
    started_at, estimated = database_now(get_engine(database_url)), estimate_rows(source)
    on_dask = estimated >= settings.products.in_process_max_rows
    if on_dask and settings.dask.scheduler_address:
        check_scheduler_reachable(settings.dask.scheduler_address, settings.dask.connect_timeout_seconds)
    processes, slots = cluster_shape(settings) if on_dask else (1, settings.dask.n_workers)
    load = _Load(
        source, settings.stack.output_dir / "products" / run_key, run_key, dealers, database_url, queue,
        chunk_rows or chunk_size(estimated, slots, settings.products.min_chunk_rows, settings.products.max_chunk_rows),
        0 if chunk_rows else estimated, slots, chunk_pool_size(settings.database.pool_size, processes), on_dask,
        record_path(settings.stack.output_dir, file_digest(source), database_url, queue.stream), started_at,
    )
    get_run_logger().info(
        "run %s: %s (~%s rows), %d dealer(s), chunks of %s rows on %s, %d connection(s) per chunk process",
        run_key, source, f"{estimated:,}", len(dealers), f"{load.rows_per_chunk:,}",
        f"Dask ({processes} process(es), {slots} slot(s))" if on_dask else "the flow's thread pool", load.pool_size,
    )
    return load


@contextmanager
def _chunk_task_runner(settings: Settings, on_dask: bool) -> Iterator[TaskRunner]:
    """The started runner of the chunk tasks: a LocalCluster started in the background, the cluster at
    DASK_SCHEDULER_ADDRESS, or the in-process thread pool."""
    local_cluster = LocalClusterInBackground(settings) if on_dask and not settings.dask.scheduler_address else None
    try:
        if local_cluster is not None:
            runner = local_cluster.task_runner()
        else:
            runner = dask_task_runner(settings) if on_dask else in_process_task_runner(settings)
        with runner:
            yield runner
    finally:
        if local_cluster is not None:
            local_cluster.close()


def _load(runner: TaskRunner, load: _Load, chunk_task, should_stop: StopCheck) -> LoadResult:
    """Read the file once, submitting each chunk file to `runner` as soon as it is written; wait for every
    chunk; publish what they left in the outbox. Once `should_stop()` (or on SIGTERM) no chunk is cut or
    started: the chunks under way finish their transaction (up to CANCEL_GRACE_SECONDS), the rest are
    cancelled, and the result says what was done."""
    logger, source, run_dir = get_run_logger(), load.source, load.run_dir
    progress_id = create_progress_artifact(
        progress=0.0, key="products-progress", description=f"Rows of {source.name} accounted for (run {load.run_key})",
        _sync=True,  # blocking under the async engine too
    )
    chunks: dict[PrefectFuture, ChunkFile] = {}
    pending: set[PrefectFuture] = set()  # submitted, outcome not yet taken into the result
    result = LoadResult(SplitStats())
    (run_dir / READ_FAILURES).unlink(missing_ok=True)  # a re-run with the same run key starts its log afresh
    try:
        with FailureLog(run_dir / READ_FAILURES) as failures, \
                FileSplitter(source, run_dir / "chunks", load.dealers, load.rows_per_chunk, failures,
                             expected_rows=load.expected_rows, slots=load.slots) as splitter:
            result.stats = splitter.stats
            for chunk in splitter.chunks(should_stop):
                future = runner.submit(chunk_task, {"chunk": chunk, "database_url": load.database_url,
                                                    "pool_size": load.pool_size, "run_key": load.run_key,
                                                    "queue": load.queue})
                chunks[future] = chunk
                pending.add(future)
        logger.info("%s", read_line(result.stats, source, load.rows_per_chunk))
        result.read_failures_workbook = WorkbookInBackground(  # written while the chunks load
            _failures_workbook(load), merged_failures(run_dir, []), title=_failures_title(load))
        progress = _Progress(progress_id, result.stats)
        while pending:
            for future in wait(list(pending), timeout=1.0).done:
                _collect(future, chunks[future], result, progress)
                pending.discard(future)
            if pending:
                raise_if_stopped(should_stop, f"the remaining {len(pending)} chunk(s)")
        raise_if_stopped(should_stop, "the final publish")
        final = runner.submit(publish_pending_messages, {"database_url": load.database_url, "queue": load.queue})
        try:
            final = final.result(raise_on_failure=False)
        except Abort:
            raise OperationCancelled("cancelled before the final publish") from None
        if isinstance(final, PublishCounts):
            result.final_publish = final
        else:
            result.final_publish_error = f"{type(final).__name__}: {final}"
    except (OperationCancelled, TerminationSignal) as exc:
        result.cancelled = str(exc) if isinstance(exc, OperationCancelled) else "the worker stopped the run"
        logger.warning("stopping: %s; waiting up to %d s for the chunks under way", result.cancelled,
                       CANCEL_GRACE_SECONDS)
        _wind_down(chunks, pending, result)
    return result


class _Progress:
    """The progress artifact: rows accounted for (failed the checks, or in a loaded chunk) over rows read."""

    def __init__(self, artifact_id, stats: SplitStats):
        self.artifact_id, self.total, self.accounted = artifact_id, max(1, stats.rows), stats.failed_rows
        update_progress_artifact(artifact_id, 100.0 * self.accounted / self.total, _sync=True)

    def add(self, rows: int) -> None:
        self.accounted += rows
        update_progress_artifact(self.artifact_id, 100.0 * self.accounted / self.total, _sync=True)


def _collect(future: PrefectFuture, chunk: ChunkFile, result: LoadResult, progress: _Progress | None) -> None:
    """Take a finished chunk's outcome into the result: its report, a chunk not loaded because of the cancel,
    or a chunk that failed."""
    logger = get_run_logger()
    try:
        report = future.result(raise_on_failure=False)  # the exception itself when the chunk failed
    except Abort as exc:  # the server refused to start it: the run is being cancelled
        report = exc
    if isinstance(report, ChunkReport):
        result.reports.append(report)
        if progress is not None:
            progress.add(report.rows)
        logger.info("%s", chunk_line(report))
    elif isinstance(report, Abort) or result.cancelled or future.state.is_cancelled():
        result.chunks_not_loaded += 1
    else:
        result.failed_chunks.append(failed_chunk(chunk, report))
        logger.error("a chunk was not loaded: %s", result.failed_chunks[-1])


def _wind_down(chunks: dict[PrefectFuture, ChunkFile], pending: set[PrefectFuture], result: LoadResult) -> None:
    """After a cancel: drop the chunks queued on the thread pool, let the chunks under way finish their
    transaction (a Dask chunk not started yet ends Cancelled at once: the task checks the run first), then
    cancel the futures still pending; the runner's exit then closes the Dask client and cluster."""
    not_started = cancel_not_started(pending)
    result.chunks_not_loaded += len(not_started)
    pending = pending - not_started
    done, pending = wait(list(pending), timeout=CANCEL_GRACE_SECONDS) if pending else (set(), set())
    for future in done:
        try:
            _collect(future, chunks[future], result, None)
        except Exception as exc:  # noqa: BLE001 - a chunk whose outcome cannot be read: not loaded, said so
            get_run_logger().warning("chunk %d: its outcome could not be read: %r", chunks[future].index, exc)
            result.chunks_not_loaded += 1
    cancel_pending(pending)
    result.chunks_not_loaded += len(pending)


def _failures_workbook(load: _Load) -> Path:
    return load.run_dir / f"{load.source.stem}-failures.xlsx"


def _failures_title(load: _Load) -> str:
    return f"Failures of {load.source.name} (run {load.run_key})"


def _publish_report(load: _Load, result: LoadResult, elapsed: float) -> dict:
    """Write the failures spreadsheet, publish the artifacts (the failures linked only when rows failed) and
    return the run's summary. A spreadsheet that cannot be written (OUTPUT_DIR read-only or full) is noted in
    the result and the summary, counted from the failure logs instead."""
    source, workbook = load.source, _failures_workbook(load)
    try:
        if result.same_as_run:  # the earlier run's spreadsheet, copied: the same failures
            by_reason = count_by_reason(merged_failures(load.run_dir, result.reports))
        else:
            prepared = result.read_failures_workbook
            by_reason = prepared.use(workbook, [f for r in result.reports for f in r.failures]) if prepared else None
            if by_reason is None:
                by_reason = write_failures_workbook(workbook, merged_failures(load.run_dir, result.reports),
                                                    title=_failures_title(load))
    except OSError as exc:
        result.report_error = f"{type(exc).__name__}: {exc}"
        by_reason = count_by_reason(merged_failures(load.run_dir, result.reports))
    summary = run_summary(source, load.run_key, result, by_reason, workbook, elapsed)
    link = output_link(workbook) if summary["failures"] and not result.report_error else None
    if link:
        create_link_artifact(
            key="products-failures", link=link, link_text=workbook.name,
            description=f"{summary['failures']:,} failed row(s) of {source.name} (row, dealer, SKU, column, reason)",
            _sync=True,
        )
    create_table_artifact(key="products-failure-reasons", table=reasons_table(by_reason),
                          description=f"Failed rows of {source.name} by reason", _sync=True)
    create_markdown_artifact(key="products-summary", markdown=summary_markdown(source, summary, result,
                             load.on_dask, link), description=f"Summary of {source.name}", _sync=True)
    return summary
