"""Writing a chunk of product rows: one transaction per chunk, each row isolated when one fails, every write
an upsert keyed so that a retried or re-run chunk changes nothing twice.

In the chunk's transaction, for its rows: the catalog products (by SKU), the dealers' offers (by product x
dealer, updated only when what the file says of them changed, their version then growing by one), one
integration record per created or changed offer (by offer x version) and its outbox message (by message
key). The messages are published after the commit (`outbox.py`), so none announces a change that was not
committed. Rows are written in key order, so concurrent chunks lock shared rows in the same order.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Iterable

from sqlalchemy import Connection, Engine, delete, func, select, text, tuple_
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError, IntegrityError, DataError, InterfaceError, OperationalError

from operations.errors import UserError
from operations.products.models import (
    Dealer,
    OutboxMessage,
    Product,
    ProductDealer,
    ProductIntegrationStaging,
)
from operations.products.reader import ProductRow, RowFailure

MESSAGE_TYPE = "product.staged"


class ChunkFailed(Exception):
    """A chunk could not be written (nothing of it committed). `transient`: worth retrying (connection lost,
    deadlock, timeout); otherwise retrying would fail the same way. Plain text only, so it pickles."""

    def __init__(self, message: str, transient: bool):
        super().__init__(message)
        self.transient = transient

    def __reduce__(self):
        return (ChunkFailed, (str(self), self.transient))


@dataclass(frozen=True, slots=True)
class DealerRow:
    """A product row whose dealer code is known: what a chunk file holds."""

    dealer_id: int
    row: ProductRow


@dataclass
class ChunkOutcome:
    """What a chunk's transaction did: rows by outcome, the outbox messages it queued, the rows that failed."""

    rows: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    outbox_ids: list[int] = field(default_factory=list)
    failures: list[RowFailure] = field(default_factory=list)

    def add(self, other: ChunkOutcome) -> None:
        self.rows += other.rows
        self.created += other.created
        self.updated += other.updated
        self.unchanged += other.unchanged
        self.outbox_ids += other.outbox_ids
        self.failures += other.failures


def fingerprint(row: ProductRow) -> str:
    """What the file says of an offer, hashed: equal fingerprints mean nothing to write or publish."""
    text = json.dumps(
        [row.name, str(row.price), row.stock, sorted(row.attributes.items())], ensure_ascii=False, separators=(",", ":")
    )
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


# Each write is one statement over the chunk's rows sent as one JSON document (`jsonb_to_recordset`): one
# parameter, encoded by the json module and parsed by PostgreSQL, where a multi-row VALUES of 20,000 rows
# (or text arrays of JSON) costs seconds of client-side work.
_SELECT_PRODUCTS = text("SELECT id, sku, name, attributes FROM products WHERE sku = ANY(CAST(:skus AS text[]))")

_UPSERT_PRODUCTS = text("""
INSERT INTO products (sku, name, attributes)
SELECT sku, name, attributes FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS p(sku text, name text, attributes jsonb)
ORDER BY sku
ON CONFLICT (sku) DO UPDATE SET name = excluded.name, attributes = excluded.attributes, updated_at = now()
RETURNING id, sku
""")

_UPSERT_OFFERS = text("""
INSERT INTO product_dealers (product_id, dealer_id, price, stock, fingerprint, version, source_run, source_row)
SELECT product_id, dealer_id, price, stock, fingerprint, 1, :run_key, source_row
FROM jsonb_to_recordset(CAST(:rows AS jsonb))
     AS o(product_id bigint, dealer_id bigint, price numeric, stock integer, fingerprint text, source_row integer)
ORDER BY product_id, dealer_id
ON CONFLICT (product_id, dealer_id) DO UPDATE SET
    price = excluded.price, stock = excluded.stock, fingerprint = excluded.fingerprint,
    version = product_dealers.version + 1, source_run = excluded.source_run, source_row = excluded.source_row,
    updated_at = now()
WHERE product_dealers.fingerprint <> excluded.fingerprint
RETURNING id, product_id, dealer_id, version
""")

