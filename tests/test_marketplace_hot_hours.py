"""Hot hours, gaps, independent resources, token margin and tokens encrypted at rest: one account's sync against the
real emulator over HTTP and the session's PostgreSQL."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, text, update

from marketplace_fixtures import OPTIONS
from operations.marketplace.models import MarketplaceAccount, MarketplaceItem, MarketplaceOrder
from operations.marketplace.store import (
    encrypt_stored_tokens,
    get_checkpoint,
    open_gaps,
    read_tokens,
)
from operations.marketplace.sync import REFUSED_PREFIX, AccountSyncFailed, AccountSyncResult, SyncResources, sync_account
from operations.marketplace.tokens import PREFIX, TokenKeyError, new_key, token_cipher
from operations.settings import get_settings


def _stored_order_ids(engine, seller_id: int) -> set[int]:
    with engine.connect() as conn:
        return set(conn.scalars(select(MarketplaceOrder.id).where(MarketplaceOrder.seller_id == seller_id)))


def _stored_item_ids(engine, seller_id: int) -> set[str]:
    with engine.connect() as conn:
        return set(conn.scalars(select(MarketplaceItem.id).where(MarketplaceItem.seller_id == seller_id)))


def _truth_order_ids(market, seller_id: int) -> set[int]:
    return {int(o["id"]) for o in market.control.orders(seller_id)}


def _hot_hour_synced_in_full(pg_engine, emulator_factory, orders: int, cap: int) -> None:
    market = emulator_factory(pg_engine, sellers=1, orders_per_seller=100, items_per_seller=5, max_offset=cap)
    seller = market.seller_ids()[0]
    account = market.onboard(seller)
    hot = market.control.hot_hour(seller, orders)
    started = time.monotonic()
    result = sync_account(pg_engine, market.client(orders_offset_cap=cap), account, SyncResources.orders, OPTIONS)
    print(f"hot hour of {orders:,} orders: {time.monotonic() - started:.1f} s, {result.order_pages} pages")
    assert result.status == "synced" and not result.gaps
    assert _stored_order_ids(pg_engine, seller) == _truth_order_ids(market, seller)
    assert result.orders.new == orders + 100
    assert get_checkpoint(pg_engine, seller, "orders") >= datetime.fromisoformat(hot["to"])
    stats = market.control.stats()
    assert "400" not in stats["by_status"], "no request passed the offset cap"
    # pages beyond the data: the cut costs a few dozen requests, not hundreds
    assert result.order_pages < (orders + 100) / 50 + 80, result.order_pages


@pytest.mark.slow
def test_a_hot_hour_of_25000_orders_is_synced_in_full(pg_engine, emulator_factory):
    """25,000 orders updated in one hour, 2.5x the API's offset cap of 10,000: cut along date_created until each
    part fits, nothing left unread. Slow (~60 s on the loaded 2-core machine, 50 s of it upserting 500 pages of
    orders): the size is the point; the test below keeps the same ratio at a tenth of the size."""
    _hot_hour_synced_in_full(pg_engine, emulator_factory, 25_000, 10_000)


def test_a_hot_hour_of_2500_orders_past_a_cap_of_1000_is_synced_in_full(pg_engine, emulator_factory):
    """The 25,000-order hot hour at a tenth of its size (the offset cap too)."""
    _hot_hour_synced_in_full(pg_engine, emulator_factory, 2_500, 1_000)


def test_an_hour_created_at_once_is_cut_by_status_and_read_from_both_ends(pg_engine, emulator_factory):
    # cap 200: a pass reads at most 200 orders; 420 orders updated in one hour, created within minutes of it
    market = emulator_factory(pg_engine, sellers=1, orders_per_seller=30, items_per_seller=5, max_offset=200)
    seller = market.seller_ids()[0]
    account = market.onboard(seller)
    market.control.hot_hour(seller, 420, created_hours=0.05)
    result = sync_account(pg_engine, market.client(orders_offset_cap=200), account, SyncResources.orders, OPTIONS)
    assert result.status == "synced" and not result.gaps, result.gaps
    assert _stored_order_ids(pg_engine, seller) == _truth_order_ids(market, seller)
    assert "400" not in market.control.stats()["by_status"]


def test_an_hour_out_of_reach_is_a_gap_the_account_goes_on_and_a_later_sync_closes_it(pg_engine, emulator_factory):
    market = emulator_factory(pg_engine, sellers=1, orders_per_seller=60, items_per_seller=5, max_offset=100)
    seller = market.seller_ids()[0]
    account = market.onboard(seller)
    hot = market.control.hot_hour(seller, 600, created_hours=0.01)  # ~500 paid in one created hour: > 2 x 100
    market.control.mutate(seller_id=seller, orders_new=5)  # orders after the hot hour
    result = sync_account(pg_engine, market.client(orders_offset_cap=100), account, SyncResources.orders, OPTIONS)
    assert result.status == "synced"
    assert result.gaps and "out of reach" in result.gaps[0]["reason"]
    gaps = open_gaps(pg_engine, seller, "orders")
    assert [g.start.isoformat() for g in gaps] == [result.gaps[0]["start"]]
    assert gaps[0].stop - gaps[0].start == timedelta(hours=1)
    assert gaps[0].start == datetime.fromisoformat(hot["from"])
    stored, truth = _stored_order_ids(pg_engine, seller), _truth_order_ids(market, seller)
    assert 0 < len(truth - stored) < 600, "only part of the hot hour is missing"
    assert get_checkpoint(pg_engine, seller, "orders") > gaps[0].stop, "the checkpoint passed the gap"

    market.control.configure(max_offset=10_000)  # the gap is now within reach: the next sync closes it
    again = sync_account(pg_engine, market.client(), account, SyncResources.orders, OPTIONS)
    assert again.status == "synced" and again.gaps_closed == 1 and not again.gaps
    assert open_gaps(pg_engine, seller) == []
    assert _stored_order_ids(pg_engine, seller) == _truth_order_ids(market, seller)


def test_orders_failing_while_items_succeed(pg_engine, emulator_factory):
    market = emulator_factory(pg_engine, sellers=1, orders_per_seller=80, items_per_seller=30)
    seller = market.seller_ids()[0]
    account = market.onboard(seller)
    market.control.add_fault(path_prefix="/orders/search", seller_id=seller, times=1000, status=503)
    tally = AccountSyncResult(seller, account.nickname)
    with pytest.raises(AccountSyncFailed) as failed:
        sync_account(pg_engine, market.client(), account, SyncResources.both, OPTIONS, result=tally)
    report = failed.value.result
    assert failed.value.transient and report["status"] == "failed"
    assert report["resources"] == {"orders": "failed", "items": "synced"}
    assert report["error"].startswith("orders: TransientAPIError")
    assert _stored_item_ids(pg_engine, seller) == {str(i["id"]) for i in market.control.items(seller)}
    assert get_checkpoint(pg_engine, seller, "items") is not None
    assert get_checkpoint(pg_engine, seller, "orders") is None

    # the task's retry (same figures): only the failed resource is synced again
    market.control.clear_faults()
    item_pages = tally.item_pages
    result = sync_account(pg_engine, market.client(), account, SyncResources.both, OPTIONS, result=tally)
    assert result.status == "synced" and result.resources == {"orders": "synced", "items": "synced"}
    assert result.item_pages == item_pages
    assert _stored_order_ids(pg_engine, seller) == _truth_order_ids(market, seller)


def test_items_failing_do_not_stop_orders(pg_engine, emulator_factory):
    market = emulator_factory(pg_engine, sellers=1, orders_per_seller=40, items_per_seller=30)
    seller = market.seller_ids()[0]
    account = market.onboard(seller)
    market.control.add_fault(path_prefix="/items", times=1000, status=503)
    with pytest.raises(AccountSyncFailed) as failed:
        sync_account(pg_engine, market.client(), account, SyncResources.both, OPTIONS)
    assert failed.value.result["resources"] == {"orders": "synced", "items": "failed"}
    assert _stored_order_ids(pg_engine, seller) == _truth_order_ids(market, seller)
    assert get_checkpoint(pg_engine, seller, "orders") is not None


def test_the_access_token_is_refreshed_only_within_the_margin(pg_engine, emulator_factory):
    market = emulator_factory(pg_engine, sellers=1, orders_per_seller=200, items_per_seller=150,
                              token_ttl_seconds=120)
    seller = market.seller_ids()[0]
    account = market.onboard(seller)
    far = sync_account(pg_engine, market.client(), account, SyncResources.both,
                       replace(OPTIONS, token_margin=timedelta(seconds=60)))
    assert far.refreshes == 0 and far.requests > 5
    near = sync_account(pg_engine, market.client(), account, SyncResources.both,
                        replace(OPTIONS, token_margin=timedelta(seconds=180)))
    assert near.refreshes >= 5, "a token expiring within the margin is refreshed before the call"


# -- tokens at rest --------------------------------------------------------------------------------------------
@pytest.fixture
def token_key(monkeypatch):
    """Set MARKETPLACE_TOKEN_KEY for this test (the session's generated key is back afterwards)."""

    def use(value: str) -> None:
        monkeypatch.setenv("MARKETPLACE_TOKEN_KEY", value)
        get_settings.cache_clear()

    yield use
    monkeypatch.delenv("MARKETPLACE_TOKEN_KEY", raising=False)
    get_settings.cache_clear()


def _raw_tokens(engine, seller_id: int) -> tuple[str, str]:
    with engine.connect() as conn:
        row = conn.execute(select(MarketplaceAccount.access_token, MarketplaceAccount.refresh_token)
                           .where(MarketplaceAccount.seller_id == seller_id)).one()
    return row.access_token, row.refresh_token


def test_no_plain_token_is_stored_and_a_wrong_key_names_the_setting(pg_engine, emulator_factory, token_key):
    key = new_key()
    token_key(key)
    market = emulator_factory(pg_engine, sellers=1, orders_per_seller=20, items_per_seller=5, token_ttl_seconds=1)
    seller = market.seller_ids()[0]
    account = market.onboard(seller)
    time.sleep(1.1)  # the access token expired: the sync refreshes (and stores a new pair)
    assert sync_account(pg_engine, market.client(), account, SyncResources.orders, OPTIONS).refreshes >= 1
    with pg_engine.connect() as conn:
        dump = "\n".join(str(v) for row in conn.execute(text("SELECT * FROM marketplace_accounts")) for v in row)
    tokens = read_tokens(pg_engine, seller)
    plain_refresh, plain_access = tokens.refresh_token.get_secret_value(), tokens.access_token.get_secret_value()
    assert plain_refresh.startswith("TG-") and plain_refresh not in dump and plain_access not in dump
    assert all(value.startswith(PREFIX) for value in _raw_tokens(pg_engine, seller))

    token_key(new_key())
    with pytest.raises(TokenKeyError, match="MARKETPLACE_TOKEN_KEY"):
        read_tokens(pg_engine, seller)
    with pytest.raises(AccountSyncFailed, match="MARKETPLACE_TOKEN_KEY") as failed:
        sync_account(pg_engine, market.client(), account, SyncResources.orders, OPTIONS)
    assert not failed.value.transient
    token_key("not-a-key")
    with pytest.raises(TokenKeyError, match="MARKETPLACE_TOKEN_KEY"):
        read_tokens(pg_engine, seller)


def test_plain_rows_are_encrypted_when_met_and_a_key_rotation_rewrites_every_row(pg_engine, emulator_factory,
                                                                                 token_key):
    old = new_key()
    token_key(old)
    market = emulator_factory(pg_engine, sellers=2, orders_per_seller=5, items_per_seller=2)
    first, second = market.seller_ids()
    market.onboard(first)
    market.onboard(second)
    plain = read_tokens(pg_engine, first)
    with pg_engine.begin() as conn:  # a row stored before encryption
        conn.execute(update(MarketplaceAccount).where(MarketplaceAccount.seller_id == first).values(
            access_token=plain.access_token.get_secret_value(), refresh_token=plain.refresh_token.get_secret_value()))
    assert read_tokens(pg_engine, first).refresh_token == plain.refresh_token  # read as it is...
    assert all(v.startswith(PREFIX) for v in _raw_tokens(pg_engine, first))  # ...and encrypted in place

    new = new_key()
    token_key(f"{new},{old}")  # rotation: the new key first, the old one still decrypts
    assert encrypt_stored_tokens(pg_engine) == 2
    token_key(new)  # the old key retired
    assert read_tokens(pg_engine, first).refresh_token == plain.refresh_token
    assert read_tokens(pg_engine, second).version >= 1
    assert token_cipher().decrypt(_raw_tokens(pg_engine, second)[1]).startswith("TG-")


def test_migration_0005_encrypts_plain_tokens_when_a_key_is_at_hand(tmp_path, token_key):
    from alembic import command

    from operations.infra.database import _migration_connection, _new_engine, alembic_config, migrate_to_head

    url = f"sqlite:///{tmp_path / 'before.db'}"
    engine = _new_engine(url, migrations=True)
    config = alembic_config(url)
    with _migration_connection(engine) as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0004")
        connection.commit()
    with engine.begin() as conn:  # an account as revision 0004 stored it
        conn.execute(text(
            "INSERT INTO marketplace_accounts (seller_id, nickname, status, status_reason, access_token, refresh_token, "
            "token_version, scope, last_sync_status, last_sync_error, created_at, updated_at) VALUES (7, 'x', "
            "'active', '', 'APP_USR-plain', 'TG-plain', 1, '', '', '', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
    engine.dispose()
    token_key(new_key())
    migrate_to_head(url)
    engine = _new_engine(url)
    try:
        access, refresh = _raw_tokens(engine, 7)
        assert access.startswith(PREFIX) and refresh.startswith(PREFIX) and "plain" not in access + refresh
        assert token_cipher().decrypt(refresh) == "TG-plain"
    finally:
        engine.dispose()


def test_a_window_the_api_refuses_with_400_is_a_gap_passed_then_retried_a_few_times(pg_engine, emulator_factory):
    """A permanent 400 on an order search becomes a gap: the account and its items go on, the checkpoint passes
    it, a later sync reads it whole; refused for good, it is tried again by `bad_window_retries` syncs only."""
    market = emulator_factory(pg_engine, sellers=1, orders_per_seller=60, items_per_seller=5)
    seller = market.seller_ids()[0]
    account = market.onboard(seller)
    market.control.add_fault("/orders/search", status=400, times=1)
    result = sync_account(pg_engine, market.client(), account, SyncResources.both, OPTIONS)
    assert result.status == "synced" and result.resources == {"orders": "synced", "items": "synced"}
    assert len(result.gaps) == 1 and result.gaps[0]["reason"].startswith(REFUSED_PREFIX), result.gaps
    [gap] = open_gaps(pg_engine, seller, "orders")
    assert get_checkpoint(pg_engine, seller, "orders") > gap.stop, "the checkpoint passed the refused window"
    assert _stored_item_ids(pg_engine, seller) == {i["id"] for i in market.control.items(seller)}

    again = sync_account(pg_engine, market.client(), account, SyncResources.orders, OPTIONS)
    assert again.gaps_closed == 1 and not again.gaps and open_gaps(pg_engine, seller) == []
    assert _stored_order_ids(pg_engine, seller) == _truth_order_ids(market, seller)

    market.control.add_fault("/orders/search", status=400, times=1000)  # refused for good
    options = replace(OPTIONS, bad_window_retries=1)
    runs = [sync_account(pg_engine, market.client(), account, SyncResources.orders, options) for _ in range(3)]
    assert all(run.status == "synced" for run in runs)
    retried = [[g["retried"] for g in run.gaps] for run in runs]
    assert retried[0] == [False] and True in retried[1] and retried[2] == [False], retried
