"""The marketplace's notifications: what the receiver stores and what the consumer makes of them. No Prefect.

The marketplace POSTs `{"_id", "resource": "/orders/2195160686", "user_id", "topic", "application_id",
"attempts", "sent", "received"}` to the app's callback URL for every change. The receiver (deployments/
marketplace_receiver.py) keeps those of this app (`parse_notification`) and stores them (`store_notifications`,
keyed by `_id`: a redelivery inserts nothing) before it answers 200; it never calls the API.

The consumer (flow `marketplace-notifications`) takes the pending ones once the oldest is `window` old
(`wait_for_window`: a burst is coalesced), groups them per account (`touched_by_account`), and syncs just the
touched resources (`sync_touched`): the touched orders (one search page of their hours when that is cheaper
than one `GET /orders/{id}` each, then a GET for any not found there) and the touched items by multiget (20 ids
per request). Each notification is then marked with its outcome (`mark`). Unknown sellers are logged and
counted (outcome `unknown_seller`), not errors.

Unit of work and why a repeat is harmless: an account's touched resources are fetched and upserted through the
store's upserts (newer `date_last_updated` / `last_updated` only), then its notifications are marked; a crash
between the two fetches them again, which changes nothing. Two consumers at once only fetch twice.

The missed-feeds catch-up (`store_missed_feeds`) reads what the marketplace failed to deliver and stores it the
same way (same `_id`s: nothing twice).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Iterable

from sqlalchemy import Engine, delete, func, select, update

from operations.cancellation import StopCheck, never, raise_if_stopped
from operations.infra.database import upsert_statement
from operations.marketplace.client import (
    ITEMS_DETAIL_BATCH,
    ORDERS_PAGE_LIMIT,
    MarketplaceClient,
    PermanentAPIError,
    parse_time,
)
from operations.marketplace.notification_models import MarketplaceNotification
from operations.marketplace.reconcile import mark_gone
from operations.marketplace.store import (
    AccountNeedsReauthorization,
    UpsertCounts,
    list_accounts,
    now_utc,
    upsert_items,
    upsert_orders,
    utc as _utc,
)
from operations.marketplace.sync import HOUR, AccountSession, SyncOptions, floor_hour, refused_window

logger = logging.getLogger(__name__)

NOTIFICATIONS = MarketplaceNotification.__table__
ORDER_TOPICS = frozenset({"orders_v2", "orders"})
ITEM_TOPICS = frozenset({"items"})
CALLBACK_PATH = "/marketplace/notifications"  # where the receiver takes the marketplace's POSTs


class BadNotification(ValueError):
    """A body that is not a notification of the marketplace's contract (answered 400, never stored)."""


@dataclass(frozen=True)
class Pending:
    """A stored notification not yet applied."""

    id: str
    user_id: int
    topic: str
    resource: str
    stored_at: datetime
    sent_at: datetime | None


@dataclass
class Touched:
    """What the pending notifications of one account name: order ids, item ids, and the notifications."""

    seller_id: int
    order_ids: set[int] = field(default_factory=set)
    item_ids: set[str] = field(default_factory=set)
    notification_ids: list[str] = field(default_factory=list)
    earliest: datetime | None = None  # the earliest change of a touched order (its notification's `sent`)
    ignored: list[str] = field(default_factory=list)  # notifications of topics the consumer does not sync
    bad: list[str] = field(default_factory=list)  # notifications whose resource names nothing it can fetch


