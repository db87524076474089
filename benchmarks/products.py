"""Product-file figures for `make bench`, each beside a baseline measured in the same run.

A generated .xlsx of ROWS rows (BAD_FRACTION bad rows, 50 dealers), loaded from empty tables:
- the reading baseline: openpyxl read-only reading the same file row by row, and beside it the project's
  reader (calamine) reading it raw, then reading and checking every row;
- `process-products` end to end (flow start to artifacts) on the flow's thread pool (the default for files of
  up to PRODUCTS_IN_PROCESS_MAX_ROWS rows) and on Dask process workers, with the peak memory of the run's
  processes and the CPU seconds of each process involved (the flow's process and its children, PostgreSQL,
  Redis, the Prefect server). Targets: the default runner <= 0.5 x the reading baseline (stretch 0.35 x), peak
  memory < 1 GiB on both runners;
- the same file again (nothing changes, nothing is published). Target: <= 0.25 x the reading baseline; then
  once more without the record of the earlier run (operations/products/loaded.py), so read and compared;
- the publish-outbox relay draining a whole run's messages left unpublished, against the domain's
  publish_outbox called directly on the same backlog;
- baseline: the old system's way on one process, row by row with one transaction per row (dealer looked up
  per row, product, offer, staging and outbox written, committed, then published), on the first
  BASELINE_ROWS rows of the same file. Target: end to end >= 3 x the baseline's rows/s, memory < 1 GiB.
`bench_large_products` (`--products-large-rows 1000000`, off by default): a larger file on each runner, its
time, rows/s and peak memory, beside the project's reader alone on it.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from itertools import islice
from pathlib import Path

from benchmarks.memory import PeakMemory

BENCH_QUEUE_BLOCK = "products-bench"
DEALERS = 50
DEFAULT_RUNNER = "threads"  # the runner process-products picks for a file of these sizes (PRODUCTS_IN_PROCESS_MAX_ROWS)
_RUNNERS = (("threads", "the flow's thread pool (default)"), ("dask", "Dask process workers"))


def _setup() -> tuple:
    """The stack (Prefect server, Redis), a database of the bench's own with DEALERS dealers, the queue block."""
    from deployments.stack import start_local_stack
    from operations.infra.database import get_engine, migrate_to_head
    from operations.infra.embedded_postgres import ensure_database, running_embedded_postgres
    from operations.products.sample import dealer_codes
    from operations.products.store import clear_products_data, upsert_dealers
    from operations.settings import get_settings

    settings = get_settings()
    stack = start_local_stack(settings)  # the Prefect server and Redis; the bench gets a database of its own
    from blocks.products_queue import ProductsQueue  # imports Prefect: only once the API URL is set

    if settings.database.url:
        url = settings.database.url.get_secret_value()
    else:
        url = ensure_database(running_embedded_postgres(settings.stack.postgres_dir), "products_bench")  # the stack's
    migrate_to_head(url)
    os.environ["DATABASE_URL"] = url
    engine = get_engine(url)
    clear_products_data(engine, dealers=True)
    codes = dealer_codes(DEALERS)
    upsert_dealers(engine, [(code, f"Dealer {code}") for code in codes])
    queue = ProductsQueue.from_url(stack.redis_url, stream="bench.products.staged")
    queue.save(BENCH_QUEUE_BLOCK, overwrite=True)
    return engine, queue, codes


def _sample(rows: int, codes: list[str], bad_fraction: float) -> tuple[Path, object, float]:
    from operations.products.sample import generate_products_file

    source = Path(tempfile.mkdtemp(prefix="products-bench-")) / f"products-{rows}.xlsx"
    started = time.perf_counter()
    sample = generate_products_file(source, rows, codes, bad_fraction=bad_fraction, seed=5)
    return source, sample, time.perf_counter() - started


def _forget_loaded_files() -> None:
    """Remove the records of files already loaded: the next run of the same file reads and compares it all."""
    import shutil

    from operations.products.loaded import LOADED_DIR
    from operations.settings import get_settings

    shutil.rmtree(get_settings().stack.output_dir / "products" / LOADED_DIR, ignore_errors=True)


