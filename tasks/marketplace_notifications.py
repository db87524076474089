"""Tasks of the marketplace-notifications flow: take the pending notifications once a burst is gathered, apply
one account's notifications (retries, its figures), and read the missed feeds."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from blocks.marketplace_app import MarketplaceApp
from operations.infra.database import get_engine
from operations.marketplace.notifications import (
    AccountNeedsReauthorization,
    Touched,
    TouchedResult,
    due_by_account,
    mark,
    mark_failed,
    pending_notifications,
    prune_processed,
    settle,
    split_known,
    store_missed_feeds,
    sync_touched,
    touched_by_account,
    wait_for_window,
)
from operations.marketplace.store import list_accounts, now_utc
from operations.marketplace.sync import SyncOptions
from tasks.cancellation import run_stop_check
from tasks.retries import retrying_task

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NotificationRun:
    """What every account's task of one consumer run is given."""

    database_url: str
    options: SyncOptions
    max_tries: int


@dataclass
class Taken:
    """One round's notifications: the active accounts' touched resources and what was set aside."""

    accounts: list[Touched]
    notifications: int
    unknown_sellers: list[int]
    unknown_notifications: int
    inactive_notifications: int


def take_notifications(database_url: str, window_seconds: float, idle_seconds: float, limit: int = 20_000,
                       ) -> Taken | None:
    """Wait until the oldest pending notification is `window_seconds` old, then take the pending ones of every
    account whose own oldest is that old (`due_by_account`: each account's burst coalesced over its window), grouped
    per account; those of unknown sellers (logged and counted) and of inactive accounts are marked at once. None when
    nothing arrived for `idle_seconds` (or the run was cancelled)."""
    engine = get_engine(database_url)
    if not wait_for_window(engine, window_seconds, idle_seconds, run_stop_check()):
        return None
    pending = due_by_account(pending_notifications(engine, limit), window_seconds, now_utc())
    active, unknown, inactive = split_known(engine, touched_by_account(pending))
    for entry in unknown:
        logger.warning("%d notification(s) of seller %s, which is no account here: ignored (onboard it to sync it)",
                       len(entry.notification_ids), entry.seller_id)
        mark(engine, entry.notification_ids, "unknown_seller")
    for entry in inactive:
        settle(engine, entry, "account_inactive", "the account is not active: its next sync after re-authorization")
    return Taken(active, len(pending), [e.seller_id for e in unknown], sum(len(e.notification_ids) for e in unknown),
                 sum(len(e.notification_ids) for e in inactive))


# Re-running is harmless: the fetched orders and items are upserted only when newer, and only pending
# notifications are marked.
@retrying_task(name="apply-notifications", task_run_name="notifications-{touched.seller_id}", retries=2,
               delays=[2, 10], cache_policy=NO_CACHE, tags=["marketplace", "http"])
def apply_account_notifications(touched: Touched, app: MarketplaceApp, run: NotificationRun) -> dict:
    """Fetch and store what one account's notifications name, then mark them; returns its figures."""
    engine = get_engine(run.database_url)
    try:
        result = sync_touched(engine, app.client(), touched, run.options, run_stop_check())
    except AccountNeedsReauthorization as exc:
        settle(engine, touched, "account_inactive", str(exc))
        return TouchedResult(touched.seller_id, len(touched.notification_ids), status="account_inactive",
                             error=str(exc)).to_json()
    except Exception as exc:
        if _last_attempt():
            mark_failed(engine, touched.notification_ids, f"{type(exc).__name__}: {exc}", run.max_tries)
        raise
    settle(engine, touched, "synced")
    return result.to_json()


def _last_attempt() -> bool:
    context = TaskRunContext.get()
    return context is None or context.task_run.run_count > context.task.retries


# Re-running is harmless: missed feeds are stored under their `_id`, so a second read stores nothing new.
@retrying_task(name="read-missed-feeds", retries=2, delays=[5, 20], cache_policy=NO_CACHE,
               tags=["marketplace", "http"])
def read_missed_feeds(app: MarketplaceApp, run: NotificationRun) -> dict:
    """Store the app's missed feeds (read with the token of the first active account); {"read", "stored"}."""
    engine = get_engine(run.database_url)
    active = [a for a in list_accounts(engine) if a.status == "active"]
    if not active:
        return {"read": 0, "stored": 0}
    read, stored = store_missed_feeds(engine, app.client(), active[0].seller_id, app.client_id, run.options,
                                      run_stop_check())
    return {"read": read, "stored": stored}


# Re-running is harmless: it deletes only notifications applied before the cut-off; a second run finds fewer.
@retrying_task(name="prune-notifications", retries=2, delays=[5, 20], cache_policy=NO_CACHE, tags=["marketplace"])
def prune_notifications(run: NotificationRun, retention_days: float) -> int:
    """Delete the applied notifications older than `retention_days`; returns how many."""
    return prune_processed(get_engine(run.database_url), now_utc() - timedelta(days=retention_days))
