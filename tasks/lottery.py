"""Tasks of the game-generation flow: thin wrappers that add retries, tags and names to domain code."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from blocks.redis_game_counter import RedisGameCounter
from operations.lottery.counter import RunKeyConflict, SupersededAttempt
from operations.lottery.generation import (
    ChunkResult,
    GenerationStalled,
    generate_chunk,
    rank_games,
)
from operations.lottery.plan import GenerationPlan, InfeasibleRequest
from operations.lottery.spreadsheet import WorkbookSummary, WrittenWorkbook, write_games_workbook
from tasks.retries import retry_transient

PERMANENT_ERRORS = (InfeasibleRequest, GenerationStalled, RunKeyConflict, SupersededAttempt, ValueError)


# Side effects are guarded by the counter itself (a committed chunk returns its saved result, a new attempt
# releases the previous one's claims), so Dask recomputing a finished chunk is harmless: no cache needed,
# and NO_CACHE avoids hashing the plan on every call.
@task(
    name="generate-games-chunk",
    task_run_name="chunk-{chunk}",
    retries=3,
    retry_delay_seconds=[1, 4, 10],
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_transient(PERMANENT_ERRORS),
    cache_policy=NO_CACHE,
    tags=["redis", "lottery"],
)
def generate_games_chunk(
    plan: GenerationPlan, counter_block: RedisGameCounter, chunk: int, run_dir: Path
) -> ChunkResult:
    """Generate one chunk of distinct games, claimed through the shared Redis counter."""
    return generate_chunk(plan, counter_block.counter(plan.run_key), chunk, run_dir)


@task(
    name="write-games-spreadsheet",
    task_run_name="spreadsheet-ranks-{start}-{stop}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[2, 5],
    tags=["spreadsheet"],
)
def write_games_spreadsheet(
    chunk_files: list[Path], start: int, stop: int, path: Path, summary: WorkbookSummary, rows_per_sheet: int
) -> WrittenWorkbook:
    """Rank the whole run and write ranks start+1..stop to one .xlsx (atomically replaced: retries are safe)."""
    games, scores = rank_games(chunk_files)
    return write_games_workbook(path, games[start:stop], scores[start:stop], start + 1, summary, rows_per_sheet)
