"""Flow `generate-games`: millions of filtered, scored, never-repeated Mega-Sena games, made in chunks on Dask,
balanced by a Redis first-number counter shared live by every worker, written to .xlsx, linked from artifacts.

Stages: check the request and plan (infeasible requests fail here, before any chunk), generate the pending
chunks (a re-run with the same run_key resumes), rank the whole run by score, write the spreadsheets in
parallel, then publish the counter snapshot and the artifacts, and finish the run: Redis keeps only its
counter and outputs record, its chunk files go (operations/lottery/retention.py). A re-run of a completed run
key serves its outputs again without generating anything. The chunks, the ranking and the writers run on one
task runner chosen by the run's size (Dask or the in-process pool), inside this flow run, whose progress
artifact reads 90% once the chunks are done and 100% once every spreadsheet is written. An expected user error
(an infeasible or contradictory request, a run key used with other parameters, a bad past-draws file) ends the
run Failed with one line, no traceback.

A cancelled run (its state through the API, or the worker's SIGTERM) starts no new chunk: the chunk tasks check
before they start, the flow cancels the chunks not yet done and closes the cluster, then publishes what was
committed before the cancel (a re-run with the same run_key resumes from there) and ends Cancelled.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.exceptions import TerminationSignal
from prefect.futures import PrefectFuture, as_completed, wait
from prefect.runtime import flow_run
from prefect.states import Cancelled as CancelledState
from prefect.task_runners import TaskRunner
from prefect.utilities.annotations import unmapped
from pydantic import Field
from typing_extensions import Annotated

from blocks.redis_game_counter import RedisGameCounter
from flows.concurrency import generation_slot
from flows.forms import form_field, model_form_field
from flows.outcomes import ends_failed_on_user_error
from flows.task_runners import (
    cancel_not_started,
    cancel_pending,
    check_scheduler_reachable,
    dask_task_runner,
    in_process_task_runner,
    worker_count,
)
from operations.cancellation import Cancelled, StopCheck, raise_if_stopped
from operations.infra.links import output_base_url, output_link
from operations.lottery.counter import FirstNumberCounter
from operations.lottery.draws import SAMPLE_RESULTS
from operations.lottery.generation import ChunkResult, chunk_path, pending_chunks
from operations.lottery.parameters import (
    GenerationRequest,
    HighestNumber,
    NumbersPerGame,
    Quantity,
    Regions,
    Rules,
    Seed,
    generation_request,
)
from operations.lottery.plan import GenerationPlan, part_ranges, plan_run
from operations.lottery.report import (
    GenerationProgress,
    RunReport,
    artifact_key,
    cancelled_markdown,
    chunk_line,
    completed_at_text,
    distribution_rows,
    planned_line,
    run_result,
    spreadsheet_links,
    spreadsheet_name,
    summary_markdown,
    workbook_summary,
)
from operations.lottery.retention import RunOutputs, completed_outputs, finish_run, remove_chunk_files
from operations.settings import Settings, get_settings
from tasks.cancellation import run_stop_check, watch_termination
from tasks.lottery import generate_games_chunk, rank_games_of_run, write_games_spreadsheet
from tasks.retries import with_retries

STOP_POLL_SECONDS = 1.0  # the flow asks whether the run was cancelled this often while chunks run
CHUNK_STOP_WAIT_SECONDS = 15.0  # then gives the chunks already running this long to finish (SIGKILL comes at 30 s)


def _field(name: str):
    """A request parameter's form field: its default, title and description from GenerationRequest (its bounds
    come with its type)."""
    return model_form_field(GenerationRequest, name)


# Optional text fields default to "" rather than None: the UI then shows a plain text box, not a type switch.
RunKey = Annotated[str, Field(max_length=80, pattern=r"^[A-Za-z0-9_.-]*$")]
BlockName = Annotated[str, Field(max_length=120)]
FilePath = Annotated[str, Field(max_length=4096)]
_RUN_KEY = form_field(
    "", "Run key", "Names the run, its output folder and its Redis keys; re-run with the same key to resume. "
    "Empty: the flow run id.",
)
_COUNTER_BLOCK = form_field(
    "", "Counter block", "Name of the RedisGameCounter block holding the shared counter. Empty: COUNTER_BLOCK_NAME "
    "(games-counter), created on first use.",
)
_PAST_DRAWS_FILE = form_field(
    "", "Past draws file", "Caixa's Mega-Sena results .xlsx (Concurso, Data do Sorteio, Bola1..Bola6). "
    "Empty: PAST_DRAWS_FILE, else the bundled sample.",
)


@flow(name="generate-games", log_prints=False)
@ends_failed_on_user_error
def generate_games(
    quantity: Quantity = _field("quantity"),
    run_key: RunKey = _RUN_KEY,  # second in the form: the rules and regions below it are long
    numbers_per_game: NumbersPerGame = _field("numbers_per_game"),
    highest_number: HighestNumber = _field("highest_number"),
    rules: Rules = _field("rules"),
    regions: Regions = _field("regions"),
    seed: Seed = _field("seed"),
    counter_block: BlockName = _COUNTER_BLOCK,
    past_draws_file: FilePath = _PAST_DRAWS_FILE,
) -> dict:
    """Generate `quantity` distinct, rule-abiding, scored Mega-Sena games into ranked spreadsheets."""
    watch_termination()
    started, settings = time.perf_counter(), get_settings()
    output_base_url(settings)  # where the links will point: a missing OUTPUT_BASE_URL fails now, not after the work
    request = generation_request(quantity=quantity, numbers_per_game=numbers_per_game,
                                 highest_number=highest_number, rules=rules, regions=regions, seed=seed)
    run_key = run_key or str(flow_run.get_id() or "local")
    block = _counter_block(counter_block, settings)
    counter, on_dask = block.counter(run_key), quantity >= settings.lottery.in_process_max_quantity
    if counter.outputs() is not None:
        return _serve_completed_run(request, run_key, past_draws_file, settings, counter, on_dask)
    workers = _workers(settings, on_dask)
    plan, pending = _plan_run(request, run_key, past_draws_file, settings, counter, workers, started)
    run_dir = settings.stack.output_dir / run_key
    # One generation at a time per machine, whatever deployment started it: the cluster work, starting the
    # LocalCluster included, holds a slot of the 'generate-games' limit. Planning stays outside: an
    # infeasible request fails at once, not after the run ahead of it.
    should_stop, produced = run_stop_check(), _Generated([], [])
    try:
        with generation_slot(settings.lottery.games_concurrency_limit, get_run_logger(), should_stop) as waited:
            with dask_task_runner(settings) if on_dask else in_process_task_runner(settings) as runner:
                _produce(runner, plan, block, run_dir, pending, workers, settings, should_stop, produced)
    except (Cancelled, TerminationSignal) as stop:  # the runner is closed: no chunk runs any more
        return _cancelled(plan, counter, produced, stop)
    outputs = _finish(plan, counter, run_dir, produced.workbooks, settings, started)
    return _published(RunReport(plan, outputs, counter.region_counts(len(plan.regions)), on_dask,
                                [r.to_json() for r in produced.results], waited))


class GenerationCancelled(RuntimeError):
    """The run was cancelled: its summary says which chunks were committed before."""


def _workers(settings: Settings, on_dask: bool) -> int:
    """How many workers the run is planned for (a configured Dask scheduler must answer first)."""
    if not on_dask:
        return settings.dask.n_workers
    if settings.dask.scheduler_address:
        check_scheduler_reachable(settings.dask.scheduler_address, settings.dask.connect_timeout_seconds)
    return worker_count(settings)


def _counter_block(name: str, settings: Settings) -> RedisGameCounter:
    block = RedisGameCounter.load_or_create_default(
        name or settings.lottery.counter_block_name, settings.lottery.counter_block_name, settings
    )
    block.ping()
    return block


def _plan(request: GenerationRequest, run_key: str, past_draws_file: str, settings: Settings,
          workers: int) -> GenerationPlan:
    """The checked plan (raises InfeasibleRequest naming the rule or region, DrawsFileError for a bad file)."""
    draws_file = Path(past_draws_file or settings.lottery.past_draws_file or SAMPLE_RESULTS)
    return plan_run(request, run_key, draws_file, workers, settings.lottery.min_games_per_chunk,
                    settings.lottery.max_games_per_chunk, settings.stack.data_dir / "cache")


def _plan_run(
    request: GenerationRequest, run_key: str, past_draws_file: str, settings: Settings,
    counter: FirstNumberCounter, workers: int, started: float,
) -> tuple[GenerationPlan, list[int]]:
    """Plan, register the run with the counter (RunKeyConflict for a key used with other parameters) and pin
    its chunking; returns the plan and the chunks still to generate."""
    plan = _plan(request, run_key, past_draws_file, settings, workers)
    resumed = counter.initialise(plan.fingerprint, request.quantity, [r.cap for r in plan.regions])
    plan = dataclasses.replace(plan, chunk_quotas=counter.pin_chunk_quotas(plan.chunk_quotas))
    pending = pending_chunks(len(plan.chunk_quotas), counter.committed_chunks(), settings.stack.output_dir / run_key)
    get_run_logger().info("%s", planned_line(plan, len(pending), resumed, time.perf_counter() - started))
    return plan, pending


@dataclasses.dataclass
class _Generated:
    results: list[ChunkResult]
    workbooks: list[dict]


def _produce(
    runner: TaskRunner, plan: GenerationPlan, block: RedisGameCounter, run_dir: Path, pending: list[int],
    workers: int, settings: Settings, should_stop: StopCheck, produced: _Generated,
) -> None:
    """Generate the pending chunks on `runner`, then rank the run once and write its spreadsheets in parallel
    (each writer reads its own slice of the ranking) into `produced`; the run's progress artifact follows all
    three. A stop (`should_stop()`) or a chunk failed after its retries raises (see _generate_chunks)."""
    quotas, quantity = plan.chunk_quotas, plan.request.quantity
    parts = part_ranges(quantity, workers, settings.lottery.max_rows_per_file)
    progress = GenerationProgress(quantity, len(parts), games=sum(quotas) - sum(quotas[i] for i in pending))
    progress_id = create_progress_artifact(progress.percent, key=artifact_key("games-progress", plan.run_key),
                                           description=f"Games generated and written in run {plan.run_key}")
    _generate_chunks(runner, plan, block, run_dir, pending, settings, should_stop, produced,
                     lambda games: _advance(progress_id, progress, games=games))
    raise_if_stopped(should_stop, "ranking the run")
    ranked = runner.submit(rank_games_of_run, {
        "chunk_files": [chunk_path(run_dir, i) for i in range(len(quotas))], "run_dir": run_dir})
    summary = workbook_summary(plan, block.counter(plan.run_key).region_counts(len(plan.regions)))
    ranking = ranked.result()
    _advance(progress_id, progress, ranked=True)
    raise_if_stopped(should_stop, "writing the spreadsheets")
    writes = [runner.submit(write_games_spreadsheet, {
        "ranking": ranking, "start": start, "stop": stop, "summary": summary,
        "rows_per_sheet": settings.lottery.rows_per_sheet,
        "path": run_dir / spreadsheet_name(plan.run_key, quantity, start, stop)}) for start, stop in parts]
    workbooks = []
    for future in as_completed(writes):
        workbooks.append(future.result())
        _advance(progress_id, progress, written=1)
    workbooks.sort(key=lambda w: str(w.path))
    produced.workbooks = [{"path": str(w.path), "rows": w.rows, "sheets": len(w.sheets)} for w in workbooks]


def _advance(progress_id: UUID, progress: GenerationProgress, games: int = 0, ranked: bool = False,
             written: int = 0) -> None:
    """Count generated games, the ranking and written spreadsheets into the run's progress artifact."""
    progress.games += games
    progress.ranked = progress.ranked or ranked
    progress.written += written
    update_progress_artifact(progress_id, progress.percent)


