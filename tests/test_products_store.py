"""Product chunks against the real PostgreSQL and Redis: upserts, row isolation, idempotent re-runs, and the
outbox published exactly once through crashes and concurrent publishers."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import uuid
from dataclasses import replace
from decimal import Decimal

import pytest
from sqlalchemy import text

from operations.infra.database import get_engine
from operations.infra.redis_stream import InjectedPublishFault, StreamMessage, StreamPublisher
from operations.cancellation import Cancelled, after
from operations.products.outbox import PublishCounts, outbox_backlog, publish_outbox, sweep_guards
from operations.products.reader import ProductRow
from operations.products.store import (
    DealerRow,
    clear_products_data,
    dealer_ids,
    offers,
    product_counts,
    store_chunk,
    upsert_dealers,
)
from operations.settings import PROJECT_ROOT


@pytest.fixture
def products_engine(database_url):
    engine = get_engine(database_url)
    clear_products_data(engine, dealers=True)
    upsert_dealers(engine, [("D1", "Dealer one"), ("D2", "Dealer two")])
    return engine


@pytest.fixture
def publisher(redis_client):
    stream = f"test.products.{uuid.uuid4().hex[:8]}"
    yield StreamPublisher(redis_client, stream)
    redis_client.delete(stream)


def _rows(engine, count: int, price_bump: dict[int, Decimal] | None = None, start_row: int = 2) -> list[DealerRow]:
    ids = dealer_ids(engine)
    rows = []
    for i in range(count):
        dealer = "D1" if i % 2 == 0 else "D2"
        price = Decimal("10.00") + i + (price_bump or {}).get(i, Decimal(0))
        rows.append(DealerRow(ids[dealer], ProductRow(start_row + i, dealer, f"SKU-{i // 2:05d}", f"Product {i // 2}",
                                                      price, i, {"brand": "Acme"})))
    return rows


def _outbox_keys(engine, where: str = "") -> list[str]:
    """The message keys of the outbox rows (`where` them), in order."""
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(f"SELECT message_keys FROM outbox_batches {where} ORDER BY id").scalars()
        return [key for keys in rows for key in keys.split(",")]


def _stream(publisher: StreamPublisher) -> list[dict]:
    entries = publisher.client.xrange(publisher.stream)
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


def test_a_chunk_stages_every_new_offer_and_publishes_each_message_once(products_engine, publisher):
    outcome = store_chunk(products_engine, _rows(products_engine, 40), "run-1", publisher.stream)
    assert (outcome.rows, outcome.created, outcome.updated, outcome.unchanged) == (40, 40, 0, 0)
    assert not outcome.failures
    counts = product_counts(products_engine)
    assert counts["products"] == 20 and counts["offers"] == 40  # one product per SKU, one offer per dealer
    assert counts["staged"] == counts["outbox"] == counts["unpublished"] == 40

    published = publish_outbox(products_engine, publisher, outcome.outbox_ids)
    assert (published.published, published.already_in_stream) == (40, 0)
    again = publish_outbox(products_engine, publisher)
    assert (again.published, again.already_in_stream) == (0, 0)
    messages = _stream(publisher)
    assert len(messages) == 40 and len({m["message_key"] for m in messages}) == 40
    payload = json.loads(messages[0]["payload"])
    key = messages[0]["message_key"]  # product-dealer:<offer id>:v<version>
    with products_engine.connect() as conn:
        staging_id = conn.exec_driver_sql("SELECT id FROM product_integration_staging WHERE product_dealer_id = "
                                          f"{payload['product_dealer_id']} AND version = 1").scalar_one()
    assert key == f"product-dealer:{payload['product_dealer_id']}:v1"
    assert payload == {"event": "product.created", "staging_id": staging_id,
                       "product_dealer_id": payload["product_dealer_id"], "version": 1, "dealer_code": "D1",
                       "sku": "SKU-00000", "name": "Product 0", "price": "10.00", "stock": 0,
                       "attributes": {"brand": "Acme"}, "source_run": "run-1", "source_row": 2}
    assert product_counts(products_engine)["unpublished"] == 0


def test_a_rerun_changes_nothing_and_a_changed_price_updates_and_publishes_just_that_offer(products_engine, publisher):
    rows = _rows(products_engine, 10)
    first = store_chunk(products_engine, rows, "run-1", publisher.stream)
    publish_outbox(products_engine, publisher, first.outbox_ids)

    again = store_chunk(products_engine, rows, "run-2", publisher.stream)
    assert (again.created, again.updated, again.unchanged, again.outbox_ids) == (0, 0, 10, [])

    changed = store_chunk(products_engine, _rows(products_engine, 10, {3: Decimal("1.50")}), "run-3", publisher.stream)
    assert (changed.created, changed.updated, changed.unchanged) == (0, 1, 9)
    publish_outbox(products_engine, publisher, changed.outbox_ids)
    stored = offers(products_engine, [("D2", "SKU-00001")])[("D2", "SKU-00001")]
    assert stored["price"] == Decimal("14.50") and stored["version"] == 2
    messages = _stream(publisher)
    assert len(messages) == 11
    update = json.loads(messages[-1]["payload"])
    assert (update["event"], update["sku"], update["price"], update["version"]) == (
        "product.updated", "SKU-00001", "14.50", 2)


def test_a_row_the_database_refuses_fails_alone_and_the_rest_commit(products_engine, publisher):
    rows = _rows(products_engine, 6)
    rows[2] = DealerRow(rows[2].dealer_id, replace(rows[2].row, price=Decimal("99999999999.00")))  # > NUMERIC(12,2)
    rows[4] = DealerRow(999_999, rows[4].row)  # a dealer id that no longer exists
    outcome = store_chunk(products_engine, rows, "run-1", publisher.stream)
    assert (outcome.rows, outcome.created) == (6, 4)
    by_row = {f.row_number: f for f in outcome.failures}
    assert set(by_row) == {rows[2].row.row_number, rows[4].row.row_number}
    assert by_row[rows[4].row.row_number].reason == "dealer removed"
    assert by_row[rows[2].row.row_number].reason == "refused by the database"
    assert "numeric" in by_row[rows[2].row.row_number].detail
    assert product_counts(products_engine)["offers"] == 4


def test_text_with_tabs_newlines_and_backslashes_is_stored_as_given_and_names_its_refused_row(
    products_engine, publisher
):
    """Chunk rows travel to the database as COPY text lines: every special character of that format round-trips."""
    ids = dealer_ids(products_engine)
    odd = "tab\there, line\nbreak, back\\slash\\t, cr\r, quote \" and \\n, ação 🚗 \u2028"
    rows = [DealerRow(ids["D1"], ProductRow(2, "D1", "SKU\\1", odd, Decimal("1.50"), 3, {"note": odd})),
            DealerRow(ids["D1"], ProductRow(3, "D1", "SKU\t2", "fine", Decimal("99999999999.00"), 1, {}))]
    outcome = store_chunk(products_engine, rows, "run-1", publisher.stream)
    assert (outcome.rows, outcome.created) == (2, 1)
    assert [(f.row_number, f.sku) for f in outcome.failures] == [(3, "SKU\t2")]
    publish_outbox(products_engine, publisher, outcome.outbox_ids)
    published = _stream(publisher)[0]["payload"]
    with products_engine.connect() as conn:  # the stream holds the outbox's payload text byte for byte
        assert published == json.loads(conn.exec_driver_sql("SELECT messages FROM outbox_batches").scalar_one())[0][4]
    payload = json.loads(published)
    assert (payload["sku"], payload["name"], payload["attributes"]) == ("SKU\\1", odd, {"note": odd})


_CRASH_AFTER_COMMIT = textwrap.dedent("""
    import os, sys
    from decimal import Decimal
    from operations.infra.database import get_engine
    from operations.products.reader import ProductRow
    from operations.products.store import DealerRow, dealer_ids, store_chunk

    url, stream = sys.argv[1], sys.argv[2]
    engine = get_engine(url)
    d1 = dealer_ids(engine)["D1"]
    rows = [DealerRow(d1, ProductRow(2 + i, "D1", f"CRASH-{i}", "x", Decimal(i), i, {})) for i in range(25)]
    outcome = store_chunk(engine, rows, "crashing-run", stream)
    assert outcome.created == 25
    os._exit(17)  # killed after the commit, before the publish
