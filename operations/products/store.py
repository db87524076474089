"""Writing a chunk of product rows: one transaction per chunk, each row isolated when one fails, every write
an upsert keyed so that a retried or re-run chunk changes nothing twice.

In the chunk's transaction, for its rows: the catalog products (by SKU), the dealers' offers (by product x
dealer, updated only when what the file says of them changed, their version then growing by one), one
integration record per created or changed offer (by offer x version, so each change is staged once) and its
message, in outbox rows of a batch of messages each, written only for the records staged by this statement.
The messages are published after the commit (`outbox.py`), so none announces a change that was not
committed. Rows are written in key order, so concurrent chunks lock shared rows in the same order.
"""

from __future__ import annotations

import hashlib
from functools import partial
from dataclasses import dataclass, field
from typing import Any, Iterable

import orjson
import psycopg
from sqlalchemy import Connection, Engine, delete, func, select, text, tuple_
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import DBAPIError, IntegrityError, DataError, InterfaceError, OperationalError

from operations.errors import UserError
from operations.products.models import (
    Dealer,
    OutboxBatch,
    Product,
    ProductDealer,
    ProductIntegrationStaging,
)
from operations.products.reader import ProductRow, Reason, RowFailure

MESSAGE_TYPE = "product.staged"
OUTBOX_BATCH_MESSAGES = 2000  # messages per outbox row: one claim, one script call and one mark each


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
    """What a chunk's transaction did: rows by outcome, the outbox rows it queued (`outbox_ids`, each a batch of
    messages) and how many messages they hold, the rows that failed."""

    rows: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    outbox_ids: list[int] = field(default_factory=list)
    messages: int = 0
    failures: list[RowFailure] = field(default_factory=list)

    def add(self, other: ChunkOutcome) -> None:
        self.rows += other.rows
        self.created += other.created
        self.updated += other.updated
        self.unchanged += other.unchanged
        self.outbox_ids += other.outbox_ids
        self.messages += other.messages
        self.failures += other.failures


def fingerprint(row: ProductRow) -> str:
    """What the file says of an offer, hashed: equal fingerprints mean nothing to write or publish."""
    # orjson writes what json.dumps(..., ensure_ascii=False, separators=(",", ":")) writes, 5x faster
    text = orjson.dumps([row.name, str(row.price), row.stock, sorted(row.attributes.items())])
    return hashlib.blake2b(text, digest_size=16).hexdigest()


# The chunk's rows are copied (COPY, the fastest way into PostgreSQL) into a temporary table dropped at commit;
# the writes are then two set-based statements over it: the products, then the offers with their integration
# records and outbox messages, decided and built in SQL (changed or not by fingerprint, each payload's JSON text
# concatenated, its text values escaped by to_json: ~15% less of the statement's time than jsonb_build_object
# and ::text), so no row travels back to Python but the ids of the queued messages.
_CHUNK_TABLE = "_chunk_rows"
_CREATE_CHUNK_TABLE = f"""
CREATE TEMPORARY TABLE IF NOT EXISTS {_CHUNK_TABLE} (
    ord integer, source_row integer, dealer_id bigint, dealer_code text, sku text, name text, price numeric,
    stock integer, attributes jsonb, fingerprint text
) ON COMMIT DROP
"""
_COPY_CHUNK = (f"COPY {_CHUNK_TABLE} (ord, source_row, dealer_id, dealer_code, sku, name, price, stock, attributes, "
               "fingerprint) FROM STDIN")

# The dealers the chunk's rows name, locked once for the transaction (`FOR KEY SHARE`: a dealer cannot be deleted
# under the chunk, as a foreign key's check per row would ensure; migration 0010), in id order; the rows of a
# dealer that is gone are taken out of the chunk and returned, to fail as "dealer removed".
_LOCK_DEALERS = text(f"""
WITH present AS (
    SELECT id FROM dealers WHERE id IN (SELECT DISTINCT dealer_id FROM {_CHUNK_TABLE}) ORDER BY id FOR KEY SHARE
)
DELETE FROM {_CHUNK_TABLE} c WHERE NOT EXISTS (SELECT 1 FROM present p WHERE p.id = c.dealer_id)
RETURNING source_row, dealer_code, sku, dealer_id
""")

