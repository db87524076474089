"""One account's sync against the real emulator over HTTP and a real database (PostgreSQL, and SQLite where
the store is concerned): completeness, idempotence, tokens, faults, paging limits and checkpoints."""

from __future__ import annotations

import multiprocessing
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import func, select

from marketplace_fixtures import OPTIONS, FAST_RETRY
from operations.infra.http import RetryPolicy
from operations.marketplace.client import MarketplaceClient
from operations.marketplace.models import AccountStatus, MarketplaceItem, MarketplaceOrder
from operations.errors import UserError
from operations.marketplace.onboarding import AuthorizationRefused, onboard_from_code
from operations.cancellation import after
from operations.marketplace.store import (
    UnknownAccount,
    account_sync_lock,
    claim_parked_notices,
    count_rows,
    get_account,
    get_checkpoint,
    now_utc,
    read_tokens,
    record_sync,
    refresh_tokens,
    release_interrupted_syncs,
    select_accounts,
)
from operations.marketplace.sync import AccountSyncFailed, AccountSyncResult, SyncResources, sync_account



def _stored_orders(engine, seller_id: int) -> dict[int, datetime]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(MarketplaceOrder.id, MarketplaceOrder.date_last_updated).where(MarketplaceOrder.seller_id == seller_id)
        )
        return {r.id: r.date_last_updated for r in rows}


def _truth_order_ids(market, seller_id: int) -> set[int]:
    return {int(o["id"]) for o in market.control.orders(seller_id)}


def _truth_item_ids(market, seller_id: int) -> set[str]:
    return {str(i["id"]) for i in market.control.items(seller_id)}


def _stored_item_ids(engine, seller_id: int) -> set[str]:
    with engine.connect() as conn:
        return set(conn.scalars(select(MarketplaceItem.id).where(MarketplaceItem.seller_id == seller_id)))


def test_full_sync_stores_everything_once_and_a_rerun_changes_nothing(any_database, emulator_factory):
    market = emulator_factory(any_database)
    seller = market.seller_ids()[0]
    account = market.onboard(seller)
    first = sync_account(any_database, market.client(), account, SyncResources.both, OPTIONS)
    assert first.status == "synced"
    assert set(_stored_orders(any_database, seller)) == _truth_order_ids(market, seller)
    assert _stored_item_ids(any_database, seller) == _truth_item_ids(market, seller)
    assert first.orders.new == len(_truth_order_ids(market, seller)) and first.orders.updated == 0
    assert first.items.new == len(_truth_item_ids(market, seller))
    assert get_checkpoint(any_database, seller, "orders") is not None
    counts = count_rows(any_database, seller)

    again = sync_account(any_database, market.client(), account, SyncResources.both, OPTIONS)
    assert (again.orders.new, again.orders.updated, again.items.new, again.items.updated) == (0, 0, 0, 0)
    assert count_rows(any_database, seller) == counts, "a re-run duplicated rows"


def test_changed_and_new_records_are_picked_up_by_the_next_incremental_sync(any_database, emulator_factory):
    market = emulator_factory(any_database)
    seller = market.seller_ids()[1]
    account = market.onboard(seller)
    sync_account(any_database, market.client(), account, SyncResources.both, OPTIONS)
    before = _stored_orders(any_database, seller)
    changed = market.control.mutate(seller_id=seller, orders_updated=7, orders_new=3, items_updated=4, items_new=2)

    result = sync_account(any_database, market.client(), account, SyncResources.both, OPTIONS)
    assert (result.orders.new, result.orders.updated) == (3, 7)
    assert (result.items.new, result.items.updated) == (2, 4)
    after = _stored_orders(any_database, seller)
    assert set(after) == _truth_order_ids(market, seller)
    updated = {i for i in after if i in before and after[i] != before[i]}
    assert len(updated) == 7 and len(set(after) - set(before)) == 3, changed
    # the incremental sync read only the lookback window, not the whole history again
    assert result.order_pages < 5