def _generate_chunks(
    runner: TaskRunner, plan: GenerationPlan, block: RedisGameCounter, run_dir: Path, pending: list[int],
    settings: Settings, should_stop: StopCheck, produced: _Generated, on_chunk: Callable[[int], None],
) -> None:
    """Run the pending chunks, each result into `produced` and its games to `on_chunk`. Once `should_stop()`
    (asked every STOP_POLL_SECONDS), or when a chunk fails after its retries, the chunks not started are
    cancelled, those running get CHUNK_STOP_WAIT_SECONDS to finish, and the error is raised."""
    logger, quotas = get_run_logger(), plan.chunk_quotas
    chunk_task = with_retries(generate_games_chunk, settings.lottery.task_retries)
    futures = runner.map(chunk_task, {
        "plan": unmapped(plan), "counter_block": unmapped(block), "chunk": pending, "run_dir": unmapped(run_dir)})
    results = produced.results
    waiting: list[PrefectFuture] = list(futures)
    try:
        while waiting:
            done, not_done = wait(waiting, timeout=STOP_POLL_SECONDS)
            waiting = [future for future in waiting if future in not_done]
            for future in done:
                results.append(future.result())  # a chunk that failed after its retries fails the flow here
                on_chunk(quotas[results[-1].chunk])
                logger.info("%s", chunk_line(results[-1], len(quotas)))
            raise_if_stopped(should_stop, "the next chunk")
    except BaseException:
        # the chunks not started never start; those under way commit (or not) before the summary counts them: a
        # Dask task whose future is cancelled still runs to its end in its worker, after the summary
        running = [future for future in waiting if future not in cancel_not_started(set(waiting))]
        wait(running, timeout=CHUNK_STOP_WAIT_SECONDS)
        cancel_pending(running)
        raise


