"""One seller account's incremental sync: orders by date windows, items by a full id scan, each page upserted
and committed, each checkpoint advanced only after the rows it covers are stored. No Prefect import.

Cancel: every API request goes through `AccountSession.call` (or `AccountSession.ahead`, for a page or batch
asked while the one before is stored), which asks the run's `should_stop` first, so a cancelled run starts no
new page or batch; the sync ends `cancelled` with what it committed counted and its
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
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
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
    ORDER_SORTS,
    ORDER_STATUSES,
    ORDERS_PAGE_LIMIT,
    InvalidAccessToken,
    InvalidGrant,
    MarketplaceClient,
    MarketplaceError,
    PermanentAPIError,
    ScrollExpired,
    TransientAPIError,
)
from operations.marketplace.store import (
    AccountConnectionLost,
    AccountNeedsReauthorization,
    AccountView,
    TokenState,
    UpsertCounts,
    account_connection,
    account_label,
    account_sync_lock,
    advance_checkpoint,
    get_account,
    get_checkpoint,
    close_gap,
    now_utc,
    open_gaps,
    read_tokens,
    record_gap,
    record_sync,
    refresh_tokens,
    item_row,
    upsert_items,
    upsert_orders,
)
from operations.marketplace.reconcile import differing, mark_gone, repair, stored_items, unlisted_ids

T = TypeVar("T")
HOUR = timedelta(hours=1)


class SyncResources(str, enum.Enum):
    """What a sync fetches."""

    orders = "orders"
    items = "items"
    both = "both"

    def includes(self, resource: str) -> bool:
        return self is SyncResources.both or self.value == resource

    def names(self) -> list[str]:
        """The resources synced, in order."""
        return [r for r in ("orders", "items") if self.includes(r)]


@dataclass(frozen=True)
class SyncOptions:
    """How one account is synced (from settings)."""

    lookback: timedelta = timedelta(hours=2)
    initial_history: timedelta = timedelta(days=90)
    max_window: timedelta = timedelta(days=30)
    timeout_seconds: float = 300.0
    lock_wait_seconds: float = 30.0
    token_margin: timedelta = timedelta(minutes=3)  # refresh only an access token expiring within this
    window_rereads: int = 3  # re-reads of a window whose total moved while it was paged
    scan_restarts: int = 3  # items scans restarted after an expired scroll_id
    bad_window_retries: int = 3  # later syncs that try again a window the API refused with a 400
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
    requests_in_flight: int = 0  # API requests at once in each process running account syncs (0: no limit)
    accounts_at_once: int = 0  # account syncs at once in the run: each holds one pooled connection (0: the pool's)


# Account syncs at once per request slot: while one account writes a page or moves a checkpoint, another's
# request takes its slot, so the slots stay busy (one account per slot left ~4 of 10 slots idle).
ACCOUNTS_PER_REQUEST_SLOT = 2


@dataclass(frozen=True)
class RunShape:
    """How a run spreads its accounts: account syncs at once, and request slots of each process."""

    accounts_at_once: int
    requests_in_flight: int


def run_shape(concurrency: int, accounts: int, runner: str, dask_workers: int, external_cluster: bool) -> RunShape:
    """`concurrency` API requests in flight for the run, with ACCOUNTS_PER_REQUEST_SLOT times as many account
    syncs at once (at most one per account). Threads: one process, `concurrency` slots. A local Dask cluster: its
    workers (min(dask_workers, accounts at once), as `io_task_runner` builds it) share the slots. An existing
    cluster (`external_cluster`): each worker process gets `concurrency` slots, its threads bound the rest."""
    at_once = max(1, min(concurrency * ACCOUNTS_PER_REQUEST_SLOT, accounts))
    if runner != "dask" or external_cluster:
        return RunShape(at_once, concurrency)
    workers = max(1, min(dask_workers, at_once))
    return RunShape(at_once, -(-concurrency // workers))


# An account whose orders checkpoint is at most this old, in a run that reads no items (notifications on) and
# no full resync, has a few hours of orders to read: one or two requests. Such accounts are synced several to a
# task (`group_light_accounts`): a task run of its own costs more than the account's sync.
LIGHT_CHECKPOINT_AGE = timedelta(hours=6)


def light_account(run: SyncRun, checkpoint: datetime | None, now: datetime) -> bool:
    """Whether an account's sync in `run` is a short catch-up (see LIGHT_CHECKPOINT_AGE)."""
    reads_items = run.resources is SyncResources.items or (
        run.resources is SyncResources.both and run.options.items_scan)
    return (not reads_items and run.full_resync_from is None and checkpoint is not None
            and now - checkpoint <= LIGHT_CHECKPOINT_AGE)