def test_expired_access_token_is_refreshed_once_and_the_call_retried(pg_engine, emulator_factory):
    market = emulator_factory(pg_engine)
    seller = market.seller_ids()[0]
    account = market.onboard(seller)
    version = read_tokens(pg_engine, seller).version
    market.control.expire_tokens(seller_id=seller)  # the stored token still looks valid: the API says 401
    result = sync_account(pg_engine, market.client(), account, SyncResources.orders, OPTIONS)
    assert result.status == "synced" and result.refreshes == 1
    assert read_tokens(pg_engine, seller).version == version + 1
    assert set(_stored_orders(pg_engine, seller)) == _truth_order_ids(market, seller)


def _race_refresh(base_url: str, database_url: str, seller_id: int, seen_version: int, start, out) -> None:
    from pydantic import SecretStr

    from emulators.marketplace import EmulatorConfig
    from operations.infra.database import get_engine
    from operations.infra.http import shared_http_client
    from operations.marketplace.client import AppCredentials, MarketplaceClient

    cfg = EmulatorConfig()
    client = MarketplaceClient(
        shared_http_client(base_url), AppCredentials(cfg.client_id, SecretStr(cfg.client_secret)), FAST_RETRY
    )
    start.wait()  # every racer imported and ready: they refresh together
    try:
        state = refresh_tokens(get_engine(database_url), seller_id, seen_version, client.refresh)
        out.put(("ok", state.version, client.stats.refreshes))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out.put(("error", repr(exc), 0))


