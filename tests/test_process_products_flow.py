"""The `process-products` flow on the session's real Prefect server, PostgreSQL and Redis: a mixed file
accounted for row by row, its failures spreadsheet, re-runs, header errors refused before any write, and a
Dask run with publish faults that still publishes each message once within the connection budget."""

from __future__ import annotations

import asyncio
import os
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text

from blocks.products_queue import ProductsQueue
from operations.infra.database import get_engine
from operations.products.report import read_failures_workbook
from operations.products.sample import dealer_codes, generate_products_file
from operations.products.store import clear_products_data, offers, product_counts, upsert_dealers
from operations.settings import get_settings
from run_checks import fetch_link, run_artifacts, run_texts

pytestmark = pytest.mark.slow

DEALERS = dealer_codes(6)


@pytest.fixture
def products(database_url, redis_url, settings):
    """Empty product tables with 6 dealers, and a queue block on a stream of this test's own."""
    engine = get_engine(database_url)
    clear_products_data(engine, dealers=True)
    upsert_dealers(engine, [(code, f"Dealer {code}") for code in DEALERS])
    name = f"queue-{uuid.uuid4().hex[:8]}"
    queue = ProductsQueue.from_url(redis_url, stream=f"test.products.{name}")
    queue.save(name, overwrite=True)
    yield engine, queue, name
    queue.get_client().delete(queue.stream)


def _stream_keys(queue: ProductsQueue) -> list[str]:
    return [fields[b"message_key"].decode() for _, fields in queue.get_client().xrange(queue.stream)]


def _run(**parameters):
    from flows.process_products import process_products

    state = asyncio.run(process_products(**parameters, return_state=True))  # an async flow
    return state, (state.result() if state.is_completed() else None)


def test_a_mixed_file_is_accounted_for_row_by_row_and_reruns_change_only_what_changed(products, tmp_path):
    engine, queue, block = products
    source = tmp_path / "products.xlsx"
    sample = generate_products_file(source, 3_000, DEALERS, bad_fraction=0.1, seed=7)

    state, result = _run(file_path=str(source), queue_block=block, run_key="mixed-1")
    assert state.is_completed(), state.message
    assert (result["rows"], result["successes"], result["failures"], result["unaccounted"]) == (
        sample.rows, sample.good_rows, sample.rows - sample.good_rows, 0)
    assert result["created"] == sample.good_rows and result["chunks"] >= 2
    assert result["failures_by_reason"] == sample.bad_by_reason
    assert result["messages_published"] == sample.good_rows
    keys = _stream_keys(queue)
    assert len(keys) == len(set(keys)) == sample.good_rows

    # the failures spreadsheet, as the link artifact points at it, read back
    artifacts = {a.key: a for a in run_artifacts(state.state_details.flow_run_id)}
    assert {"products-failures", "products-failure-reasons", "products-summary", "products-progress"} <= set(artifacts)
    path = fetch_link(artifacts["products-failures"].data, tmp_path / "downloads")  # over HTTP, as clicked
    assert path.read_bytes() == Path(result["failures_file"]).read_bytes()
    failures = read_failures_workbook(path)
    assert len(failures) == result["failures"]
    assert [f.row_number for f in failures] == sorted(f.row_number for f in failures)
    by_reason: dict[str, int] = {}
    for failure in failures:
        by_reason[failure.reason] = by_reason.get(failure.reason, 0) + 1
        assert failure.row_number >= 2 and failure.column
    assert by_reason == sample.bad_by_reason
    reasons_table = artifacts["products-failure-reasons"].data
    for reason, count in sample.bad_by_reason.items():
        assert reason in reasons_table and str(count) in reasons_table
    assert "Every row is accounted for" in artifacts["products-summary"].data
    assert artifacts["products-progress"].data == 100.0

    # the same file again: nothing changes, nothing is published
    state, again = _run(file_path=str(source), queue_block=block, run_key="mixed-2")
    assert state.is_completed(), state.message
    assert (again["created"], again["updated"], again["unchanged"]) == (0, 0, sample.good_rows)
    assert again["messages_published"] == 0 and len(_stream_keys(queue)) == sample.good_rows
    assert again["same_as_run"] == "mixed-1" and again["failures_by_reason"] == sample.bad_by_reason
    assert read_failures_workbook(Path(again["failures_file"])) == failures

    # changed prices: just those offers updated, one message each
    repriced = tmp_path / "products-repriced.xlsx"
    generate_products_file(repriced, 3_000, DEALERS, bad_fraction=0.1, seed=7, reprice_every=10)
    before = offers(engine)
    state, third = _run(file_path=str(repriced), queue_block=block, run_key="mixed-3")
    assert state.is_completed(), state.message
    after = offers(engine)
    changed = {key for key in after if after[key]["price"] != before[key]["price"]}
    assert third["updated"] == len(changed) > 0 and third["created"] == 0
    assert all(after[key]["version"] == 2 for key in changed)
    assert third["messages_published"] == len(changed)
    assert len(_stream_keys(queue)) == sample.good_rows + len(changed)

    # the first file again: the catalog moved since its record, so it is read and loaded again
    state, fourth = _run(file_path=str(source), queue_block=block, run_key="mixed-4")
    assert state.is_completed(), state.message
    assert fourth["same_as_run"] == "" and (fourth["updated"], fourth["created"]) == (len(changed), 0)
    assert fourth["unchanged"] == sample.good_rows - len(changed)