def group_light_accounts(
    accounts: list[AccountView], light: set[int], at_once: int
) -> tuple[list[AccountView], list[list[AccountView]]]:
    """(accounts synced one to a task, groups of light accounts synced several to a task). The light accounts
    are grouped only when there are more of them than tasks at once (`at_once`): then into `at_once` groups of
    near-equal size, in the accounts' order, so the run keeps `at_once` syncs going with a task run per group
    instead of per account."""
    chosen = [a for a in accounts if a.seller_id in light]
    if len(chosen) <= at_once:
        return list(accounts), []
    groups = [chosen[i::at_once] for i in range(at_once)]
    return [a for a in accounts if a.seller_id not in light], [g for g in groups if g]


# A task run costs the Prefect server ~50 ms of CPU and the flow process ~20 ms, whatever its account does. In a
# run with many more accounts than syncs at once, the accounts that are not light are synced several to a task
# too, in groups sized so that the run keeps TASKS_PER_SYNC_SLOT tasks per sync at once: tasks are started as
# syncs finish, so an account slower than the others holds up its own group only.
TASKS_PER_SYNC_SLOT = 2


def group_accounts(
    accounts: list[AccountView], light: set[int], at_once: int
) -> tuple[list[AccountView], list[list[AccountView]]]:
    """(accounts synced one to a task, groups synced several to a task): the light accounts as
    `group_light_accounts` groups them; the others, when there are at least 2 * TASKS_PER_SYNC_SLOT times as many
    as syncs at once (`at_once`), in groups of len // (TASKS_PER_SYNC_SLOT * at_once) accounts (the last one may
    hold fewer), in the accounts' order."""
    singles, groups = group_light_accounts(accounts, light, at_once)
    size = len(singles) // (TASKS_PER_SYNC_SLOT * max(1, at_once))
    if size < 2:
        return singles, groups
    return [], [singles[i : i + size] for i in range(0, len(singles), size)] + groups


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


REFUSED_PREFIX = "refused by the API (400):"  # the reason of a gap recorded for a window the API refused


def refused_window(exc: PermanentAPIError) -> bool:
    """A 400 answer to an order search: the window's request is refused for good (retrying it at once cannot
    help); 401/403/404 and token errors are not a window's fault."""
    return exc.status == 400 and not isinstance(exc, (InvalidGrant, ScrollExpired))


class SyncTimeout(MarketplaceError):
    """The account's sync ran out of its time; its checkpoints keep what was committed."""


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
    items_unlisted: int = 0  # stored items the seller's search no longer lists (read by id: deleted ones come back closed)
    items_gone: int = 0  # stored items the API no longer answers at all, marked closed / deleted here
    items_repaired: int = 0  # stored items whose fields differed from the API's under the same last_updated
    order_pages: int = 0
    item_pages: int = 0
    requests: int = 0
    retries: int = 0
    throttled: int = 0
    server_errors: int = 0
    refreshes: int = 0
    scan_restarts: int = 0
    windows: list[WindowReport] = field(default_factory=list)
    gaps: list[dict[str, Any]] = field(default_factory=list)  # hours not read whole: {start, end, reason, retried}
    gaps_closed: int = 0  # gaps of earlier syncs read whole by this one
    resources: dict[str, str] = field(default_factory=dict)  # orders / items -> synced | failed | cancelled
    resource_errors: dict[str, str] = field(default_factory=dict)  # orders / items -> why it failed
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

    def ahead(self, fn: Callable[[SecretStr], T], unit: str = "the next request") -> ReadAhead:
        """`call(fn, unit)` started now on a read-ahead thread, its answer taken later with `.result()`: the
        request's wait overlaps what the account's thread does meanwhile (storing the page before it). The
        checks (cancel, time, token) run here, once, as `call` runs them; whatever they raise is raised by
        `.result()`, where the account's thread would have called `call`. `fn` must not read variables the
        caller changes afterwards (bind them)."""
        try:
            raise_if_stopped(self.should_stop, unit)
            self._check_time()
            token = self.token()
        except Exception as exc:  # noqa: BLE001 - raised by result(), in the order `call` would raise it
            return ReadAhead(self, fn, None, exc)
        return ReadAhead(self, fn, _read_ahead_pool().submit(fn, token), None)