def test_concurrent_refreshes_from_threads_and_processes_never_lose_the_account(pg_engine, database_url, emulator_factory):
    market = emulator_factory(pg_engine, latency_ms=20)
    seller = market.seller_ids()[0]
    market.onboard(seller)
    seen = read_tokens(pg_engine, seller).version
    market.control.reset_stats()
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start = ctx.Barrier(3 + 3, timeout=60)  # 3 processes, 3 threads: released once the last one is ready
    procs = [ctx.Process(target=_race_refresh, args=(market.base_url, database_url, seller, seen, start, out))
             for _ in range(3)]
    for p in procs:
        p.start()
    thread_results = []

    def in_thread():
        client = market.client()
        start.wait()
        state = refresh_tokens(pg_engine, seller, seen, client.refresh)
        thread_results.append((state.version, client.stats.refreshes))

    threads = [threading.Thread(target=in_thread) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    assert all(r[0] == "ok" for r in results), results
    versions = {r[1] for r in results} | {v for v, _ in thread_results}
    assert versions == {seen + 1}, "every racer must end with the one refreshed token pair"
    assert sum(r[2] for r in results) + sum(n for _, n in thread_results) == 1, "exactly one refresh call"
    assert get_account(pg_engine, seller).status == AccountStatus.active.value
    # the stored refresh token is the live one: a later forced refresh works
    client = market.client()
    assert refresh_tokens(pg_engine, seller, seen + 1, client.refresh).version == seen + 2


def test_throttling_and_server_errors_are_retried_and_counted(pg_engine, emulator_factory):
    market = emulator_factory(pg_engine, rate_429=0.15, rate_503=0.1, retry_after=1)
    seller = market.seller_ids()[2]
    account = market.onboard(seller)
    client = market.client(RetryPolicy(attempts=8, base_delay=0.01, max_delay=0.05, max_retry_after=0.05))
    result = sync_account(pg_engine, client, account, SyncResources.both, OPTIONS)
    assert result.status == "synced"
    assert result.retries > 0 and result.throttled > 0 and result.server_errors > 0
    assert result.retries == result.throttled + result.server_errors
    assert set(_stored_orders(pg_engine, seller)) == _truth_order_ids(market, seller)
    assert _stored_item_ids(pg_engine, seller) == _truth_item_ids(market, seller)


def test_windows_split_below_the_offset_cap_and_short_totals_are_reported(pg_engine, emulator_factory):
    # 600 orders in 60 days with an offset cap of 200: the history must be cut into smaller windows
    market = emulator_factory(pg_engine, sellers=1, orders_per_seller=600, max_offset=200, total_underreport=0.2)
    seller = market.seller_ids()[0]
    account = market.onboard(seller)
    result = sync_account(pg_engine, market.client(orders_offset_cap=200), account, SyncResources.orders, OPTIONS)
    assert set(_stored_orders(pg_engine, seller)) == _truth_order_ids(market, seller)
    assert len(result.windows) > 3
    assert all(w.end - w.start <= timedelta(days=30) for w in result.windows)
    assert result.mismatched_windows, "the under-reported totals must show as mismatches"
    assert sum(w.rows_read for w in result.windows) == 600
    stats = market.control.stats()
    assert not any(str(status) == "400" for status in stats.get("by_status", {})), stats


def test_items_beyond_the_offset_cap_are_scanned_and_an_expired_scroll_restarts_the_scan(pg_engine, emulator_factory):
    market = emulator_factory(pg_engine, sellers=1, orders_per_seller=5, items_per_seller=1_250)
    seller = market.seller_ids()[0]
    account = market.onboard(seller)

    class ExpiringScroll(MarketplaceClient):
        calls = 0

        def scan_item_ids(self, token, seller_id, scroll_id, limit=100):
            ExpiringScroll.calls += 1
            if ExpiringScroll.calls == 4:
                market.control.expire_scrolls()
            return super().scan_item_ids(token, seller_id, scroll_id, limit)

    base = market.client()
    client = ExpiringScroll(base.http, base.credentials, base.retry)
    result = sync_account(pg_engine, client, account, SyncResources.items, OPTIONS)
    assert result.scan_restarts == 1
    assert _stored_item_ids(pg_engine, seller) == _truth_item_ids(market, seller)
    assert result.items.new == 1_250


def test_a_failure_mid_window_keeps_the_checkpoint_and_the_rerun_completes_without_duplicates(pg_engine, emulator_factory):
    market = emulator_factory(pg_engine, sellers=1, orders_per_seller=400)
    seller = market.seller_ids()[0]
    account = market.onboard(seller)
    # the 3rd and later order pages fail past every retry: 2 pages (100 orders) are committed, no window ends
    market.control.add_fault(path_prefix="/orders/search", seller_id=seller, skip=2, times=1000, status=503)
    options = OPTIONS.__class__(**{**OPTIONS.__dict__, "max_window": timedelta(days=365)})
    with pytest.raises(AccountSyncFailed) as failed:
        sync_account(pg_engine, market.client(RetryPolicy(attempts=2, base_delay=0.01)), account,
                     SyncResources.orders, options)
    assert failed.value.transient and failed.value.result["status"] == "failed"
    assert get_checkpoint(pg_engine, seller, "orders") is None, "checkpoint advanced past uncommitted pages"
    assert len(_stored_orders(pg_engine, seller)) == 100
    assert get_account(pg_engine, seller).last_sync_status == "failed"

    market.control.clear_faults()
    result = sync_account(pg_engine, market.client(), account, SyncResources.orders, options)
    assert result.orders.new == 300 and result.orders.unchanged == 100
    with pg_engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(MarketplaceOrder).where(MarketplaceOrder.seller_id == seller)).scalar()
    assert total == 400 and get_checkpoint(pg_engine, seller, "orders") is not None


def test_a_dead_refresh_token_parks_the_account_and_later_runs_skip_it(any_database, emulator_factory):
    market = emulator_factory(any_database)
    seller = market.seller_ids()[0]
    account = market.onboard(seller)
    market.control.revoke(seller)
    market.control.expire_tokens(seller_id=seller)
    with pytest.raises(AccountSyncFailed) as failed:
        sync_account(any_database, market.client(), account, SyncResources.orders, OPTIONS)
    assert not failed.value.transient
    assert failed.value.result["status"] == "needs_reauthorization"
    parked = get_account(any_database, seller)
    assert parked.status == AccountStatus.needs_reauthorization.value and "invalid_grant" in parked.status_reason
    to_sync, skipped = select_accounts(any_database, None)
    assert seller not in {a.seller_id for a in to_sync}
    assert [(a.seller_id, "re-authorization" in why) for a, why in skipped] == [(seller, True)]
    # the owner authorizes again: the same account is active with its data kept
    assert market.onboard(seller).status == AccountStatus.active.value