def test_a_bad_header_or_a_missing_file_fails_the_run_before_anything_is_written(products, tmp_path):
    engine, _, block = products
    bad = tmp_path / "bad-header.csv"
    bad.write_text("dealer_code;sku;nome;preço unitário errado;estoque\nD0001;A;x;1,00;2\n", encoding="utf-8")
    state, _ = _run(file_path=str(bad), queue_block=block)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "'price'" in message and "preço unitário errado" in message
    _assert_one_clear_line(state, "preço unitário errado")
    state, _ = _run(file_path=str(tmp_path / "missing.csv"), queue_block=block)
    assert state.is_failed() and "does not exist" in str(state.result(raise_on_failure=False))
    _assert_one_clear_line(state, "does not exist")
    assert product_counts(engine)["offers"] == 0


def _assert_one_clear_line(state, message: str) -> None:
    """An expected user error: the run's log holds its message, and no traceback."""
    texts = run_texts(state.state_details.flow_run_id)
    assert any(message in t for t in texts), texts
    assert not [t for t in texts if "Traceback" in t], texts


def test_a_file_without_failures_links_no_failures_file(products, tmp_path):
    _, _, block = products
    source = tmp_path / "clean.csv"
    sample = generate_products_file(source, 300, DEALERS, bad_fraction=0.0, seed=5)
    state, result = _run(file_path=str(source), queue_block=block)
    assert state.is_completed(), state.message
    assert (result["successes"], result["failures"]) == (sample.rows, 0)
    artifacts = {a.key: a for a in run_artifacts(state.state_details.flow_run_id)}
    assert "products-failures" not in artifacts
    assert "No row failed." in artifacts["products-summary"].data
    assert "failures.xlsx" not in artifacts["products-summary"].data


def test_on_dask_publish_faults_still_publish_each_message_once_within_the_connection_budget(
    products, tmp_path, monkeypatch, database_url
):
    engine, queue, block = products
    monkeypatch.setenv("PRODUCTS_IN_PROCESS_MAX_ROWS", "500")  # Dask even for this small file
    monkeypatch.setenv("DATABASE_POOL_SIZE", "3")  # the flow's connection + one per worker process
    monkeypatch.setenv("DASK_N_WORKERS", "2")
    monkeypatch.setenv("DASK_THREADS_PER_WORKER", "3")  # more chunks in flight than connections
    get_settings.cache_clear()
    source = tmp_path / "products.csv"
    sample = generate_products_file(source, 4_000, DEALERS, bad_fraction=0.05, seed=11)
    queue.publisher().inject_faults(3)  # three chunks fail to publish after their commit

    peak, ready, stop = [0], threading.Event(), threading.Event()

    def sample_connections():
        """The most chunk-engine connections open at once, of other processes than this one: those this
        process's earlier tests left idle in its pool are there before the run and not counted. PostgreSQL
        reads pg_stat_activity once per transaction, so each sample is a transaction of its own."""
        watcher = get_engine(database_url, pool_size=1, purpose="test-watcher")
        query = text("SELECT pid FROM pg_stat_activity WHERE application_name = 'operations-products'")
        with watcher.connect() as conn:
            before = set(conn.execute(query).scalars())
            conn.rollback()
            ready.set()
            while not stop.is_set():
                peak[0] = max(peak[0], len(set(conn.execute(query).scalars()) - before))
                conn.rollback()
                time.sleep(0.02)

    watcher = threading.Thread(target=sample_connections, daemon=True)
    watcher.start()
    assert ready.wait(30), "the connection sampler did not start"
    try:
        state, result = _run(file_path=str(source), queue_block=block, run_key="dask-1", chunk_rows=400)
    finally:
        stop.set()
        watcher.join()
    assert state.is_completed(), state.message
    assert result["successes"] == sample.good_rows and result["unaccounted"] == 0 and result["chunks"] >= 9
    keys = _stream_keys(queue)
    assert len(keys) == len(set(keys)) == sample.good_rows == product_counts(engine)["staged"]
    assert product_counts(engine)["unpublished"] == 0
    assert 1 <= peak[0] <= 2, f"chunk processes held {peak[0]} connections; the budget leaves them 2"


