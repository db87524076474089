"""The item reconciliation (a full item read, `resources=items`) finds and repairs every difference: items changed
without a notification, items the seller closed or deleted (no longer listed: kept, marked as the API marks them),
items the API no longer answers, fields changed here under the same stamp. The emulator over HTTP and the session's
PostgreSQL; the comparison itself is tested as a pure function."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal

from sqlalchemy import insert, select, update

from marketplace_fixtures import OPTIONS
from operations.marketplace.reconcile import differing, unlisted_ids
from operations.marketplace.store import ITEMS, item_row
from operations.marketplace.sync import SyncResources, sync_account

STAMP = datetime(2026, 12, 5, 10, tzinfo=timezone.utc)


def test_differing_takes_only_rows_that_differ_under_the_same_stamp():
    api = {"id": "MLB1", "title": "Lamp", "price": 10.5, "currency_id": "BRL", "available_quantity": 3,
           "sold_quantity": 1, "status": "active", "sub_status": [], "last_updated": "2026-12-05T10:00:00.000Z"}
    row = item_row(1, api, STAMP)
    stored = {"id": "MLB1", "title": "Lamp", "price": Decimal("10.50"), "currency_id": "BRL", "available_quantity": 3,
              "sold_quantity": 1, "status": "active", "sub_status": [], "permalink": None,
              "seller_custom_field": None, "last_updated": STAMP}
    assert differing({"MLB1": stored}, [row]) == []
    assert differing({"MLB1": {**stored, "price": Decimal("9.99")}}, [row]) == [row]
    assert differing({"MLB1": {**stored, "sub_status": ["deleted"]}}, [row]) == [row]
    older = {**stored, "price": Decimal("9.99"), "last_updated": datetime(2026, 12, 4, tzinfo=timezone.utc)}
    assert differing({"MLB1": older}, [row]) == [], "a newer API row is the upsert's to write"
    assert differing({}, [row]) == [], "a new item is the upsert's to write"
    assert unlisted_ids({"MLB2": stored, "MLB1": stored, "MLB3": stored}, ["MLB1"]) == ["MLB2", "MLB3"]
    deleted = {**stored, "status": "closed", "sub_status": ["deleted"]}
    assert unlisted_ids({"MLB2": stored, "MLB3": deleted}, []) == ["MLB2"], "a deleted item is final"


def _stored(engine, seller: int) -> dict[str, dict]:
    with engine.connect() as conn:
        return {r["id"]: dict(r) for r in conn.execute(select(ITEMS).where(ITEMS.c.seller_id == seller)).mappings()}


def test_the_reconciliation_finds_and_repairs_every_difference_and_deletes_no_history(pg_engine, emulator_factory):
    market = emulator_factory(pg_engine, sellers=1, orders_per_seller=10, items_per_seller=30)
    seller = market.seller_ids()[0]
    account = market.onboard(seller)
    sync_account(pg_engine, market.client(), account, SyncResources.items, OPTIONS)
    changed = market.control.mutate(seller_id=seller, items_updated=4, items_closed=2, items_deleted=3, notify=False)
    untouched = sorted(set(_stored(pg_engine, seller)) - {i for key in ("items_updated", "items_closed",
                                                                        "items_deleted") for i in changed[key]})
    with pg_engine.begin() as conn:  # a row changed here under the same stamp, and one the API never heard of
        conn.execute(update(ITEMS).where(ITEMS.c.id == untouched[0]).values(title="changed here", price=1))
        conn.execute(insert(ITEMS).values(id="MLB9999999999", seller_id=seller, title="gone", price=5,
                                          currency_id="BRL", status="active", sub_status=[], last_updated=STAMP,
                                          synced_at=STAMP))

    result = sync_account(pg_engine, market.client(), account, SyncResources.items, OPTIONS)
    assert result.status == "synced"
    assert (result.items_unlisted, result.items_gone, result.items_repaired) == (4, 1, 1)  # 3 deleted + the unknown
    assert result.items.updated == 9, "4 updated, 2 closed, 3 deleted: newer on the marketplace"
    stored = _stored(pg_engine, seller)
    truth = {i["id"]: i for i in market.control.items(seller)}  # what the seller's search lists
    assert set(stored) == set(truth) | set(changed["items_deleted"]) | {"MLB9999999999"}, "no row deleted"
    for item_id, item in truth.items():
        row = stored[item_id]
        assert (row["title"], float(row["price"]), row["status"], row["sub_status"]) == (
            item["title"], item["price"], item["status"], item["sub_status"]), item_id
    assert {stored[i]["status"] for i in changed["items_closed"]} == {"closed"}
    for item_id in changed["items_deleted"] + ["MLB9999999999"]:
        assert (stored[item_id]["status"], stored[item_id]["sub_status"]) == ("closed", ["deleted"]), item_id
    assert stored["MLB9999999999"]["title"] == "gone", "history kept"

    again = sync_account(pg_engine, market.client(), account, SyncResources.items, OPTIONS)
    assert (again.items.new, again.items.updated, again.items_repaired, again.items_gone) == (0, 0, 0, 0)
    assert again.items_unlisted == 0, "items stored as deleted are final: not read again"
