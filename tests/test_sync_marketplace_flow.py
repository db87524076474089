"""The `sync-marketplace` and `onboard-account` flows on the session's real Prefect server: parallel accounts
on threads and on Dask (task runs of the flow run itself), a failing account that does not stop the others,
refusal before any request with one log line and no traceback, a killed flow run re-run cleanly, and no token
text in any log line or artifact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from uuid import UUID

import pytest
from pydantic import SecretStr
from sqlalchemy import select

from blocks.marketplace_app import MarketplaceApp
from operations.marketplace.models import MarketplaceAccount, MarketplaceOrder
from operations.marketplace.client import parse_time
from operations.marketplace.store import count_rows, get_account, get_checkpoint, list_accounts, utc
from operations.settings import PROJECT_ROOT
from flow_run_checks import assert_failed_in_one_line, task_runs_of_flow_run
from run_checks import run_artifacts, run_texts

pytestmark = pytest.mark.slow


@pytest.fixture
def market(pg_engine, emulator_factory, settings, monkeypatch):
    """An emulator with 3 sellers, its app block saved as the default, retries quick."""
    from operations import settings as settings_module

    market = emulator_factory(pg_engine, sellers=3, orders_per_seller=150, items_per_seller=30, latency_ms=5)
    block = f"emulated-{os.getpid()}-{time.monotonic_ns()}"
    MarketplaceApp(
        api_base_url=market.base_url,
        client_id=market.config.client_id,
        client_secret=SecretStr(market.config.client_secret),
        redirect_uri=market.config.redirect_uri,
        max_attempts=3,
        backoff_base_seconds=0.01,
        backoff_max_seconds=0.05,
    ).save(block, overwrite=True)
    monkeypatch.setenv("MARKETPLACE_APP_BLOCK", block)
    monkeypatch.setenv("MARKETPLACE_RETRY_DELAY_SECONDS", "0")
    monkeypatch.setenv("MARKETPLACE_TASK_RETRIES", "1")
    settings_module.get_settings.cache_clear()
    yield market
    settings_module.get_settings.cache_clear()


def _tokens(engine) -> list[str]:
    with engine.connect() as conn:
        rows = conn.execute(select(MarketplaceAccount.access_token, MarketplaceAccount.refresh_token)).all()
    return [t for row in rows for t in row if t]


def test_accounts_sync_in_parallel_a_failing_one_does_not_stop_the_others_and_no_token_is_logged(market, pg_engine):
    from flows.sync_marketplace import sync_marketplace

    a, b, c = market.seller_ids()
    for seller in (a, b, c):
        market.onboard(seller)
    market.control.expire_tokens()  # every account refreshes during the run: the rotated tokens must not leak
    market.control.add_fault(path_prefix="/orders/search", seller_id=c, skip=0, times=10_000, status=403)  # forbidden: the account fails (a 400 is a gap)
    state = sync_marketplace(return_state=True)
    assert state.is_failed()
    assert f"-{c}" in state.message and "1 of 3" in state.message, state.message
    assert "1 of 3" in str(state.result(raise_on_failure=False))
    for seller in (a, b):
        assert count_rows(pg_engine, seller)["orders"] == 150 and count_rows(pg_engine, seller)["items"] == 30
    texts = run_texts(state.state_details.flow_run_id)
    table = [t for t in texts if "marketplace" in t.lower() or "seller" in t.lower()]
    assert table, "no artifacts or logs were written"
    tokens = _tokens(pg_engine)
    assert tokens
    leaked = [t for t in tokens if any(t in text for text in texts)]
    assert not leaked, "a token appeared in a log line or artifact"


def test_unknown_accounts_and_bad_dates_are_refused_before_any_request_in_one_line(market):
    from datetime import date, timedelta

    from flows.sync_marketplace import sync_marketplace

    market.onboard(market.seller_ids()[0])
    market.control.reset_stats()
    assert_failed_in_one_line(sync_marketplace(accounts=[424242], return_state=True), "424242", "onboard")
    future = (date.today() + timedelta(days=2)).isoformat()
    assert_failed_in_one_line(sync_marketplace(full_resync_from=future, return_state=True), future, "future")
    assert_failed_in_one_line(sync_marketplace(full_resync_from="2026-13-45", return_state=True), "not a date")
    assert market.control.stats()["total"] == 0


def test_the_flow_runs_its_account_tasks_on_dask(market, pg_engine, on_session_cluster, monkeypatch):
    from operations import settings as settings_module

    monkeypatch.setenv("MARKETPLACE_TASK_RUNNER", "dask")
    monkeypatch.setenv("MARKETPLACE_CONCURRENCY", "4")
    settings_module.get_settings.cache_clear()
    from flows.sync_marketplace import sync_marketplace

    sellers = market.seller_ids()
    for seller in sellers:
        market.onboard(seller)
    state = sync_marketplace(accounts=sellers[:2], full_resync_from="", return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["by_status"] == {"synced": 2} and result["orders_new"] == 300
    assert count_rows(pg_engine, sellers[2])["orders"] == 0
    flow_run_id = state.state_details.flow_run_id
    runs, subflows = task_runs_of_flow_run(flow_run_id)
    assert sorted(r.name for r in runs) == sorted(f"sync-{a.label}" for a in list_accounts(pg_engine)
                                                  if a.seller_id in sellers[:2])
    assert {r.flow_run_id for r in runs} == {flow_run_id} and subflows == [], "the Dask tasks are the run's own"


def test_onboarding_flow_adds_an_account_without_returning_its_tokens(market, pg_engine):
    from flows.onboard_account import onboard_account

    seller = market.seller_ids()[1]
    state = onboard_account(authorization_code=market.control.authorize(seller), nickname="shop", return_state=True)
    assert state.is_completed(), state.message
    assert state.result() == {"seller_id": seller, "nickname": "shop", "status": "active"}
    texts = run_texts(state.state_details.flow_run_id)
    assert not [t for t in _tokens(pg_engine) if any(t in text for text in texts)]
    used = onboard_account(authorization_code="not-a-live-code", return_state=True)
    assert_failed_in_one_line(used, "invalid_grant", "authorize the app again")


KILLABLE_RUN = """
import sys
from flows.sync_marketplace import sync_marketplace
sync_marketplace(accounts=[int(sys.argv[1])])
"""


def test_a_killed_flow_run_is_rerun_cleanly(market, pg_engine):
    from flows.sync_marketplace import sync_marketplace

    seller = market.seller_ids()[0]
    market.onboard(seller)
    market.control.configure(latency_ms=60)  # ~0.5 s per page of 50 orders... long enough to kill mid-sync
    market.control.mutate(seller_id=seller, orders_new=600)
    process = subprocess.Popen([sys.executable, "-c", KILLABLE_RUN, str(seller)], cwd=PROJECT_ROOT,
                               env=dict(os.environ), start_new_session=True)
    deadline = time.monotonic() + 90
    while count_rows(pg_engine, seller)["orders"] < 100:
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, "no order stored in time"
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    partial = count_rows(pg_engine, seller)["orders"]
    assert 0 < partial < 750
    killed = get_account(pg_engine, seller)
    assert killed.last_sync_status == "running" and killed.last_sync_run_id, "the killed sync left no trace"

    market.control.configure(latency_ms=0)
    state = sync_marketplace(accounts=[seller], return_state=True)  # the killed run's lock died with it
    assert state.is_completed(), state.message
    assert state.result()["by_status"] == {"synced": 1}
    summary = _artifact(state, "marketplace-sync-summary")
    assert "Interrupted syncs found" in summary and killed.last_sync_run_id in summary, summary
    assert get_account(pg_engine, seller).last_sync_status == "synced"
    with pg_engine.connect() as conn:
        ids = conn.scalars(select(MarketplaceOrder.id).where(MarketplaceOrder.seller_id == seller)).all()
    assert len(ids) == len(set(ids)) == len(market.control.orders(seller)) == 750


def _artifact(state, key: str) -> str:
    [artifact] = [a for a in run_artifacts(state.state_details.flow_run_id) if a.key == key]
    return str(artifact.data)


def _rows(state) -> list[dict]:
    import json

    return json.loads(_artifact(state, "marketplace-sync-accounts"))


def _stored_order_ids(engine, seller: int) -> set[int]:
    with engine.connect() as conn:
        return set(conn.scalars(select(MarketplaceOrder.id).where(MarketplaceOrder.seller_id == seller)))


@pytest.mark.parametrize("runner", ["threads", "dask"])
def test_a_cancelled_sync_makes_no_request_seconds_after_the_cancel_and_reports_what_it_did(
    runner, market, pg_engine, request, monkeypatch
):
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    from operations import settings as settings_module

    if runner == "dask":
        request.getfixturevalue("on_session_cluster")  # 2 single-thread workers: 2 accounts at a time
    monkeypatch.setenv("MARKETPLACE_TASK_RUNNER", runner)
    monkeypatch.setenv("MARKETPLACE_CONCURRENCY", "1")  # 1 request in flight, 2 accounts at once: the third waits
    settings_module.get_settings.cache_clear()
    from flows.sync_marketplace import sync_marketplace

    sellers = market.seller_ids()
    for seller in sellers:
        market.onboard(seller)
        market.control.mutate(seller_id=seller, orders_new=450)  # 600 orders each: ~20 pages at 150 ms
    market.control.configure(latency_ms=150)
    cancelled: dict = {}

    def cancel_once_orders_are_stored() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            holders = {a.last_sync_run_id for a in list_accounts(pg_engine) if a.last_sync_status == "running"}
            if holders and count_rows(pg_engine)["orders"] >= 100:
                with get_client(sync_client=True) as client:
                    client.set_flow_run_state(UUID(holders.pop()), Cancelling(), force=True)
                cancelled["at"] = time.time()
                return
            time.sleep(0.05)

    canceller = threading.Thread(target=cancel_once_orders_are_stored, daemon=True)
    canceller.start()
    began = time.monotonic()
    state = sync_marketplace(return_state=True)
    ended = time.monotonic()
    canceller.join()
    last_request = market.control.stats()["last_request_at"]
    assert "at" in cancelled, "the sync never stored 100 orders"
    print(f"\n{runner}: last request at the emulator {last_request - cancelled['at']:.2f} s after the cancel; "
          f"run {ended - began:.1f} s, ended {time.time() - (time.monotonic() - ended) - cancelled['at']:.1f} s after it")
    assert last_request - cancelled["at"] < 3.0, "requests went on after the cancel"
    assert state.is_cancelled(), (state.type, state.message)
    assert "interrupted" in state.message

    rows = {r["account"]: r for r in _rows(state)}
    assert sorted(r["status"] for r in rows.values()) == ["cancelled"] * 3, rows
    summary = _artifact(state, "marketplace-sync-summary")
    assert "**Cancelled.**" in summary and "not started: " in summary, summary
    for account in list_accounts(pg_engine):
        stored = _stored_order_ids(pg_engine, account.seller_id)
        assert rows[account.label]["orders new"] == len(stored), "the table must count what was committed"
        checkpoint = get_checkpoint(pg_engine, account.seller_id, "orders")
        truth = {int(o["id"]): parse_time(o["date_last_updated"]) for o in market.control.orders(account.seller_id)}
        if checkpoint is not None:
            assert {i for i, updated in truth.items() if updated < checkpoint} <= stored, "checkpoint past stored rows"
        assert len(stored) < len(truth), f"{account.label} was synced to the end despite the cancel"
    assert sum(r["orders new"] for r in rows.values()) == count_rows(pg_engine)["orders"] > 0
    assert any("before its sync started" in r["error"] for r in rows.values()), "the third account started"


def test_the_table_counts_the_orders_of_every_attempt_of_an_account(market, pg_engine):
    from flows.sync_marketplace import sync_marketplace

    seller = market.seller_ids()[0]
    market.onboard(seller)
    # the 3rd order request and its 2 in-client retries fail (max_attempts=3): the first attempt commits the
    # first window's orders and fails transiently; the task's retry (MARKETPLACE_TASK_RETRIES=1) does the rest
    market.control.add_fault(path_prefix="/orders/search", seller_id=seller, skip=2, times=3, status=503)
    state = sync_marketplace(accounts=[seller], return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["orders_new"] == 150 == count_rows(pg_engine, seller)["orders"], result
    [row] = _rows(state)
    assert (row["status"], row["attempts"], row["orders new"]) == ("synced", 2, 150), row
    assert market.control.stats()["faults_injected"] == 3


def _parked_events(seller: int) -> list:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    with get_client(sync_client=True) as client:
        page = client.read_events(filter=EventFilter(
            event=EventNameFilter(name=["project.marketplace.account.parked"]),
            resource=EventResourceFilter(id=[f"project.marketplace.account.{seller}"]),
        ), limit=50)
    return page.events


def test_a_parked_account_is_announced_by_an_event_and_no_later_run_looks_all_green(market, pg_engine):
    from flows.sync_marketplace import sync_marketplace

    seller, other = market.seller_ids()[:2]
    market.onboard(seller)
    market.onboard(other)
    market.control.revoke(seller)
    market.control.expire_tokens(seller_id=seller)
    parking = sync_marketplace(accounts=[seller, other], resources="orders", return_state=True)
    assert parking.is_failed() and f"-{seller}" in parking.message, parking.message
    later = sync_marketplace(accounts=[seller, other], resources="orders", return_state=True)
    assert later.is_completed() and "1 account(s) need reauthorization" in later.message, later.message
    summary = _artifact(later, "marketplace-sync-summary")
    assert "**1 account(s) need reauthorization:**" in summary and "onboard-account" in summary, summary

    deadline = time.monotonic() + 30
    while not (events := _parked_events(seller)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(events) == 1, "the parked account must be announced once (then after the reminder interval)"
    [event] = events
    nickname = get_account(pg_engine, seller).nickname
    assert event.resource.get("prefect.resource.name") == nickname and event.payload["seller_id"] == seller
    assert f"prefect.flow-run.{parking.state_details.flow_run_id}" in [r.id for r in event.related]

    from flows.onboard_account import onboard_account

    revived = onboard_account(authorization_code=market.control.authorize(seller), return_state=True)
    assert revived.is_completed() and get_account(pg_engine, seller).status == "active"
    assert "It was parked" in _artifact(revived, "marketplace-onboarded-account")


def test_a_holder_run_counts_as_syncing_only_while_running_pending_or_cancelling(prefect_api_url):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling, Crashed, Running

    from tasks.marketplace import holder_running

    @flow
    def holder() -> None:
        pass

    with get_client(sync_client=True) as client:
        client.create_flow(holder)
        run = client.create_flow_run(holder, state=Running())
        assert holder_running(str(run.id))
        client.set_flow_run_state(run.id, Cancelling(), force=True)
        assert holder_running(str(run.id))
        client.set_flow_run_state(run.id, Crashed(), force=True)
        assert not holder_running(str(run.id))
    assert not holder_running("00000000-0000-4000-8000-000000000000") and not holder_running("not-a-run")


def test_light_accounts_of_a_catch_up_share_tasks_and_an_accounts_transient_failure_is_retried_in_its_group(
    market, pg_engine, monkeypatch
):
    """Two runs of 3 accounts (~6 s: the first one reads their 450 orders, as the catch-up needs checkpoints)."""
    from operations import settings as settings_module

    a, b, c = market.seller_ids()
    for seller in (a, b, c):
        market.onboard(seller)
    from flows.sync_marketplace import sync_marketplace

    assert sync_marketplace(return_state=True).is_completed()  # first syncs: one task each
    monkeypatch.setenv("MARKETPLACE_NOTIFICATIONS", "true")  # catch-ups read no items: 3 light accounts
    monkeypatch.setenv("MARKETPLACE_CONCURRENCY", "1")  # 2 tasks at once: the 3 share 2 tasks
    settings_module.get_settings.cache_clear()
    changed = market.control.mutate(orders_updated=2, notify=False)["orders_updated"]
    # a's first order request and its 2 in-client retries fail: a fails transiently, then its group retries it
    market.control.add_fault(path_prefix="/orders/search", seller_id=a, skip=0, times=3, status=503)
    state = sync_marketplace(return_state=True)
    assert state.is_completed(), state.message
    table = _rows(state)
    assert [r["status"] for r in table] == ["synced"] * 3, table
    assert sorted(r["attempts"] for r in table) == [1, 1, 2], table
    deadline = time.monotonic() + 10  # task runs reach the API through events, shortly after the run
    while len(runs := task_runs_of_flow_run(state.state_details.flow_run_id)[0]) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(runs) == 2 and all(r.name.startswith("sync-") and "-more" in r.name for r in runs), [r.name for r in runs]
    with pg_engine.connect() as conn:
        stored = dict(conn.execute(select(MarketplaceOrder.id, MarketplaceOrder.date_last_updated)
                                   .where(MarketplaceOrder.id.in_(changed))).all())
    truth = {o["id"]: parse_time(o["date_last_updated"]) for o in market.control.orders() if o["id"] in changed}
    assert {i: utc(v) for i, v in stored.items()} == truth, "the changed orders are read by the catch-up"
