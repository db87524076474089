"""The page writes of the marketplace sync (`upsert_orders`, `upsert_items`) on PostgreSQL and SQLite: counts,
newer-only overwrites and whole replacement of an order's lines, without the API."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

from pydantic import SecretStr
from sqlalchemy import select

from operations.marketplace.client import TokenGrant
from operations.marketplace.models import MarketplaceItem, MarketplaceOrder, MarketplaceOrderLine
from operations.marketplace.store import UpsertCounts, save_account, upsert_items, upsert_orders

SELLER = 4242
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


def _account(engine) -> None:
    save_account(engine, TokenGrant(SecretStr("a"), SecretStr("r"), 3600, SELLER, "read"), "pages")


def _order(order_id: int, updated: datetime, lines: list[tuple[str, int]], amount: str = "10.50") -> dict:
    return {
        "id": order_id, "status": "paid", "date_created": "2026-03-01T09:00:00.000-03:00",
        "date_last_updated": updated.isoformat(), "total_amount": float(amount), "currency_id": "BRL",
        "buyer": {"id": 77, "nickname": "BUYER"}, "tags": ["paid", "delivered"],
        "order_items": [
            {"item": {"id": item, "title": f"title of {item}"}, "quantity": quantity, "unit_price": 1.25}
            for item, quantity in lines
        ],
    }


def _lines(engine, order_id: int) -> list[tuple[int, str, int]]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(MarketplaceOrderLine.line, MarketplaceOrderLine.item_id, MarketplaceOrderLine.quantity)
            .where(MarketplaceOrderLine.order_id == order_id)
            .order_by(MarketplaceOrderLine.line)
        )
        return [tuple(r) for r in rows]


def test_order_pages_count_overwrite_only_when_newer_and_replace_lines_whole(any_database):
    engine = any_database
    _account(engine)
    first = [_order(1, T0, [("MLB1", 1), ("MLB2", 2), ("MLB3", 3)]), _order(2, T0, [("MLB9", 9)])]
    assert upsert_orders(engine, SELLER, first) == UpsertCounts(new=2)
    assert _lines(engine, 1) == [(0, "MLB1", 1), (1, "MLB2", 2), (2, "MLB3", 3)]

    # order 1 changed and lost two lines; order 2 repeated as it was; the page also repeats order 1's older copy
    newer = T0 + timedelta(minutes=5)
    page = [_order(1, newer, [("MLB7", 4)], amount="99.99"), _order(2, T0, [("MLB9", 9)]), first[0]]
    assert upsert_orders(engine, SELLER, page) == UpsertCounts(updated=1, unchanged=1)
    assert _lines(engine, 1) == [(0, "MLB7", 4)]
    assert _lines(engine, 2) == [(0, "MLB9", 9)]
    with engine.connect() as conn:
        stored = conn.execute(select(MarketplaceOrder).where(MarketplaceOrder.id == 1)).one()
    assert stored.total_amount == Decimal("99.99") and stored.tags == ["paid", "delivered"]
    assert stored.date_last_updated.replace(tzinfo=stored.date_last_updated.tzinfo or timezone.utc) == newer

    # the older copy alone changes nothing, lines included
    assert upsert_orders(engine, SELLER, [first[0]]) == UpsertCounts(unchanged=1)
    assert _lines(engine, 1) == [(0, "MLB7", 4)]


def test_item_pages_count_and_overwrite_only_when_newer(any_database):
    engine = any_database
    _account(engine)

    def item(item_id: str, updated: datetime, price: float) -> dict:
        return {"id": item_id, "title": item_id, "price": price, "currency_id": "BRL", "available_quantity": 3,
                "status": "active", "last_updated": updated.isoformat()}

    assert upsert_items(engine, SELLER, [item("MLB1", T0, 5.0), item("MLB2", T0, 6.0)]) == UpsertCounts(new=2)
    later = T0 + timedelta(hours=1)
    page = [item("MLB1", later, 7.5), item("MLB2", T0 - timedelta(hours=1), 1.0), item("MLB3", T0, 2.0)]
    assert upsert_items(engine, SELLER, page) == UpsertCounts(new=1, updated=1, unchanged=1)
    with engine.connect() as conn:
        prices = dict(conn.execute(select(MarketplaceItem.id, MarketplaceItem.price).order_by(MarketplaceItem.id)).all())
    assert prices == {"MLB1": Decimal("7.50"), "MLB2": Decimal("6.00"), "MLB3": Decimal("2.00")}


def _odd_orders() -> list[dict]:
    """Orders in the API's shapes and at the edges of each conversion of `order_row` / `order_line_rows`."""
    plain = {
        "id": 2000000001, "status": "paid", "status_detail": None, "date_created": "2026-03-01T09:00:00.000-03:00",
        "date_closed": "2026-03-01T09:05:00.123-03:00", "last_updated": "2026-03-01T12:00:00.000Z",
        "date_last_updated": "2026-03-01T12:00:00.000-03:00", "total_amount": 2.665, "paid_amount": 2.675,
        "currency_id": "BRL", "buyer": {"id": 123456789, "nickname": "BUYER1"}, "shipping": {"id": 44000000001},
        "pack_id": 2000000000000000123, "tags": ["paid", "delivered"], "context": {"ignored": True},
        "order_items": [
            {"item": {"id": "MLB1", "title": "Caneca azul", "variation_id": 170000000001, "seller_sku": "SKU-1"},
             "quantity": 2, "unit_price": 10.005, "sale_fee": 1.015, "currency_id": "BRL"},
            {"item": {"id": "MLB2", "title": "Ação ∑ \"quoted\"", "variation_id": None, "seller_sku": None},
             "quantity": 1, "unit_price": -3.125, "sale_fee": 0},
        ],
    }
    sparse = {"id": "2000000002", "status": None, "date_created": "", "last_updated": "2026-03-01T10:00:00",
              "total_amount": "12.5", "paid_amount": None, "buyer": None, "shipping": {}, "pack_id": "",
              "tags": None, "status_detail": "pack_splitted", "order_items": None}
    odd = {"id": 2000000003, "status": 0, "status_detail": True, "currency_id": False, "date_last_updated": "",
           "last_updated": None, "date_closed": "2026-03-01 10:00:00+0100", "total_amount": 1e3,
           "buyer": {"id": " 1_234 ", "nickname": None}, "shipping": {"id": 44.9}, "pack_id": "1.5", "tags": [],
           "order_items": [{"item": None, "quantity": "3"}, {"quantity": None, "unit_price": "7.115"}, {}]}
    older_copy = {**plain, "date_last_updated": "2026-03-01T11:00:00.000-03:00", "status": "cancelled"}
    return [older_copy, plain, sparse, odd, dict(plain)]