def _cancelled(plan: GenerationPlan, counter: FirstNumberCounter, produced: _Generated,
               stop: BaseException) -> CancelledState:
    """The summary of a cancelled run (what was committed before the cancel) and its final state."""
    committed = sorted(counter.committed_chunks())
    games = sum(plan.chunk_quotas[i] for i in committed)
    markdown = cancelled_markdown(plan, committed, len(produced.results), games, str(stop) or "termination signal")
    create_markdown_artifact(key="games-run-summary", markdown=markdown,
                             description=f"Run {plan.run_key}: cancelled")
    message = (f"cancelled ({stop or 'termination signal'}): {len(committed)} of {len(plan.chunk_quotas)} chunk(s) "
               f"committed, {games:,} of {plan.request.quantity:,} games; re-run with run_key {plan.run_key} to resume")
    get_run_logger().warning("%s", message)
    return CancelledState(message=message, data=GenerationCancelled(message))


def _finish(plan: GenerationPlan, counter: FirstNumberCounter, run_dir: Path, workbooks: list[dict],
            settings: Settings, started: float) -> RunOutputs:
    """Check the counter, write its snapshot and finish the run (Redis keeps its counter and outputs only)."""
    quantity, run_key = plan.request.quantity, plan.run_key
    snapshot = counter.snapshot()
    if snapshot["total_generated"] != quantity:
        raise RuntimeError(f"counter holds {snapshot['total_generated']} games, expected {quantity}")
    snapshot_path = run_dir / f"counter-{run_key}.json"
    snapshot_path.write_text(json.dumps(snapshot, indent=2))
    elapsed = round(time.perf_counter() - started, 2)
    outputs = RunOutputs(workbooks, str(snapshot_path), quantity, time.time(), elapsed)
    freed = finish_run(counter, run_dir, outputs, len(plan.chunk_quotas), settings.retention.keep_chunk_files)
    get_run_logger().info(
        "run %s finished: Redis keeps its counter and outputs record only; %s", run_key,
        "chunk files kept (KEEP_CHUNK_FILES)" if settings.retention.keep_chunk_files else f"{freed:,} bytes of chunk files "
        "removed",
    )
    return outputs


