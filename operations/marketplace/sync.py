"""One seller account's incremental sync: orders by date windows, items by a full id scan, each page upserted
and committed, each checkpoint advanced only after the rows it covers are stored. No Prefect import.

Cancel: every API request goes through `AccountSession.call`, which asks the run's `should_stop` first, so a
cancelled run starts no new page or batch; the sync ends `cancelled` with what it committed counted and its
checkpoints where the stored rows put them (a window cut short never moves the checkpoint).

Figures across retries: the caller may hand the same `AccountSyncResult` to every attempt of an account's task;
each committed page and batch is added to it as it is stored, so its counts are what all attempts did.

Unit of work and why a repeat is harmless: a page of orders (or a batch of item details) is one transaction
of upserts keyed by the API's ids and guarded by the records' own update times; the checkpoint of a resource
moves after a whole date window is stored. A crash between the two re-reads the window (upserts make that a
no-op); a re-run with the lookback re-reads the last hours (the API truncates filters to the hour and late
updates land behind the watermark), again without duplicates.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, time as clock_time, timedelta, timezone
from typing import Any, Callable, TypeVar

from pydantic import SecretStr
from sqlalchemy import Engine

from operations.cancellation import Cancelled, StopCheck, never, raise_if_stopped
from operations.errors import UserError
from operations.marketplace.client import (
    ITEMS_DETAIL_BATCH,
    ITEMS_OFFSET_CAP,
    ITEMS_PAGE_LIMIT,
    ORDERS_PAGE_LIMIT,
    InvalidAccessToken,
    MarketplaceClient,
    MarketplaceError,
    ScrollExpired,
    TransientAPIError,
)
from operations.marketplace.store import (
    AccountNeedsReauthorization,
    AccountView,
    TokenState,
    UpsertCounts,
    account_label,
    account_sync_lock,
    advance_checkpoint,
    get_account,
    get_checkpoint,
    now_utc,
    read_tokens,
    record_sync,
    refresh_tokens,
    upsert_items,
    upsert_orders,
)

T = TypeVar("T")
HOUR = timedelta(hours=1)


class SyncResources(str, enum.Enum):
    """What a sync fetches."""

    orders = "orders"
    items = "items"
    both = "both"

    def includes(self, resource: str) -> bool:
        return self is SyncResources.both or self.value == resource


@dataclass(frozen=True)
class SyncOptions:
    """How one account is synced (from settings)."""

    lookback: timedelta = timedelta(hours=2)
    initial_history: timedelta = timedelta(days=90)
    max_window: timedelta = timedelta(days=30)
    timeout_seconds: float = 300.0
    lock_wait_seconds: float = 30.0
    token_margin: timedelta = timedelta(minutes=5)
    window_rereads: int = 3  # re-reads of a window whose total moved while it was paged
    scan_restarts: int = 3  # items scans restarted after an expired scroll_id
    # False (MARKETPLACE_NOTIFICATIONS on): a sync of `both` reads no items, changed items come from notifications
    # and the daily reconciliation; a sync asked for `items` alone still reads them all
    items_scan: bool = True


@dataclass(frozen=True)
class SyncRun:
    """What every account of one run is synced with: the one object a run hands each account's sync."""

    database_url: str = field(repr=False)  # may carry a password
    resources: SyncResources = SyncResources.both
    options: SyncOptions = SyncOptions()
    full_resync_from: datetime | None = None  # re-read orders updated since then, ignoring the checkpoints


class BadResyncDate(UserError, ValueError):
    """A full-resync day that is not a date, or is in the future."""


def resync_start(day: str | date | None, now: datetime) -> datetime | None:
    """The first moment (UTC) of `day` (YYYY-MM-DD) for a full resync; None for an empty day (incremental).
    Raises BadResyncDate for a day that is not a date or is after `now`."""
    if not day:
        return None
    try:
        parsed = day if isinstance(day, date) else date.fromisoformat(day)
    except ValueError:
        raise BadResyncDate(f"full_resync_from {day!r} is not a date (YYYY-MM-DD)") from None
    start = datetime.combine(parsed, clock_time.min, tzinfo=timezone.utc)
    if start > now:
        raise BadResyncDate(f"full_resync_from {parsed} is in the future")
    return start


class SyncTimeout(MarketplaceError):
    """The account's sync ran out of its time; its checkpoints keep what was committed."""


class WindowTooLarge(MarketplaceError):
    """One hour holds more orders than the API pages through: they cannot all be read."""