def test_a_chunk_that_keeps_failing_fails_the_run_naming_its_rows_and_a_rerun_completes_it(
    products, tmp_path, monkeypatch
):
    import tasks.products as product_tasks
    from operations.products.store import ChunkFailed, store_chunk

    engine, queue, block = products
    source = tmp_path / "products.csv"
    sample = generate_products_file(source, 1_200, DEALERS, bad_fraction=0.0, seed=3)

    def refuse_second_chunk(engine, rows, run_key, stream):
        if rows.first_row > 400:  # the chunk file's rows, as COPY lines
            raise ChunkFailed("database refused the chunk: injected", transient=False)
        return store_chunk(engine, rows, run_key, stream)

    monkeypatch.setattr(product_tasks, "store_chunk", refuse_second_chunk)
    state, _ = _run(file_path=str(source), queue_block=block, chunk_rows=400)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "800 of 1,200 rows unaccounted for" in message and "rows 402-801" in message, message
    assert product_counts(engine)["offers"] == 400

    monkeypatch.undo()
    get_settings.cache_clear()
    state, result = _run(file_path=str(source), queue_block=block, chunk_rows=400)
    assert state.is_completed(), state.message
    assert (result["created"], result["unchanged"]) == (sample.good_rows - 400, 400)
    assert len(_stream_keys(queue)) == sample.good_rows


def _running_flow_run_id(run_key: str, timeout: float = 60, states: tuple[str, ...] = ("RUNNING",)):
    """The id of the process-products flow run of `run_key` in one of `states`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType(s) for s in states]))),
                sort=FlowRunSort.START_TIME_DESC, limit=20)
            for run in runs:
                if run.parameters.get("run_key") == run_key:
                    return run.id
            time.sleep(0.2)
    raise AssertionError(f"no running flow run of {run_key}")


def _flow_log_lines(flow_run_id) -> list[str]:
    """The flow run's own log lines (not its tasks'), oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                limit=200, sort=LogSort.TIMESTAMP_ASC)
    return [log.message for log in logs if log.task_run_id is None]