def _serve_completed_run(
    request: GenerationRequest, run_key: str, past_draws_file: str, settings: Settings,
    counter: FirstNumberCounter, on_dask: bool,
) -> dict:
    """A re-run of a completed run key: its outputs again, artifacts republished, nothing generated (its claims
    were released when it finished). Other parameters still raise RunKeyConflict; gone files OutputsGone."""
    plan = _plan(request, run_key, past_draws_file, settings, settings.dask.n_workers)
    counter.initialise(plan.fingerprint, request.quantity, [r.cap for r in plan.regions])
    outputs = completed_outputs(counter)
    if not settings.retention.keep_chunk_files:  # left behind by a run stopped between finishing and removing them
        remove_chunk_files(settings.stack.output_dir / run_key)
    plan = dataclasses.replace(plan, chunk_quotas=counter.pin_chunk_quotas(plan.chunk_quotas))
    completed = completed_at_text(outputs)
    get_run_logger().info(
        "run %s already completed at %s: serving its %d spreadsheet(s) and counter snapshot, nothing generated",
        run_key, completed, len(outputs.spreadsheets),
    )
    return _published(RunReport(plan, outputs, counter.region_counts(len(plan.regions)), on_dask,
                                served_from=completed))


def _published(report: RunReport) -> dict:
    """The run's spreadsheet links, first-number distribution table and summary, published; the run's result."""
    for link in spreadsheet_links(report, output_link):
        create_link_artifact(**link)
    create_table_artifact(
        key="games-first-number-distribution",
        table=distribution_rows(report),
        description=f"Run {report.run_key}: first-number distribution against the targets",
    )
    create_markdown_artifact(
        key="games-run-summary", markdown=summary_markdown(report, output_link),
        description=f"Run {report.run_key}: summary",
    )
    return run_result(report)