@dataclass
class TouchedResult:
    """What applying one account's notifications did."""

    seller_id: int
    notifications: int = 0
    orders: UpsertCounts = field(default_factory=UpsertCounts)
    items: UpsertCounts = field(default_factory=UpsertCounts)
    orders_missing: int = 0
    items_missing: int = 0
    order_searches: int = 0
    order_gets: int = 0
    item_multigets: int = 0
    requests: int = 0
    refreshes: int = 0
    status: str = "synced"  # synced | account_inactive | failed
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# -- the receiver's side ---------------------------------------------------------------------------------------
def parse_notification(data: Any, app_id: str) -> dict[str, Any] | None:
    """The row to store for a notification body, or None when it is another application's (dropped).
    Raises BadNotification for a body that is not a notification."""
    if not isinstance(data, dict):
        raise BadNotification("the body must be a JSON object")
    missing = [key for key in ("_id", "resource", "user_id", "topic", "application_id") if data.get(key) in (None, "")]
    if missing:
        raise BadNotification(f"missing {', '.join(missing)}")
    if str(data["application_id"]) != str(app_id):
        return None
    try:
        user_id = int(data["user_id"])
        attempts = int(data.get("attempts") or 1)
        sent = parse_time(data.get("sent")) if data.get("sent") else None
    except (TypeError, ValueError) as exc:
        raise BadNotification(f"bad field: {exc}") from None
    return {
        "id": str(data["_id"])[:64], "user_id": user_id, "topic": str(data["topic"])[:40],
        "resource": str(data["resource"])[:200], "application_id": str(data["application_id"])[:40],
        "attempts": attempts, "sent_at": sent, "processed_at": None, "outcome": "", "tries": 0, "detail": "",
    }


def store_notifications(engine: Engine, rows: list[dict[str, Any]]) -> set[str]:
    """Store the notifications in one transaction, each once (`_id` is the key: a redelivered one inserts nothing
    and changes nothing). Returns the ids that were new."""
    if not rows:
        return set()
    stored_at = now_utc()
    unique = [{**row, "stored_at": stored_at} for row in {row["id"]: row for row in reversed(rows)}.values()]
    statement = upsert_statement(engine, NOTIFICATIONS, unique, ["id"], []).returning(NOTIFICATIONS.c.id)
    with engine.begin() as conn:
        return set(conn.execute(statement).scalars())


# -- the consumer's side ---------------------------------------------------------------------------------------
def pending_notifications(engine: Engine, limit: int = 10_000) -> list[Pending]:
    """The oldest pending notifications, at most `limit`."""
    c = NOTIFICATIONS.c
    query = (select(c.id, c.user_id, c.topic, c.resource, c.stored_at, c.sent_at)
             .where(c.processed_at.is_(None)).order_by(c.stored_at).limit(limit))
    with engine.connect() as conn:
        return [Pending(r.id, r.user_id, r.topic, r.resource, _utc(r.stored_at), _utc(r.sent_at))
                for r in conn.execute(query)]


def oldest_pending(engine: Engine) -> datetime | None:
    """When the oldest pending notification was stored (None: nothing pending)."""
    with engine.connect() as conn:
        value = conn.execute(select(func.min(NOTIFICATIONS.c.stored_at))
                             .where(NOTIFICATIONS.c.processed_at.is_(None))).scalar()
    return _utc(value)


def wait_for_window(engine: Engine, window_seconds: float, idle_seconds: float, should_stop: StopCheck = never,
                    poll_seconds: float = 0.5) -> bool:
    """Wait until the oldest pending notification is `window_seconds` old (so that a burst is taken whole);
    False when nothing arrived for `idle_seconds` (or the run was stopped)."""
    idle_until = time.monotonic() + idle_seconds
    while not should_stop():
        oldest = oldest_pending(engine)
        if oldest is not None:
            wait = (oldest + timedelta(seconds=window_seconds) - now_utc()).total_seconds()
            if wait <= 0:
                return True
            time.sleep(min(wait, poll_seconds * 4))
            continue
        if time.monotonic() >= idle_until:
            return False
        time.sleep(poll_seconds)
    return False


def due_by_account(pending: Iterable[Pending], window_seconds: float, now: datetime) -> list[Pending]:
    """The notifications of the accounts whose oldest pending notification is `window_seconds` old: each
    account's burst is coalesced over its own window (its first notification opens it), while the notifications
    of accounts whose window is still open wait for a later round."""
    pending = list(pending)
    cutoff = now - timedelta(seconds=window_seconds)
    oldest: dict[int, datetime] = {}
    for note in pending:
        oldest[note.user_id] = min(oldest.get(note.user_id, note.stored_at), note.stored_at)
    return [note for note in pending if oldest[note.user_id] <= cutoff]


def resource_id(topic: str, resource: str) -> int | str | None:
    """The order id (orders topics) or item id (items) a notification's resource names; None otherwise."""
    parts = [part for part in resource.split("?")[0].split("/") if part]
    if len(parts) != 2:
        return None
    if topic in ORDER_TOPICS and parts[0] == "orders" and parts[1].isdigit():
        return int(parts[1])
    if topic in ITEM_TOPICS and parts[0] == "items" and parts[1].isalnum():
        return parts[1]
    return None


def touched_by_account(pending: Iterable[Pending]) -> dict[int, Touched]:
    """The pending notifications grouped per account: the distinct orders and items they name."""
    found: dict[int, Touched] = {}
    for note in pending:
        touched = found.setdefault(note.user_id, Touched(note.user_id))
        touched.notification_ids.append(note.id)
        if note.topic not in ORDER_TOPICS | ITEM_TOPICS:
            touched.ignored.append(note.id)
            continue
        key = resource_id(note.topic, note.resource)
        if key is None:
            touched.bad.append(note.id)
        elif note.topic in ORDER_TOPICS:
            touched.order_ids.add(int(key))
            when = note.sent_at or note.stored_at
            touched.earliest = when if touched.earliest is None else min(touched.earliest, when)
        else:
            touched.item_ids.add(str(key))
    return found


def split_known(engine: Engine, touched: dict[int, Touched]) -> tuple[list[Touched], list[Touched], list[Touched]]:
    """(active accounts' touched resources, unknown sellers', inactive or parked accounts')."""
    status = {a.seller_id: a.status for a in list_accounts(engine)}
    active, unknown, inactive = [], [], []
    for seller_id, entry in sorted(touched.items()):
        if seller_id not in status:
            unknown.append(entry)
        elif status[seller_id] != "active":
            inactive.append(entry)
        else:
            active.append(entry)
    return active, unknown, inactive