def test_a_used_authorization_code_is_a_user_error_and_unknown_ids_are_refused(pg_engine, emulator_factory):
    market = emulator_factory(pg_engine)
    seller = market.seller_ids()[0]
    code = market.control.authorize(seller)
    onboard_from_code(pg_engine, market.client(), code)
    with pytest.raises(AuthorizationRefused, match="invalid_grant") as refused:
        onboard_from_code(pg_engine, market.client(), code)  # single use
    assert isinstance(refused.value, UserError) and code not in str(refused.value)
    with pytest.raises(UnknownAccount, match="424242"):
        select_accounts(pg_engine, [seller, 424242])
    assert issubclass(UnknownAccount, UserError)


def test_the_next_page_and_batch_are_asked_while_the_one_before_is_stored(pg_engine, emulator_factory, monkeypatch):
    import operations.marketplace.sync as sync_module

    # 300 ms a request: a store that sees no request of its account in flight ran while nothing was asked
    from operations.marketplace.client import request_slots

    market = emulator_factory(pg_engine, sellers=2, orders_per_seller=120, items_per_seller=120, latency_ms=300)
    seller, other = market.seller_ids()
    account = market.onboard(seller)
    seen: dict[str, list[int]] = {"orders": [], "items": []}

    def observed(kind: str, store):
        def run(engine, seller_id, rows):
            deadline = time.monotonic() + 0.25
            while market.control.stats()["in_flight"] == 0 and time.monotonic() < deadline:
                time.sleep(0.005)
            seen[kind].append(market.control.stats()["in_flight"])
            return store(engine, seller_id, rows)
        return run

    monkeypatch.setattr(sync_module, "upsert_orders", observed("orders", sync_module.upsert_orders))
    monkeypatch.setattr(sync_module, "upsert_items", observed("items", sync_module.upsert_items))
    market.control.reset_stats()
    result = sync_account(pg_engine, market.client(), account, SyncResources.both, OPTIONS)
    assert result.status == "synced" and result.orders.new == 120 and result.items.new == 120
    # every page of orders is stored while the next one (the last: the empty page) is asked; item details are
    # stored 100 at a time, the first while the 6th batch is asked (the last after every batch is read)
    assert seen["orders"] and set(seen["orders"]) == {1}, seen
    assert seen["items"][0] >= 1, seen
    # item details (no batch depends on another) are asked two at a time; pages of orders one at a time
    assert market.control.stats()["max_in_flight"] == 2
    # the process's request slots bound what is asked ahead too
    market.control.reset_stats()
    result = sync_account(pg_engine, market.client().sharing(request_slots(1)), market.onboard(other),
                          SyncResources.both, OPTIONS)
    assert result.status == "synced" and result.items.new == 120
    assert market.control.stats()["max_in_flight"] == 1


def test_two_accounts_overlap_in_time_and_the_same_account_never(pg_engine, emulator_factory):
    # each sync takes over a second (12+ pages at 60 ms), far longer than the second run's 0.3 s lock wait
    market = emulator_factory(pg_engine, sellers=2, orders_per_seller=600, latency_ms=60)
    a, b = market.seller_ids()
    accounts = {s: market.onboard(s) for s in (a, b)}
    options = OPTIONS.__class__(**{**OPTIONS.__dict__, "lock_wait_seconds": 0.3})
    spans: dict[str, tuple[float, float, str]] = {}

    def run(name: str, seller: int) -> None:
        started = time.monotonic()
        result = sync_account(pg_engine, market.client(), accounts[seller], SyncResources.orders, options)
        spans[name] = (started, time.monotonic(), result.status)

    threads = [threading.Thread(target=run, args=args) for args in (("a1", a), ("b", b))]
    for t in threads:
        t.start()
    time.sleep(0.1)
    second = threading.Thread(target=run, args=("a2", a))
    second.start()
    for t in [*threads, second]:
        t.join()
    assert spans["a1"][2] == spans["b"][2] == "synced"
    assert spans["a1"][0] < spans["b"][1] and spans["b"][0] < spans["a1"][1], "different accounts did not overlap"
    assert spans["a2"][2] == "skipped", "the same account was synced twice at once"
    assert spans["a2"][1] < spans["a1"][1]