# The catalog products of the chunk (the first row of a SKU wins): new SKUs inserted, changed names or
# attributes updated, the others not touched (no row lock on a product another chunk also names).
_UPSERT_PRODUCTS = text(f"""
INSERT INTO products (sku, name, attributes)
SELECT w.sku, w.name, w.attributes
FROM (SELECT DISTINCT ON (sku) sku, name, attributes FROM {_CHUNK_TABLE} ORDER BY sku, ord) AS w
LEFT JOIN products p ON p.sku = w.sku
WHERE p.id IS NULL OR p.name IS DISTINCT FROM w.name OR coalesce(p.attributes, '{{}}'::jsonb) <> w.attributes
ORDER BY w.sku
ON CONFLICT (sku) DO UPDATE SET name = excluded.name, attributes = excluded.attributes, updated_at = now()
""")

# The offers whose fingerprint is new or changed (version + 1), one integration record per written offer
# version, and their messages as outbox rows of up to :batch_messages messages each, every row's messages one
# JSON array as the stream publisher takes them (its `outbox_id` field the row's id, drawn before the insert);
# returns how many offers were written, how many created, the ids of the outbox rows queued and how many messages
# they hold (an integration record an earlier attempt kept is kept with its message: a message is queued only
# for a record this statement staged). Integration records
# take their offer's id only from `changed` (an offer this statement wrote, locked until the commit): that is
# what stands for a foreign key on them (migration 0008; a trigger deletes them with their offer).
_WRITE_OFFERS = text(f"""
WITH incoming AS (
    SELECT p.id AS product_id, c.dealer_id, c.dealer_code, c.sku, c.name, c.price, c.stock, c.attributes,
           c.fingerprint, c.source_row
    FROM {_CHUNK_TABLE} c JOIN products p ON p.sku = c.sku
), changed AS (
    INSERT INTO product_dealers (product_id, dealer_id, price, stock, fingerprint, version, source_run, source_row)
    SELECT i.product_id, i.dealer_id, i.price, i.stock, i.fingerprint, 1, :run_key, i.source_row
    FROM incoming i
    LEFT JOIN product_dealers d ON d.product_id = i.product_id AND d.dealer_id = i.dealer_id
    WHERE d.id IS NULL OR d.fingerprint <> i.fingerprint
    ORDER BY i.product_id, i.dealer_id
    ON CONFLICT (product_id, dealer_id) DO UPDATE SET
        price = excluded.price, stock = excluded.stock, fingerprint = excluded.fingerprint,
        version = product_dealers.version + 1, source_run = excluded.source_run,
        source_row = excluded.source_row, updated_at = now()
    WHERE product_dealers.fingerprint <> excluded.fingerprint
    RETURNING id, product_id, dealer_id, version
), staged AS (
    INSERT INTO product_integration_staging
        (product_dealer_id, version, change, dealer_code, sku, name, price, stock, attributes, source_run,
         source_row)
    SELECT ch.id, ch.version, CASE WHEN ch.version = 1 THEN 'created' ELSE 'updated' END, i.dealer_code, i.sku,
           i.name, i.price, i.stock, i.attributes, :run_key, i.source_row
    FROM changed ch JOIN incoming i ON i.product_id = ch.product_id AND i.dealer_id = ch.dealer_id
    ORDER BY ch.id
    ON CONFLICT (product_dealer_id, version) DO NOTHING
    RETURNING id, product_dealer_id, version, dealer_code, sku, name, price, stock, attributes, source_row
), numbered AS (
    SELECT s.*, 'product-dealer:' || s.product_dealer_id || ':' || 'v' || s.version AS message_key,
           (row_number() OVER (ORDER BY s.id) - 1) / :batch_messages AS batch
    FROM staged s
), batches AS (
    SELECT batch, nextval(pg_get_serial_sequence('outbox_batches', 'id')) AS id
    FROM (SELECT DISTINCT batch FROM numbered ORDER BY batch) b
), queued AS (
    INSERT INTO outbox_batches (id, stream, message_type, source_run, message_count, message_keys, messages)
    SELECT b.id, :stream, CAST(:message_type AS text), CAST(:run_key AS text), count(*),
           string_agg(n.message_key, ',' ORDER BY n.id),
           json_agg(json_build_array(n.message_key, n.message_key, CAST(:message_type AS text), b.id::text,
               concat('{{"event":"', CASE WHEN n.version = 1 THEN 'product.created' ELSE 'product.updated' END,
                   '","staging_id":', n.id, ',"product_dealer_id":', n.product_dealer_id, ',"version":', n.version,
                   ',"dealer_code":', to_json(n.dealer_code), ',"sku":', to_json(n.sku), ',"name":', to_json(n.name),
                   ',"price":"', n.price, '","stock":', n.stock, ',"attributes":', n.attributes,
                   ',"source_run":', to_json(CAST(:run_key AS text)), ',"source_row":', n.source_row, '}}'))
               ORDER BY n.id)::text
    FROM numbered n JOIN batches b ON b.batch = n.batch
    GROUP BY b.id ORDER BY b.id
    RETURNING id, message_count
)
SELECT (SELECT count(*) FROM changed), (SELECT count(*) FROM changed WHERE version = 1),
       (SELECT coalesce(array_agg(id ORDER BY id), '{{}}') FROM queued),
       (SELECT coalesce(sum(message_count), 0) FROM queued)
""")


