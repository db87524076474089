"""Flow `generate-games`: millions of filtered, scored, never-repeated Mega-Sena games, made in chunks on Dask,
balanced by a Redis first-number counter shared live by every worker, written to .xlsx, linked from artifacts.

Stages: check the request and plan (infeasible requests fail here, before any chunk), generate the pending
chunks (a re-run with the same run_key resumes), rank the whole run by score, write the spreadsheets in
parallel, then publish the counter snapshot and the artifacts, and finish the run: Redis keeps only its
counter and outputs record, its chunk files go (operations/lottery/retention.py). A re-run of a completed run
key serves its outputs again without generating anything.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from pathlib import Path

import numpy as np

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
from prefect.utilities.annotations import unmapped
from pydantic import Field
from typing_extensions import Annotated

from blocks.redis_game_counter import RedisGameCounter
from flows.forms import form_field
from flows.concurrency import generation_slot
from flows.task_runners import (
    check_scheduler_reachable,
    dask_task_runner,
    in_process_task_runner,
    worker_count,
)
from operations.infra.links import output_link
from operations.lottery.counter import FirstNumberCounter
from operations.lottery.draws import SAMPLE_RESULTS, load_past_draws
from operations.lottery.generation import ChunkResult, chunk_path
from operations.lottery.parameters import DEFAULT_REGIONS, FirstNumberRegion, GameRules, GenerationRequest
from operations.lottery.plan import GenerationPlan, build_plan
from operations.lottery.retention import RunOutputs, completed_outputs, finish_run, remove_chunk_files
from operations.lottery.spreadsheet import RegionRow, WorkbookSummary
from operations.settings import Settings, get_settings
from tasks.lottery import generate_games_chunk, rank_games_of_run, write_games_spreadsheet

PARALLEL_WRITE_MIN_ROWS = 50_000  # below this, one file: a second writer costs more than it saves


def _artifact_key(*parts: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


def part_ranges(quantity: int, workers: int, max_rows_per_file: int) -> list[tuple[int, int]]:
    """Rank ranges of the spreadsheet files: enough files for every worker to write one at a time."""
    files = math.ceil(quantity / max_rows_per_file)
    if quantity >= PARALLEL_WRITE_MIN_ROWS:
        files = max(files, workers)
    size = math.ceil(quantity / files)
    return [(start, min(start + size, quantity)) for start in range(0, quantity, size)]


def _plan(
    request: GenerationRequest, run_key: str, past_draws_file: str | None, settings: Settings, workers: int
) -> GenerationPlan:
    """Resolve the rules and check feasibility (raises InfeasibleRequest naming the rule or region)."""
    draws_path = Path(past_draws_file or settings.past_draws_file or SAMPLE_RESULTS)
    draws = load_past_draws(draws_path) if request.rules.exclude_past_draws else np.zeros(0, np.uint64)
    return build_plan(
        request,
        run_key,
        draws,
        workers=workers,
        min_chunk=settings.min_games_per_chunk,
        max_chunk=settings.max_games_per_chunk,
        cache_dir=settings.data_dir / "cache",
    )


def _workbook_summary(plan: GenerationPlan, region_counts: list[int]) -> WorkbookSummary:
    req = plan.request
    params = [
        ("run key", plan.run_key),
        ("games", f"{req.quantity:,}"),
        ("numbers per game", str(req.numbers_per_game)),
        ("universe", f"1..{req.highest_number}"),
        ("seed", str(req.seed)),
        *plan.rules.describe(),
        ("feasible games", f"{plan.feasibility.total:,.0f} ({'exact' if plan.feasibility.exact else 'estimate'})"),
    ]
    regions = [
        RegionRow(label=r.label, target_share=r.share, cap=r.cap, count=c)
        for r, c in zip(plan.regions, region_counts)
    ]
    return WorkbookSummary(
        title=f"Mega-Sena games - run {plan.run_key}", parameters=params, regions=regions, total_games=req.quantity
    )


def _chunk_line(result: ChunkResult, total_chunks: int) -> str:
    if result.resumed:
        return f"chunk {result.chunk + 1}/{total_chunks}: {result.games:,} games already committed (resumed)"
    rejected = sum(result.rejected_by_rule.values())
    return (
        f"chunk {result.chunk + 1}/{total_chunks}: {result.games:,} games in {result.seconds:.1f} s "
        f"({result.candidates:,} candidates, {rejected:,} failed rules, {result.repeats:,} repeats, "
        f"{result.region_full:,} in full regions, {result.released:,} released from an earlier attempt)"
    )


@flow(name="produce-games", log_prints=False)
def produce_games(
    plan: GenerationPlan,
    counter_block: RedisGameCounter,
    run_dir: Path,
    pending: list[int],
    parts: list[tuple[int, int]],
    rows_per_sheet: int,
) -> dict:
    """Generate the pending chunks, then rank the run once and write its spreadsheets in parallel on this flow's
    task runner (each writer reads its own slice of the ranking)."""
    logger = get_run_logger()
    counter = counter_block.counter(plan.run_key)
    total_chunks = len(plan.chunk_quotas)
    done_games = sum(plan.chunk_quotas) - sum(plan.chunk_quotas[i] for i in pending)
    progress_id = create_progress_artifact(
        progress=100.0 * done_games / plan.request.quantity,
        key=_artifact_key("games-progress", plan.run_key),
        description=f"Games generated in run {plan.run_key}",
    )
    results: dict[int, ChunkResult] = {}
    futures = generate_games_chunk.map(unmapped(plan), unmapped(counter_block), pending, unmapped(run_dir))
    for future in as_completed(futures):
        result = future.result()  # a chunk that failed after its retries fails the flow here
        results[result.chunk] = result
        done_games += plan.chunk_quotas[result.chunk]
        update_progress_artifact(progress_id, 100.0 * done_games / plan.request.quantity)
        logger.info(_chunk_line(result, total_chunks))

    ranked = rank_games_of_run.submit([chunk_path(run_dir, i) for i in range(total_chunks)], run_dir)
    summary = _workbook_summary(plan, counter.region_counts(len(plan.regions)))
    ranking = ranked.result()
    width = len(str(plan.request.quantity))
    writes = [
        write_games_spreadsheet.submit(
            ranking,
            start,
            stop,
            run_dir / f"games-{plan.run_key}-ranks-{start + 1:0{width}d}-{stop:0{width}d}.xlsx",
            summary,
            rows_per_sheet,
        )
        for start, stop in parts
    ]
    workbooks = [w.result() for w in writes]
    return {
        "chunks": {i: r.to_json() for i, r in results.items()},
        "workbooks": [{"path": str(w.path), "rows": w.rows, "sheets": len(w.sheets)} for w in workbooks],
    }


@flow(name="generate-games", log_prints=False)
def generate_games(
    quantity: Annotated[int, Field(ge=1, le=10_000_000)] = form_field(
        10_000, "Games", "How many distinct games to generate (1 to 10,000,000)."
    ),
    numbers_per_game: Annotated[int, Field(ge=6, le=20)] = form_field(
        6, "Numbers per game", "6 to 20, as on the Mega-Sena slip."
    ),
    highest_number: Annotated[int, Field(ge=20, le=60)] = form_field(
        60, "Highest number", "Games use the numbers 1..this (60 on the Mega-Sena slip)."
    ),
    rules: GameRules = form_field(GameRules(), "Rules", "Filters every game passes; empty rules take historical defaults."),
    regions: Annotated[list[FirstNumberRegion], Field(min_length=1, max_length=60)] = form_field(
        list(DEFAULT_REGIONS),
        "First-number regions",
        "Balance of the games' smallest number: no region ever exceeds ceil(share x games).",
    ),
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] = form_field(
        20_260_000, "Seed", "Random seed: the same seed draws the same candidates."
    ),
    # Optional text fields default to "" rather than None: the UI then shows a plain text box, not a type switch.
    run_key: Annotated[str, Field(max_length=80, pattern=r"^[A-Za-z0-9_.-]*$")] = form_field(
        "",
        "Run key",
        "Names the run, its output folder and its Redis keys; re-run with the same key to resume. "
        "Empty: the flow run id.",
    ),
    counter_block: Annotated[str, Field(max_length=120)] = form_field(
        "",
        "Counter block",
        "Name of the RedisGameCounter block holding the shared counter. Empty: COUNTER_BLOCK_NAME "
        "(games-counter), created on first use.",
    ),
    past_draws_file: Annotated[str, Field(max_length=4096)] = form_field(
        "",
        "Past draws file",
        "Caixa's Mega-Sena results .xlsx (Concurso, Data do Sorteio, Bola1..Bola6). "
        "Empty: PAST_DRAWS_FILE, else the bundled sample.",
    ),
) -> dict:
    """Generate `quantity` distinct, rule-abiding, scored Mega-Sena games into ranked spreadsheets."""
    started = time.perf_counter()
    logger = get_run_logger()
    settings = get_settings()
    request = GenerationRequest(
        quantity=quantity,
        numbers_per_game=numbers_per_game,
        highest_number=highest_number,
        rules=rules,
        regions=regions,
        seed=seed,
    )
    run_key = run_key or str(flow_run.get_id() or "local")
    block = RedisGameCounter.load_or_create_default(
        counter_block or settings.counter_block_name, settings.counter_block_name, settings
    )
    block.ping()
    counter = block.counter(run_key)
    on_dask = quantity >= settings.in_process_max_quantity
    if counter.outputs() is not None:
        return _serve_completed_run(request, run_key, past_draws_file, settings, counter, on_dask)
    if on_dask and settings.dask_scheduler_address:
        check_scheduler_reachable(settings.dask_scheduler_address, settings.dask_connect_timeout_seconds)
    workers = worker_count(settings) if on_dask else settings.dask_n_workers
    plan = _plan(request, run_key, past_draws_file, settings, workers)
    resumed = counter.initialise(plan.fingerprint, quantity, [r.cap for r in plan.regions])
    plan = dataclasses.replace(plan, chunk_quotas=counter.pin_chunk_quotas(plan.chunk_quotas))
    run_dir = settings.output_dir / run_key
    committed = counter.committed_chunks()
    pending = [
        i for i in range(len(plan.chunk_quotas)) if i not in committed or not chunk_path(run_dir, i).exists()
    ]
    logger.info(
        "run %s: %s games in %d chunks (%d pending%s), %s feasible games (%s), planned in %.1f s",
        run_key,
        f"{quantity:,}",
        len(plan.chunk_quotas),
        len(pending),
        ", resumed" if resumed else "",
        f"{plan.feasibility.total:,.0f}",
        "exact" if plan.feasibility.exact else "estimate",
        time.perf_counter() - started,
    )
    # One generation at a time per machine, whatever deployment started it: the cluster work, starting the
    # LocalCluster included, holds a slot of the 'generate-games' limit. Planning stays outside: an
    # infeasible request fails at once, not after the run ahead of it.
    with generation_slot(settings.games_concurrency_limit, logger) as waited:
        runner = dask_task_runner(settings) if on_dask else in_process_task_runner(settings)
        parts = part_ranges(quantity, workers, settings.max_rows_per_file)
        produced = produce_games.with_options(task_runner=runner)(
            plan, block, run_dir, pending, parts, settings.rows_per_sheet
        )
    produced["slot_wait_seconds"] = waited
    snapshot = counter.snapshot()
    if snapshot["total_generated"] != quantity:
        raise RuntimeError(f"counter holds {snapshot['total_generated']} games, expected {quantity}")
    snapshot_path = run_dir / f"counter-{run_key}.json"
    snapshot_path.write_text(json.dumps(snapshot, indent=2))
    elapsed = time.perf_counter() - started
    outputs = RunOutputs(produced["workbooks"], str(snapshot_path), quantity, time.time(), round(elapsed, 2))
    freed = finish_run(counter, run_dir, outputs, len(plan.chunk_quotas), settings.keep_chunk_files)
    logger.info(
        "run %s finished: Redis keeps its counter and outputs record only; %s",
        run_key, "chunk files kept (KEEP_CHUNK_FILES)" if settings.keep_chunk_files else f"{freed:,} bytes of "
        "chunk files removed",
    )
    _publish_artifacts(plan, produced, counter, snapshot_path, elapsed, on_dask)
    return _run_result(plan, outputs, len(produced["chunks"]))


def _serve_completed_run(
    request: GenerationRequest, run_key: str, past_draws_file: str, settings: Settings,
    counter: FirstNumberCounter, on_dask: bool,
) -> dict:
    """A re-run of a completed run key: its outputs again, artifacts republished, nothing generated (its claims
    were released when it finished). Other parameters still raise RunKeyConflict; gone files OutputsGone."""
    plan = _plan(request, run_key, past_draws_file, settings, settings.dask_n_workers)
    counter.initialise(plan.fingerprint, request.quantity, [r.cap for r in plan.regions])
    outputs = completed_outputs(counter)
    if not settings.keep_chunk_files:  # left behind by a run stopped between finishing and removing them
        remove_chunk_files(settings.output_dir / run_key)
    plan = dataclasses.replace(plan, chunk_quotas=counter.pin_chunk_quotas(plan.chunk_quotas))
    completed = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(outputs.completed_at))
    get_run_logger().info(
        "run %s already completed at %s: serving its %d spreadsheet(s) and counter snapshot, nothing generated",
        run_key, completed, len(outputs.spreadsheets),
    )
    produced = {"chunks": {}, "workbooks": outputs.spreadsheets}
    _publish_artifacts(plan, produced, counter, Path(outputs.snapshot), outputs.seconds, on_dask, completed)
    return _run_result(plan, outputs, 0)


def _run_result(plan: GenerationPlan, outputs: RunOutputs, chunks_generated: int) -> dict:
    return {
        "run_key": plan.run_key,
        "games": outputs.games,
        "chunks": len(plan.chunk_quotas),
        "chunks_generated": chunks_generated,
        "spreadsheets": [w["path"] for w in outputs.spreadsheets],
        "counter_snapshot": outputs.snapshot,
        "seconds": outputs.seconds,
        "completed_at": outputs.completed_at,
    }


def _publish_artifacts(
    plan: GenerationPlan, produced: dict, counter: FirstNumberCounter, snapshot_path: Path, elapsed: float,
    on_dask: bool, served_from: str | None = None,
) -> None:
    """The run's links, distribution table and summary; `served_from` (the completion time) when a re-run
    republishes a completed run's outputs."""
    run_key = plan.run_key
    for i, workbook in enumerate(produced["workbooks"], start=1):
        path = Path(workbook["path"])
        create_link_artifact(
            key=_artifact_key("games-spreadsheet", str(i)),
            link=output_link(path),
            link_text=path.name,
            description=f"Run {run_key}: spreadsheet {i} of {len(produced['workbooks'])}, "
            f"{workbook['rows']:,} games in {workbook['sheets']} sheet(s)",
        )
    counts = counter.region_counts(len(plan.regions))
    total = max(1, sum(counts))
    slot_wait = produced.get("slot_wait_seconds")  # absent when the run generated nothing
    waited = "" if slot_wait is None else (
        f"\nWaited for a generation slot: {slot_wait:.1f} s (one generation at a time per machine).\n"
    )
    create_table_artifact(
        key="games-first-number-distribution",
        table=[
            {
                "region": r.label,
                "target share": f"{r.share:.4%}",
                "cap": r.cap,
                "generated": c,
                "generated share": f"{c / total:.4%}",
            }
            for r, c in zip(plan.regions, counts)
        ],
        description=f"Run {run_key}: first-number distribution against the targets",
    )
    rejected: dict[str, int] = {}
    repeats = region_full = candidates = 0
    for chunk in produced["chunks"].values():
        candidates += chunk["candidates"]
        repeats += chunk["repeats"]
        region_full += chunk["region_full"]
        for rule, n in chunk["rejected_by_rule"].items():
            rejected[rule] = rejected.get(rule, 0) + n
    rule_rows = "\n".join(f"| {rule} | {n:,} |" for rule, n in sorted(rejected.items(), key=lambda kv: -kv[1]))
    files = "\n".join(f"- [{Path(w['path']).name}]({output_link(Path(w['path']))}) ({w['rows']:,} games)"
                      for w in produced["workbooks"])
    served = f"\nServed from the run completed at {served_from}: nothing generated again.\n" if served_from else ""
    create_markdown_artifact(
        key="games-run-summary",
        markdown=f"""# Run `{run_key}`

**{plan.request.quantity:,} games** of {plan.k} numbers in **{elapsed:.1f} s**
({'Dask' if on_dask else 'in-process'}, {len(plan.chunk_quotas)} chunks; {len(produced['chunks'])} generated by this flow run).
{served}
| rejected candidates (this flow run) | count |
|---|---|
| failed a rule (below) | {sum(rejected.values()):,} |
| repeated an earlier game | {repeats:,} |
| first-number region full | {region_full:,} |
| candidates drawn | {candidates:,} |

| rule | rejected |
|---|---|
{rule_rows or '| none | 0 |'}

Feasible games under the rules: {plan.feasibility.total:,.0f} ({'exact count' if plan.feasibility.exact else 'estimate'}).
{waited}
## Files
{files}
- counter snapshot: [{snapshot_path.name}]({output_link(snapshot_path)})
""",
        description=f"Run {run_key}: summary",
    )