def _truth_updated(market, seller_id: int) -> dict[int, datetime]:
    from operations.marketplace.client import parse_time

    return {int(o["id"]): parse_time(o["date_last_updated"]) for o in market.control.orders(seller_id)}


def test_a_cancelled_sync_stops_before_its_next_page_and_its_checkpoint_covers_only_stored_orders(pg_engine, emulator_factory):
    market = emulator_factory(pg_engine, sellers=1, orders_per_seller=400)
    seller = market.seller_ids()[0]
    account = market.onboard(seller)
    options = OPTIONS.__class__(**{**OPTIONS.__dict__, "max_window": timedelta(days=7)})  # ~14 windows
    market.control.reset_stats()
    # asked once as the sync starts, then before each request: 9 requests, then the run is cancelled
    result = sync_account(pg_engine, market.client(), account, SyncResources.both, options, should_stop=after(10))
    assert result.status == "cancelled" and "before the next page of orders" in result.error
    assert market.control.stats()["total"] == result.requests == 9, "a request was made after the cancel"
    stored = _stored_orders(pg_engine, seller)
    assert result.orders.new == len(stored) > 0, "the report must count what was committed before the cancel"
    checkpoint = get_checkpoint(pg_engine, seller, "orders")
    truth = _truth_updated(market, seller)
    assert checkpoint is not None and checkpoint < max(truth.values())
    assert {i for i, updated in truth.items() if updated < checkpoint} <= set(stored), "checkpoint past stored rows"
    assert get_account(pg_engine, seller).last_sync_status == "cancelled"

    resumed = sync_account(pg_engine, market.client(), account, SyncResources.both, options)
    assert resumed.status == "synced" and set(_stored_orders(pg_engine, seller)) == set(truth)
    assert resumed.orders.new == len(truth) - len(stored)


def test_a_cancelled_item_sync_keeps_the_details_it_read_and_starts_no_request_before_its_turn(pg_engine, emulator_factory):
    market = emulator_factory(pg_engine, sellers=1, orders_per_seller=5, items_per_seller=200)
    seller = market.seller_ids()[0]
    account = market.onboard(seller)
    market.control.reset_stats()
    not_started = sync_account(pg_engine, market.client(), account, SyncResources.items, OPTIONS, should_stop=lambda: True)
    assert not_started.status == "cancelled" and "before its sync started" in not_started.error
    assert market.control.stats()["total"] == 0
    # 3 pages of ids (200 ids, then an empty page), then 4 batches of 20 details: the 5th batch is not asked
    result = sync_account(pg_engine, market.client(), account, SyncResources.items, OPTIONS, should_stop=after(8))
    assert result.status == "cancelled" and "item details" in result.error
    assert result.items.new == 80 == len(_stored_item_ids(pg_engine, seller)), "read details were dropped"
    assert get_checkpoint(pg_engine, seller, "items") is None


def test_a_cancelled_sync_waiting_for_another_runs_lock_stops_waiting(any_database, emulator_factory):
    market = emulator_factory(any_database)
    seller = market.seller_ids()[0]
    account = market.onboard(seller)
    options = OPTIONS.__class__(**{**OPTIONS.__dict__, "lock_wait_seconds": 30})
    with account_sync_lock(any_database, seller, 1, lease_seconds=60) as held:  # another run syncs it
        assert held
        started = time.monotonic()
        result = sync_account(any_database, market.client(), account, SyncResources.orders, options,
                              should_stop=after(3))
    assert result.status == "cancelled" and "another run was syncing" in result.error
    assert time.monotonic() - started < 5, "the cancelled sync waited out the lock"