def _copy_field(text: str) -> str:
    """`text` as a field of COPY's text format (backslash, tab, newline and carriage return escaped)."""
    if "\\" in text or "\t" in text or "\n" in text or "\r" in text:
        return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return text


def copy_line(ord_: int, dealer_id: int, row: ProductRow) -> bytes:
    """One row of the chunk's temporary table as a line of COPY's text format, its fingerprint computed here:
    what chunk files hold, so that a chunk task sends its file to the database without decoding a row."""
    attributes = _copy_field(orjson.dumps(row.attributes).decode()) if row.attributes else "{}"
    return (f"{ord_}\t{row.row_number}\t{dealer_id}\t{_copy_field(row.dealer_code)}\t{_copy_field(row.sku)}\t"
            f"{_copy_field(row.name)}\t{row.price}\t{row.stock}\t{attributes}\t{fingerprint(row)}\n").encode()


@dataclass(frozen=True)
class CopyRows:
    """A chunk's rows as COPY text lines (`copy_line`), one per dealer and SKU, and how many rows were given
    (a repeat of a dealer's SKU in the same chunk is given but not written: the last one wins)."""

    data: bytes
    rows: int

    @classmethod
    def of(cls, rows: list[DealerRow]) -> CopyRows:
        """The lines of `rows` (the last row of a dealer's SKU wins, as one offer can be written once per
        statement)."""
        unique = {(r.dealer_id, r.row.sku): (ord_, r) for ord_, r in enumerate(rows)}
        lines = [copy_line(ord_, r.dealer_id, r.row) for ord_, r in sorted(unique.values(), key=lambda item: item[0])]
        return cls(b"".join(lines), len(rows))

    def lines(self) -> list[bytes]:
        return [line + b"\n" for line in self.data.split(b"\n") if line]

    @property
    def first_row(self) -> int:
        """The file row of the first line (0 when there is none)."""
        line = self.data.split(b"\n", 1)[0]
        return int(line.split(b"\t", 2)[1]) if line else 0


def _unescape(field: bytes) -> str:
    text = field.decode()
    if "\\" not in text:
        return text
    return text.replace("\\\\", "\0").replace("\\t", "\t").replace("\\n", "\n").replace("\\r", "\r").replace("\0", "\\")