class AccountSyncFailed(Exception):
    """One account's sync failed. Carries the partial result (what was committed still counts) and whether
    a retry could help. Pickles (Dask) through its args."""

    def __init__(self, message: str, result: dict[str, Any], transient: bool):
        super().__init__(message, result, transient)

    @property
    def message(self) -> str:
        return self.args[0]

    @property
    def result(self) -> dict[str, Any]:
        return self.args[1]

    @property
    def transient(self) -> bool:
        return self.args[2]

    def __str__(self) -> str:
        return self.message


@dataclass
class WindowReport:
    """One date window of orders: what the API said it held against what was read."""

    start: datetime
    end: datetime
    api_total: int
    rows_read: int
    pages: int
    rereads: int = 0

    @property
    def mismatch(self) -> bool:
        return self.api_total != self.rows_read


@dataclass
class AccountSyncResult:
    seller_id: int
    nickname: str
    status: str = "running"  # synced | failed | skipped | needs_reauthorization | cancelled
    orders: UpsertCounts = field(default_factory=UpsertCounts)
    items: UpsertCounts = field(default_factory=UpsertCounts)
    items_missing: int = 0
    order_pages: int = 0
    item_pages: int = 0
    requests: int = 0
    retries: int = 0
    throttled: int = 0
    server_errors: int = 0
    refreshes: int = 0
    scan_restarts: int = 0
    windows: list[WindowReport] = field(default_factory=list)
    orders_checkpoint: datetime | None = None
    seconds: float = 0.0
    error: str = ""
    attempts: int = 0  # attempts of the account's task that reached its sync (the figures count them all)
    resumed_from: str = ""  # the flow run whose sync of this account was interrupted (crashed, killed), if any

    @property
    def label(self) -> str:
        return account_label(self.nickname, self.seller_id)

    @property
    def mismatched_windows(self) -> list[WindowReport]:
        return [w for w in self.windows if w.mismatch]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for window in data["windows"]:
            window["start"], window["end"] = window["start"].isoformat(), window["end"].isoformat()
        data["orders_checkpoint"] = self.orders_checkpoint.isoformat() if self.orders_checkpoint else None
        return data


def floor_hour(value: datetime) -> datetime:
    return value.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)


def split_windows(start: datetime, end: datetime, max_window: timedelta) -> list[tuple[datetime, datetime]]:
    """Hour-aligned windows [start, end) of at most max_window each (at least one hour)."""
    step = max(HOUR, max_window - max_window % HOUR)
    windows, cursor = [], start
    while cursor < end:
        windows.append((cursor, min(cursor + step, end)))
        cursor += step
    return windows


class AccountSession:
    """The account's API calls with a valid access token: refreshed ahead of expiry (serialized in the
    database), and once more on a 401 before the call is retried once."""

    def __init__(
        self, engine: Engine, client: MarketplaceClient, seller_id: int, options: SyncOptions, deadline: float,
        should_stop: StopCheck = never,
    ):
        self.engine, self.client, self.seller_id = engine, client, seller_id
        self.options, self.deadline, self.should_stop = options, deadline, should_stop
        self.tokens: TokenState = read_tokens(engine, seller_id)

    def _check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise SyncTimeout(
                f"seller {self.seller_id}: stopped after {self.options.timeout_seconds:.0f} s "
                "(MARKETPLACE_ACCOUNT_TIMEOUT_SECONDS); committed pages and checkpoints are kept"
            )

    def _refresh(self) -> None:
        self.tokens = refresh_tokens(self.engine, self.seller_id, self.tokens.version, self.client.refresh)

    def token(self) -> SecretStr:
        if not self.tokens.valid_for(self.options.token_margin, now_utc()):
            self._refresh()
        return self.tokens.access_token

    def call(self, fn: Callable[[SecretStr], T], unit: str = "the next request") -> T:
        """`fn(access token)`, unless the run was cancelled (raises Cancelled naming `unit`) or the account's
        time is up."""
        raise_if_stopped(self.should_stop, unit)
        self._check_time()
        try:
            return fn(self.token())
        except InvalidAccessToken:
            self._refresh()  # another holder may have refreshed already: then its token is taken
            return fn(self.tokens.access_token)  # a second 401 propagates