def test_one_result_handed_to_every_attempt_counts_what_all_of_them_committed(pg_engine, emulator_factory):
    market = emulator_factory(pg_engine, sellers=1, orders_per_seller=400)
    seller = market.seller_ids()[0]
    account = market.onboard(seller)
    market.control.reset_stats()
    market.control.add_fault(path_prefix="/orders/search", seller_id=seller, skip=2, times=2, status=503)
    options = OPTIONS.__class__(**{**OPTIONS.__dict__, "max_window": timedelta(days=365)})
    tally = AccountSyncResult(seller, account.nickname)
    with pytest.raises(AccountSyncFailed) as failed:
        sync_account(pg_engine, market.client(RetryPolicy(attempts=2, base_delay=0.01)), account,
                     SyncResources.orders, options, result=tally)
    assert failed.value.transient and failed.value.result["orders"]["new"] == 100
    result = sync_account(pg_engine, market.client(), account, SyncResources.orders, options, result=tally)
    assert result is tally and result.status == "synced" and result.attempts == 2
    assert (result.orders.new, result.orders.unchanged) == (400, 100), "the first attempt's orders were lost"
    assert result.requests == market.control.stats()["total"] and result.server_errors == 2


def test_a_sync_left_running_by_a_dead_holder_is_released_as_interrupted_and_resumed(any_database, emulator_factory):
    market = emulator_factory(any_database)
    seller, other = market.seller_ids()[:2]
    account = market.onboard(seller)
    market.onboard(other)
    dead_run, live_run = "7a1e0f3c-0000-4000-8000-00000000dead", "7a1e0f3c-0000-4000-8000-0000000a11e0"
    # what a killed sync leaves behind: `running`, with its flow run, and no lock held by anyone
    record_sync(any_database, seller, started=now_utc(), finished=None, status="running", run_id=dead_run)
    record_sync(any_database, other, started=now_utc(), finished=None, status="running", run_id=live_run)
    alive = {live_run}
    with account_sync_lock(any_database, other, 1, lease_seconds=60) as held:  # `other` is really being synced
        assert held
        released = release_interrupted_syncs(any_database, lambda run_id: run_id in alive)
    assert [(a.seller_id, a.last_sync_status, a.last_sync_run_id) for a in released] == [
        (seller, "interrupted", dead_run)]
    assert get_account(any_database, other).last_sync_status == "running"
    assert "crashed or killed" in get_account(any_database, seller).last_sync_error

    result = sync_account(any_database, market.client(), account, SyncResources.orders, OPTIONS, run_id="next-run")
    assert result.status == "synced" and result.resumed_from == dead_run
    after_sync = get_account(any_database, seller)
    assert (after_sync.last_sync_status, after_sync.last_sync_run_id) == ("synced", "next-run")


def test_a_parked_account_is_announced_once_then_after_the_reminder_interval(pg_engine, emulator_factory):
    market = emulator_factory(pg_engine)
    seller, other = market.seller_ids()[:2]
    market.onboard(seller)
    market.onboard(other)
    market.control.revoke(seller)
    market.control.expire_tokens(seller_id=seller)
    with pytest.raises(AccountSyncFailed):
        sync_account(pg_engine, market.client(), get_account(pg_engine, seller), SyncResources.orders, OPTIONS)
    now, day = now_utc(), timedelta(hours=24)
    assert [a.seller_id for a in claim_parked_notices(pg_engine, now, day)] == [seller]
    assert claim_parked_notices(pg_engine, now + timedelta(hours=23), day) == [], "told again before the reminder"
    assert [a.seller_id for a in claim_parked_notices(pg_engine, now + day, day)] == [seller]
    market.onboard(seller)  # authorized again, then parked again later: news at once
    market.control.revoke(seller)
    market.control.expire_tokens(seller_id=seller)
    with pytest.raises(AccountSyncFailed):
        sync_account(pg_engine, market.client(), get_account(pg_engine, seller), SyncResources.orders, OPTIONS)
    assert [a.seller_id for a in claim_parked_notices(pg_engine, now + day, day, [seller, other])] == [seller]


