"""Tasks of the marketplace flows: thin wrappers that add retries, names and tags to domain code, the run's stop
check and figures across attempts, and the events that tell someone an account needs its owner."""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from uuid import UUID

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.context import TaskRunContext
from prefect.exceptions import ObjectNotFound
from sqlalchemy import Engine

from blocks.marketplace_app import MarketplaceApp
from operations.events import ACCOUNT_PARKED
from operations.infra.database import get_engine
from operations.marketplace.client import request_slots
from operations.marketplace.store import AccountView, claim_parked_notices, now_utc, release_interrupted_syncs
from operations.marketplace.report import failed_report
from operations.marketplace.sync import AccountSyncFailed, AccountSyncResult, SyncRun, sync_account
from tasks.attempts import attempt_tally, release_tally
from tasks.cancellation import current_flow_run_id, run_stop_check
from tasks.events import emit
from tasks.retries import is_transient, retrying_task

logger = logging.getLogger(__name__)
# The states of a flow run that may still be syncing an account (a run waiting to be cancelled still is).
HOLDING_STATES = frozenset({StateType.RUNNING, StateType.CANCELLING, StateType.PENDING})


# Re-running an account is harmless by design (upserts keyed by the API's ids, checkpoints after commits), so
# Dask recomputing a finished task needs no cache; NO_CACHE also keeps the block out of cache keys.
# No tags: a tagged task run asks the Prefect server for its tags' concurrency slots before it starts, through
# one queue per tag set on the client's event-loop thread; with 20 account syncs busy in the process, the
# second wave of a first sync's tasks waited 0.5-2.4 s there (and the first wave sometimes ~2 s), every request
# slot idle meanwhile. MARKETPLACE_CONCURRENCY is what bounds the marketplace's load.
@retrying_task(
    name="sync-account",
    task_run_name="sync-{account.label}",
    retries=2,
    delays=[5, 20],  # AccountSyncFailed says whether a retry helps
    cache_policy=NO_CACHE,
)
def sync_marketplace_account(account: AccountView, app: MarketplaceApp, run: SyncRun) -> dict:
    """Sync one seller account (orders and/or items, as `run` says) into the project database; returns its
    report, which counts what every attempt of this task committed. Stops between two pages once the run is
    cancelled (its report then says `cancelled`)."""
    tally = attempt_tally(lambda: AccountSyncResult(account.seller_id, account.nickname))
    flow_run_id = current_flow_run_id()
    try:
        result = _sync(account, app, run, tally, run_stop_check(flow_run_id), flow_run_id)
    except AccountSyncFailed as exc:
        if not exc.transient or _last_attempt():
            release_tally()  # no retry follows
        raise
    release_tally()
    return result.to_json()


# Re-running a group is harmless for the reasons an account's re-run is; Prefect does not retry it: the accounts
# that failed transiently are tried again inside it, after the others, so one account never re-runs the group.
# No tags, as `sync-account`.
@task(name="sync-accounts", task_run_name="sync-{label}", cache_policy=NO_CACHE)
def sync_marketplace_accounts(
    accounts: list[AccountView], label: str, app: MarketplaceApp, run: SyncRun, retries: int = 2,
    retry_delay: float = 5.0,
) -> list[dict]:
    """Sync a group of accounts (`operations.marketplace.sync.group_accounts`) one after another, each
    as `sync_marketplace_account` syncs one; returns their reports in order. An account whose sync failed in a way
    a retry may heal is tried again once the others are done, up to `retries` times `retry_delay` s later, its
    report counting every attempt; one account failing never stops the others."""
    flow_run_id = current_flow_run_id()
    should_stop = run_stop_check(flow_run_id)
    tallies = {a.seller_id: AccountSyncResult(a.seller_id, a.nickname) for a in accounts}
    reports: dict[int, dict] = {}
    pending = list(accounts)
    for attempt in range(retries + 1):
        again = []
        for account in pending:
            try:
                reports[account.seller_id] = _sync(account, app, run, tallies[account.seller_id], should_stop,
                                                   flow_run_id).to_json()
                continue
            except AccountSyncFailed as exc:
                reports[account.seller_id], transient = dict(exc.result), exc.transient
            except Exception as exc:  # noqa: BLE001 - the account's own failure, as its task would end with it
                reports[account.seller_id] = failed_report(account, f"{type(exc).__name__}: {exc}")
                transient = is_transient(exc)
            if transient:
                again.append(account)
        if not again or attempt == retries or not _paused(retry_delay, should_stop):
            break
        pending = again
    return [reports[a.seller_id] for a in accounts]


def _sync(account: AccountView, app: MarketplaceApp, run: SyncRun, tally: AccountSyncResult, should_stop,
          flow_run_id: UUID | None) -> AccountSyncResult:
    """One attempt at one account's sync, its figures added to `tally`, its requests in the process's slots
    (`run_shape`)."""
    client = app.client().sharing(request_slots(run.requests_in_flight))
    return sync_account(_engine(run), client, account, run.resources, run.options,
                        full_resync_from=run.full_resync_from, should_stop=should_stop, result=tally,
                        run_id=str(flow_run_id) if flow_run_id else None)


def _paused(seconds: float, should_stop) -> bool:
    """Wait `seconds` unless the run is stopped meanwhile (False then)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if should_stop():
            return False
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    return not should_stop()


def _engine(run: SyncRun) -> Engine:
    """The engine of the run's account syncs: one pooled connection per account synced at once."""
    if not run.accounts_at_once:
        return get_engine(run.database_url)
    return get_engine(run.database_url, pool_size=run.accounts_at_once, purpose="marketplace-sync")


def _last_attempt() -> bool:
    context = TaskRunContext.get()
    return context is None or context.task_run.run_count > context.task.retries


def holder_running(flow_run_id: str) -> bool:
    """Whether the flow run that holds an account's sync may still be syncing it (Running, Pending or
    Cancelling). An id the API does not know is gone; an unreachable API answers True (an outage is no crash)."""
    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(UUID(flow_run_id)).state
    except (ValueError, ObjectNotFound):  # not a flow run id, or a run the API does not know
        return False
    except Exception as exc:  # noqa: BLE001 - see the docstring
        logger.warning("could not read flow run %s: %s", flow_run_id, exc)
        return True
    return state is not None and state.type in HOLDING_STATES


def release_interrupted(engine: Engine) -> list[AccountView]:
    """The accounts left `running` by a crashed or killed sync, now marked `interrupted` (the run resumes them)."""
    return release_interrupted_syncs(engine, holder_running)


def tell_parked(engine: Engine, reminder_hours: float, seller_ids: list[int] | None = None) -> list[AccountView]:
    """Emit `project.marketplace.account.parked` for each parked account whose owner is due to be told: once
    when it is parked, then every `reminder_hours` while it stays parked. Returns the accounts told."""
    told = claim_parked_notices(engine, now_utc(), timedelta(hours=reminder_hours), seller_ids)
    for account in told:
        emit(ACCOUNT_PARKED, str(account.seller_id), name=account.nickname or str(account.seller_id),
             payload={"seller_id": account.seller_id, "nickname": account.nickname, "reason": account.status_reason})
    return told