def _page_window(
    session: AccountSession, result: AccountSyncResult, start: datetime, stop: datetime
) -> tuple[set[int], set[int], int] | None:
    """One pass over a window, each page upserted: (order ids read, paging totals seen, pages), or None when
    the window holds more orders than the API pages through (offset + limit above its cap): split it."""
    client, seller, cap = session.client, session.seller_id, session.client.orders_offset_cap
    offset, seen, totals, pages = 0, set(), set(), 0
    while offset + ORDERS_PAGE_LIMIT <= cap:
        page = session.call(lambda t: client.search_orders(t, seller, start, stop, offset), "the next page of orders")
        result.order_pages += 1
        pages += 1
        total = int((page.get("paging") or {}).get("total") or 0)
        totals.add(total)
        if offset == 0 and total + ORDERS_PAGE_LIMIT > cap and stop - start > HOUR:
            return None  # split now rather than after paging up to the cap
        orders = page.get("results") or []
        if not orders:  # page until empty: paging.total is known to run low for some sellers
            return seen, totals, pages
        result.orders.add(upsert_orders(session.engine, seller, orders))
        seen.update(int(o["id"]) for o in orders)
        offset += len(orders)
    return None


def _read_window(
    session: AccountSession, result: AccountSyncResult, start: datetime, stop: datetime, rereads: int
) -> WindowReport | None:
    """A window read until its total held still while it was paged (else offsets shifted under the pages and
    it is read again, at most `rereads` times); None when it must be split."""
    report = WindowReport(start, stop, api_total=0, rows_read=0, pages=0)
    for _ in range(rereads + 1):
        passed = _page_window(session, result, start, stop)
        if passed is None:
            return None
        seen, totals, pages = passed
        report.pages += pages
        report.api_total, report.rows_read = max(totals, default=0), len(seen)
        if len(totals) <= 1:
            break
        report.rereads += 1
    return report


