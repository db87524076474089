"""Tasks of the cleanup-runs flow: thin wrappers that add retries and names to operations/lottery/retention.py
and operations/products/retention.py."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from prefect.cache_policies import NO_CACHE

from blocks.redis_game_counter import RedisGameCounter
from operations.lottery.retention import AofCheck, CleanupReport, cleanup_expired_runs, compact_aof
from operations.products.retention import ChunkCleanup, remove_stale_chunk_folders
from tasks.retries import retrying_task

# Both are safe to retry: removing a run twice removes nothing more, and BGREWRITEAOF is refused by the rule
# while a rewrite is under way.
_redis_task = partial(retrying_task, retries=2, delays=[2, 10], cache_policy=NO_CACHE)


@_redis_task(name="remove-expired-runs", tags=["redis", "lottery"])
def remove_expired_runs(
    counter_block: RedisGameCounter, output_dir: Path, retention_days: float, dry_run: bool
) -> CleanupReport:
    """Remove (or list, in a dry run) the generation runs older than `retention_days`: folders and Redis keys."""
    return cleanup_expired_runs(counter_block.get_client(), counter_block.key_prefix, output_dir, retention_days,
                                dry_run)


@_redis_task(name="compact-redis-aof", tags=["redis"])
def compact_redis_aof(counter_block: RedisGameCounter, dry_run: bool) -> AofCheck:
    """Ask Redis to rewrite its append-only file when it has outgrown the data."""
    return compact_aof(counter_block.get_client(), dry_run)


# Removing a folder twice removes nothing more; a run under way keeps its chunk folder younger than the retention.
@retrying_task(name="remove-stale-product-chunks", retries=1, delays=[2], cache_policy=NO_CACHE, tags=["products"])
def remove_stale_product_chunks(output_dir: Path, retention_days: float, dry_run: bool) -> ChunkCleanup:
    """Remove (or list, in a dry run) the chunk files that crashed or killed products runs left, once older than
    `retention_days`."""
    return remove_stale_chunk_folders(output_dir, retention_days, dry_run)
