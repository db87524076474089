"""Tasks of the game-generation flow: thin wrappers that add retries, tags and names to domain code."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from prefect.cache_policies import NO_CACHE

from blocks.redis_game_counter import RedisGameCounter
from operations.cancellation import Cancelled, raise_if_stopped
from operations.lottery.counter import RunKeyConflict, SupersededAttempt
from operations.lottery.generation import (
    ChunkResult,
    GenerationStalled,
    Ranking,
    RepeatedGames,
    generate_chunk,
    rank_run,
)
from operations.lottery.plan import GenerationPlan, InfeasibleRequest
from operations.lottery.spreadsheet import WorkbookSummary, WrittenWorkbook, write_games_workbook
from tasks.cancellation import run_stop_check
from tasks.retries import retrying_task

# A permanent OSError (a read-only or full OUTPUT_DIR, a missing chunk file) is never retried either: the rule
# of tasks/retries.py retries only the OS errors that may heal.
PERMANENT_ERRORS = (
    InfeasibleRequest, GenerationStalled, RunKeyConflict, SupersededAttempt, RepeatedGames, ValueError, Cancelled
)


# Side effects are guarded by the counter itself (a committed chunk returns its saved result, a new attempt
# releases the previous one's claims), so Dask recomputing a finished chunk is harmless: no cache needed,
# and NO_CACHE avoids hashing the plan on every call.
# Retries: GAMES_TASK_RETRIES, set by the flow (tasks.retries.with_retries).
@retrying_task(
    name="generate-games-chunk",
    task_run_name="chunk-{chunk}",
    retries=3,
    delays=[1, 4, 10],
    permanent=PERMANENT_ERRORS,
    cache_policy=NO_CACHE,
    tags=["redis", "lottery"],
)
def generate_games_chunk(
    plan: GenerationPlan, counter_block: RedisGameCounter, chunk: int, run_dir: Path
) -> ChunkResult:
    """Generate one chunk of distinct games, claimed through the shared Redis counter; a chunk of a cancelled
    run does not start (`Cancelled`)."""
    raise_if_stopped(run_stop_check(), f"chunk {chunk}")
    return generate_chunk(plan, counter_block.counter(plan.run_key), chunk, run_dir)


# Both write their whole output atomically (temporary file, then replace): retries and re-runs are harmless.
_whole_file_writer = partial(retrying_task, retries=2, delays=[2, 5], permanent=PERMANENT_ERRORS, cache_policy=NO_CACHE)


@_whole_file_writer(name="rank-games", tags=["lottery"])
def rank_games_of_run(chunk_files: list[Path], run_dir: Path) -> Ranking:
    """Rank the whole run by score, once, into files the spreadsheet writers read their slices from."""
    return rank_run(chunk_files, run_dir)


@_whole_file_writer(
    name="write-games-spreadsheet", task_run_name="spreadsheet-ranks-{start}-{stop}", tags=["spreadsheet"]
)
def write_games_spreadsheet(
    ranking: Ranking, start: int, stop: int, path: Path, summary: WorkbookSummary, rows_per_sheet: int
) -> WrittenWorkbook:
    """Write ranks start+1..stop of the ranked run to one .xlsx."""
    games, scores = ranking.slice(start, stop)
    return write_games_workbook(path, games, scores, start + 1, summary, rows_per_sheet)