def _sync_orders(
    session: AccountSession, result: AccountSyncResult, since: datetime, until: datetime, options: SyncOptions
) -> None:
    """Orders last updated in [since, until), window by window; the checkpoint follows each stored window."""
    # The API truncates both ends of the filter to the hour: the last window ends at the next full hour so
    # that the current hour is read, and the checkpoint never passes `until` (the sync's start).
    end = floor_hour(until)
    if end < until:
        end += HOUR
    pending = deque(split_windows(floor_hour(since), end, options.max_window))
    while pending:
        start, stop = pending.popleft()
        report = _read_window(session, result, start, stop, options.window_rereads)
        if report is None:
            if stop - start <= HOUR:
                raise WindowTooLarge(
                    f"more than {session.client.orders_offset_cap:,} orders last updated in the hour from "
                    f"{start:%Y-%m-%d %H:00} UTC: the API cannot page through them"
                )
            middle = max(start + ((stop - start) / 2 // HOUR) * HOUR, start + HOUR)
            pending.extendleft([(middle, stop), (start, middle)])  # the earlier half first
            continue
        result.windows.append(report)
        advance_checkpoint(session.engine, session.seller_id, "orders", min(stop, until))
        result.orders_checkpoint = min(stop, until)


def _item_ids(session: AccountSession, result: AccountSyncResult) -> list[str]:
    """Every item id of the seller: offset pages up to the API's cap, then a scan from the start."""
    client, seller = session.client, session.seller_id
    ids: dict[str, None] = {}
    offset = 0
    while offset + ITEMS_PAGE_LIMIT <= ITEMS_OFFSET_CAP:
        page = session.call(lambda t: client.search_item_ids(t, seller, offset), "the next page of item ids")
        result.item_pages += 1
        batch = page.get("results") or []
        ids.update(dict.fromkeys(map(str, batch)))
        if not batch:
            return list(ids)
        offset += len(batch)
    # more than the offset cap: scan (ids are merged, so a restarted scan duplicates nothing)
    for restart in range(session.options.scan_restarts + 1):
        scroll_id = None
        try:
            while True:
                page = session.call(lambda t: client.scan_item_ids(t, seller, scroll_id), "the next page of item ids")
                result.item_pages += 1
                batch = page.get("results") or []
                if not batch:
                    return list(ids)
                ids.update(dict.fromkeys(map(str, batch)))
                scroll_id = page.get("scroll_id") or scroll_id
        except ScrollExpired:
            if restart == session.options.scan_restarts:
                raise
            result.scan_restarts += 1
    return list(ids)


def _sync_items(session: AccountSession, result: AccountSyncResult) -> None:
    started = now_utc()
    client, seller, engine = session.client, session.seller_id, session.engine
    ids = _item_ids(session, result)
    buffer: list[dict[str, Any]] = []
    try:
        for i in range(0, len(ids), ITEMS_DETAIL_BATCH):
            batch = ids[i : i + ITEMS_DETAIL_BATCH]
            found, missing = session.call(lambda t: client.get_items(t, batch), "the next batch of item details")
            result.items_missing += len(missing)
            buffer.extend(found)
            if len(buffer) >= 100:
                result.items.add(upsert_items(engine, seller, buffer))
                buffer = []
    except Cancelled:
        result.items.add(upsert_items(engine, seller, buffer))  # details already read are kept
        raise
    result.items.add(upsert_items(engine, seller, buffer))
    advance_checkpoint(engine, seller, "items", started)


def sync_account(
    engine: Engine,
    client: MarketplaceClient,
    account: AccountView,
    resources: SyncResources,
    options: SyncOptions,
    full_resync_from: datetime | None = None,
    now: datetime | None = None,
    should_stop: StopCheck = never,
    result: AccountSyncResult | None = None,
    run_id: str | None = None,
) -> AccountSyncResult:
    """Sync one account under its lock. Returns the result (status `cancelled` when `should_stop()` stopped it
    between two pages); raises AccountSyncFailed (with the partial result) when it fails, with `transient`
    telling whether a retry may help.

    `result`: the figures of the account's earlier attempts in this run, added to (see the module's note).
    `run_id`: the flow run holding the sync, recorded in the account so that a sync it leaves `running` (its
    process killed) is recognized as interrupted."""
    started_clock, started = time.monotonic(), now_utc()
    now = now or started
    result = result or AccountSyncResult(account.seller_id, account.nickname)
    result.attempts += 1
    deadline = started_clock + options.timeout_seconds
    counters = ("requests", "retries", "throttled", "server_errors", "refreshes")
    base = {name: getattr(result, name) - getattr(client.stats, name) for name in counters}

    def finish(status: str, error: str = "") -> None:
        result.status, result.error = status, error
        for name in counters:  # this attempt's requests on top of the earlier attempts'
            setattr(result, name, base[name] + getattr(client.stats, name))
        result.seconds += time.monotonic() - started_clock

    if should_stop():
        finish("cancelled", "cancelled before its sync started")
        return result

    with account_sync_lock(
        engine, account.seller_id, options.lock_wait_seconds, lease_seconds=options.timeout_seconds + 60,
        should_stop=should_stop,
    ) as acquired:
        if not acquired and should_stop():
            finish("cancelled", "cancelled while another run was syncing this account")
            return result
        if not acquired:
            finish("skipped", f"another run has been syncing this account for over {options.lock_wait_seconds:.0f} s")
            return result
        previous = get_account(engine, account.seller_id)
        if previous.last_sync_status in ("running", "interrupted") and previous.last_sync_run_id != (run_id or ""):
            result.resumed_from = previous.last_sync_run_id or "(unknown run)"
        record_sync(engine, account.seller_id, started=started, finished=None, status="running", run_id=run_id)
        try:
            session = AccountSession(engine, client, account.seller_id, options, deadline, should_stop)
            if resources.includes("orders"):
                checkpoint = get_checkpoint(engine, account.seller_id, "orders")
                if full_resync_from is not None:
                    since = full_resync_from
                elif checkpoint is not None:
                    since = checkpoint - options.lookback
                else:
                    since = now - options.initial_history
                _sync_orders(session, result, since, now, options)
            if resources.includes("items") and (options.items_scan or resources is SyncResources.items):
                _sync_items(session, result)
        except Cancelled as exc:
            finish("cancelled", f"{exc}; what it committed is kept and the next sync resumes from its checkpoint")
            record_sync(engine, account.seller_id, started=started, finished=now_utc(), status="cancelled",
                        error=result.error)
            return result
        except AccountNeedsReauthorization as exc:
            finish("needs_reauthorization", str(exc))
            record_sync(engine, account.seller_id, started=started, finished=now_utc(), status=result.status,
                        error=result.error)
            raise AccountSyncFailed(f"{result.label}: {exc}", result.to_json(), transient=False) from None
        except Exception as exc:  # noqa: BLE001 - reported per account, classified for retries
            transient = isinstance(exc, (TransientAPIError, InvalidAccessToken)) or _is_transient_db_error(exc)
            finish("failed", f"{type(exc).__name__}: {exc}")
            try:
                record_sync(engine, account.seller_id, started=started, finished=now_utc(), status="failed",
                            error=result.error)
            except Exception:  # noqa: BLE001 - the database may be what failed
                pass
            raise AccountSyncFailed(f"{result.label}: {result.error}", result.to_json(), transient) from None
        finish("synced")
        record_sync(engine, account.seller_id, started=started, finished=now_utc(), status="synced")
        return result


def _is_transient_db_error(exc: BaseException) -> bool:
    from sqlalchemy.exc import DBAPIError, OperationalError, TimeoutError as PoolTimeout

    if isinstance(exc, (OperationalError, PoolTimeout)):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated
