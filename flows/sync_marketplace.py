"""Flow `sync-marketplace`: every seller account's orders and items synced incrementally into the project
database, one mapped task per account, in parallel, on a schedule or on demand through the Prefect API. In a
catch-up run with notifications on (no item read), the accounts synced a few hours ago share tasks, several
accounts to a task, when there are more of them than tasks at once: their sync is a request or two, less than a
task run costs. A run with many more accounts than syncs at once (a first sync of many sellers) syncs the others
several to a task as well, keeping two tasks per sync at once (`group_accounts`).

Stages: release the accounts a crashed or killed sync left `running` (shown as interrupted, resumed here); check
the request and pick the accounts (unknown ids, a bad or future resync date, a missing app block or an unmigrated
database fail here, before any API request); sync the accounts on the configured task runner (threads or Dask),
each under its own lock and timeout, one account's failure never stopping the others; tell someone about parked
accounts (event `project.marketplace.account.parked`); then publish a table of accounts and a summary, and end
Failed naming the failed accounts, if any.

Cancel: every account's task stops before its next page once the run is CANCELLING (or this process got the
worker's SIGTERM), so no new page, batch or account starts seconds after the cancel; the run then writes its
table and summary (what was committed before the cancel, which accounts were interrupted) and ends Cancelled.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from datetime import date, timedelta

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.exceptions import TerminationSignal
from prefect.futures import wait
from prefect.states import Cancelled, Completed, Failed
from prefect.utilities.annotations import unmapped
from pydantic import BeforeValidator, Field
from typing_extensions import Annotated

from blocks.marketplace_app import MarketplaceApp, load_marketplace_app
from flows.forms import form_field
from flows.outcomes import ends_failed_on_user_error
from flows.task_runners import io_task_runner
from operations.errors import UserError
from operations.events import ACCOUNT_PARKED
from operations.infra.database import get_engine, project_engine
from operations.infra.heap import settled_heap
from operations.marketplace.report import (
    AccountsFailed,
    account_line,
    account_rows,
    failed_report,
    run_outcome,
    skipped_reports,
    start_lines,
    summary_markdown,
    sync_summary,
)
from operations.marketplace.store import AccountView, checkpoints, now_utc, select_accounts
from operations.marketplace.sync import (
    AccountSyncFailed,
    SyncOptions,
    SyncResources,
    SyncRun,
    group_accounts,
    light_account,
    resync_start,
    run_shape,
)
from operations.settings import Settings, get_settings
from tasks.cancellation import note_termination, run_stop_check, watch_termination
from tasks.marketplace import release_interrupted, sync_marketplace_account, sync_marketplace_accounts, tell_parked
from tasks.retries import with_retries

# After the worker's SIGTERM (it kills the process 30 s later), how long the run waits for its accounts to stop
# at their next page before writing what they did.
STOP_GRACE_SECONDS = 15.0


def sync_options(settings: Settings) -> SyncOptions:
    return SyncOptions(
        lookback=timedelta(hours=settings.marketplace.lookback_hours),
        initial_history=timedelta(days=settings.marketplace.initial_history_days),
        max_window=timedelta(days=settings.marketplace.max_window_days),
        timeout_seconds=settings.marketplace.account_timeout_seconds,
        lock_wait_seconds=settings.marketplace.lock_wait_seconds,
        token_margin=timedelta(seconds=settings.marketplace.token_margin_seconds),
        items_scan=not settings.marketplace_notifications.enabled,
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


def sync_accounts(
    accounts: list[AccountView], app: MarketplaceApp, run: SyncRun, settings: Settings
) -> tuple[list[dict], TerminationSignal | None]:
    """One task per account on MARKETPLACE_TASK_RUNNER, MARKETPLACE_CONCURRENCY requests in flight (`run_shape`),
    several accounts to a task when they are many or light (`group_accounts`): every account's report (a
    failed account's is its partial report with the error), and the worker's termination signal if it arrived
    meanwhile (the caller reports, then re-raises it)."""
    kind = settings.marketplace.task_runner
    shape = run_shape(settings.marketplace.concurrency, len(accounts), kind, settings.dask.n_workers,
                      bool(settings.dask.scheduler_address))
    run = replace(run, requests_in_flight=shape.requests_in_flight, accounts_at_once=shape.accounts_at_once)
    singles, groups = group_accounts(accounts, light_sellers(accounts, run), shape.accounts_at_once)
    get_run_logger().info("syncing %d account(s) (%s) on %s, %d at a time, %d request(s) in flight%s",
                          len(accounts), run.resources.value, kind, shape.accounts_at_once,
                          settings.marketplace.concurrency,
                          f"; {len(accounts) - len(singles)} of them in {len(groups)} shared task(s)" if groups else "")
    runner = io_task_runner(settings, shape.accounts_at_once, kind)
    signal = None
    with runner, settled_heap():
        futures = _submit(runner, singles, groups, app, run, settings)
        try:
            wait(futures)
        except TerminationSignal as exc:  # the accounts stop at their next page: wait for what they did
            signal = exc
            note_termination()
            get_run_logger().warning("termination signal: waiting up to %.0f s for the accounts to stop",
                                     STOP_GRACE_SECONDS)
            wait(futures, timeout=STOP_GRACE_SECONDS)
        outcomes = [_outcome(future, None if signal is None else 1.0) for future in futures]
    reports = {}
    for index, outcome in enumerate(outcomes):  # the singles' outcomes, then the groups' (lists of reports)
        grouped = index >= len(singles)
        unit = groups[index - len(singles)] if grouped else [singles[index]]
        each = outcome if grouped and isinstance(outcome, list) else [outcome] * len(unit)
        reports.update((a.seller_id, _report(a, o)) for a, o in zip(unit, each))
    return [reports[a.seller_id] for a in accounts], signal


def light_sellers(accounts: list[AccountView], run: SyncRun) -> set[int]:
    """The accounts whose sync in `run` is a short catch-up (`light_account`), from their orders checkpoints."""
    now = now_utc()
    marks = checkpoints(get_engine(run.database_url), [a.seller_id for a in accounts], "orders")
    return {seller for seller, mark in marks.items() if light_account(run, mark, now)}


def _submit(runner, singles: list[AccountView], groups: list[list[AccountView]], app: MarketplaceApp, run: SyncRun,
            settings: Settings) -> list:
    """The futures of the run's tasks: one per single account (with Prefect's retries), then one per group."""
    # No Prefect timeout_seconds: it cannot interrupt a blocking call in a worker thread. The domain stops
    # the account itself at options.timeout_seconds, and every HTTP/database call has its own timeout.
    task = with_retries(sync_marketplace_account, settings.marketplace.task_retries,
                        [settings.marketplace.retry_delay_seconds])
    futures = list(runner.map(task, {"account": singles, "app": unmapped(app), "run": unmapped(run)})) if singles else []
    if groups:
        futures += runner.map(sync_marketplace_accounts, {
            "accounts": groups, "label": [f"{g[0].label}-and-{len(g) - 1}-more" for g in groups],
            "app": unmapped(app), "run": unmapped(run), "retries": unmapped(settings.marketplace.task_retries),
            "retry_delay": unmapped(settings.marketplace.retry_delay_seconds),
        })
    return futures


def _report(account: AccountView, outcome: object) -> dict:
    """An account's report from its task's outcome (`_outcome`)."""
    if isinstance(outcome, dict):
        return outcome
    if isinstance(outcome, AccountSyncFailed):
        return dict(outcome.result)
    return failed_report(account, f"{type(outcome).__name__}: {outcome}")


def _outcome(future, timeout: float | None) -> object:
    """The task's return value or the exception it ended with; after a termination signal, an account still
    running once the grace is over is reported as such. (The future, not the task run's state through the API:
    task run states reach the API asynchronously.)"""
    try:
        return future.result(timeout=timeout, raise_on_failure=False)
    except TimeoutError:
        return RuntimeError("still running when the run was terminated")


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
    watch_termination()
    started = time.perf_counter()
    settings = get_settings()
    resync_from = resync_start(full_resync_from, now_utc())
    database_url, engine = project_engine(settings)
    released = release_interrupted(engine)
    to_sync, skipped = select_accounts(engine, accounts or None)
    _log(start_lines(released, skipped), warning=True)
    reports, signal = [], None
    if to_sync:
        run = SyncRun(database_url, resources, sync_options(settings), resync_from)
        reports, signal = sync_accounts(to_sync, checked_app(app_block or settings.marketplace.app_block), run, settings)
    else:
        get_run_logger().info("no active account to sync")
    _log([account_line(r) for r in reports])
    reports += skipped_reports(skipped)
    told = tell_parked(engine, settings.marketplace.parked_reminder_hours, [r["seller_id"] for r in reports])
    if told:
        _log([f"announced {len(told)} parked account(s) (event {ACCOUNT_PARKED}): "
              f"{', '.join(a.label for a in told)}"], warning=True)
    elapsed = time.perf_counter() - started
    publish_report(reports, resources, settings.marketplace.task_runner, elapsed, released)
    if signal is not None:
        raise signal  # the engine ends the run Cancelled (the worker's cancel) or Crashed
    return final_state(reports, elapsed, run_stop_check()())


def _log(lines: list[str], warning: bool = False) -> None:
    logger = get_run_logger()
    for line in lines:
        (logger.warning if warning else logger.info)("%s", line)


def publish_report(reports: list[dict], resources: SyncResources, runner: str, seconds: float,
                   released: list[AccountView]) -> None:
    """The run's artifacts: the accounts table and the summary."""
    create_table_artifact(key="marketplace-sync-accounts", table=account_rows(reports),
                          description="Accounts of this sync")
    create_markdown_artifact(
        key="marketplace-sync-summary", description="Summary of this marketplace sync",
        markdown=summary_markdown(reports, resources.value, runner, seconds, [asdict(a) for a in released]),
    )


def final_state(reports: list[dict], seconds: float, stopped: bool):
    """The run's final state (`run_outcome`): Cancelled or Completed with the summary as data, Failed naming the
    failed accounts, or the summary itself (Completed)."""
    state, message = run_outcome(reports, stopped)
    summary = sync_summary(reports, seconds)
    if state == "cancelled":
        return Cancelled(message=message, data=summary)
    if state == "failed":
        return Failed(message=message, data=AccountsFailed(message))
    return Completed(message=message, data=summary) if message else summary