class ReadAhead:
    """A request started by `AccountSession.ahead`."""

    def __init__(self, session: AccountSession, fn: Callable[[SecretStr], Any], future: Future | None,
                 error: BaseException | None):
        self.session, self.fn, self.future, self.error = session, fn, future, error

    def result(self) -> Any:
        """The answer, or what `AccountSession.call` would have raised (a 401 is handled as `call` handles it)."""
        if self.error is not None:
            raise self.error
        try:
            return self.future.result()
        except InvalidAccessToken:
            self.session._refresh()
            return self.fn(self.session.tokens.access_token)

    def settle(self) -> None:
        """Wait for a request whose answer is no longer wanted (the account stopped): nothing of the account's
        is in flight once its sync returns."""
        if self.future is not None:
            try:
                self.future.result()
            except Exception:  # noqa: BLE001 - an answer nobody reads
                pass


def _settle(ahead: ReadAhead | None) -> None:
    if ahead is not None:
        ahead.settle()


# The threads that send the read-ahead requests of this process's account syncs (each account has at most two
# outstanding, and each holds one of the process's request slots only while on the wire): threads are started
# as needed, up to this many.
READ_AHEAD_THREADS = 64
_read_ahead: dict[int, ThreadPoolExecutor] = {}
_read_ahead_lock = threading.Lock()


def _read_ahead_pool() -> ThreadPoolExecutor:
    with _read_ahead_lock:
        pool = _read_ahead.get(os.getpid())
        if pool is None:
            pool = _read_ahead[os.getpid()] = ThreadPoolExecutor(READ_AHEAD_THREADS, "marketplace-read-ahead")
        return pool


@dataclass(frozen=True)
class OrderSlice:
    """One order search: orders last updated in [start, stop), optionally also created in
    [created_from, created_to) (None: unbounded) and of one status. A slice too large for the API's offset cap
    is cut along the next filter the API offers (see `_split`)."""

    start: datetime
    stop: datetime
    created_from: datetime | None = None
    created_to: datetime | None = None
    status: str | None = None
    created_split: bool = False  # cut along date_created already

    def search(self, client: MarketplaceClient, token: SecretStr, seller_id: int, offset: int, sort: str) -> dict:
        return client.search_orders(
            token, seller_id, self.start, self.stop, offset, created_from=self.created_from,
            created_to=self.created_to, status=self.status, sort=sort,
        )

    def describe(self) -> str:
        parts = [f"updated {self.start:%Y-%m-%d %H:%M}..{self.stop:%Y-%m-%d %H:%M} UTC"]
        if self.created_split:
            low = f"{self.created_from:%Y-%m-%d %H:%M}" if self.created_from else "any time"
            parts.append(f"created {low}..{self.created_to:%Y-%m-%d %H:%M}")
        if self.status:
            parts.append(f"status {self.status}")
        return ", ".join(parts)


@dataclass
class _Pass:
    """One pass over a slice in one sort order: the ids read, the paging totals seen, and whether the pass
    stopped at the offset cap with orders left."""

    seen: set[int] = field(default_factory=set)
    totals: set[int] = field(default_factory=set)
    pages: int = 0
    capped: bool = False

    @property
    def total(self) -> int:
        return max(self.totals, default=0)


def _page_slice(
    session: AccountSession, result: AccountSyncResult, sl: OrderSlice, sort: str = "date_asc",
    split_early: bool = True,
) -> _Pass:
    """One pass over a slice, each page upserted. `split_early`: stop at the first page when the total is beyond
    what the offset cap lets one pass read (the slice is then cut, not read to the cap)."""
    client, seller, cap = session.client, session.seller_id, session.client.orders_offset_cap
    unit = "the next page of orders"

    def page_at(at: int) -> Callable[[SecretStr], dict]:
        return lambda t: sl.search(client, t, seller, at, sort)

    done, offset, ahead = _Pass(), 0, None
    try:
        while offset + ORDERS_PAGE_LIMIT <= cap:
            page = ahead.result() if ahead is not None else session.call(page_at(offset), unit)
            ahead = None
            result.order_pages += 1
            done.pages += 1
            total = int((page.get("paging") or {}).get("total") or 0)
            done.totals.add(total)
            if offset == 0 and split_early and total + ORDERS_PAGE_LIMIT > cap:
                done.capped = True
                return done  # cut now rather than after paging up to the cap
            orders = page.get("results") or []
            if not orders:  # page until empty: paging.total is known to run low for some sellers
                return done
            offset += len(orders)
            if offset + ORDERS_PAGE_LIMIT <= cap:  # the next page is asked while this one is stored
                ahead = session.ahead(page_at(offset), unit)
            result.orders.add(upsert_orders(session.engine, seller, orders))
            done.seen.update(int(o["id"]) for o in orders)
        done.capped = True
        return done
    finally:
        _settle(ahead)