_STAGE = text("""
INSERT INTO product_integration_staging
    (product_dealer_id, version, change, dealer_code, sku, name, price, stock, attributes, source_run, source_row)
SELECT product_dealer_id, version, CASE WHEN version = 1 THEN 'created' ELSE 'updated' END, dealer_code, sku, name,
       price, stock, attributes, :run_key, source_row
FROM jsonb_to_recordset(CAST(:rows AS jsonb))
     AS s(product_dealer_id bigint, version integer, dealer_code text, sku text, name text, price numeric,
          stock integer, attributes jsonb, source_row integer)
ORDER BY product_dealer_id
ON CONFLICT (product_dealer_id, version) DO NOTHING
RETURNING id, product_dealer_id, version
""")

_QUEUE = text("""
INSERT INTO outbox_messages (stream, message_key, message_type, payload)
SELECT :stream, message_key, :message_type, payload
FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS m(message_key text, payload jsonb)
ON CONFLICT (message_key) DO NOTHING
RETURNING id
""")


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _upsert_products(conn: Connection, rows: list[ProductRow]) -> dict[str, int]:
    """Catalog products of the rows (first row of a SKU wins within the chunk): new SKUs inserted, changed
    names or attributes updated, the rest only read. Returns SKU -> product id."""
    wanted: dict[str, ProductRow] = {}
    for row in rows:
        wanted.setdefault(row.sku, row)
    existing = conn.execute(_SELECT_PRODUCTS, {"skus": list(wanted)}).all()
    ids = {sku: id_ for id_, sku, _, _ in existing}
    current = {sku: (name, attributes or {}) for _, sku, name, attributes in existing}
    to_write = [{"sku": sku, "name": row.name, "attributes": row.attributes}
                for sku, row in wanted.items() if current.get(sku) != (row.name, row.attributes)]
    if to_write:
        ids.update({sku: id_ for id_, sku in conn.execute(_UPSERT_PRODUCTS, {"rows": _json(to_write)})})
    return ids


def _upsert_offers(
    conn: Connection, rows: list[DealerRow], product_ids: dict[str, int], run_key: str
) -> list[tuple[int, int, DealerRow]]:
    """The dealers' offers: inserted, or updated (version + 1) when their fingerprint changed; unchanged offers
    are not touched. Returns (offer id, version, row) of each offer created or changed."""
    by_key = {(product_ids[r.row.sku], r.dealer_id): r for r in rows}
    values = [
        {"product_id": product_id, "dealer_id": dealer_id, "price": str(r.row.price), "stock": r.row.stock,
         "fingerprint": fingerprint(r.row), "source_row": r.row.row_number}
        for (product_id, dealer_id), r in by_key.items()
    ]
    changed = conn.execute(_UPSERT_OFFERS, {"run_key": run_key, "rows": _json(values)})
    return [(id_, version, by_key[(product_id, dealer_id)]) for id_, product_id, dealer_id, version in changed]


def _stage(conn: Connection, changed: list[tuple[int, int, DealerRow]], run_key: str, stream: str) -> list[int]:
    """One integration record and one outbox message per created or changed offer. Returns the message ids."""
    if not changed:
        return []
    rows = {offer_id: r.row for offer_id, _, r in changed}
    records = [
        {"product_dealer_id": offer_id, "version": version, "dealer_code": r.row.dealer_code, "sku": r.row.sku,
         "name": r.row.name, "price": str(r.row.price), "stock": r.row.stock, "attributes": r.row.attributes,
         "source_row": r.row.row_number}
        for offer_id, version, r in changed
    ]
    staged = conn.execute(_STAGE, {"run_key": run_key, "rows": _json(records)}).all()
    messages = []
    for staging_id, offer_id, version in staged:  # an earlier attempt's record is kept with its message
        row = rows[offer_id]
        messages.append({"message_key": f"product-dealer:{offer_id}:v{version}", "payload": {
            "event": "product.created" if version == 1 else "product.updated",
            "staging_id": staging_id, "product_dealer_id": offer_id, "version": version,
            "dealer_code": row.dealer_code, "sku": row.sku, "name": row.name, "price": str(row.price),
            "stock": row.stock, "attributes": row.attributes, "source_run": run_key, "source_row": row.row_number,
        }})
    if not messages:
        return []
    queued = conn.execute(_QUEUE, {"stream": stream, "message_type": MESSAGE_TYPE, "rows": _json(messages)})
    return [id_ for (id_,) in queued]