def bench_products(rows: int, bad_fraction: float, baseline_rows: int) -> dict:
    engine, queue, codes = _setup()
    source, sample, generate_seconds = _sample(rows, codes, bad_fraction)
    figures: dict = {"rows": sample.rows, "good_rows": sample.good_rows, "generate_seconds": generate_seconds}
    try:
        figures["openpyxl"] = _openpyxl_read(source)
        figures["raw"] = _raw_read(source)
        figures["read"] = _read_only(source)
        for runner, _ in _RUNNERS:
            _clear(engine, queue)
            figures[runner] = _flow(source, runner, sample.rows)
        figures["rerun"] = _flow(source, DEFAULT_RUNNER, sample.rows)
        _forget_loaded_files()
        figures["rerun_full"] = _flow(source, DEFAULT_RUNNER, sample.rows)
        figures["relay"] = _relay(engine, queue)
        _clear(engine, queue)
        figures["baseline"] = _row_by_row(source, engine, queue, baseline_rows)
    finally:
        _clear(engine, queue)
        source.unlink(missing_ok=True)
    return figures


def bench_large_products(rows: int, bad_fraction: float) -> dict:
    """One file of `rows` rows: the project's reader alone on it (time, this process's peak memory), then
    process-products on each runner from empty tables, then the same file again on the default runner (time,
    peak memory of the run's processes). No openpyxl baseline: at a million rows it would take minutes."""
    engine, queue, codes = _setup()
    source, sample, generate_seconds = _sample(rows, codes, bad_fraction)
    figures: dict = {"rows": sample.rows, "good_rows": sample.good_rows, "generate_seconds": generate_seconds}
    try:
        _clear(engine, queue)
        with PeakMemory({os.getpid()}) as memory:
            figures["raw"] = _raw_read(source)
        figures["raw"]["peak_bytes"] = memory.peak
        figures["read"] = _read_only(source)
        for runner, _ in _RUNNERS:
            _clear(engine, queue)
            _forget_loaded_files()
            figures[runner] = _flow(source, runner, sample.rows)
        figures["rerun"] = _flow(source, DEFAULT_RUNNER, sample.rows)
    finally:
        _clear(engine, queue)
        source.unlink(missing_ok=True)
    return figures


def print_large_products(figures: dict) -> None:
    rows, raw, read = figures["rows"], figures["raw"], figures["read"]
    print(f"process-products, a generated .xlsx of {rows:,} rows ({rows - figures['good_rows']:,} bad):")
    print(f"  the project's reader (calamine) reading it raw: {raw['seconds']:.1f} s, peak memory of the reading "
          f"process {raw['peak_bytes'] / 2**20:,.0f} MiB; reading and checking every row: {read['seconds']:.1f} s")
    for runner, label in (*_RUNNERS, ("rerun", "the same file again")):
        f, r = figures[runner], figures[runner]["result"]
        print(f"  {label}: {f['seconds']:.1f} s end to end, {rows / f['seconds']:,.0f} rows/s; read and checked in "
              f"{r['read_seconds']:.1f} s, chunk transactions {r['store_seconds']:.1f} task-s, publishing "
              f"{r['publish_seconds']:.1f} task-s; peak memory {f['peak_bytes'] / 2**20:,.0f} MiB (target < 1 GiB); "
              f"{_cpu_line(f['cpu'])}")


def _unpublish(engine, queue) -> int:
    """Every outbox message of the run as a crashed run leaves it: unmarked, not in the stream, no guard."""
    from sqlalchemy import text

    with engine.begin() as conn:
        count = conn.execute(text("UPDATE outbox_batches SET published_at = NULL, entry_ids = NULL "
                                  "WHERE stream = :stream RETURNING message_count"), {"stream": queue.stream})
        count = sum(n for (n,) in count)
    client = queue.get_client()
    client.delete(queue.stream, queue.publisher().guards_key)
    return count


def _relay(engine, queue) -> dict:
    """The publish-outbox relay (a flow run) draining a whole run's messages, against the domain's
    publish_outbox called directly on the same backlog (the baseline: no Prefect around it)."""
    from flows.publish_outbox import publish_outbox as relay
    from operations.products.outbox import publish_outbox

    messages = _unpublish(engine, queue)
    started = time.perf_counter()
    direct = publish_outbox(engine, queue.publisher()).published
    direct_seconds = time.perf_counter() - started
    _unpublish(engine, queue)
    started = time.perf_counter()
    report = relay(queue_block=BENCH_QUEUE_BLOCK)
    return {"messages": messages, "seconds": time.perf_counter() - started, "published": report["published"],
            "direct": direct, "direct_seconds": direct_seconds}