def _split(sl: OrderSlice, options: SyncOptions) -> list[OrderSlice]:
    """The slices that together hold a too-large slice's orders, along the next filter the API offers: the
    update window in hour-aligned halves; within one hour, date_created (before the history the sync reads,
    then hour-aligned halves of it: the API truncates date filters to the hour); within one created hour, each
    documented status. [] when no filter is left (the slice is then read from both ends)."""
    if sl.stop - sl.start > HOUR:
        middle = max(sl.start + ((sl.stop - sl.start) / 2 // HOUR) * HOUR, sl.start + HOUR)
        return [replace(sl, stop=middle), replace(sl, start=middle)]
    if not sl.created_split:
        floor = floor_hour(sl.start - options.initial_history)
        return [replace(sl, created_to=floor, created_split=True),
                replace(sl, created_from=floor, created_to=sl.stop, created_split=True)]
    if sl.created_from is not None and sl.created_to - sl.created_from > HOUR:
        span = sl.created_to - sl.created_from
        middle = max(sl.created_from + (span / 2 // HOUR) * HOUR, sl.created_from + HOUR)
        return [replace(sl, created_to=middle), replace(sl, created_from=middle)]
    if sl.status is None:
        return [replace(sl, status=status) for status in ORDER_STATUSES]
    return []


@dataclass
class _WindowRead:
    """What reading one update window found: the orders read, pages, re-reads, and the hours whose orders
    could not all be read (gaps: (start, stop, why))."""

    seen: set[int] = field(default_factory=set)
    pages: int = 0
    rereads: int = 0
    gaps: list[tuple[datetime, datetime, str]] = field(default_factory=list)


class _TooWide(Exception):
    """A window wider than an hour holds too many orders for one pass: the caller cuts it in halves."""


def _read_slice(
    session: AccountSession, result: AccountSyncResult, sl: OrderSlice, options: SyncOptions, out: _WindowRead,
    cut_updates: bool = True,
) -> int:
    """Read a slice whole, cutting it (recursively) while it is too large for one pass; returns its API total.
    A pass whose total moved while it was paged (offsets shifted under the pages) is read again, at most
    `window_rereads` times. A slice that no filter cuts further is read from both ends (date_asc, then
    date_desc, each up to the offset cap); orders still out of reach become a gap in `out`.
    `cut_updates=False`: a too-large slice wider than an hour raises _TooWide (the caller cuts it)."""
    for _ in range(options.window_rereads + 1):
        done = _page_slice(session, result, sl)
        out.pages += done.pages
        if done.capped:
            break
        out.seen |= done.seen
        if len(done.totals) <= 1:
            return done.total
        out.rereads += 1
    else:
        return done.total
    if not cut_updates and sl.stop - sl.start > HOUR:
        raise _TooWide()
    total = done.total
    children = _split(sl, options)
    if children:
        read = sum(_read_slice(session, result, child, options, out) for child in children)
        if children[0].status is not None and read < total:
            out.gaps.append((sl.start, sl.stop, f"{sl.describe()}: {total - read:,} order(s) of statuses outside "
                                                 "the documented ones"))
        return total
    ends = [_page_slice(session, result, sl, sort, split_early=False) for sort in ORDER_SORTS]
    seen = ends[0].seen | ends[1].seen
    out.pages += ends[0].pages + ends[1].pages
    out.seen |= seen
    total = max(total, ends[0].total, ends[1].total)
    if len(seen) < total:
        out.gaps.append((sl.start, sl.stop, (
            f"{sl.describe()}: {total:,} orders, {len(seen):,} read from both ends of the API's offset cap "
            f"({session.client.orders_offset_cap:,}); {total - len(seen):,} out of reach"
        )))
    return total


def _read_window(
    session: AccountSession, result: AccountSyncResult, start: datetime, stop: datetime, options: SyncOptions
) -> tuple[WindowReport, list[tuple[datetime, datetime, str]]] | None:
    """An update window read whole, cut along the API's filters as needed: its report and its gaps; None when
    the window is wider than an hour and too large (cut it in halves, each with its own checkpoint)."""
    out = _WindowRead()
    try:
        total = _read_slice(session, result, OrderSlice(start, stop), options, out, cut_updates=False)
    except _TooWide:
        return None
    except PermanentAPIError as exc:
        if not refused_window(exc):
            raise
        # the API refuses this window for good: what was read is kept, the window becomes a gap the checkpoint
        # passes (later syncs try it again up to BAD_WINDOW_RETRIES times), and the account goes on
        out.gaps.append((start, stop, f"{REFUSED_PREFIX} updated {start:%Y-%m-%d %H:%M}..{stop:%Y-%m-%d %H:%M} "
                                      f"UTC: {exc}"))
        total = len(out.seen)
    report = WindowReport(start, stop, api_total=total, rows_read=len(out.seen), pages=out.pages,
                          rereads=out.rereads)
    return report, out.gaps


def _note_gaps(session: AccountSession, result: AccountSyncResult, gaps: list[tuple[datetime, datetime, str]],
               retried: bool) -> None:
    for start, stop, why in gaps:
        record_gap(session.engine, session.seller_id, "orders", start, stop, why)
        result.gaps.append({"start": start.isoformat(), "end": stop.isoformat(), "reason": why, "retried": retried})


def _retry_gaps(session: AccountSession, result: AccountSyncResult, options: SyncOptions) -> None:
    """Read again the hours earlier syncs recorded as gaps; an hour read whole closes its gap."""
    for gap in open_gaps(session.engine, session.seller_id, "orders"):
        if gap.reason.startswith(REFUSED_PREFIX) and gap.attempts > options.bad_window_retries:
            continue  # refused on every try: kept open for the operator (`marketplace_accounts gaps`), not retried
        read = _read_window(session, result, gap.start, gap.stop, options)
        if read is None:  # gaps are hours or less: cannot happen
            continue
        report, gaps = read
        result.windows.append(report)
        if gaps:
            _note_gaps(session, result, gaps, retried=True)
        else:
            close_gap(session.engine, session.seller_id, "orders", gap.start)
            result.gaps_closed += 1


def _sync_orders(
    session: AccountSession, result: AccountSyncResult, since: datetime, until: datetime, options: SyncOptions
) -> None:
    """Orders last updated in [since, until), window by window; the checkpoint follows each stored window.
    Windows are cut along the API's filters until every part fits its offset cap; a part that still does not
    (more orders than both ends of the cap reach) is recorded as a gap that the checkpoint passes and later
    syncs read again until it is read whole: a hot hour never stops the account."""
    _retry_gaps(session, result, options)
    # The API truncates both ends of the filter to the hour: the last window ends at the next full hour so
    # that the current hour is read, and the checkpoint never passes `until` (the sync's start).
    end = floor_hour(until)
    if end < until:
        end += HOUR
    pending = deque(split_windows(floor_hour(since), end, options.max_window))
    while pending:
        start, stop = pending.popleft()
        read = _read_window(session, result, start, stop, options)
        if read is None:
            middle = max(start + ((stop - start) / 2 // HOUR) * HOUR, start + HOUR)
            pending.extendleft([(middle, stop), (start, middle)])  # the earlier half first
            continue
        report, gaps = read
        result.windows.append(report)
        _note_gaps(session, result, gaps, retried=False)
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


# Batches of item details an account asks ahead of the one it stores (the ids are known, no batch depends on
# another's answer): while request slots are free (a run's first and last seconds), an account's details
# arrive two at a time.
DETAIL_BATCHES_AHEAD = 2


def _sync_items(session: AccountSession, result: AccountSyncResult) -> None:
    """Every item of the seller read and stored: the listed ids and, to reconcile, the stored ids no longer
    listed (deleted on the marketplace); differences under an equal stamp repaired (operations/marketplace/
    reconcile.py), ids the API no longer answers marked closed / deleted."""
    started = now_utc()
    client, seller, engine = session.client, session.seller_id, session.engine
    stored = stored_items(engine, seller)
    ids = _item_ids(session, result)
    unlisted = unlisted_ids(stored, ids)
    result.items_unlisted += len(unlisted)
    ids += unlisted
    buffer: list[dict[str, Any]] = []
    gone: list[str] = []

    def store() -> None:
        result.items.add(upsert_items(engine, seller, buffer))
        result.items_repaired += repair(engine, seller, differing(stored, (item_row(seller, i, started) for i in buffer
                                                                             if str(i["id"]) in stored)))
        buffer.clear()

    unit = "the next batch of item details"

    def details(batch: list[str]) -> Callable[[SecretStr], tuple[list[dict[str, Any]], list[str]]]:
        return lambda t: client.get_items(t, batch)

    batches = [ids[i : i + ITEMS_DETAIL_BATCH] for i in range(0, len(ids), ITEMS_DETAIL_BATCH)]
    pending: deque[ReadAhead] = deque()  # the next batches asked, in order
    asked = 0
    try:
        for batch in batches:
            if pending:
                found, missing = pending.popleft().result()
            else:
                found, missing = session.call(details(batch), unit)
                asked += 1
            result.items_missing += len(missing)
            gone += [item_id for item_id in missing if item_id in stored]
            buffer.extend(found)
            # the next batches (they depend on no answer) are asked while this one is stored; none after a
            # check failed (its error is raised in turn)
            while asked < len(batches) and len(pending) < DETAIL_BATCHES_AHEAD and not (
                    pending and pending[-1].error is not None):
                pending.append(session.ahead(details(batches[asked]), unit))
                asked += 1
            if len(buffer) >= 100:
                store()
    except Cancelled:
        store()  # details already read are kept
        raise
    finally:
        for ahead in pending:
            ahead.settle()
    store()
    result.items_gone += mark_gone(engine, seller, gone)
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

    with account_connection(engine), account_sync_lock(
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
            transient = _sync_resources(session, result, resources, options, full_resync_from, now)
        except Cancelled as exc:
            for resource in resources.names():
                result.resources.setdefault(resource, "cancelled")
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
        if result.resource_errors:  # one resource failed, the other was still synced
            finish("failed", "; ".join(f"{name}: {why}" for name, why in result.resource_errors.items()))
            try:
                record_sync(engine, account.seller_id, started=started, finished=now_utc(), status="failed",
                            error=result.error)
            except Exception:  # noqa: BLE001 - the database may be what failed
                pass
            raise AccountSyncFailed(f"{result.label}: {result.error}", result.to_json(), transient)
        finish("synced")
        record_sync(engine, account.seller_id, started=started, finished=now_utc(), status="synced")
        return result


def _sync_resources(
    session: AccountSession, result: AccountSyncResult, resources: SyncResources, options: SyncOptions,
    full_resync_from: datetime | None, now: datetime,
) -> bool:
    """Orders, then items, each on its own: one failing never stops the other (each keeps its own checkpoint).
    A resource an earlier attempt of this run synced is not synced again. Returns whether every failure may pass
    on a retry; a cancel or a dead refresh token stops both (raised)."""
    transient = True
    # without the items scan (notifications on), a sync of both reads orders only; items alone are still read
    scanned = [r for r in resources.names() if r != "items" or options.items_scan or resources is SyncResources.items]
    for resource in scanned:
        if result.resources.get(resource) == "synced":
            continue
        try:
            if resource == "orders":
                checkpoint = get_checkpoint(session.engine, session.seller_id, "orders")
                if full_resync_from is not None:
                    since = full_resync_from
                elif checkpoint is not None:
                    since = checkpoint - options.lookback
                else:
                    since = now - options.initial_history
                _sync_orders(session, result, since, now, options)
            else:
                _sync_items(session, result)
        except (Cancelled, AccountNeedsReauthorization):
            raise
        except Exception as exc:  # noqa: BLE001 - reported per resource, classified for retries
            result.resources[resource] = "failed"
            result.resource_errors[resource] = f"{type(exc).__name__}: {exc}"
            transient = transient and (
                isinstance(exc, (TransientAPIError, InvalidAccessToken, SyncTimeout)) or _is_transient_db_error(exc)
            )
            continue
        result.resources[resource] = "synced"
        result.resource_errors.pop(resource, None)
    return transient


def _is_transient_db_error(exc: BaseException) -> bool:
    from sqlalchemy.exc import DBAPIError, OperationalError, TimeoutError as PoolTimeout

    if isinstance(exc, (OperationalError, PoolTimeout, AccountConnectionLost)):
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated
