"""The marketplace's notifications: the receiver (a real uvicorn server in a thread, the session's PostgreSQL)
fed by the emulator's own notifications over HTTP, the consumer's domain functions and its flow, the missed-feeds
catch-up, and the scheduled sync's item switch."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import httpx
import pytest
import uvicorn
from sqlalchemy import delete, select, update

from deployments.marketplace_receiver import build_app, store_rows
from emulators.common import bind
from marketplace_fixtures import OPTIONS
from operations.marketplace.notifications import (
    CALLBACK_PATH,
    NOTIFICATIONS,
    BadNotification,
    Pending,
    counts_by_outcome,
    due_by_account,
    parse_notification,
    pending_notifications,
    prune_processed,
    resource_id,
    store_missed_feeds,
    store_notifications,
    touched_by_account,
)
from operations.marketplace.store import ITEMS, ORDERS, utc
from operations.marketplace.sync import SyncResources, sync_account
from tasks.marketplace_notifications import NotificationRun, apply_account_notifications, take_notifications

APP = "emulated-app"


def _note(**fields) -> dict:
    return {"_id": "n1", "resource": "/orders/2000000000001", "user_id": 100000001, "topic": "orders_v2",
            "application_id": APP, "attempts": 1, "sent": "2026-12-05T10:00:00.000-03:00",
            "received": "2026-12-05T10:00:00.000-03:00", **fields}


def test_a_notification_of_another_app_is_dropped_and_a_body_that_is_none_is_refused():
    assert parse_notification(_note(application_id="someone-else"), APP) is None
    row = parse_notification(_note(), APP)
    assert (row["id"], row["user_id"], row["topic"]) == ("n1", 100000001, "orders_v2")
    assert row["sent_at"] == datetime(2026, 12, 5, 13, tzinfo=timezone.utc)
    with pytest.raises(BadNotification, match="user_id"):
        parse_notification(_note(user_id=None), APP)
    with pytest.raises(BadNotification):
        parse_notification(["not", "a", "dict"], APP)


def test_notifications_are_grouped_per_account_into_distinct_orders_and_items():
    now = datetime.now(timezone.utc)
    notes = [Pending(f"n{i}", 7, "orders_v2", "/orders/11", now, now) for i in range(500)]
    notes += [Pending(f"i{i}", 7, "items", f"/items/MLB{i % 30}", now, None) for i in range(500)]
    notes += [Pending("q", 7, "questions", "/questions/5", now, None), Pending("b", 8, "items", "/items/../x", now, None)]
    touched = touched_by_account(notes)
    assert touched[7].order_ids == {11} and len(touched[7].item_ids) == 30
    assert touched[7].ignored == ["q"] and touched[8].bad == ["b"] and len(touched[7].notification_ids) == 1001
    assert resource_id("orders_v2", "/orders/123") == 123 and resource_id("items", "/items/MLB1") == "MLB1"
    assert resource_id("orders_v2", "/items/MLB1") is None


class _Receiver:
    """The receiver's app served by uvicorn from a thread on a free port."""

    def __init__(self, engine, app_id: str = APP):
        self.stored_events: list[int] = []
        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.app = build_app(store_rows(engine), app_id, self.stored_events.append)
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        self.sock = sock

    @property
    def callback(self) -> str:
        return self.url + CALLBACK_PATH

    def stats(self) -> dict:
        return httpx.get(self.url + "/-/stats").json()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)
        self.sock.close()


@pytest.fixture
def notified(pg_engine, emulator_factory):
    """The session's PostgreSQL emptied, an emulator of 3 sellers notifying a receiver, two sellers onboarded."""
    with pg_engine.begin() as conn:
        conn.execute(delete(NOTIFICATIONS))
    receiver = _Receiver(pg_engine)
    market = emulator_factory(pg_engine, notification_url=receiver.callback, notification_retry_seconds=0.2)
    for seller in market.seller_ids()[:2]:
        market.onboard(seller)
    yield market, receiver
    receiver.stop()


