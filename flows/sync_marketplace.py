"""Flow `sync-marketplace`: every seller account's orders and items synced incrementally into the project
database, one mapped task per account, in parallel, on a schedule or on demand through the Prefect API.

Stages: check the request and pick the accounts (unknown ids, a future resync date, a missing app block or an
unmigrated database fail here, before any API request); sync the accounts on the configured task runner
(threads or Dask), each under its own lock and timeout, one account's failure never stopping the others;
then publish a table of accounts and a summary, and end Failed naming the failed accounts, if any.
"""

from __future__ import annotations

import time
from datetime import date, datetime, time as dtime, timedelta, timezone

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import wait
from prefect.utilities.annotations import unmapped
from pydantic import Field
from typing_extensions import Annotated

from blocks.marketplace_app import MarketplaceApp, load_marketplace_app
from flows.forms import form_field
from flows.task_runners import io_task_runner
from operations.infra.database import project_engine
from operations.marketplace.store import AccountView, account_label, select_accounts
from operations.marketplace.sync import AccountSyncFailed, SyncOptions, SyncResources
from operations.settings import Settings, get_settings
from tasks.marketplace import sync_marketplace_account


def sync_options(settings: Settings) -> SyncOptions:
    return SyncOptions(
        lookback=timedelta(hours=settings.marketplace_lookback_hours),
        initial_history=timedelta(days=settings.marketplace_initial_history_days),
        max_window=timedelta(days=settings.marketplace_max_window_days),
        timeout_seconds=settings.marketplace_account_timeout_seconds,
        lock_wait_seconds=settings.marketplace_lock_wait_seconds,
    )


@flow(name="sync-accounts", log_prints=False)
def sync_accounts(
    accounts: list[AccountView],
    app: MarketplaceApp,
    database_url: str,
    resources: SyncResources,
    options: SyncOptions,
    full_resync_from: datetime | None,
    retries: int,
    retry_delay_seconds: float,
) -> list[dict]:
    """Map one task per account on this flow's task runner and wait for every one of them; failed accounts
    come back as their partial reports with `status` failed (or needs_reauthorization) and the error."""
    logger = get_run_logger()
    # No Prefect timeout_seconds: it cannot interrupt a blocking call in a worker thread. The domain stops
    # the account itself at options.timeout_seconds, and every HTTP/database call has its own timeout.
    task = sync_marketplace_account.with_options(retries=retries, retry_delay_seconds=retry_delay_seconds)
    futures = task.map(
        accounts, unmapped(app), unmapped(database_url), unmapped(resources), unmapped(options),
        unmapped(full_resync_from),
    )
    wait(futures)
    reports = []
    for account, future in zip(accounts, futures):
        state = future.state
        if state.is_completed():
            report = future.result()
        else:
            error = state.result(raise_on_failure=False)
            if isinstance(error, AccountSyncFailed):
                report = dict(error.result)
            else:
                report = {"seller_id": account.seller_id, "nickname": account.nickname, "status": "failed",
                          "error": f"{state.name}: {error or state.message}"}
        reports.append(report)
        logger.info(_account_line(report))
    return reports


def _account_line(r: dict) -> str:
    label = account_label(r.get("nickname"), r["seller_id"])
    if r["status"] != "synced":
        return f"{label}: {r['status']}: {r.get('error', '')}"
    o, i = r["orders"], r["items"]
    return (
        f"{label}: orders {o['new']} new / {o['updated']} updated, items {i['new']} new / {i['updated']} updated, "
        f"{r['requests']} requests ({r['retries']} retries) in {r['seconds']:.1f} s"
    )


@flow(name="sync-marketplace", log_prints=False)
def sync_marketplace(
    accounts: Annotated[list[Annotated[int, Field(ge=1, le=2**63 - 1)]], Field(max_length=10_000)] = form_field(
        [], "Accounts", "Seller ids to sync. Empty: every active account."
    ),
    resources: SyncResources = form_field(
        SyncResources.both, "What to sync", "Orders, items, or both."
    ),
    full_resync_from: date | None = form_field(
        None,
        "Full resync from",
        "Re-read every order last updated since this day (UTC, YYYY-MM-DD), ignoring the checkpoints. "
        "Empty: incremental from each account's checkpoint (minus the lookback).",
        pattern=r"^\d{4}-\d{2}-\d{2}$",
    ),
    app_block: Annotated[str, Field(max_length=120)] = form_field(
        "", "App block", "Name of the MarketplaceApp block. Empty: MARKETPLACE_APP_BLOCK (marketplace-app)."
    ),
) -> dict:
    """Sync the orders and items of the chosen seller accounts into the project database."""
    started = time.perf_counter()
    logger = get_run_logger()
    settings = get_settings()
    now = datetime.now(timezone.utc)
    resync_from = None
    if full_resync_from is not None:
        resync_from = datetime.combine(full_resync_from, dtime.min, tzinfo=timezone.utc)
        if resync_from > now:
            raise ValueError(f"full_resync_from {full_resync_from} is in the future")
    database_url, engine = project_engine(settings)
    to_sync, skipped = select_accounts(engine, accounts or None)
    for account, why in skipped:
        logger.warning("%s skipped: %s", account.label, why)
    reports: list[dict] = []
    if to_sync:
        app = load_marketplace_app(app_block or settings.marketplace_app_block)
        app.client()  # fails here, before any task, when the block lacks credentials
        concurrency = max(1, min(settings.marketplace_concurrency, len(to_sync)))
        runner = io_task_runner(settings, concurrency, settings.marketplace_task_runner)
        logger.info(
            "syncing %d account(s) (%s) on %s, %d at a time", len(to_sync), resources.value,
            settings.marketplace_task_runner, concurrency,
        )
        reports = sync_accounts.with_options(task_runner=runner)(
            to_sync, app, database_url, resources, sync_options(settings), resync_from,
            settings.marketplace_task_retries, settings.marketplace_retry_delay_seconds,
        )
    else:
        logger.info("no active account to sync")
    reports += [
        {"seller_id": a.seller_id, "nickname": a.nickname, "status": "skipped", "error": why} for a, why in skipped
    ]
    elapsed = time.perf_counter() - started
    summary = _publish(reports, resources, settings.marketplace_task_runner, elapsed)
    failed = [r for r in reports if r["status"] in ("failed", "needs_reauthorization")]
    if failed:
        raise RuntimeError(
            f"{len(failed)} of {len(reports)} account(s) failed: "
            + "; ".join(f"{account_label(r.get('nickname'), r['seller_id'])}: {r['error']}" for r in failed)
        )
    return summary


def _publish(reports: list[dict], resources: SyncResources, runner: str, elapsed: float) -> dict:
    rows = []
    totals = {"orders_new": 0, "orders_updated": 0, "items_new": 0, "items_updated": 0, "requests": 0,
              "retries": 0}
    mismatches = []
    for r in reports:
        o, i = r.get("orders") or {}, r.get("items") or {}
        label = account_label(r.get("nickname"), r["seller_id"])
        windows = r.get("windows") or []
        bad = [w for w in windows if w["api_total"] != w["rows_read"]]
        mismatches += [(label, w) for w in bad]
        rows.append(
            {
                "account": label,
                "status": r["status"],
                "orders new": o.get("new", 0),
                "orders updated": o.get("updated", 0),
                "items new": i.get("new", 0),
                "items updated": i.get("updated", 0),
                "pages": r.get("order_pages", 0) + r.get("item_pages", 0),
                "requests": r.get("requests", 0),
                "retries": r.get("retries", 0),
                "429s": r.get("throttled", 0),
                "token refreshes": r.get("refreshes", 0),
                "windows total != read": len(bad),
                "seconds": round(r.get("seconds", 0.0), 2),
                "error": r.get("error", ""),
            }
        )
        totals["orders_new"] += o.get("new", 0)
        totals["orders_updated"] += o.get("updated", 0)
        totals["items_new"] += i.get("new", 0)
        totals["items_updated"] += i.get("updated", 0)
        totals["requests"] += r.get("requests", 0)
        totals["retries"] += r.get("retries", 0)
    by_status: dict[str, int] = {}
    for r in reports:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    create_table_artifact(key="marketplace-sync-accounts", table=rows, description="Accounts of this sync")
    problems = "\n".join(
        f"- **{row['account']}** {row['status']}: {row['error']}" for row in rows if row["status"] != "synced"
    )
    mismatch_lines = "\n".join(
        f"- {label}: {w['start']} .. {w['end']}: API total {w['api_total']:,}, rows read {w['rows_read']:,}"
        for label, w in mismatches[:50]
    )
    create_markdown_artifact(
        key="marketplace-sync-summary",
        markdown=f"""# Marketplace sync ({resources.value})

{len(reports)} account(s) in {elapsed:.1f} s on the {runner} task runner:
{', '.join(f'{n} {s}' for s, n in sorted(by_status.items())) or 'none'}.

| | new | updated |
|---|---|---|
| orders | {totals['orders_new']:,} | {totals['orders_updated']:,} |
| items | {totals['items_new']:,} | {totals['items_updated']:,} |

API requests: {totals['requests']:,} ({totals['retries']:,} retried).

## Accounts not synced
{problems or 'none'}

## Windows where the API's total differs from the orders read
{mismatch_lines or 'none'}
""",
        description="Summary of this marketplace sync",
    )
    return {"accounts": len(reports), "by_status": by_status, **totals, "seconds": round(elapsed, 2)}