def _clear(engine, queue) -> None:
    from operations.products.store import clear_products_data

    clear_products_data(engine)
    client = queue.get_client()
    client.delete(queue.stream)
    for key in client.scan_iter(f"{{{queue.stream}}}:*", count=10_000):
        client.delete(key)


def _openpyxl_read(source: Path) -> dict:
    """The reading baseline: openpyxl read-only reading every row of the .xlsx (reset_dimensions, as the
    project's reader did: a sheet may record a wrong size), values only."""
    import openpyxl

    started = time.perf_counter()
    workbook = openpyxl.load_workbook(source, read_only=True, data_only=True)
    try:
        sheet = workbook.active
        sheet.reset_dimensions()
        count = sum(1 for _ in sheet.iter_rows(values_only=True))
    finally:
        workbook.close()
    return {"rows": count, "seconds": time.perf_counter() - started}


def _raw_read(source: Path) -> dict:
    """The project's reader giving every row of the .xlsx, raw (no check)."""
    from operations.infra.tabular import open_records

    started = time.perf_counter()
    with open_records(source) as records:
        count = sum(1 for _ in records)
    return {"rows": count, "seconds": time.perf_counter() - started}


def _read_only(source: Path) -> dict:
    """Reading and checking every row of the .xlsx, nothing else."""
    from operations.products.reader import open_product_rows

    started = time.perf_counter()
    with open_product_rows(source) as (_, rows):
        count = sum(1 for _ in rows)
    seconds = time.perf_counter() - started
    return {"rows": count, "seconds": seconds}


def _flow(source: Path, runner: str, rows: int) -> dict:
    from flows.process_products import process_products
    from operations import settings as settings_module

    # threads: a threshold above the file (the default's choice for these sizes); dask: every file on Dask
    os.environ["PRODUCTS_IN_PROCESS_MAX_ROWS"] = str(10 * rows if runner == "threads" else 0)
    settings_module.get_settings.cache_clear()
    processes = _service_processes()
    before = _cpu_seconds(processes)
    with PeakMemory({os.getpid()}) as memory:
        started = time.perf_counter()
        state = asyncio.run(process_products(file_path=str(source), queue_block=BENCH_QUEUE_BLOCK, return_state=True))
        wall = time.perf_counter() - started
    after = _cpu_seconds(processes)
    if not state.is_completed():
        raise SystemExit(f"process-products on {runner} failed: {state.message}")
    result = state.result()
    return {"seconds": wall, "peak_bytes": memory.peak, "result": result,
            "cpu": {name: after[name] - before[name] for name in after}}


def _service_processes() -> dict[str, object]:
    """The processes whose CPU a run uses: this one (the flow, its threads and its Dask workers, reaped or not),
    the PostgreSQL server of the project database (its backends), Redis and the Prefect server (when local)."""
    from urllib.parse import urlparse

    import psutil
    from sqlalchemy import text

    from operations.infra.database import get_engine

    with get_engine(os.environ["DATABASE_URL"]).connect() as conn:
        postgres = psutil.Process(conn.execute(text("SELECT pg_backend_pid()")).scalar_one()).parent()
    processes = {"flow process": psutil.Process(), "PostgreSQL": postgres}
    from blocks.products_queue import ProductsQueue

    redis_pid = ProductsQueue.load(BENCH_QUEUE_BLOCK).get_client().info("server").get("process_id")
    if redis_pid:
        processes["Redis"] = psutil.Process(int(redis_pid))
    port = str(urlparse(os.environ.get("PREFECT_API_URL", "")).port)
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "prefect" in " ".join(cmdline) and "server" in cmdline and port in cmdline:
            processes["Prefect server"] = process
    return processes


def _cpu_seconds(processes: dict[str, object]) -> dict[str, float]:
    """Each process's CPU seconds with those of its children, running or reaped (PostgreSQL's backends, Dask's
    workers)."""
    import psutil

    seconds = {}
    for name, process in processes.items():
        total = 0.0
        for member in (process, *process.children(recursive=True)):
            try:
                times = member.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system + times.children_user + times.children_system
        seconds[name] = total
    return seconds


def _cpu_line(cpu: dict[str, float]) -> str:
    return "CPU " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in cpu.items()) + \
        f" (together {sum(cpu.values()):.1f} s)"