def _wait(check, timeout: float = 10.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return value


def test_changes_in_the_emulator_are_in_the_database_seconds_later_without_a_sync(notified, database_url):
    """Receiver, store and consumer end to end; the unknown seller's notifications are counted, not errors."""
    market, receiver = notified
    a, b, stranger = market.seller_ids()
    before = market.client().stats.requests
    changed = [market.control.mutate(seller_id=s, orders_updated=5, items_updated=30) for s in (a, b, stranger)]
    _wait(lambda: market.control.notifications()["delivered"] == 105, what="all 105 notifications delivered")
    assert receiver.stats()["stored"] == 105 and receiver.stored_events
    started = time.monotonic()
    time.sleep(0.25)  # each account's notifications are taken once its oldest is a window (0.2 s) old
    taken = take_notifications(database_url, window_seconds=0.2, idle_seconds=0)
    assert taken.notifications == 105 and taken.unknown_sellers == [stranger] and taken.unknown_notifications == 35
    run = NotificationRun(database_url, OPTIONS, 3)
    results = [apply_account_notifications.fn(t, _app(market), run) for t in taken.accounts]  # the task's body
    seconds = time.monotonic() - started
    assert seconds < 5, seconds
    for result in results:  # 5 orders: one search page; 30 items: two multigets (+ a token refresh at most)
        assert result["status"] == "synced" and result["order_searches"] + result["order_gets"] <= 6
        assert result["item_multigets"] == 2 and result["requests"] <= 5, result
    truth = {o["id"]: o for o in market.control.orders(a) + market.control.orders(b)}
    with market.engine.connect() as conn:
        stored = {r.id: r for r in conn.execute(select(ORDERS.c.id, ORDERS.c.status, ORDERS.c.date_last_updated)
                                                 .where(ORDERS.c.id.in_(changed[0]["orders_updated"]
                                                                        + changed[1]["orders_updated"])))}
        items = {r.id: r.price for r in conn.execute(select(ITEMS.c.id, ITEMS.c.price)
                                                     .where(ITEMS.c.id.in_(changed[0]["items_updated"])))}
    assert set(stored) == set(changed[0]["orders_updated"] + changed[1]["orders_updated"])
    assert all(stored[i].status == truth[i]["status"] for i in stored)
    prices = {i["id"]: i["price"] for i in market.control.items(a)}
    assert len(items) == 30 and {k: float(v) for k, v in items.items()} == {k: prices[k] for k in items}
    assert counts_by_outcome(market.engine) == {"synced": 70, "unknown_seller": 35}
    assert market.client().stats.requests == before  # (a fresh client: the receiver itself called nothing)


def _app(market):
    from pydantic import SecretStr

    from blocks.marketplace_app import MarketplaceApp

    return MarketplaceApp(api_base_url=market.base_url, client_id=market.config.client_id,
                          client_secret=SecretStr(market.config.client_secret), max_attempts=4)


def test_a_redelivered_notification_changes_nothing_and_other_apps_are_dropped(notified):
    market, receiver = notified
    body = _note(_id="dup-1", user_id=market.seller_ids()[0])
    for _ in range(3):
        assert httpx.post(receiver.callback, json=body).status_code == 200
    assert httpx.post(receiver.callback, json={**body, "_id": "other", "application_id": 999}).status_code == 200
    assert httpx.post(receiver.callback, content=b"not json").status_code == 400
    with market.engine.connect() as conn:
        rows = conn.execute(select(NOTIFICATIONS)).all()
    assert [r.id for r in rows] == ["dup-1"]
    stats = receiver.stats()
    assert (stats["stored"], stats["redelivered"], stats["other_app"], stats["bad"]) == (1, 2, 1, 1)
    first = rows[0]
    httpx.post(receiver.callback, json={**body, "attempts": 2})
    with market.engine.connect() as conn:
        again = conn.execute(select(NOTIFICATIONS)).one()
    assert again == first  # not even its attempts or stored_at moved


def test_a_burst_is_answered_within_500_ms_each(notified):
    """A burst of notifications at once is answered 200 within the marketplace's 500 ms each (group commits)."""
    market, receiver = notified
    market.control.configure(notification_timeout_ms=500, notification_attempts=1)
    market.control.mutate(orders_updated=20, items_updated=10)  # 3 sellers: 90 notifications at once
    _wait(lambda: market.control.notifications()["pending"] == 0, 20, "the burst delivered")
    summary = market.control.notifications()
    assert summary["delivered"] == 90 and summary["missed"] == 0, summary
    assert len(pending_notifications(market.engine)) == 90


def test_undelivered_notifications_are_retried_then_read_back_from_missed_feeds(notified, pg_engine):
    market, receiver = notified
    seller = market.seller_ids()[0]
    market.control.configure(notification_url="http://127.0.0.1:9/nowhere", notification_attempts=2)
    changed = market.control.mutate(seller_id=seller, orders_updated=3)
    _wait(lambda: market.control.notifications()["missed"] == 3, 10, "three missed after two attempts each")
    assert market.control.notifications()["failed_attempts"] == 6
    assert pending_notifications(pg_engine) == []
    read, stored = store_missed_feeds(pg_engine, market.client(), seller, APP, OPTIONS)
    assert (read, stored) == (3, 3)
    assert store_missed_feeds(pg_engine, market.client(), seller, APP, OPTIONS) == (3, 0)  # same _ids: nothing new
    assert {p.resource for p in pending_notifications(pg_engine)} == {f"/orders/{i}" for i in changed["orders_updated"]}


def test_with_notifications_a_sync_of_both_reads_no_items_and_one_of_items_reads_them_all(pg_engine, emulator_factory):
    market = emulator_factory(pg_engine, sellers=1, orders_per_seller=50, items_per_seller=150)
    account = market.onboard(market.seller_ids()[0])
    incremental = replace(OPTIONS, items_scan=False)
    client = market.client()
    sync_account(pg_engine, client, account, SyncResources.both, incremental)
    routes = market.control.stats()["routes"]
    assert not {"/users/{user_id}/items/search", "/items"} & set(routes), routes
    full = sync_account(pg_engine, market.client(), account, SyncResources.items, incremental)
    assert full.items.new == 150


def test_the_receiver_service_follows_the_stacks_bind_and_auth_rules(tmp_path, pg_engine):
    """The stack's service (a supervised process): refused beyond loopback without auth; with STACK_AUTH_STRING,
    every request needs it. Slow-ish (5-10 s): a supervisord and the receiver's process start."""
    from deployments.marketplace_receiver import MarketplaceReceiverService
    from operations.infra.processes import ExposedWithoutAuth, free_port

    with pg_engine.begin() as conn:
        conn.execute(delete(NOTIFICATIONS))
    with pytest.raises(ExposedWithoutAuth, match="STACK_AUTH_STRING"):
        MarketplaceReceiverService(tmp_path / "open", APP, host="0.0.0.0").ensure()
    service = MarketplaceReceiverService(tmp_path / "marketplace-receiver", APP, port=free_port(),
                                         auth_string="ops:s3cret")
    running = service.ensure()
    try:
        # httpx's 5 s default is too short for a first request to a just-started process on a loaded machine
        assert httpx.post(running.callback_url, json=_note(_id="svc-1"), timeout=30).status_code == 401
        assert httpx.post(running.callback_url, json=_note(_id="svc-1"), auth=("ops", "s3cret"),
                          timeout=30).status_code == 200
        assert [p.id for p in pending_notifications(pg_engine)] == ["svc-1"]
        line = service.status().line()
        assert line.startswith("running") and running.callback_url in line and "basic auth" in line, line
    finally:
        service.stop()


def test_each_account_is_coalesced_over_its_own_window():
    """An account is taken once its oldest pending notification is a window old; a younger account's burst waits
    for its own window (and then comes whole)."""
    now = datetime.now(timezone.utc)
    old, young = now - timedelta(seconds=3), now - timedelta(seconds=0.5)
    notes = [Pending("a1", 1, "items", "/items/MLB1", old, old), Pending("a2", 1, "items", "/items/MLB2", now, now),
             Pending("b1", 2, "items", "/items/MLB3", young, young), Pending("b2", 2, "items", "/items/MLB4", now, now)]
    assert [n.id for n in due_by_account(notes, 2.0, now)] == ["a1", "a2"]
    assert [n.id for n in due_by_account(notes, 2.0, now + timedelta(seconds=2))] == ["a1", "a2", "b1", "b2"]
    assert due_by_account(notes, 5.0, now) == []


def test_a_burst_of_1000_notifications_for_one_seller_costs_a_handful_of_requests(pg_engine, emulator_factory,
                                                                                 database_url):
    """1,000 notifications of one seller (repeated changes to 40 items and 10 orders, as a repricing or stock tool
    sends them) coalesced in one window: each resource fetched once, items 20 per multiget."""
    with pg_engine.begin() as conn:
        conn.execute(delete(NOTIFICATIONS))
    market = emulator_factory(pg_engine, sellers=1, orders_per_seller=50, items_per_seller=60)
    seller = market.seller_ids()[0]
    market.onboard(seller)
    changed = market.control.mutate(seller_id=seller, orders_updated=10, items_updated=40, notify=False)
    resources = ([("orders_v2", f"/orders/{i}") for i in changed["orders_updated"]]
                 + [("items", f"/items/{i}") for i in changed["items_updated"]])
    sent = datetime.now(timezone.utc).isoformat()
    rows = [parse_notification({"_id": f"burst-{n}", "resource": resources[n % len(resources)][1], "user_id": seller,
                                "topic": resources[n % len(resources)][0], "application_id": APP, "attempts": 1,
                                "sent": sent}, APP) for n in range(1000)]
    assert len(store_notifications(pg_engine, rows)) == 1000
    taken = take_notifications(database_url, window_seconds=0.1, idle_seconds=0)
    assert taken.notifications == 1000 and len(taken.accounts) == 1
    market.control.reset_stats()
    result = apply_account_notifications.fn(taken.accounts[0], _app(market), NotificationRun(database_url, OPTIONS, 3))
    requests = market.control.stats()["total"]
    print(f"1,000 notifications of one seller (10 orders, 40 items): {requests} requests {result}")
    assert result["item_multigets"] == 2 and result["order_searches"] + result["order_gets"] <= 3, result
    assert requests <= 6, requests  # + a token refresh at most
    assert result["orders"]["new"] == 10 and result["items"]["new"] == 40  # (never synced before: new here)
    assert counts_by_outcome(pg_engine) == {"synced": 1000}


def test_applied_notifications_past_their_retention_are_pruned_and_pending_ones_never(pg_engine):
    with pg_engine.begin() as conn:
        conn.execute(delete(NOTIFICATIONS))
    rows = [parse_notification(_note(_id=f"p{n}"), APP) for n in range(25)]
    store_notifications(pg_engine, rows)
    now = datetime.now(timezone.utc)
    with pg_engine.begin() as conn:  # 10 applied 40 days ago, 5 applied today, 10 pending (stored long ago)
        conn.execute(update(NOTIFICATIONS).values(stored_at=now - timedelta(days=60)))
        conn.execute(update(NOTIFICATIONS).where(NOTIFICATIONS.c.id.in_([f"p{n}" for n in range(10)]))
                     .values(processed_at=now - timedelta(days=40), outcome="synced"))
        conn.execute(update(NOTIFICATIONS).where(NOTIFICATIONS.c.id.in_([f"p{n}" for n in range(10, 15)]))
                     .values(processed_at=now, outcome="synced"))
    assert prune_processed(pg_engine, now - timedelta(days=30), batch=3) == 10  # several batches
    assert counts_by_outcome(pg_engine) == {"synced": 5, "pending": 10}
    assert prune_processed(pg_engine, now - timedelta(days=30)) == 0