def _line_failure(line: bytes, exc: DBAPIError) -> RowFailure:
    """The row of a COPY line the database refused (its row number, dealer code and SKU from the line)."""
    fields = line.rstrip(b"\n").split(b"\t")
    row = ProductRow(int(fields[1]), _unescape(fields[3]), _unescape(fields[4]), "", None, 0, {})  # type: ignore[arg-type]
    return _row_failure(row, exc)


def _copy_rows(conn: Connection, data: bytes) -> None:
    """The lines into the chunk's temporary table, in one COPY. A driver error comes out as SQLAlchemy's
    (DataError, ...)."""
    cursor = conn.connection.driver_connection.cursor()
    try:
        with cursor.copy(_COPY_CHUNK) as copy:
            copy.write(data)
    except psycopg.Error as exc:
        raise DBAPIError.instance(_COPY_CHUNK, None, exc, psycopg.Error) from None
    finally:
        cursor.close()


def _write(conn: Connection, data: bytes, rows: int, run_key: str, stream: str, batch_messages: int) -> ChunkOutcome:
    conn.exec_driver_sql(_CREATE_CHUNK_TABLE)
    conn.exec_driver_sql("SET LOCAL work_mem = '64MB'")  # the sorts of a chunk stay in memory
    conn.exec_driver_sql(f"DELETE FROM {_CHUNK_TABLE}")  # a single row's probe after the batch was refused
    _copy_rows(conn, data)
    removed = [RowFailure(row, code, sku, "dealer_code", Reason.DEALER_REMOVED, f"no dealer with id {dealer_id}")
               for row, code, sku, dealer_id in conn.execute(_LOCK_DEALERS)]
    conn.execute(_UPSERT_PRODUCTS)
    changed, created, outbox_ids, messages = conn.execute(_WRITE_OFFERS, {
        "run_key": run_key, "stream": stream, "message_type": MESSAGE_TYPE, "batch_messages": batch_messages,
    }).one()
    return ChunkOutcome(rows=rows, created=created, updated=changed - created,
                        unchanged=rows - changed - len(removed), outbox_ids=list(outbox_ids), messages=int(messages),
                        failures=sorted(removed, key=lambda failure: failure.row_number))


def _row_failure(row: ProductRow, exc: DBAPIError) -> RowFailure:
    """A row the database refused: the constraint or value it broke, without the statement's parameters."""
    orig = exc.orig
    diag = getattr(orig, "diag", None)
    column = getattr(diag, "column_name", None) or ""
    message = (getattr(diag, "message_primary", None) or str(orig).splitlines()[0])[:300]
    return RowFailure(row.row_number, row.dealer_code, row.sku, column, "refused by the database", message)


_TRANSIENT = (OperationalError, InterfaceError)


def store_chunk(engine: Engine, rows: list[DealerRow] | CopyRows, run_key: str, stream: str, *,
                batch_messages: int = OUTBOX_BATCH_MESSAGES) -> ChunkOutcome:
    """Write the chunk in one transaction (PostgreSQL), its messages in outbox rows of `batch_messages`: all rows
    in one batch, or, when the database refuses the batch (a value or constraint it rejects), each row probed in
    its own savepoint (rolled back) so that a bad row fails alone, then the others in one batch again (so their
    messages stay batched). Raises ChunkFailed (nothing committed) when the transaction itself cannot complete."""
    chunk = rows if isinstance(rows, CopyRows) else CopyRows.of(rows)
    if not chunk.rows:
        return ChunkOutcome()
    write = partial(_write, run_key=run_key, stream=stream, batch_messages=batch_messages)
    try:
        with engine.begin() as conn:
            try:
                with conn.begin_nested():
                    return write(conn, chunk.data, chunk.rows)
            except (IntegrityError, DataError):
                pass
            lines = chunk.lines()
            repeats, failures, outcome = chunk.rows - len(lines), [], ChunkOutcome()
            for _ in range(2):  # the good rows refused together again (changed meanwhile): probed again, once
                lines, refused = _probe(conn, lines, write)
                failures += refused
                try:
                    with conn.begin_nested():
                        outcome = write(conn, b"".join(lines), len(lines)) if lines else ChunkOutcome()
                    lines = []
                    break
                except (IntegrityError, DataError):
                    pass
            for line in lines:  # still refused together: each row in a savepoint of its own
                try:
                    with conn.begin_nested():
                        outcome.add(write(conn, line, 1))
                except (IntegrityError, DataError) as exc:
                    failures.append(_line_failure(line, exc))
            outcome.rows += repeats + len(failures)
            outcome.unchanged += repeats
            outcome.failures += failures
            return outcome
    except _TRANSIENT as exc:
        raise ChunkFailed(f"database fault, nothing of the chunk committed: {_first_line(exc)}", True) from None
    except DBAPIError as exc:
        transient = bool(exc.connection_invalidated)
        raise ChunkFailed(f"database refused the chunk: {_first_line(exc)}", transient) from None


