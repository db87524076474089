"""The `sync-marketplace` and `onboard-account` flows on the session's real Prefect server: parallel accounts
on threads and on Dask (task runs of the flow run itself), a failing account that does not stop the others,
refusal before any request with one log line and no traceback, a killed flow run re-run cleanly, and no token
text in any log line or artifact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from pydantic import SecretStr
from sqlalchemy import select

from blocks.marketplace_app import MarketplaceApp
from operations.marketplace.models import MarketplaceAccount, MarketplaceOrder
from operations.marketplace.store import count_rows, list_accounts
from operations.settings import PROJECT_ROOT
from flow_run_checks import assert_failed_in_one_line, task_runs_of_flow_run
from run_checks import run_texts

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
    market.control.add_fault(path_prefix="/orders/search", seller_id=c, skip=0, times=10_000, status=400)
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

    market.control.configure(latency_ms=0)
    state = sync_marketplace(accounts=[seller], return_state=True)  # the killed run's lock died with it
    assert state.is_completed(), state.message
    assert state.result()["by_status"] == {"synced": 1}
    with pg_engine.connect() as conn:
        ids = conn.scalars(select(MarketplaceOrder.id).where(MarketplaceOrder.seller_id == seller)).all()
    assert len(ids) == len(set(ids)) == len(market.control.orders(seller)) == 750