def _chunk_starts(flow_run_id) -> list[float]:
    """When each chunk task run of the flow run that did not end Cancelled entered Running (epoch seconds)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted(r.start_time.timestamp() for r in runs
                  if r.name.startswith("rows-") and r.start_time and r.state_type != StateType.CANCELLED)


def _cancel_after_chunks(engine, run_key: str, chunks_loaded: int, chunk_rows: int, cancelled_at: list) -> threading.Thread:
    """A thread that sets the run CANCELLING through the API once `chunks_loaded` chunks are in the database."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    def cancel():
        flow_run_id = _running_flow_run_id(run_key)
        while product_counts(engine)["offers"] < chunks_loaded * chunk_rows:
            time.sleep(0.05)
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(flow_run_id, Cancelling(message="cancelled by the test"), force=True)
        cancelled_at.append(time.time())

    thread = threading.Thread(target=cancel, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("runner", ["threads", pytest.param("dask", marks=pytest.mark.skipif(
    not os.environ.get("PRODUCTS_CANCEL_ON_DASK"), reason="~25 s; the SIGTERM test below covers Dask"))])
def test_a_run_cancelled_while_it_loads_starts_no_chunk_after_and_reports_what_it_did(
    products, tmp_path, monkeypatch, runner
):
    """A run set CANCELLING through the API, as the UI does. ~5 s on threads; on Dask (a LocalCluster of its
    own, which the cancel closes) ~25 s, so only with PRODUCTS_CANCEL_ON_DASK set."""
    import psutil

    engine, queue, block = products
    if runner == "dask":
        monkeypatch.setenv("PRODUCTS_IN_PROCESS_MAX_ROWS", "500")
        monkeypatch.setenv("DASK_N_WORKERS", "2")
        monkeypatch.setenv("DASK_THREADS_PER_WORKER", "1")
        rows, chunk_rows = 40_000, 400
    else:
        import tasks.products as product_tasks
        from operations.products.store import store_chunk

        def slow_store_chunk(*args):
            time.sleep(0.1)
            return store_chunk(*args)

        monkeypatch.setattr(product_tasks, "store_chunk", slow_store_chunk)
        rows, chunk_rows = 6_000, 100
    get_settings.cache_clear()
    source = tmp_path / "products.csv"
    generate_products_file(source, rows, DEALERS, bad_fraction=0.0, seed=13)
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    run_key, cancelled_at = f"cancel-{runner}-{uuid.uuid4().hex[:6]}", []
    canceller = _cancel_after_chunks(engine, run_key, 2, chunk_rows, cancelled_at)

    state, _ = _run(file_path=str(source), queue_block=block, run_key=run_key, chunk_rows=chunk_rows)
    canceller.join(5)
    assert state.is_cancelled(), (state.type, state.message)
    starts = _chunk_starts(state.state_details.flow_run_id)
    late = max(starts) - cancelled_at[0]
    print(f"{runner}: last chunk started {late:.2f} s after the cancel; {len(starts)} chunk(s) started")
    assert late < 10, f"a chunk started {late:.1f} s after the cancel"

    counts = product_counts(engine)
    assert 0 < counts["offers"] < rows, "the cancel stopped the load part-way"
    message = state.message
    assert f"{counts['offers']:,} row(s) written" in message, message
    published = publisher_length = queue.publisher().length()
    assert f"{published:,} message(s) published, {counts['unpublished']:,} deferred to publish-outbox" in message
    assert publisher_length + counts["unpublished"] == counts["outbox"] == counts["offers"]
    artifacts = {a.key: a for a in run_artifacts(state.state_details.flow_run_id)}
    assert "**Cancelled**" in artifacts["products-summary"].data
    assert f"{counts['offers']:,} row(s) written" in artifacts["products-summary"].data
    last = _flow_log_lines(state.state_details.flow_run_id)[-1]
    assert "cancelled" in last and f"{counts['offers']:,} row(s) written" in last, last
    assert not (get_settings().stack.output_dir / "products" / run_key / "chunks").exists()
    left = [" ".join(p.cmdline()[:6]) for p in psutil.Process().children(recursive=True)
            if p.pid not in children and p.is_running() and "resource_tracker" not in " ".join(p.cmdline())]
    assert not left, f"processes left by the cancelled run (its Dask workers?): {left}"


def test_a_chunk_attempt_that_fails_after_its_commit_is_counted_once_with_what_it_did(products, tmp_path, monkeypatch):
    """The retry finds the chunk committed (the attempts' tally): the run reports the rows it created and the
    messages it published, not "unchanged"."""
    import tasks.products as product_tasks
    from operations.products.outbox import publish_outbox

    engine, queue, block = products
    source = tmp_path / "products.csv"
    sample = generate_products_file(source, 900, DEALERS, bad_fraction=0.0, seed=17)
    faults = [RuntimeError("lost after the commit")]

    def publish_after_a_fault(*args, **kwargs):
        if faults:
            raise faults.pop()
        return publish_outbox(*args, **kwargs)

    monkeypatch.setattr(product_tasks, "publish_outbox", publish_after_a_fault)
    state, result = _run(file_path=str(source), queue_block=block, chunk_rows=300)
    assert state.is_completed(), state.message
    assert not faults, "the fault was injected"
    assert (result["created"], result["unchanged"]) == (sample.good_rows, 0)
    assert result["messages_published"] == sample.good_rows == len(_stream_keys(queue))


def test_the_final_publish_counts_the_batches_of_every_attempt(products, monkeypatch, database_url):
    """A publish attempt that commits a batch and then fails is retried; the task returns all batches."""
    from prefect import flow

    from operations.products.store import store_chunk
    from tasks.products import publish_pending_messages
    from tasks.retries import with_retries
    from test_products_store import _rows

    engine, queue, _ = products
    upsert_dealers(engine, [("D1", "Dealer one"), ("D2", "Dealer two")])
    store_chunk(engine, _rows(engine, 4_100), "run-1", queue.stream)
    real = ProductsQueue.publisher
    calls = []

    def second_publish_fails(self):
        publisher = real(self)
        publish = publisher.publish

        def flaky(messages):
            calls.append(len(messages))
            if len(calls) == 2:
                raise ConnectionError("Redis went away after the first batch")
            return publish(messages)

        publisher.publish = flaky
        return publisher

    monkeypatch.setattr(ProductsQueue, "publisher", second_publish_fails)

    @flow
    def final_publish():
        return with_retries(publish_pending_messages, 2, [0])(database_url, queue)

    counts = final_publish()
    assert calls[:2] == [2000, 2000] and len(calls) == 4
    assert counts.total == 4_100 == queue.publisher().length()
    assert product_counts(engine)["unpublished"] == 0


def test_a_loaded_file_whose_failures_report_cannot_be_written_says_its_rows_are_loaded(products, tmp_path):
    engine, queue, block = products
    source = tmp_path / "products.csv"
    sample = generate_products_file(source, 600, DEALERS, bad_fraction=0.1, seed=19)
    run_key = f"report-{uuid.uuid4().hex[:6]}"
    blocker = get_settings().stack.output_dir / "products" / run_key / f"{source.stem}-failures.xlsx"
    blocker.mkdir(parents=True)  # the report's path is taken: writing it fails with an OSError
    state, _ = _run(file_path=str(source), queue_block=block, run_key=run_key)
    assert state.is_failed()
    assert "every row is loaded" in state.message and "the failures report could not be written" in state.message
    assert f"{sample.good_rows:,} message(s) published" in state.message, state.message
    assert product_counts(engine)["offers"] == sample.good_rows == len(_stream_keys(queue))
    artifacts = {a.key: a for a in run_artifacts(state.state_details.flow_run_id)}
    assert "The failures report could not be written" in artifacts["products-summary"].data
    assert "products-failures" not in artifacts
    assert "Traceback" not in "".join(_flow_log_lines(state.state_details.flow_run_id))


def test_cleanup_runs_removes_the_chunk_files_products_runs_left_after_the_retention(settings, redis_url):
    import os

    from blocks.redis_game_counter import RedisGameCounter
    from flows.cleanup_runs import cleanup_runs

    name = f"retention-{uuid.uuid4().hex[:6]}"
    RedisGameCounter.from_url(redis_url, key_prefix=name).save(name, overwrite=True)
    runs = settings.stack.output_dir / "products"
    old, recent = runs / "killed-run" / "chunks", runs / "running-run" / "chunks"
    for folder in (old, recent):
        folder.mkdir(parents=True)
        (folder / "chunk-00000.jsonl").write_text("x" * 1000)
    (runs / "killed-run" / "read-failures.jsonl").write_text("")
    month_ago = time.time() - 31 * 86_400
    os.utime(old / "chunk-00000.jsonl", (month_ago, month_ago))
    os.utime(old, (month_ago, month_ago))

    dry = cleanup_runs(retention_days=30, dry_run=True, counter_block=name)
    assert dry["product_chunk_folders"] == ["killed-run"] and old.exists()
    done = cleanup_runs(retention_days=30, counter_block=name)
    assert (done["product_chunk_folders"], done["product_chunk_bytes"]) == (["killed-run"], 1000)
    assert not old.exists() and recent.exists() and (runs / "killed-run" / "read-failures.jsonl").exists()


def test_the_relay_publishes_what_runs_left_and_says_when_messages_stay_unpublished(products, monkeypatch):
    import flows.publish_outbox as relay
    import tasks.products as product_tasks
    from operations.events import OUTBOX_STALE
    from operations.products.store import store_chunk
    from test_products_store import _rows

    engine, queue, block = products
    upsert_dealers(engine, [("D1", "Dealer one"), ("D2", "Dealer two")])
    store_chunk(engine, _rows(engine, 30), "killed-run", queue.stream)  # committed, never published
    report = relay.publish_outbox(queue_block=block)
    assert (report["published"], report["unpublished"], report["stale"]) == (30, 0, False)
    assert len(_stream_keys(queue)) == 30 and queue.publisher().guards() == 0

    # Redis refuses every publish while messages wait for 20 minutes: the run fails and says they are stale
    store_chunk(engine, _rows(engine, 34), "cancelled-run", queue.stream)
    with engine.begin() as conn:
        conn.execute(text("UPDATE outbox_batches SET created_at = now() - interval '20 minutes' "
                          "WHERE published_at IS NULL"))
    queue.publisher().inject_faults(2)
    monkeypatch.setattr(relay, "RETRY_DELAY_SECONDS", 0)
    emitted = []
    monkeypatch.setattr(product_tasks, "emit", lambda event, subject, **kw: emitted.append((event, subject, kw)))
    state = relay.publish_outbox(queue_block=block, return_state=True)
    assert state.is_failed() and "4 unpublished (oldest 20" in state.message, state.message
    [(event, subject, details)] = emitted
    assert (event, subject, details["payload"]["unpublished"]) == (OUTBOX_STALE, queue.stream, 4)
    assert details["payload"]["oldest_minutes"] >= 20
    artifacts = {a.key: a for a in run_artifacts(state.state_details.flow_run_id)}
    assert "**Stale**" in artifacts["publish-outbox-report"].data

    assert relay.publish_outbox(queue_block=block)["published"] == 4
    keys = _stream_keys(queue)
    assert len(keys) == len(set(keys)) == 34


_RUN_IN_A_PROCESS = textwrap.dedent("""
    import asyncio
    import sys
    from flows.process_products import process_products

    file_path, block, run_key = sys.argv[1:4]
    state = asyncio.run(process_products(file_path=file_path, queue_block=block, run_key=run_key, chunk_rows=400,
                                         return_state=True))
    print(state.type.value, state.message, flush=True)
""")


def test_a_sigterm_to_the_flow_process_on_dask_stops_it_with_its_summary(products, tmp_path):
    """What the worker does on a cancel (SIGTERM, SIGKILL 30 s later), to a run on a LocalCluster of its own:
    no chunk starts after it, the cluster closes, the run ends Cancelled with its summary. ~12 s: a process and
    a LocalCluster of its own (the cancel closes it), as a worker's flow run has."""
    import signal
    import subprocess
    import sys

    from operations.settings import PROJECT_ROOT

    engine, queue, block = products
    source = tmp_path / "products.csv"
    generate_products_file(source, 40_000, DEALERS, bad_fraction=0.0, seed=23)  # 100 chunks, signalled after 2
    run_key = f"sigterm-{uuid.uuid4().hex[:6]}"
    # one worker process, as the stack's worker runs its flow runs (STACK_WORKER_SETTINGS in conftest.py)
    env = dict(os.environ, PRODUCTS_IN_PROCESS_MAX_ROWS="500", DASK_N_WORKERS="1", DASK_THREADS_PER_WORKER="1")
    process = subprocess.Popen([sys.executable, "-c", _RUN_IN_A_PROCESS, str(source), block, run_key],
                               cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        deadline = time.monotonic() + 300  # ~10 s on a quiet machine; minutes when other work shares the cores
        while product_counts(engine)["offers"] < 800:
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before the signal"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        signalled = time.time()
        output, _ = process.communicate(timeout=30)  # the worker's SIGKILL would come 30 s after its SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
    ended = time.time() - signalled
    assert output.splitlines()[-1].startswith("CANCELLED"), output[-3000:]
    flow_run_id = _running_flow_run_id(run_key, states=("CANCELLED",))
    starts = _chunk_starts(flow_run_id)
    late = max(starts) - signalled
    print(f"SIGTERM on Dask: last chunk started {late:.2f} s after it, the process ended {ended:.1f} s after it")
    assert late < 10, f"a chunk started {late:.1f} s after the SIGTERM"
    counts = product_counts(engine)
    assert 0 < counts["offers"] < 40_000
    artifacts = {a.key: a for a in run_artifacts(flow_run_id)}
    assert f"{counts['offers']:,} row(s) written" in artifacts["products-summary"].data