def test_clients_sharing_request_slots_never_have_more_requests_in_flight_than_slots():
    """Pure client code over httpx.MockTransport: 8 threads, 3 slots."""
    import httpx
    from pydantic import SecretStr

    from operations.marketplace.client import AppCredentials, request_slots

    lock, in_flight, peak, calls = threading.Lock(), [0], [0], [0]

    def answer(request: httpx.Request) -> httpx.Response:
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
            calls[0] += 1
        time.sleep(0.02)
        with lock:
            in_flight[0] -= 1
        return httpx.Response(200, json={"results": [], "paging": {"total": 0}})

    http = httpx.Client(base_url="http://api.test", transport=httpx.MockTransport(answer))
    slots = request_slots(3)
    assert request_slots(3) is slots and request_slots(0) is None  # one set per process and size; 0: no limit
    clients = [MarketplaceClient(http, AppCredentials("app", SecretStr("s"))).sharing(slots) for _ in range(8)]
    threads = [threading.Thread(target=lambda c=c: [c.search_item_ids(SecretStr("t"), 1) for _ in range(3)])
               for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls[0] == 8 * 3 and 1 < peak[0] <= 3


def test_an_accounts_store_calls_share_one_connection_that_gives_its_lock_back(pg_engine, emulator_factory):
    """The sync's store calls inside `account_connection` check out no other connection (reads, one-statement
    writes, a transaction, the lock); the lock is free afterwards; a lost connection stops the sync (transient)."""
    from sqlalchemy import event

    from operations.marketplace.store import (
        AccountConnectionLost,
        _sync_lock_free,
        account_connection,
        advance_checkpoint,
        record_gap,
    )
    from operations.marketplace.sync import _is_transient_db_error

    market = emulator_factory(pg_engine)
    seller = market.seller_ids()[0]
    market.onboard(seller)
    checkouts = []
    listener = lambda *args: checkouts.append(1)  # noqa: E731
    event.listen(pg_engine.pool, "checkout", listener)
    try:
        with account_connection(pg_engine) as conn, account_sync_lock(pg_engine, seller, 1, 60) as acquired:
            assert acquired and not _sync_lock_free(pg_engine, seller)
            record_sync(pg_engine, seller, started=now_utc(), finished=None, status="running")
            read_tokens(pg_engine, seller)
            advance_checkpoint(pg_engine, seller, "orders", datetime(2026, 1, 1, tzinfo=now_utc().tzinfo))
            record_gap(pg_engine, seller, "orders", datetime(2026, 1, 1, tzinfo=now_utc().tzinfo),
                       datetime(2026, 1, 1, 1, tzinfo=now_utc().tzinfo), "test")
            assert get_checkpoint(pg_engine, seller, "orders").year == 2026
            assert len(checkouts) == 1  # the account's own connection
        assert _sync_lock_free(pg_engine, seller)
        assert get_account(pg_engine, seller).last_sync_status == "running"  # committed, not rolled back
        with pytest.raises(AccountConnectionLost) as lost:
            with account_connection(pg_engine) as conn:
                conn.invalidate()
                get_account(pg_engine, seller)
        assert _is_transient_db_error(lost.value)
    finally:
        event.remove(pg_engine.pool, "checkout", listener)


def _view(seller_id: int):
    from operations.marketplace.store import AccountView

    return AccountView(seller_id, f"s{seller_id}", "active", "", None, None, "", "")


def test_a_catch_up_with_a_recent_checkpoint_and_no_item_read_is_light():
    from operations.marketplace.sync import SyncOptions, SyncRun, light_account

    now = datetime(2026, 12, 5, 12, tzinfo=timezone.utc)
    catch_up = SyncRun("postgresql://x", SyncResources.both, SyncOptions(items_scan=False))
    assert light_account(catch_up, now - timedelta(minutes=15), now)
    assert not light_account(catch_up, None, now), "a first sync reads the whole history"
    assert not light_account(catch_up, now - timedelta(days=2), now), "days of orders to read"
    assert not light_account(SyncRun("u", SyncResources.both, SyncOptions(items_scan=True)), now, now), "every item"
    assert not light_account(SyncRun("u", SyncResources.items, SyncOptions(items_scan=False)), now, now)
    assert light_account(SyncRun("u", SyncResources.orders, SyncOptions(items_scan=True)), now, now)
    assert not light_account(SyncRun("u", SyncResources.orders, full_resync_from=now - timedelta(days=9)), now, now)


def test_light_accounts_are_grouped_only_when_more_of_them_than_tasks_at_once():
    from operations.marketplace.sync import group_light_accounts

    accounts = [_view(i) for i in range(1, 8)]
    assert group_light_accounts(accounts, {1, 2, 3}, 3) == (accounts, [])
    singles, groups = group_light_accounts(accounts, {1, 2, 3, 4, 5, 6}, 4)
    assert singles == [accounts[6]]
    assert [[a.seller_id for a in g] for g in groups] == [[1, 5], [2, 6], [3], [4]]


def test_many_accounts_share_tasks_keeping_two_tasks_per_sync_at_once():
    from operations.marketplace.sync import group_accounts

    few = [_view(i) for i in range(1, 8)]
    assert group_accounts(few, set(), 3) == (few, []), "fewer than 4 accounts per sync at once: a task each"
    many = [_view(i) for i in range(1, 42)]
    singles, groups = group_accounts(many, set(), 4)
    assert singles == [] and [len(g) for g in groups] == [5] * 8 + [1]
    assert [a for g in groups for a in g] == many, "every account once, in order"
    singles, groups = group_accounts(many, set(range(1, 6)), 4)  # 5 light ones in 4 groups, 36 others by 4
    assert singles == [] and [len(g) for g in groups] == [4] * 9 + [2, 1, 1, 1]
    assert sorted(a.seller_id for g in groups for a in g) == list(range(1, 42))


def test_keepalive_gets_answers_as_httpx_reuses_connections_and_fails_with_transport_errors():
    """A stdlib server in a thread: the query and headers arrive, a kept-alive connection is reused, one the
    server closed while idle is replaced without an error, and a server that never answers is a ReadTimeout
    (~0.4 s)."""
    import http.server
    import socket
    import threading

    import httpx

    from operations.infra.http import TRANSIENT_ERRORS, HttpSettings, KeepAliveGets

    seen: list[tuple[str, str, int]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802 - the stdlib's name
            seen.append((self.path, self.headers.get("Authorization"), self.client_address[1]))
            body = b'{"ok": true}'
            self.send_response(429 if "busy" in self.path else 200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Retry-After", "3")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = "closing" in self.path  # closed after the answer, unannounced

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        gets = KeepAliveGets(f"http://127.0.0.1:{server.server_address[1]}/api", HttpSettings(read_timeout=0.3))
        answer = gets.get("/orders/search", {"from": "2026-01-01T00:00:00.000+00:00", "n": 2},
                          {"Authorization": "Bearer t"})
        assert isinstance(answer, httpx.Response) and answer.status_code == 200 and answer.json() == {"ok": True}
        busy = gets.get("/busy")
        assert busy.status_code == 429 and busy.headers["retry-after"] == "3"
        assert seen[0][:2] == ("/api/orders/search?from=2026-01-01T00%3A00%3A00.000%2B00%3A00&n=2", "Bearer t")
        assert seen[1][2] == seen[0][2], "the second GET reuses the first one's connection"
        assert gets.get("/closing").status_code == 200  # then the server closes that connection while idle
        time.sleep(0.05)
        assert gets.get("/again").status_code == 200 and seen[3][2] != seen[0][2], "a fresh connection"
        mute = KeepAliveGets(f"http://127.0.0.1:{silent.getsockname()[1]}", HttpSettings(read_timeout=0.3))
        with pytest.raises(httpx.ReadTimeout) as caught:
            mute.get("/orders/search")
        assert isinstance(caught.value, TRANSIENT_ERRORS)
    finally:
        server.shutdown()
        silent.close()