def _search_touched_orders(session: AccountSession, touched: Touched, result: TouchedResult) -> set[int]:
    """The touched orders read through one search of their hours, when its pages cost fewer requests than one
    GET per order; returns the ids it stored."""
    ids = touched.order_ids
    if len(ids) < 3 or touched.earliest is None:
        return set()
    client, seller = session.client, session.seller_id
    start = floor_hour(touched.earliest - timedelta(minutes=1))
    stop = floor_hour(now_utc()) + HOUR
    budget = len(ids) // 2  # pages worth reading instead of GETs
    seen: set[int] = set()
    offset = 0
    while True:
        page = session.call(lambda t: client.search_orders(t, seller, start, stop, offset), "the next page of orders")
        result.order_searches += 1
        total = int((page.get("paging") or {}).get("total") or 0)
        orders = page.get("results") or []
        result.orders.add(upsert_orders(session.engine, seller, orders))
        seen.update(int(o["id"]) for o in orders)
        offset += len(orders)
        if not orders or offset >= total or ids <= seen:
            break
        if result.order_searches - (-(total - offset) // ORDERS_PAGE_LIMIT) > budget:
            break  # the rest of the hours costs more than GETs of the orders still unread
    return seen & ids


def sync_touched(
    engine: Engine, client: MarketplaceClient, touched: Touched, options: SyncOptions, should_stop: StopCheck = never,
) -> TouchedResult:
    """Fetch and upsert one active account's touched orders and items. Raises AccountNeedsReauthorization when
    its refresh token is refused; other errors propagate (the task retries transient ones)."""
    result = TouchedResult(touched.seller_id, notifications=len(touched.notification_ids))
    session = AccountSession(engine, client, touched.seller_id, options, time.monotonic() + options.timeout_seconds,
                             should_stop)
    try:
        try:
            found = _search_touched_orders(session, touched, result)
        except PermanentAPIError as exc:
            if not refused_window(exc):
                raise
            logger.warning("seller %s: the search of the touched orders' hours was refused (%s): one GET per order",
                           touched.seller_id, exc)
            found = set()
        for order_id in sorted(touched.order_ids - found):
            order = session.call(lambda t: client.get_order(t, order_id), "the next order")
            result.order_gets += 1
            if order is None:
                result.orders_missing += 1
            else:
                result.orders.add(upsert_orders(engine, touched.seller_id, [order]))
        item_ids = sorted(touched.item_ids)
        for i in range(0, len(item_ids), ITEMS_DETAIL_BATCH):
            batch = item_ids[i : i + ITEMS_DETAIL_BATCH]
            items, missing = session.call(lambda t: client.get_items(t, batch), "the next batch of item details")
            result.item_multigets += 1
            result.items_missing += len(missing)
            result.items.add(upsert_items(engine, touched.seller_id, items))
            mark_gone(engine, touched.seller_id, missing)  # no longer answered: marked as a deleted item is
    finally:
        result.requests, result.refreshes = client.stats.requests, client.stats.refreshes
    return result


def mark(engine: Engine, ids: Iterable[str], outcome: str, detail: str = "") -> int:
    """Mark notifications applied with their outcome (pending ones only: a second consumer's mark is a no-op)."""
    ids = list(ids)
    if not ids:
        return 0
    c = NOTIFICATIONS.c
    with engine.begin() as conn:
        return conn.execute(update(NOTIFICATIONS).where(c.id.in_(ids), c.processed_at.is_(None))
                            .values(processed_at=now_utc(), outcome=outcome, detail=detail[:2000])).rowcount


def mark_failed(engine: Engine, ids: Iterable[str], error: str, give_up_after: int) -> int:
    """Count a failed pass on notifications; those that failed `give_up_after` times are marked `failed` (the
    daily item reconciliation and the scheduled order sync still cover them). Returns how many gave up."""
    ids = list(ids)
    if not ids:
        return 0
    c = NOTIFICATIONS.c
    with engine.begin() as conn:
        conn.execute(update(NOTIFICATIONS).where(c.id.in_(ids), c.processed_at.is_(None))
                     .values(tries=c.tries + 1, detail=error[:2000]))
        return conn.execute(update(NOTIFICATIONS).where(c.id.in_(ids), c.processed_at.is_(None),
                                                        c.tries >= give_up_after)
                            .values(processed_at=now_utc(), outcome="failed")).rowcount


def settle(engine: Engine, touched: Touched, outcome: str, detail: str = "") -> None:
    """Mark an account's notifications: those of other topics `ignored_topic`, unreadable ones `bad_resource`,
    the rest `outcome`."""
    ignored, bad = set(touched.ignored), set(touched.bad)
    mark(engine, touched.ignored, "ignored_topic")
    mark(engine, touched.bad, "bad_resource")
    mark(engine, [i for i in touched.notification_ids if i not in ignored and i not in bad], outcome, detail)


def prune_processed(engine: Engine, older_than: datetime, batch: int = 10_000) -> int:
    """Delete the notifications applied before `older_than` (pending ones are never deleted), `batch` rows per
    transaction so that a large backlog never holds a long lock; returns how many were deleted. The range on
    `processed_at` is served by the table's index that starts with it."""
    c = NOTIFICATIONS.c
    deleted = 0
    while True:
        oldest = select(c.id).where(c.processed_at < older_than).limit(batch).scalar_subquery()
        with engine.begin() as conn:
            count = conn.execute(delete(NOTIFICATIONS).where(c.id.in_(oldest))).rowcount
        deleted += count
        if count < batch:
            return deleted


def counts_by_outcome(engine: Engine) -> dict[str, int]:
    """Stored notifications by outcome (`pending` for those not applied yet)."""
    c = NOTIFICATIONS.c
    with engine.connect() as conn:
        rows = conn.execute(select(c.outcome, c.processed_at.is_(None), func.count()).group_by(
            c.outcome, c.processed_at.is_(None)))
        found: dict[str, int] = defaultdict(int)
        for outcome, pending, count in rows:
            found["pending" if pending else outcome or "done"] += count
    return dict(found)


@dataclass
class ConsumerTotals:
    """What one consumer run did, over its rounds (pure: the flow adds each round, the summary reads it)."""

    rounds: int = 0
    notifications: int = 0
    accounts: int = 0
    unknown_sellers: set[int] = field(default_factory=set)
    unknown_notifications: int = 0
    inactive_notifications: int = 0
    orders: UpsertCounts = field(default_factory=UpsertCounts)
    items: UpsertCounts = field(default_factory=UpsertCounts)
    requests: int = 0
    failed: list[str] = field(default_factory=list)  # "seller: error" of the accounts whose round failed
    missed_read: int = 0
    missed_stored: int = 0
    pruned: int = 0  # applied notifications older than MARKETPLACE_NOTIFICATIONS_RETENTION_DAYS deleted by the run

    def add_round(self, notifications: int, unknown_sellers: list[int], unknown_notifications: int,
                  inactive_notifications: int, results: list[dict[str, Any] | BaseException],
                  sellers: list[int]) -> None:
        self.rounds += 1
        self.notifications += notifications
        self.accounts += len(results)
        self.unknown_sellers.update(unknown_sellers)
        self.unknown_notifications += unknown_notifications
        self.inactive_notifications += inactive_notifications
        for seller, result in zip(sellers, results):
            if isinstance(result, BaseException):
                self.failed.append(f"{seller}: {type(result).__name__}: {result}")
                continue
            self.orders.add(UpsertCounts(**result["orders"]))
            self.items.add(UpsertCounts(**result["items"]))
            self.requests += result["requests"]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["unknown_sellers"] = sorted(self.unknown_sellers)
        return data

    def markdown(self, seconds: float) -> str:
        unknown = ", ".join(map(str, sorted(self.unknown_sellers))) or "none"
        failed = "".join(f"\n- {line}" for line in self.failed) or " none"
        return (
            f"# Marketplace notifications\n\n{self.notifications:,} notification(s) in {self.rounds} round(s), "
            f"{self.accounts} account(s), {self.requests:,} API request(s), {seconds:.1f} s.\n\n"
            f"| | new | updated | unchanged |\n|---|---:|---:|---:|\n"
            f"| orders | {self.orders.new:,} | {self.orders.updated:,} | {self.orders.unchanged:,} |\n"
            f"| items | {self.items.new:,} | {self.items.updated:,} | {self.items.unchanged:,} |\n\n"
            f"Unknown sellers ({self.unknown_notifications} notification(s), not errors): {unknown}. "
            f"Inactive accounts: {self.inactive_notifications} notification(s). "
            f"Missed feeds read: {self.missed_read}, new: {self.missed_stored}. Applied notifications past their "
            f"retention deleted: {self.pruned:,}.\n\nFailed accounts:{failed}\n"
        )


# -- missed feeds ----------------------------------------------------------------------------------------------
def store_missed_feeds(engine: Engine, client: MarketplaceClient, seller_id: int, app_id: str,
                       options: SyncOptions, should_stop: StopCheck = never, page: int = 50,
                       max_pages: int = 100) -> tuple[int, int]:
    """Read the app's missed feeds (with the token of one active account: the endpoint is the app's) and store
    those of this app like the receiver does. Returns (messages read, new ones stored)."""
    session = AccountSession(engine, client, seller_id, options, time.monotonic() + options.timeout_seconds,
                             should_stop)
    read = stored = offset = 0
    for _ in range(max_pages):
        raise_if_stopped(should_stop, "the next page of missed feeds")
        answer = session.call(lambda t: client.missed_feeds(t, app_id, offset, page), "the next page of missed feeds")
        messages = answer.get("messages") or []
        rows = []
        for message in messages:
            try:
                row = parse_notification(message, app_id)
            except BadNotification as exc:
                logger.warning("missed feed skipped: %s", exc)
                continue
            if row is not None:
                rows.append(row)
        read += len(messages)
        stored += len(store_notifications(engine, rows))
        offset += len(messages)
        if not messages or offset >= int(answer.get("total") or 0):
            break
    return read, stored


__all__ = [
    "AccountNeedsReauthorization", "BadNotification", "CALLBACK_PATH", "Pending", "Touched", "TouchedResult",
    "counts_by_outcome", "due_by_account", "mark", "mark_failed", "oldest_pending", "parse_notification",
    "pending_notifications", "prune_processed",
    "resource_id", "settle", "split_known", "store_missed_feeds", "store_notifications", "sync_touched",
    "touched_by_account", "wait_for_window",
]
