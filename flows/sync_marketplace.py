"""Flow `sync-marketplace`: every seller account's orders and items synced incrementally into the project
database, one mapped task per account, in parallel, on a schedule or on demand through the Prefect API.

Stages: check the request and pick the accounts (unknown ids, a bad or future resync date, a missing app block
or an unmigrated database fail here, before any API request); sync the accounts on the configured task runner
(threads or Dask), each under its own lock and timeout, one account's failure never stopping the others;
then publish a table of accounts and a summary, and end Failed naming the failed accounts, if any.
"""

from __future__ import annotations

import time
from datetime import date, timedelta

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Failed
from prefect.utilities.annotations import unmapped
from pydantic import BeforeValidator, Field
from typing_extensions import Annotated

from blocks.marketplace_app import MarketplaceApp, load_marketplace_app
from flows.forms import form_field
from flows.outcomes import ends_failed_on_user_error
from flows.task_runners import io_task_runner, map_and_wait
from operations.errors import UserError
from operations.infra.database import project_engine
from operations.marketplace.report import (
    AccountsFailed,
    account_line,
    account_rows,
    failed_report,
    failure_message,
    skipped_reports,
    summary_markdown,
    sync_summary,
)
from operations.marketplace.store import AccountView, now_utc, select_accounts
from operations.marketplace.sync import AccountSyncFailed, SyncOptions, SyncResources, SyncRun, resync_start
from operations.settings import Settings, get_settings
from tasks.marketplace import sync_marketplace_account
from tasks.retries import with_retries


def sync_options(settings: Settings) -> SyncOptions:
    return SyncOptions(
        lookback=timedelta(hours=settings.marketplace.lookback_hours),
        initial_history=timedelta(days=settings.marketplace.initial_history_days),
        max_window=timedelta(days=settings.marketplace.max_window_days),
        timeout_seconds=settings.marketplace.account_timeout_seconds,
        lock_wait_seconds=settings.marketplace.lock_wait_seconds,
    )


def _day_text(value: object) -> object:
    """A day given as a `date` or None (Python callers) taken as its YYYY-MM-DD text, or '' for none."""
    return "" if value is None else value.isoformat() if isinstance(value, date) else value


def checked_app(name: str) -> MarketplaceApp:
    """The app block `name`, checked for credentials before any request; a missing block or credentials are
    the user's to fix (the message says how)."""
    try:
        app = load_marketplace_app(name)
        app.client()
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return app


def sync_accounts(accounts: list[AccountView], app: MarketplaceApp, run: SyncRun, settings: Settings) -> list[dict]:
    """One task per account on MARKETPLACE_TASK_RUNNER, MARKETPLACE_CONCURRENCY at a time; every account's
    report, a failed account's being its partial report with the error."""
    concurrency = max(1, min(settings.marketplace.concurrency, len(accounts)))
    get_run_logger().info("syncing %d account(s) (%s) on %s, %d at a time", len(accounts), run.resources.value,
                          settings.marketplace.task_runner, concurrency)
    # No Prefect timeout_seconds: it cannot interrupt a blocking call in a worker thread. The domain stops
    # the account itself at options.timeout_seconds, and every HTTP/database call has its own timeout.
    task = with_retries(sync_marketplace_account, settings.marketplace.task_retries,
                        [settings.marketplace.retry_delay_seconds])
    runner = io_task_runner(settings, concurrency, settings.marketplace.task_runner)
    outcomes = map_and_wait(runner, task, {"account": accounts, "app": unmapped(app), "run": unmapped(run)})
    return [
        outcome if isinstance(outcome, dict)
        else dict(outcome.result) if isinstance(outcome, AccountSyncFailed)
        else failed_report(account, f"{type(outcome).__name__}: {outcome}")
        for account, outcome in zip(accounts, outcomes)
    ]


SellerIds = Annotated[list[Annotated[int, Field(ge=1, le=2**63 - 1)]], Field(max_length=10_000)]
Day = Annotated[str, BeforeValidator(_day_text), Field(max_length=10)]
BlockName = Annotated[str, Field(max_length=120)]
# The form: each parameter's default, title and help text.
ACCOUNTS = form_field([], "Accounts", "Seller ids to sync. Empty: every active account.")
RESOURCES = form_field(SyncResources.both, "What to sync", "Orders, items, or both.")
FULL_RESYNC_FROM = form_field(
    "", "Full resync from",
    "Re-read every order last updated since this day (UTC, YYYY-MM-DD), ignoring the checkpoints. "
    "Empty: incremental from each account's checkpoint (minus the lookback).",
    pattern=r"^$|^\d{4}-\d{2}-\d{2}$",
)
APP_BLOCK = form_field(
    "", "App block", "Name of the MarketplaceApp block. Empty: MARKETPLACE_APP_BLOCK (marketplace-app)."
)


@flow(name="sync-marketplace", log_prints=False)
@ends_failed_on_user_error
def sync_marketplace(
    accounts: SellerIds = ACCOUNTS, resources: SyncResources = RESOURCES, full_resync_from: Day = FULL_RESYNC_FROM,
    app_block: BlockName = APP_BLOCK,
) -> dict:
    """Sync the orders and items of the chosen seller accounts into the project database."""
    started = time.perf_counter()
    logger = get_run_logger()
    settings = get_settings()
    resync_from = resync_start(full_resync_from, now_utc())
    database_url, engine = project_engine(settings)
    to_sync, skipped = select_accounts(engine, accounts or None)
    for account, why in skipped:
        logger.warning("%s skipped: %s", account.label, why)
    reports = []
    if to_sync:
        run = SyncRun(database_url, resources, sync_options(settings), resync_from)
        app = checked_app(app_block or settings.marketplace.app_block)
        reports = sync_accounts(to_sync, app, run, settings)
    else:
        logger.info("no active account to sync")
    for report in reports:
        logger.info("%s", account_line(report))
    reports += skipped_reports(skipped)
    elapsed = time.perf_counter() - started
    create_table_artifact(key="marketplace-sync-accounts", table=account_rows(reports),
                          description="Accounts of this sync")
    create_markdown_artifact(
        key="marketplace-sync-summary", description="Summary of this marketplace sync",
        markdown=summary_markdown(reports, resources.value, settings.marketplace.task_runner, elapsed),
    )
    failed = failure_message(reports)
    return Failed(message=failed, data=AccountsFailed(failed)) if failed else sync_summary(reports, elapsed)