def _write(conn: Connection, rows: list[DealerRow], run_key: str, stream: str) -> ChunkOutcome:
    product_ids = _upsert_products(conn, [r.row for r in rows])
    changed = _upsert_offers(conn, rows, product_ids, run_key)
    outbox_ids = _stage(conn, changed, run_key, stream)
    created = sum(1 for _, version, _ in changed if version == 1)
    return ChunkOutcome(
        rows=len(rows), created=created, updated=len(changed) - created, unchanged=len(rows) - len(changed),
        outbox_ids=outbox_ids,
    )


_DEALER_FOREIGN_KEY = next(iter(ProductDealer.__table__.c.dealer_id.foreign_keys)).constraint.name


def _row_failure(row: ProductRow, exc: DBAPIError) -> RowFailure:
    """A row the database refused: the constraint or value it broke, without the statement's parameters."""
    orig = exc.orig
    diag = getattr(orig, "diag", None)
    column = getattr(diag, "column_name", None) or ""
    message = (getattr(diag, "message_primary", None) or str(orig).splitlines()[0])[:300]
    if getattr(diag, "constraint_name", None) == _DEALER_FOREIGN_KEY:
        return RowFailure(row.row_number, row.dealer_code, row.sku, "dealer_code", "dealer removed", message)
    return RowFailure(row.row_number, row.dealer_code, row.sku, column, "refused by the database", message)


_TRANSIENT = (OperationalError, InterfaceError)


def store_chunk(engine: Engine, rows: list[DealerRow], run_key: str, stream: str) -> ChunkOutcome:
    """Write the chunk in one transaction (PostgreSQL): all rows in one batch, or, when the database refuses the batch
    (a value or constraint it rejects), each row in its own savepoint so a bad row fails alone and the rest
    commit. Raises ChunkFailed (nothing committed) when the transaction itself cannot complete."""
    if not rows:
        return ChunkOutcome()
    try:
        with engine.begin() as conn:
            try:
                with conn.begin_nested():
                    return _write(conn, rows, run_key, stream)
            except (IntegrityError, DataError):
                pass
            outcome = ChunkOutcome()
            for dealer_row in rows:
                try:
                    with conn.begin_nested():
                        outcome.add(_write(conn, [dealer_row], run_key, stream))
                except (IntegrityError, DataError) as exc:
                    outcome.rows += 1
                    outcome.failures.append(_row_failure(dealer_row.row, exc))
            return outcome
    except _TRANSIENT as exc:
        raise ChunkFailed(f"database fault, nothing of the chunk committed: {_first_line(exc)}", True) from None
    except DBAPIError as exc:
        transient = bool(exc.connection_invalidated)
        raise ChunkFailed(f"database refused the chunk: {_first_line(exc)}", transient) from None


def _first_line(exc: DBAPIError) -> str:
    return str(exc.orig).splitlines()[0][:300] if exc.orig is not None else type(exc).__name__


_RUN_FIGURES = text("""
SELECT s.change, count(*), count(o.published_at)
FROM product_integration_staging s
JOIN outbox_messages o ON o.message_key = concat('product-dealer:', s.product_dealer_id, ':', 'v', s.version)
WHERE s.source_run = :run_key
GROUP BY s.change
""")


@dataclass(frozen=True)
class RunFigures:
    """What the database holds of one run key: offers it created and updated (its staged records) and their
    messages, published or still in the outbox. The truth when a run stopped before every chunk reported."""

    created: int = 0
    updated: int = 0
    published: int = 0
    unpublished: int = 0