def _probe(conn: Connection, lines: list[bytes], write) -> tuple[list[bytes], list[RowFailure]]:
    """Each line written in a savepoint rolled back: the lines the database takes, and the failures of the
    others."""
    good, refused = [], []
    for line in lines:
        savepoint = conn.begin_nested()
        try:
            write(conn, line, 1)
            good.append(line)
        except (IntegrityError, DataError) as exc:
            refused.append(_line_failure(line, exc))
        finally:
            savepoint.rollback()
    return good, refused


def _first_line(exc: DBAPIError) -> str:
    return str(exc.orig).splitlines()[0][:300] if exc.orig is not None else type(exc).__name__


_RUN_FIGURES = text("""
SELECT s.change, count(*) FROM product_integration_staging s WHERE s.source_run = :run_key GROUP BY s.change
""")
_RUN_PUBLISHED = text("""
SELECT coalesce(sum(message_count), 0) FROM outbox_batches WHERE source_run = :run_key AND published_at IS NOT NULL
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
    """The staged changes of `run_key` and their messages (the outbox rows its chunks queued hold exactly the
    messages of its staged changes; a scan of the staging table: for a cancelled run's report, not for every
    run)."""
    with engine.connect() as conn:
        rows = dict(conn.execute(_RUN_FIGURES, {"run_key": run_key}).all())
        published = int(conn.execute(_RUN_PUBLISHED, {"run_key": run_key}).scalar_one())
    created, updated = rows.get("created", 0), rows.get("updated", 0)
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
    """Rows per table of the product files, and the outbox's messages and unpublished messages (for reports and
    tests)."""
    tables = {"dealers": Dealer, "products": Product, "offers": ProductDealer, "staged": ProductIntegrationStaging}
    messages = func.coalesce(func.sum(OutboxBatch.message_count), 0)
    with engine.connect() as conn:
        counts = {name: conn.execute(select(func.count()).select_from(model)).scalar_one()
                  for name, model in tables.items()}
        counts["outbox"] = int(conn.execute(select(messages)).scalar_one())  # messages, not rows
        counts["unpublished"] = int(conn.execute(
            select(messages).where(OutboxBatch.published_at.is_(None))).scalar_one())
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
    """Delete the products, offers, staged records and outbox messages (and the dealers): tests, benchmarks.

    On PostgreSQL the tables are truncated: emptied by DELETE, their pages stay full of dead rows until a vacuum
    (an analyze in between records them as holding no row over all those pages), and after such a DELETE two
    loads had chunk statements run past the statement timeout, PostgreSQL busy all along (a plan made for
    empty tables, most likely; the plan itself was not caught)."""
    models = (OutboxBatch, ProductIntegrationStaging, ProductDealer, Product, *([Dealer] if dealers else []))
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("TRUNCATE " + ", ".join(model.__tablename__ for model in models))
            return
        for model in models:
            conn.execute(delete(model))