def _stored(engine, table, key) -> dict:
    with engine.connect() as conn:
        return {row._mapping[key]: dict(row._mapping) for row in conn.execute(select(table))}


def _aware(row: dict) -> dict:
    return {k: v.replace(tzinfo=v.tzinfo or timezone.utc) if isinstance(v, datetime) else v for k, v in row.items()}


def test_a_page_stores_every_field_as_the_python_rows_say_on_both_databases(any_database):
    """A stored page holds, field for field and on both databases, what `order_row`, `order_line_rows` and
    `item_row` make of the same records (half-even cents, naive and `Z` times, ids and counts as strings or
    floats, an older copy of a record): the columns' types lose nothing, whatever builds the page's statement."""
    from operations.marketplace.store import _newest_by_key, _newest_orders, item_row, order_line_rows

    engine = any_database
    _account(engine)
    orders = _odd_orders()
    assert upsert_orders(engine, SELLER, orders) == UpsertCounts(new=3)
    stored = {k: _aware(v) for k, v in _stored(engine, MarketplaceOrder.__table__, "id").items()}
    synced_at = next(iter(stored.values()))["synced_at"]
    rows, source = _newest_orders(SELLER, orders, synced_at)
    assert stored == {row["id"]: row for row in rows}
    with engine.connect() as conn:
        lines = [dict(r._mapping) for r in conn.execute(select(MarketplaceOrderLine.__table__)
                                                        .order_by(MarketplaceOrderLine.order_id, MarketplaceOrderLine.line))]
    assert lines == [line for order_id in sorted(source) for line in order_line_rows(source[order_id])]

    items = [
        {"id": "MLB1", "title": "Caneca", "price": 19.995, "currency_id": "BRL", "available_quantity": 3,
         "sold_quantity": "12", "status": "active", "sub_status": ["deleted", 5, None, True],
         "last_updated": "2026-03-01T12:00:00.000-03:00", "permalink": "https://x/MLB1", "seller_custom_field": None},
        {"id": "MLB2", "price": None, "available_quantity": 2.7, "sold_quantity": False, "status": None,
         "sub_status": None, "last_updated": "", "seller_custom_field": "SKU-2"},
        {"id": "MLB1", "title": "older", "last_updated": "2026-03-01T11:00:00.000-03:00"},
    ]
    assert upsert_items(engine, SELLER, items) == UpsertCounts(new=2)
    stored = {k: _aware(v) for k, v in _stored(engine, MarketplaceItem.__table__, "id").items()}
    synced_at = stored["MLB1"]["synced_at"]
    expected = _newest_by_key([item_row(SELLER, i, synced_at) for i in items], "id", "last_updated")
    assert stored == {row["id"]: row for row in expected}