def run_figures(engine: Engine, run_key: str) -> RunFigures:
    """The staged changes of `run_key` and their messages (a scan of the staging table: for a cancelled run's
    report, not for every run)."""
    with engine.connect() as conn:
        rows = {change: (count, published) for change, count, published in conn.execute(
            _RUN_FIGURES, {"run_key": run_key})}
    created, published_created = rows.get("created", (0, 0))
    updated, published_updated = rows.get("updated", (0, 0))
    published = published_created + published_updated
    return RunFigures(created, updated, published, created + updated - published)


# -- dealers ------------------------------------------------------------------------------------------------


def upsert_dealers(engine: Engine, dealers: Iterable[tuple[str, str]]) -> tuple[int, int]:
    """Insert or rename dealers by code. Returns (inserted, updated); unchanged ones are not touched."""
    wanted = {code: name for code, name in dealers}
    if not wanted:
        return 0, 0
    table = Dealer.__table__
    with engine.begin() as conn:
        current = dict(conn.execute(select(table.c.code, table.c.name).where(table.c.code.in_(list(wanted)))).all())
        rows = [{"code": c, "name": n} for c, n in sorted(wanted.items()) if current.get(c) != n]
        if rows:
            statement = insert(table)
            statement = statement.on_conflict_do_update(
                index_elements=["code"], set_={"name": statement.excluded.name, "updated_at": func.now()}
            )
            conn.execute(statement, rows)
    inserted = sum(1 for r in rows if r["code"] not in current)
    return inserted, len(rows) - inserted


class NoDealers(UserError, ValueError):
    """The database holds no dealer: no row of a products file can be loaded."""


def known_dealers(engine: Engine) -> dict[str, int]:
    """Every dealer code -> its id; raises NoDealers when there is none."""
    dealers = dealer_ids(engine)
    if not dealers:
        raise NoDealers("no dealers in the database: load them first (python -m deployments.dealers load FILE)")
    return dealers


def dealer_ids(engine: Engine) -> dict[str, int]:
    """Every dealer code -> its id."""
    with engine.connect() as conn:
        return dict(conn.execute(select(Dealer.code, Dealer.id)).all())


def product_counts(engine: Engine) -> dict[str, int]:
    """Rows per table of the product files (for reports and tests)."""
    tables = {"dealers": Dealer, "products": Product, "offers": ProductDealer, "staged": ProductIntegrationStaging,
              "outbox": OutboxMessage}
    with engine.connect() as conn:
        counts = {name: conn.execute(select(func.count()).select_from(model)).scalar_one()
                  for name, model in tables.items()}
        counts["unpublished"] = conn.execute(
            select(func.count()).select_from(OutboxMessage).where(OutboxMessage.published_at.is_(None))
        ).scalar_one()
    return counts


def offers(engine: Engine, keys: list[tuple[str, str]] | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    """(dealer code, SKU) -> the offer's price, stock and version (all offers, or those of `keys`)."""
    query = (
        select(Dealer.code, Product.sku, ProductDealer.price, ProductDealer.stock, ProductDealer.version)
        .join(Dealer, Dealer.id == ProductDealer.dealer_id)
        .join(Product, Product.id == ProductDealer.product_id)
    )
    if keys is not None:
        query = query.where(tuple_(Dealer.code, Product.sku).in_(keys))
    with engine.connect() as conn:
        return {(code, sku): {"price": price, "stock": stock, "version": version}
                for code, sku, price, stock, version in conn.execute(query)}


def clear_products_data(engine: Engine, dealers: bool = False) -> None:
    """Delete the products, offers, staged records and outbox messages (and the dealers): tests, benchmarks."""
    with engine.begin() as conn:
        for model in (OutboxMessage, ProductIntegrationStaging, ProductDealer, Product, *([Dealer] if dealers else [])):
            conn.execute(delete(model))
