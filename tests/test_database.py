"""The project database layer against real servers: the embedded PostgreSQL (started, reused from other
processes, stopped and restarted with its data), Alembic migrations, upserts on PostgreSQL and SQLite,
engines per process and pool limits."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, TimeoutError as PoolTimeoutError

from operations.infra.database import (
    SchemaNotCurrent,
    check_schema_current,
    current_revision,
    dispose_engines,
    get_engine,
    head_revision,
    migrate_to_head,
    redact_url,
    upsert_statement,
)
from operations.infra.embedded_postgres import (
    ensure_database,
    ensure_embedded_postgres,
    running_embedded_postgres,
    server_url,
    stop_embedded_postgres,
)
from operations.settings import PROJECT_ROOT, DatabaseSettings, Settings

# A table of this module only: its own MetaData, so it never reaches Base.metadata and the migrations.
TEST_METADATA = MetaData()
ITEMS = Table(
    "test_database_items",
    TEST_METADATA,
    Column("seller_id", Integer, primary_key=True),
    Column("sku", String(40), primary_key=True),
    Column("title", String(200), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=True),
)

ENSURE_IN_CHILD = (
    "import json, sys; from operations.infra.embedded_postgres import ensure_embedded_postgres as e; "
    "s = e(sys.argv[1]); print(json.dumps({'pid': s.pid, 'started': s.started}))"
)


def _ensure_in_processes(pg_dir, count: int) -> list[dict]:
    """`ensure_embedded_postgres` in `count` concurrent child processes, which then exit."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", ENSURE_IN_CHILD, str(pg_dir)], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True
        )
        for _ in range(count)
    ]
    results = []
    for child in children:
        out, _ = child.communicate(timeout=120)
        assert child.returncode == 0
        results.append(json.loads(out))
    return results


def _new_database(database_url: str, prefix: str) -> str:
    return ensure_database(database_url, f"{prefix}_{uuid.uuid4().hex[:8]}")


def test_embedded_postgres_outlives_its_starters_is_reused_and_keeps_data_across_restarts(tmp_path):
    pg_dir = tmp_path / "pg"
    try:
        started = time.perf_counter()
        racing = _ensure_in_processes(pg_dir, 2)  # first use: initdb + start, serialised by the folder lock
        cold = time.perf_counter() - started
        assert sorted(r["started"] for r in racing) == [False, True]
        assert racing[0]["pid"] == racing[1]["pid"]

        reused = ensure_embedded_postgres(pg_dir)  # its starter has exited: the server is detached
        assert not reused.started and reused.pid == racing[0]["pid"]
        assert running_embedded_postgres(pg_dir) == reused
        assert len(str(reused.socket_dir / ".s.PGSQL.5432")) < 100

        url = ensure_database(reused, "kept")
        assert ensure_database(reused, "kept") == url == server_url(reused.socket_dir, "kept")
        engine = get_engine(url)
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE notes (body text)"))
            conn.execute(text("INSERT INTO notes VALUES ('survives a restart')"))
        dispose_engines()

        assert stop_embedded_postgres(pg_dir)
        assert running_embedded_postgres(pg_dir) is None
        assert not stop_embedded_postgres(pg_dir)

        started = time.perf_counter()
        restarted = ensure_embedded_postgres(pg_dir)
        warm = time.perf_counter() - started
        assert restarted.started and restarted.pid != reused.pid
        with get_engine(url).connect() as conn:
            assert conn.execute(text("SELECT body FROM notes")).scalar_one() == "survives a restart"
        print(f"embedded postgres: cold start (initdb, 2 racing processes) {cold:.2f} s, warm start {warm:.2f} s")
        assert warm < 5
    finally:
        dispose_engines()
        stop_embedded_postgres(pg_dir)


