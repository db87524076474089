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