""")


def test_a_crash_between_commit_and_publish_is_published_exactly_once_by_the_next_run(
    products_engine, publisher, database_url
):
    done = subprocess.run([sys.executable, "-c", _CRASH_AFTER_COMMIT, database_url, publisher.stream],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 17, done.stderr
    assert product_counts(products_engine)["unpublished"] == 25 and publisher.length() == 0

    # the re-run: its own chunk changes nothing, its final publish sends what the crashed run left
    d1 = dealer_ids(products_engine)["D1"]
    rows = [DealerRow(d1, ProductRow(2 + i, "D1", f"CRASH-{i}", "x", Decimal(i), i, {})) for i in range(25)]
    rerun = store_chunk(products_engine, rows, "rerun", publisher.stream)
    assert (rerun.unchanged, rerun.outbox_ids) == (25, [])
    assert publish_outbox(products_engine, publisher).published == 25
    assert publish_outbox(products_engine, publisher).published == 0
    skus = sorted(json.loads(m["payload"])["sku"] for m in _stream(publisher))
    assert skus == sorted(f"CRASH-{i}" for i in range(25))


def test_a_crash_after_adding_to_the_stream_but_before_marking_the_outbox_adds_nothing_twice(
    products_engine, publisher
):
    outcome = store_chunk(products_engine, _rows(products_engine, 12), "run-1", publisher.stream)
    # the publisher got half of them into the stream, then died before the outbox row was marked
    keys = _outbox_keys(products_engine)[:6]
    publisher.publish([StreamMessage(k, {"message_key": k}) for k in keys])
    assert publisher.length() == 6

    counts = publish_outbox(products_engine, publisher, outcome.outbox_ids)
    assert (counts.published, counts.already_in_stream) == (6, 6)
    assert publisher.length() == 12
    assert len({m["message_key"] for m in _stream(publisher)}) == 12


def test_concurrent_publishers_and_injected_faults_never_duplicate_a_message(products_engine, publisher):
    store_chunk(products_engine, _rows(products_engine, 300), "run-1", publisher.stream, batch_messages=7)
    publisher.inject_faults(1)
    with pytest.raises(InjectedPublishFault):
        publish_outbox(products_engine, publisher)
    assert publisher.length() == 0 and product_counts(products_engine)["unpublished"] == 300

    errors = []

    def publish():
        try:
            publish_outbox(products_engine, publisher)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=publish) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    messages = _stream(publisher)
    assert len(messages) == 300 and len({m["message_key"] for m in messages}) == 300
    assert product_counts(products_engine)["unpublished"] == 0


class _CrashBeforeMark:
    """A publisher whose process "dies" right after adding a batch to the stream, before the outbox marks it."""

    def __init__(self, publisher: StreamPublisher):
        self.inner, self.stream = publisher, publisher.stream

    def publish(self, messages):
        self.inner.publish(messages)
        raise SystemExit("killed after XADD, before the mark")


def _keys_with_expiry(publisher: StreamPublisher) -> list[str]:
    client = publisher.client
    return [k.decode() for k in client.scan_iter(match=f"{{{publisher.stream}}}*") if client.ttl(k) > 0]


def test_a_message_added_but_not_marked_is_never_added_again_however_late_the_next_publish(products_engine, publisher):
    outcome = store_chunk(products_engine, _rows(products_engine, 30), "run-1", publisher.stream, batch_messages=20)
    with pytest.raises(SystemExit):
        publish_outbox(products_engine, _CrashBeforeMark(publisher), outcome.outbox_ids)
    assert publisher.length() == 20 and product_counts(products_engine)["unpublished"] == 30
    assert publisher.guards() == 20

    # the passage of time: whatever would expire by then is gone (a guard with a TTL would be); nothing here may
    assert _keys_with_expiry(publisher) == []
    assert publisher.client.ttl(publisher.guards_key) == -1  # no expiry on the guards

    counts = publish_outbox(products_engine, publisher)
    assert (counts.published, counts.already_in_stream) == (10, 20)
    keys = [m["message_key"] for m in _stream(publisher)]
    assert len(keys) == len(set(keys)) == 30
    assert product_counts(products_engine)["unpublished"] == 0
    assert publisher.guards() == 0  # every row marked: no guard left behind


def test_the_sweep_drops_only_the_guards_of_marked_messages(products_engine, publisher, monkeypatch):
    store_chunk(products_engine, _rows(products_engine, 10), "run-1", publisher.stream, batch_messages=4)
    in_flight = _outbox_keys(products_engine)[-3:]
    publisher.publish([StreamMessage(k, {"message_key": k}) for k in in_flight])  # added, not marked
    monkeypatch.setattr(publisher, "forget", lambda keys: 0)  # died after its commit, before dropping the guards
    publish_outbox(products_engine, publisher)  # marks all 10 in 3 rows (3 were in the stream already)
    monkeypatch.undo()
    assert publisher.guards() == 10 and product_counts(products_engine)["unpublished"] == 0

    store_chunk(products_engine, _rows(products_engine, 12), "run-2", publisher.stream)  # 2 new, unpublished
    unmarked = _outbox_keys(products_engine, "WHERE published_at IS NULL")
    publisher.publish([StreamMessage(k, {"message_key": k}) for k in unmarked])  # in flight: must stay guarded
    assert sweep_guards(products_engine, publisher) == 10
    assert publisher.guards() == 2
    assert publish_outbox(products_engine, publisher).already_in_stream == 2
    assert publisher.length() == 12 and publisher.guards() == 0


def test_a_publisher_stops_between_batches_once_asked_and_counts_what_it_published(products_engine, publisher):
    store_chunk(products_engine, _rows(products_engine, 25), "run-1", publisher.stream, batch_messages=10)
    counts = PublishCounts()
    with pytest.raises(Cancelled, match="before the next batch"):
        publish_outbox(products_engine, publisher, should_stop=after(2), counts=counts)
    assert counts.total == 20 == publisher.length()
    backlog = outbox_backlog(products_engine, publisher.stream)
    assert backlog.unpublished == 5 and backlog.oldest_minutes >= 0 and not backlog.stale(10)
    assert backlog.stale(-1)


def test_removing_an_offer_or_its_dealer_removes_its_integration_records(products_engine, publisher):
    """Integration records carry no foreign key (each is written from its offer's write in the same statement):
    the trigger of migration 0008 deletes them with their offer, as a cascading key would."""
    store_chunk(products_engine, _rows(products_engine, 8), "run-1", publisher.stream)
    store_chunk(products_engine, _rows(products_engine, 8, {0: Decimal("1.00")}), "run-2", publisher.stream)
    assert product_counts(products_engine)["staged"] == 9  # eight created, one updated
    with products_engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM product_dealers WHERE version = 2")  # the offer with two records
    assert product_counts(products_engine)["staged"] == 7
    with products_engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM dealers WHERE code = 'D2'")  # its offers cascade, then their records
    counts = product_counts(products_engine)
    assert (counts["offers"], counts["staged"]) == (3, 3)
    with products_engine.connect() as conn:
        assert conn.exec_driver_sql(
            "SELECT count(*) FROM product_integration_staging s "
            "WHERE NOT EXISTS (SELECT 1 FROM product_dealers d WHERE d.id = s.product_dealer_id)").scalar_one() == 0


def test_an_offer_must_name_an_existing_product_and_deleting_a_product_deletes_its_offers(products_engine, publisher):
    """Offers carry no foreign key on their product (migration 0011): a statement writing an offer of a missing
    product is refused as a foreign key violation naming the column, and deleting a product deletes its offers
    and their integration records."""
    from sqlalchemy.exc import IntegrityError

    store_chunk(products_engine, _rows(products_engine, 6), "run-1", publisher.stream)  # 3 products, 2 offers each
    with products_engine.connect() as conn:
        (product_id,) = conn.exec_driver_sql("SELECT id FROM products WHERE sku = 'SKU-00000'").one()
        (dealer_id,) = conn.exec_driver_sql("SELECT id FROM dealers WHERE code = 'D1'").one()
        missing = conn.exec_driver_sql("SELECT max(id) + 1000 FROM products").scalar_one()
    for statement, parameters in ((_INSERT_OFFER, {"product": missing, "dealer": dealer_id}),
                                  (text("UPDATE product_dealers SET product_id = :product WHERE product_id = :old"),
                                   {"product": missing, "old": product_id})):
        with pytest.raises(IntegrityError) as refused, products_engine.begin() as conn:
            conn.execute(statement, parameters)
        assert refused.value.orig.diag.column_name == "product_id" and str(missing) in str(refused.value.orig)
    assert product_counts(products_engine)["offers"] == 6
    with products_engine.begin() as conn:
        conn.exec_driver_sql(f"DELETE FROM products WHERE id = {product_id}")
    counts = product_counts(products_engine)
    assert (counts["products"], counts["offers"], counts["staged"]) == (2, 4, 4)
    assert product_id not in {row[0] for row in _offer_products(products_engine)}


# an offer written by hand, as another writer than a chunk would
_INSERT_OFFER = text("INSERT INTO product_dealers (product_id, dealer_id, price, stock, fingerprint, version, "
                     "source_run, source_row, created_at, updated_at) "
                     "VALUES (:product, :dealer, 1, 1, 'f', 1, 'r', 1, now(), now())")


def _offer_products(engine) -> list[tuple[int]]:
    with engine.connect() as conn:
        return list(conn.exec_driver_sql("SELECT product_id FROM product_dealers").all())


def test_a_product_deleted_while_a_chunk_writes_its_offer_waits_for_the_chunk_and_leaves_no_offer(products_engine,
                                                                                                   publisher):
    """The delete of a product waits for the transactions writing offers at that moment, then deletes their
    offers of it too: no offer is left naming a deleted product."""
    store_chunk(products_engine, _rows(products_engine, 2), "run-1", publisher.stream)  # SKU-00000 on D1 and D2
    with products_engine.connect() as conn:
        (product_id,) = conn.exec_driver_sql("SELECT id FROM products WHERE sku = 'SKU-00000'").one()
    upsert_dealers(products_engine, [("D3", "Dealer three")])
    chunk = products_engine.connect()
    try:  # a chunk's offer of the product, not committed yet
        chunk.execute(_INSERT_OFFER, {"product": product_id, "dealer": dealer_ids(products_engine)["D3"]})
        deleted = []

        def delete_product():
            with products_engine.begin() as conn:
                deleted.append(conn.exec_driver_sql(f"DELETE FROM products WHERE id = {product_id}").rowcount)

        deleting = threading.Thread(target=delete_product)
        deleting.start()
        deleting.join(timeout=1.0)
        assert deleting.is_alive()  # waiting for the chunk's transaction
        chunk.commit()
    finally:
        chunk.close()
    deleting.join(timeout=30)
    assert deleted == [1]
    assert _offer_products(products_engine) == []
    with products_engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM product_integration_staging").scalar_one() == 0


def test_a_dealer_deleted_while_a_chunk_waits_for_it_fails_its_rows_and_leaves_no_offer(products_engine, publisher):
    """Offers carry no foreign key on their dealer: a chunk locks the dealers it names, so a dealer deleted by a
    transaction that commits while the chunk waits fails that dealer's rows as "dealer removed", and the rest
    commit; no offer of the deleted dealer is left."""
    rows = _rows(products_engine, 10)  # D1 and D2, alternately
    with products_engine.connect() as deleting:
        deleting.exec_driver_sql("DELETE FROM dealers WHERE code = 'D2'")  # not committed yet
        outcome = []
        chunk = threading.Thread(target=lambda: outcome.append(store_chunk(products_engine, rows, "run-1",
                                                                           publisher.stream)))
        chunk.start()
        chunk.join(timeout=1.0)
        assert chunk.is_alive()  # waiting for the dealer's lock
        deleting.commit()
    chunk.join(timeout=30)
    (done,) = outcome
    assert (done.rows, done.created, done.unchanged, done.messages) == (10, 5, 0, 5)
    assert sorted(f.row_number for f in done.failures) == [r.row.row_number for r in rows if r.row.dealer_code == "D2"]
    assert {f.reason for f in done.failures} == {"dealer removed"}
    assert {code for code, _ in offers(products_engine)} == {"D1"}


def test_dealers_are_upserted_by_code(products_engine):
    assert upsert_dealers(products_engine, [("D1", "Dealer one"), ("D2", "Renamed"), ("D3", "New")]) == (1, 1)
    assert set(dealer_ids(products_engine)) == {"D1", "D2", "D3"}


def test_the_dealers_command_loads_a_file_and_refuses_a_bad_one_before_writing(products_engine, tmp_path, capsys):
    from deployments.dealers import main
    from operations.products.sample import write_dealers_file

    good = tmp_path / "dealers.csv"
    codes = write_dealers_file(good, 5)
    assert main(["load", str(good)]) == 0
    assert "5 dealer(s)" in capsys.readouterr().out
    assert set(codes) <= set(dealer_ids(products_engine))

    bad = tmp_path / "dealers-bad.csv"
    bad.write_text("codigo;nome\nX1;Loja X\nX2;Loja Y\nX1;Loja X de novo\n", encoding="utf-8")
    assert main(["load", str(bad)]) == 2
    assert "row 4" in capsys.readouterr().err and "X1" not in dealer_ids(products_engine)
    headless = tmp_path / "dealers-no-code.csv"
    headless.write_text("name\nLoja\n", encoding="utf-8")
    assert main(["load", str(headless)]) == 2
    assert "'code'" in capsys.readouterr().err


def test_a_runs_figures_are_read_back_from_its_staged_records_and_messages(products_engine, publisher):
    from operations.products.store import RunFigures, run_figures

    first = store_chunk(products_engine, _rows(products_engine, 10), "run-1", publisher.stream, batch_messages=4)
    publish_outbox(products_engine, publisher, first.outbox_ids[:1])  # one outbox row: 4 messages
    store_chunk(products_engine, _rows(products_engine, 10, {0: Decimal("1")}), "run-2", publisher.stream)
    assert run_figures(products_engine, "run-1") == RunFigures(created=10, updated=0, published=4, unpublished=6)
    assert run_figures(products_engine, "run-2") == RunFigures(created=0, updated=1, published=0, unpublished=1)
    assert run_figures(products_engine, "other") == RunFigures()


def test_the_outbox_migration_moves_per_message_rows_into_batches_that_publish_each_message_once(
    database_url, publisher
):
    """Revision 0009 on a database whose outbox holds one row per message: the published ones stay published,
    the unpublished ones (one of them already in the stream, its guard kept by a publisher that died before
    marking it) are published by the next publish, each once, keeping their message keys and outbox ids."""
    from alembic import command

    from operations.infra.database import alembic_config
    from operations.infra.embedded_postgres import ensure_database

    url = ensure_database(database_url, f"outbox_batches_{uuid.uuid4().hex[:8]}")
    engine = get_engine(url)
    command.upgrade(alembic_config(url), "0008")
    payloads = [{"event": "product.created", "sku": f"SKU-{i}", "source_run": "old-run"} for i in range(5)]
    with engine.begin() as conn:
        for i, payload in enumerate(payloads):
            conn.execute(text(
                "INSERT INTO outbox_messages (stream, message_key, message_type, payload, published_at, "
                "stream_entry_id) VALUES (:stream, :key, 'product.staged', CAST(:payload AS jsonb), "
                "CASE WHEN :published THEN now() END, CASE WHEN :published THEN '1-' || :n END)"),
                {"stream": publisher.stream, "key": f"product-dealer:{i}:v1", "payload": json.dumps(payload),
                 "published": i < 2, "n": str(i)})
        old_ids = [i for (i,) in conn.execute(text("SELECT id FROM outbox_messages ORDER BY id"))]
    publisher.publish([StreamMessage("product-dealer:2:v1", {"message_key": "product-dealer:2:v1"})])

    command.upgrade(alembic_config(url), "head")
    counts = product_counts(engine)
    assert (counts["outbox"], counts["unpublished"]) == (5, 3)
    assert run_figures_published(engine, "old-run") == 2
    published = publish_outbox(engine, publisher)
    assert (published.published, published.already_in_stream) == (2, 1)
    assert publish_outbox(engine, publisher).total == 0
    entries = _stream(publisher)
    assert [m["message_key"] for m in entries] == [f"product-dealer:{i}:v1" for i in (2, 3, 4)]
    assert [json.loads(m["payload"])["sku"] for m in entries[1:]] == ["SKU-3", "SKU-4"]
    assert [m["outbox_id"] for m in entries[1:]] == [str(i) for i in old_ids[3:]]
    assert product_counts(engine)["unpublished"] == 0 and publisher.guards() == 0
    engine.dispose()


def run_figures_published(engine, run_key: str) -> int:
    from operations.products.store import run_figures

    return run_figures(engine, run_key).published
