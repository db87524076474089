"""Flow `cleanup-runs`: generation runs expire after RUN_RETENTION_DAYS, so Redis and OUTPUT_DIR stay bounded.

Stages: remove the expired runs (folders and Redis keys; a dry run only lists them), then ask Redis to rewrite
its append-only file if it has outgrown the data, then report what was freed. How runs are dated and the
rewrite rule: operations/lottery/retention.py.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import Field
from typing_extensions import Annotated

from blocks.redis_game_counter import RedisGameCounter
from flows.forms import form_field
from operations.lottery.retention import AofCheck, CleanupReport
from operations.settings import get_settings
from tasks.retention import compact_redis_aof, remove_expired_runs


@flow(name="cleanup-runs", log_prints=False)
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
    """Remove generation runs older than the retention (folders and Redis keys), then compact Redis's file."""
    logger = get_run_logger()
    settings = get_settings()
    days = retention_days or settings.run_retention_days
    block = RedisGameCounter.load_or_create_default(
        counter_block or settings.counter_block_name, settings.counter_block_name, settings
    )
    report = remove_expired_runs(block, settings.output_dir, days, dry_run)
    aof = compact_redis_aof(block, dry_run)
    verb = "would remove" if dry_run else "removed"
    logger.info(
        "%s %d run(s) older than %g days (%s bytes on disk, %d Redis keys, %s bytes of Redis memory), kept %d; "
        "append-only file: %s%s",
        verb, len(report.removed), days, f"{report.folder_bytes:,}", report.keys, f"{report.redis_bytes:,}",
        report.kept, aof.reason, "; rewrite started" if aof.rewrite and not dry_run else "",
    )
    _publish_report(report, aof, days, dry_run)
    return {
        "dry_run": dry_run,
        "retention_days": days,
        "removed": [r.run_key for r in report.removed],
        "kept": report.kept,
        "skipped": report.skipped,
        "folder_bytes": report.folder_bytes,
        "redis_keys": report.keys,
        "redis_bytes": report.redis_bytes,
        "aof_rewrite": aof.rewrite and not dry_run,
    }


def _publish_report(report: CleanupReport, aof: AofCheck, days: float, dry_run: bool) -> None:
    now = time.time()
    rows = "\n".join(
        f"| `{r.run_key}` | {r.status} | {r.age_days(now):.1f} | {r.folder_bytes:,} | {len(r.keys)} | "
        f"{r.redis_bytes:,} |"
        for r in report.removed
    )
    skipped = ""
    if report.skipped:
        skipped = f"\nSkipped (a flow run started on them meanwhile): {', '.join(report.skipped)}\n"
    create_markdown_artifact(
        key="cleanup-runs-report",
        markdown=f"""# Generation runs older than {days:g} days{' (dry run: nothing removed)' if dry_run else ''}

| run key | status | age (days) | folder bytes | Redis keys | Redis bytes |
|---|---|---|---|---|---|
{rows or '| none | | | | | |'}

**{'Would free' if dry_run else 'Freed'}: {report.folder_bytes:,} bytes on disk, {report.keys} Redis keys,
{report.redis_bytes:,} bytes of Redis memory.** Runs kept: {report.kept}.
{skipped}
Append-only file: {aof.current_bytes:,} bytes for a {aof.dataset_bytes:,}-byte dataset: {aof.reason}
({'rewrite due' if aof.rewrite else 'no rewrite'}{', BGREWRITEAOF sent' if aof.rewrite and not dry_run else ''}).
""",
        description=f"cleanup-runs: runs {'that would be ' if dry_run else ''}removed and what was freed",
    )