def test_migrate_is_idempotent_quick_and_safe_from_racing_processes(database_url):
    head = head_revision()
    assert migrate_to_head(database_url) == head  # the session database is migrated already
    started = time.perf_counter()
    assert migrate_to_head(database_url) == head
    assert time.perf_counter() - started < 1.0

    fresh = _new_database(database_url, "migrate_race")
    code = "import sys; from operations.infra.database import migrate_to_head as m; print(m(sys.argv[1]))"
    children = [
        subprocess.Popen([sys.executable, "-c", code, fresh], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    assert [child.communicate(timeout=120)[0].strip() for child in children] == [head] * 3
    assert all(child.returncode == 0 for child in children)
    assert current_revision(get_engine(fresh)) == head


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_check_schema_current_names_the_revisions_and_the_fix(backend, database_url, tmp_path):
    url = _new_database(database_url, "unmigrated") if backend == "postgresql" else f"sqlite:///{tmp_path / 'u.db'}"
    engine = get_engine(url)
    with pytest.raises(SchemaNotCurrent, match=rf"none \(never migrated\).*expects {head_revision()}.*make up.*migrate"):
        check_schema_current(engine)
    migrate_to_head(url)
    check_schema_current(engine)
    with engine.begin() as conn:  # as if a newer checkout had migrated it
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(SchemaNotCurrent, match="9999, unknown to this code"):
        check_schema_current(engine)


@pytest.fixture(params=["postgresql", "sqlite"])
def items_engine(request, database_url):
    url = database_url if request.param == "postgresql" else request.getfixturevalue("sqlite_database_url")
    engine = get_engine(url)
    TEST_METADATA.drop_all(engine)
    TEST_METADATA.create_all(engine)
    yield engine
    TEST_METADATA.drop_all(engine)


def _rows(engine) -> dict[tuple[int, str], tuple[str, datetime]]:
    with engine.connect() as conn:
        result = conn.execute(select(ITEMS).order_by(ITEMS.c.seller_id, ITEMS.c.sku))
        return {(r.seller_id, r.sku): (r.title, r.updated_at.replace(tzinfo=timezone.utc)) for r in result}


def test_upsert_inserts_replays_nothing_and_takes_only_newer_rows(items_engine):
    t0 = datetime(2026, 1, 5, 12, 0, tzinfo=timezone.utc)
    rows = [
        {"seller_id": 1, "sku": "A-1", "title": "mug", "updated_at": t0},
        {"seller_id": 1, "sku": "B-2", "title": "plate", "updated_at": t0},
    ]

    def upsert(batch: list[dict]) -> int:
        statement = upsert_statement(items_engine, ITEMS, batch, ["seller_id", "sku"], ["title", "updated_at"],
                                     only_if_newer="updated_at")
        with items_engine.begin() as conn:
            return conn.execute(statement).rowcount

    assert upsert(rows) == 2
    first = _rows(items_engine)
    assert first == {(1, "A-1"): ("mug", t0), (1, "B-2"): ("plate", t0)}

    assert upsert(rows) == 0  # replay: nothing changes
    stale = [{**rows[0], "title": "old mug", "updated_at": t0 - timedelta(hours=1)}]
    assert upsert(stale) == 0
    assert _rows(items_engine) == first

    newer = [{**rows[0], "title": "blue mug", "updated_at": t0 + timedelta(minutes=1)}]
    assert upsert(newer) == 1
    assert _rows(items_engine)[(1, "A-1")] == ("blue mug", t0 + timedelta(minutes=1))
    assert _rows(items_engine)[(1, "B-2")] == first[(1, "B-2")]

    ignore = upsert_statement(items_engine.dialect.name, ITEMS, [{**rows[1], "title": "x"}], ["seller_id", "sku"], [])
    with items_engine.begin() as conn:  # no update columns: DO NOTHING
        conn.execute(ignore)
        assert conn.execute(select(func.count()).select_from(ITEMS)).scalar_one() == 2
    assert _rows(items_engine)[(1, "B-2")][0] == "plate"


def test_upsert_refuses_other_dialects_and_unknown_columns():
    row = [{"seller_id": 1, "sku": "A", "title": "t"}]
    with pytest.raises(ValueError, match="postgresql and sqlite, not 'mysql'"):
        upsert_statement("mysql", ITEMS, row, ["seller_id", "sku"], ["title"])
    with pytest.raises(ValueError, match=r"unknown columns \['price'\]"):
        upsert_statement("sqlite", ITEMS, row, ["seller_id", "sku"], ["price"])
    with pytest.raises(ValueError, match="no rows"):
        upsert_statement("postgresql", ITEMS, [], ["seller_id", "sku"], ["title"])


def _child_engine(url: str, parent_engine, out) -> None:
    engine = get_engine(url)
    with engine.connect() as conn:
        out.put((engine is not parent_engine, conn.execute(text("SELECT pg_backend_pid()")).scalar_one()))
    out.close()
    out.join_thread()
    # a forked copy of the multi-threaded test process: leave without running the parent's exit handlers
    os._exit(0)


def test_each_process_gets_its_own_engine_and_leaves_the_parents_connections_alone(database_url):
    engine = get_engine(database_url)
    assert get_engine(database_url) is engine
    with engine.connect() as conn:
        parent_backend = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_child_engine, args=(database_url, engine, out))
    child.start()
    own_engine, child_backend = out.get(timeout=60)
    child.join(30)
    assert child.exitcode == 0 and own_engine and child_backend != parent_backend
    with engine.connect() as conn:  # the parent's pooled connection was neither used nor closed by the child
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() == parent_backend


def test_pool_size_and_statement_timeout_come_from_settings(database_url):
    url = make_url(database_url).update_query_dict({"application_name": "pool-test"}).render_as_string(False)
    engine = get_engine(url, Settings(database=DatabaseSettings(pool_size=2, max_overflow=0, pool_timeout_seconds=0.3, statement_timeout_seconds=0.5)))
    first, second = engine.connect(), engine.connect()
    try:
        started = time.perf_counter()
        with pytest.raises(PoolTimeoutError):
            engine.connect()
        assert time.perf_counter() - started < 2
        with pytest.raises(OperationalError, match="statement timeout"):
            first.execute(text("SELECT pg_sleep(3)"))
    finally:
        first.close()
        second.close()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1


def test_sqlite_connections_use_wal_and_foreign_keys(sqlite_database_url):
    with get_engine(sqlite_database_url).connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar_one() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar_one() == 30_000


def test_on_sqlite_deleting_a_product_deletes_its_offers_and_their_integration_records(sqlite_database_url):
    """The cascades of the products' tables hold on a migrated SQLite file too (migrations 0008-0011)."""
    from operations.products.store import product_counts

    engine = get_engine(sqlite_database_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO dealers (id, code, name) VALUES (1, 'D1', 'Dealer one')")
        conn.exec_driver_sql("INSERT INTO products (id, sku, name, attributes) VALUES (1, 'SKU-1', 'Product', '{}')")
        conn.exec_driver_sql("INSERT INTO product_dealers (id, product_id, dealer_id, price, stock, fingerprint, "
                             "version, source_run, source_row) VALUES (1, 1, 1, 1, 1, 'f', 1, 'r', 2)")
        conn.exec_driver_sql("INSERT INTO product_integration_staging (product_dealer_id, version, change, "
                             "dealer_code, sku, name, price, stock, attributes, source_run, source_row) "
                             "VALUES (1, 1, 'created', 'D1', 'SKU-1', 'Product', 1, 1, '{}', 'r', 2)")
    before = product_counts(engine)
    assert (before["offers"], before["staged"]) == (1, 1)
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM products")
    after = product_counts(engine)
    assert (after["offers"], after["staged"]) == (0, 0)


def test_redact_url_hides_passwords():
    assert redact_url("postgresql+psycopg://ops:s3cr%40t@db.internal:5432/operations") == (
        "postgresql+psycopg://ops:***@db.internal:5432/operations"
    )
    assert redact_url("sqlite:///data/ops.db") == "sqlite:///data/ops.db"
    assert "s3cret" not in redact_url("not a url://ops:s3cret@host")