def _row_by_row(source: Path, engine, queue, limit: int) -> dict:
    """The old system's work for each row, one row and one transaction at a time, on one process."""
    from sqlalchemy import select

    from operations.products.models import Dealer
    from operations.products.outbox import publish_outbox
    from operations.products.reader import RowFailure, open_product_rows
    from operations.products.store import DealerRow, store_chunk

    publisher = queue.publisher()
    seen: set[tuple[str, str]] = set()
    done = failed = 0
    started = time.perf_counter()
    with open_product_rows(source) as (_, rows):
        for item in islice(rows, limit):
            done += 1
            if isinstance(item, RowFailure) or (item.dealer_code, item.sku) in seen:
                failed += 1
                continue
            with engine.connect() as conn:
                dealer_id = conn.execute(select(Dealer.id).where(Dealer.code == item.dealer_code)).scalar()
            if dealer_id is None:
                failed += 1
                continue
            seen.add((item.dealer_code, item.sku))
            outcome = store_chunk(engine, [DealerRow(dealer_id, item)], "baseline", queue.stream)
            publish_outbox(engine, publisher, outcome.outbox_ids)
    seconds = time.perf_counter() - started
    return {"rows": done, "failed": failed, "seconds": seconds}


def print_products(figures: dict) -> None:
    rows = figures["rows"]
    base = figures["baseline"]
    base_rate = base["rows"] / base["seconds"]
    baseline_read, raw, read = figures["openpyxl"], figures["raw"], figures["read"]
    print(f"process-products, a generated .xlsx of {rows:,} rows ({rows - figures['good_rows']:,} bad), "
          f"{DEALERS} dealers:")
    print(f"  reading baseline, openpyxl read-only reading the .xlsx row by row: {baseline_read['seconds']:.1f} s")
    print(f"  the project's reader (calamine) reading it raw: {raw['seconds']:.1f} s "
          f"({raw['seconds'] / baseline_read['seconds']:.2f}x the reading baseline); reading and checking every "
          f"row: {read['seconds']:.1f} s, {read['rows'] / read['seconds']:,.0f} rows/s")
    targets = {DEFAULT_RUNNER: "<= 0.5, stretch 0.35", "dask": "none: the default is the thread pool", "rerun": "<= 0.25",
               "rerun_full": "none: where a re-run's time goes when it must compare"}
    for runner, label in (*_RUNNERS, ("rerun", "the same file again"),
                          ("rerun_full", "the same file again without the record of its earlier run")):
        f = figures[runner]
        r = f["result"]
        rate = rows / f["seconds"]
        print(
            f"  {label}: {f['seconds']:.1f} s end to end = {f['seconds'] / baseline_read['seconds']:.2f}x the reading "
            f"baseline (target {targets[runner]}); {rate:,.0f} rows/s = {rate / base_rate:.1f}x the row-by-row "
            f"baseline (target >= 3); {r['created']:,} created / {r['updated']:,} updated / {r['unchanged']:,} "
            f"unchanged, {r['failures']:,} failures, {r['messages_published']:,} messages; read and checked in "
            f"{r['read_seconds']:.1f} s ({100 * r['read_seconds'] / f['seconds']:.0f}% of the run), chunk "
            f"transactions {r['store_seconds']:.1f} task-s, publishing {r['publish_seconds']:.1f} task-s"
            f"{', not read again (same content as run ' + r['same_as_run'] + ')' if r['same_as_run'] else ''}; "
            f"peak memory {f['peak_bytes'] / 2**20:,.0f} MiB (target < 1 GiB); {_cpu_line(f['cpu'])}"
        )
    relay = figures["relay"]
    print(f"  publish-outbox relay, a whole run's {relay['messages']:,} messages left unpublished: "
          f"{relay['published']:,} published in {relay['seconds']:.1f} s = {relay['published'] / relay['seconds']:,.0f}"
          f" messages/s, {relay['direct_seconds'] / relay['seconds']:.2f}x the speed of the baseline (the domain's "
          f"publish_outbox called directly: {relay['direct']:,} in {relay['direct_seconds']:.1f} s)")
    print(f"  baseline, row by row with one transaction per row on one process: {base['rows']:,} rows in "
          f"{base['seconds']:.1f} s = {base_rate:,.0f} rows/s")
