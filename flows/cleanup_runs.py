"""Flow `cleanup-runs`: generation runs expire after RUN_RETENTION_DAYS, so Redis and OUTPUT_DIR stay bounded.

Stages: remove the expired runs (folders and Redis keys; a dry run only lists them) and the chunk files that
crashed or killed products runs left (operations/products/retention.py), then ask Redis to rewrite its
append-only file if it has outgrown the data, then report what was freed. How runs are dated and the rewrite
rule: operations/lottery/retention.py.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import Field
from typing_extensions import Annotated

from blocks.redis_game_counter import RedisGameCounter
from flows.forms import form_field
from flows.outcomes import ends_failed_on_user_error
from operations.lottery.report import cleanup_line, cleanup_markdown, cleanup_result
from operations.settings import get_settings
from tasks.retention import compact_redis_aof, remove_expired_runs, remove_stale_product_chunks


@flow(name="cleanup-runs", log_prints=False)
@ends_failed_on_user_error
def cleanup_runs(
    retention_days: Annotated[float, Field(ge=0, le=3650)] = form_field(
        0, "Retention (days)", "Runs older than this are removed (0 to 3650). 0: RUN_RETENTION_DAYS (30)."
    ),
    dry_run: bool = form_field(False, "Dry run", "List what would be removed and freed; remove nothing."),
    counter_block: Annotated[str, Field(max_length=120)] = form_field(
        "",
        "Counter block",
        "Name of the RedisGameCounter block whose runs are cleaned. Empty: COUNTER_BLOCK_NAME (games-counter).",
    ),
) -> dict:
    """Remove generation runs older than the retention (folders and Redis keys) and products runs' leftover
    chunk files, then compact Redis's file."""
    settings = get_settings()
    days = retention_days or settings.retention.days
    block = RedisGameCounter.load_or_create_default(
        counter_block or settings.lottery.counter_block_name, settings.lottery.counter_block_name, settings
    )
    report = remove_expired_runs(block, settings.stack.output_dir, days, dry_run)
    chunks = remove_stale_product_chunks(settings.stack.output_dir, days, dry_run)
    aof = compact_redis_aof(block, dry_run)
    products_line = (f"products runs' chunk files: {len(chunks.folders)} folder(s), {chunks.bytes:,} bytes "
                     f"{'would be ' if dry_run else ''}removed")
    get_run_logger().info("%s; %s", cleanup_line(report, aof, days, dry_run), products_line)
    create_markdown_artifact(
        key="cleanup-runs-report",
        markdown=cleanup_markdown(report, aof, days, dry_run, time.time())
        + f"\nChunk files of crashed or killed products runs ({', '.join(chunks.folders) or 'none'}): "
        f"{len(chunks.folders)} folder(s), {chunks.bytes:,} bytes {'would be ' if dry_run else ''}removed.\n",
        description=f"cleanup-runs: runs {'that would be ' if dry_run else ''}removed and what was freed",
    )
    return {**cleanup_result(report, aof, days, dry_run), "product_chunk_folders": chunks.folders,
            "product_chunk_bytes": chunks.bytes}
