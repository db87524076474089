"""The item reconciliation: every difference between a seller's items on the marketplace and those stored here is
found, reported and repaired. No Prefect import.

A full read of a seller's items (`sync.py::_sync_items`: every id the items search lists, details by multiget)
stores the items that are new here or newer on the marketplace (a change whose notification never came). What
that read alone would miss, this module covers:

- **Items no longer listed.** The seller's items search does not list a deleted item: the marketplace keeps it
  `closed` with `sub_status` `["deleted"]` and still answers it by id. Every item stored here that the search
  did not list is therefore read by id with the others and stored as the API has it (`unlisted_ids`); an id the
  API no longer answers at all is marked here the way the API marks a deleted item, `closed` / `["deleted"]`
  (`mark_gone`). No row is deleted: orders keep naming these items, and their history stays.
- **Fields that differ under the same `last_updated`.** The upserts overwrite only by a newer stamp; an item
  whose stored fields differ from the API's while the stamps are equal (a row changed here, a change the
  marketplace made without moving its stamp) is overwritten with the API's fields (`differing`, `repair`).

Why a repeat is harmless: each step writes the API's own values keyed by item id, and only where they differ.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Iterable

from sqlalchemy import Engine, select, update

from operations.marketplace.store import ITEMS, now_utc, statement, transaction, utc

# The item columns compared with the API's (all but the keys, the stamp and when it was synced).
COMPARED = ("title", "price", "currency_id", "available_quantity", "sold_quantity", "status", "sub_status",
            "permalink", "seller_custom_field")
DELETED = {"status": "closed", "sub_status": ["deleted"]}  # how the API shows an item its seller deleted


def stored_items(engine: Engine, seller_id: int) -> dict[str, dict[str, Any]]:
    """The seller's stored items: {id: {compared fields..., last_updated}} (one indexed query)."""
    columns = [ITEMS.c.id, ITEMS.c.last_updated, *(ITEMS.c[name] for name in COMPARED)]
    with statement(engine) as conn:  # the account's connection during its sync (store.account_connection)
        rows = conn.execute(select(*columns).where(ITEMS.c.seller_id == seller_id)).mappings().all()
    return {row["id"]: {**row, "last_updated": utc(row["last_updated"]), "sub_status": row["sub_status"] or []}
            for row in rows}


def unlisted_ids(stored: dict[str, dict[str, Any]], listed: Iterable[str]) -> list[str]:
    """Ids stored here that the seller's items search did not list, in a stable order; those already stored as
    deleted are left out (a deleted item is final: it is never listed or changed again)."""
    return sorted(i for i in set(stored) - set(listed) if not _deleted(stored[i]))


def _deleted(row: dict[str, Any]) -> bool:
    return row["status"] == "closed" and "deleted" in (row["sub_status"] or [])


def differing(stored: dict[str, dict[str, Any]], rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The item rows (`store.item_row`) whose fields differ from the stored ones under the same `last_updated`:
    those the newer-only upserts leave as they are. A row newer than the stored one is the upsert's to write; an
    older one (the API behind what was stored) is left alone."""
    found = []
    for row in rows:
        old = stored.get(row["id"])
        if old is None or old["last_updated"] != row["last_updated"]:
            continue
        if any(_normal(old[name]) != _normal(row[name]) for name in COMPARED):
            found.append(row)
    return found


def _normal(value: Any) -> Any:
    """Values compared as stored: money as a number, sub_status as a list, empty text as None."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)):
        return [str(part) for part in value]
    if hasattr(value, "quantize"):  # Decimal
        return float(value)
    return value


def repair(engine: Engine, seller_id: int, rows: list[dict[str, Any]]) -> int:
    """Overwrite the stored fields of `rows` with the API's (only while the stored stamp is not newer); returns
    how many rows were written."""
    written = 0
    now = now_utc()
    with transaction(engine) as conn:
        for row in rows:
            written += conn.execute(
                update(ITEMS).where(ITEMS.c.id == row["id"], ITEMS.c.seller_id == seller_id,
                                    ITEMS.c.last_updated <= row["last_updated"])
                .values(**{name: row[name] for name in COMPARED}, synced_at=now)
            ).rowcount
    return written


def mark_gone(engine: Engine, seller_id: int, ids: Iterable[str], now: datetime | None = None) -> int:
    """Mark the seller's stored items the API no longer answers (404 by id) as the API marks a deleted item:
    `closed`, sub_status ["deleted"]. The rows stay. Returns how many changed (one already marked is left)."""
    ids = sorted(set(ids))
    if not ids:
        return 0
    stored = stored_items(engine, seller_id)
    todo = [i for i in ids if i in stored and (stored[i]["status"], stored[i]["sub_status"]) != ("closed", ["deleted"])]
    if not todo:
        return 0
    with transaction(engine) as conn:
        return conn.execute(update(ITEMS).where(ITEMS.c.seller_id == seller_id, ITEMS.c.id.in_(todo))
                            .values(**DELETED, synced_at=now or now_utc())).rowcount


__all__ = ["COMPARED", "DELETED", "differing", "mark_gone", "repair", "stored_items", "unlisted_ids"]
