"""`make bench`: the game-generation figures, each as a ratio against a baseline measured in the same run.

    python -m benchmarks.run [--quantity 1000000] [--skip-e2e] [--skip-baseline] [--skip-counter]

1. End to end: generate-games for QUANTITY games (local Prefect server, embedded Redis, LocalCluster of
   DASK_N_WORKERS process workers), flow start to artifacts, with the peak memory of the run's processes
   (this one and its Dask workers) plus what redis-server grew by. Baseline: openpyxl write-only writing the
   same rows on one core (and the flow's own writer on them, alone). Target: end to end <= 0.35 x baseline
   (stretch <= 0.25 x); peak memory < 2 GiB.
   `--warm` keeps the exact feasibility count cached by earlier runs of the same rules (by default it is
   counted again); `--skip-baseline` leaves the baseline out (10,000,000 games: it would take ~8 minutes).
2. Counter claims from 2 processes through the Lua script (accepted games/s), against the seed's approach
   (Manager().dict() + Manager().Lock(), reading the 60 counters per game). Target: >= 50,000 games/s.
3. Marketplace sync (benchmarks/marketplace.py): 200 accounts on the emulator at 30 ms per request, on threads
   and on Dask, against the floor and against one account after another. Target: <= 1.5 x the floor. Then
   notifications on: a scheduled sync with nothing changed (<= 3 requests per account, < 5 s) and a burst of
   notifications reflected in the database (<= 10 s after the last one).
4. Product files (benchmarks/products.py): a 200,000-row .xlsx (10% bad rows) through process-products on Dask
   and on threads, its reading alone, against openpyxl read-only reading it (targets <= 0.5 x, the same file
   again <= 0.25 x) and against row by row with one transaction per row (target >= 3 x).
   `--products-large-rows 1000000` adds a run of a larger file (time and memory).
5. Turnstiles (benchmarks/registration.py): 10,000 participants x 10 emulated turnstiles at 50 ms per request, on
   threads and on Dask, against the floor and against the seed's one request per pair; then all cached.
   Turnstile scenarios (benchmarks/turnstile_scenarios.py): group moves, a wiped device, a card swap and a lost
   250-object answer, each with its requests per turnstile and whether every turnstile ends exact.
6. Prefect API (benchmarks/prefect_api.py): 1, 5 and 20 client threads creating flow runs through the REST API
   for --prefect-api-seconds, on the stack's server beside a plain `prefect server start` (same PostgreSQL,
   alternating rounds), then on SQLite. Targets: no failure at 20 clients on PostgreSQL; >= 0.8 x the plain rate.
7. Retention (benchmarks/retention.py): Redis memory (used_memory, the runs' keys) and its append-only file
   after 5 consecutive 200,000-game runs, against each run's own peak while it generated; then cleanup-runs on
   those runs (dry run, then real), timed, against what they held just before.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks.memory import PeakMemory

import numpy as np

REGION_CAPS = [700_000, 250_000, 50_000, 1_000, 100]


def write_baseline(games: np.ndarray, scores: np.ndarray, path: Path) -> float:
    """Seconds for plain openpyxl write-only to write the same rows (rank, numbers, sum, evens, score)."""
    import openpyxl

    g = games.astype(np.int64)
    rows = np.column_stack([np.arange(1, len(g) + 1), g, g.sum(axis=1), (g % 2 == 0).sum(axis=1)]).tolist()
    score_list = scores.tolist()
    started = time.perf_counter()
    wb = openpyxl.Workbook(write_only=True)
    sheets_rows = 1_000_000
    ws = None
    for i, (row, score) in enumerate(zip(rows, score_list)):
        if i % sheets_rows == 0:
            ws = wb.create_sheet(f"Games {i + 1}")
        row.append(score)
        ws.append(row)
    wb.save(path)
    return time.perf_counter() - started


def write_with_project_writer(games: np.ndarray, scores: np.ndarray, path: Path) -> float:
    """Seconds for the flow's own writer (one core, no Prefect) to write the same rows as `write_baseline`."""
    from operations.lottery.spreadsheet import WorkbookSummary, write_games_workbook

    summary = WorkbookSummary(title="benchmark", parameters=[], regions=[], total_games=len(games))
    started = time.perf_counter()
    write_games_workbook(path, games, scores, 1, summary)
    return time.perf_counter() - started


def bench_end_to_end(quantity: int, warm: bool, baseline: bool = True) -> dict:
    from deployments.stack import start_local_stack
    from operations.infra.embedded_redis import running_embedded_redis
    from operations.settings import get_settings

    # the baseline below writes the run's games from its chunk files; without it, the default (removed)
    os.environ["KEEP_CHUNK_FILES"] = "true" if baseline else "false"
    get_settings.cache_clear()
    settings = get_settings()
    stack = start_local_stack(settings)
    redis_pid = running_embedded_redis(settings.stack.redis_dir).pid if not settings.redis.url else None
    from flows.generate_games import generate_games

    run_key = f"bench-{uuid.uuid4().hex[:8]}"
    if not warm:  # the first run of these rules: their exact feasibility count is not cached yet (the
        # rule-independent table of 5-number tails it is counted from is built once per machine and kept)
        for cached in (settings.stack.data_dir / "cache").glob("feasibility-*.json"):
            cached.unlink()
    with PeakMemory({os.getpid()}, {redis_pid} if redis_pid else set()) as memory:
        started = time.perf_counter()
        state = generate_games(quantity=quantity, run_key=run_key, return_state=True)
        elapsed = time.perf_counter() - started
    if not state.is_completed():
        raise SystemExit(f"generate-games failed: {state.message}")
    result = state.result()
    from operations.lottery.generation import rank_games

    run_dir = settings.stack.output_dir / run_key
    if baseline:
        games, scores = rank_games(sorted((run_dir / "chunks").glob("chunk-*.npz")))
        baseline_seconds = write_baseline(games, scores, run_dir / "baseline.xlsx")
        writer_seconds = write_with_project_writer(games, scores, run_dir / "writer.xlsx")
        del games, scores
    else:
        baseline_seconds = writer_seconds = None
    import redis

    from blocks.redis_game_counter import RedisGameCounter

    try:  # Redis keeps no bench runs
        RedisGameCounter.load(settings.lottery.counter_block_name).counter(run_key).delete_run()
    except redis.RedisError as exc:  # a loaded machine can outlast the socket timeout deleting 10M members
        print(f"the bench run's Redis keys ({run_key}) were not deleted: {exc!r}", flush=True)
    return {
        "ui": stack.ui_url,
        "run_key": run_key,
        "run_dir": run_dir,
        "seconds": elapsed,
        "flow_seconds": result["seconds"],
        "baseline": baseline_seconds,
        "writer": writer_seconds,
        "peak_bytes": memory.peak,
        "peak_run_bytes": memory.peak_own,
        "peak_redis_bytes": memory.peak_shared,
    }


def _lua_claimer(url: str, run_key: str, worker: int, games: int, out) -> None:
    import redis

    from operations.lottery.counter import FirstNumberCounter
    from operations.lottery.engine import games_to_masks, sample_uniform_games

    counter = FirstNumberCounter(redis.Redis.from_url(url), "bench", run_key)
    token = uuid.uuid4().hex
    counter.begin_chunk(worker, token, len(REGION_CAPS))
    rng = np.random.default_rng(worker)
    batches = [sample_uniform_games(rng, 20_000, 6, 60) for _ in range(games // 20_000)]
    prepared = [(games_to_masks(b), b[:, 0], np.minimum((b[:, 0] - 1) // 10, 4)) for b in batches]
    out.put("ready")
    accepted = 0
    started = time.perf_counter()
    for masks, firsts, regions in prepared:
        res = counter.claim(worker, token, 10**9, masks, firsts, regions, len(REGION_CAPS))
        accepted += int(res.accepted.sum())
    out.put((accepted, time.perf_counter() - started))


def _manager_claimer(shared, lock, worker: int, games: int, caps: list[int], out) -> None:
    """The seed's approach: under the shared lock, read the 60 counters, check the region, increment."""
    rng = np.random.default_rng(worker)
    candidates = [sorted(rng.choice(60, 6, replace=False) + 1) for _ in range(games)]
    out.put("ready")
    accepted = 0
    started = time.perf_counter()
    for game in candidates:
        first = int(game[0])
        region = min((first - 1) // 10, 4)
        with lock:
            current = {n: shared.get(n, 0) for n in range(1, 61)}
            in_region = sum(v for n, v in current.items() if min((n - 1) // 10, 4) == region)
            if in_region < caps[region]:
                shared[first] = current[first] + 1
                accepted += 1
    out.put((accepted, time.perf_counter() - started))


def _run_pair(target, args_for) -> float:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args_for(w), out)) for w in range(2)]
    for p in procs:
        p.start()
    for _ in procs:
        out.get(timeout=300)  # both ready before timing
    results = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    accepted = sum(a for a, _ in results)
    return accepted / max(s for _, s in results)


def bench_counter(lua_games: int, manager_games: int) -> tuple[float, float]:
    from deployments.stack import start_local_stack
    from operations.infra.embedded_redis import resolve_redis_url
    from operations.lottery.counter import FirstNumberCounter
    from operations.settings import get_settings

    import redis

    start_local_stack(get_settings())  # its Redis (REDIS_URL when set), as the other lines do: the first line runs
    url = resolve_redis_url(get_settings())
    run_key = f"claims-{uuid.uuid4().hex[:8]}"
    counter = FirstNumberCounter(redis.Redis.from_url(url), "bench", run_key)
    counter.initialise("bench", sum(REGION_CAPS), REGION_CAPS)
    lua_rate = _run_pair(_lua_claimer, lambda w: (url, run_key, w, lua_games))
    counter.delete_run()
    manager = multiprocessing.get_context("spawn").Manager()
    shared, lock = manager.dict(), manager.Lock()
    manager_rate = _run_pair(_manager_claimer, lambda w: (shared, lock, w, manager_games, REGION_CAPS))
    manager.shutdown()
    return lua_rate, manager_rate


def _parser() -> argparse.ArgumentParser:
    """Which lines run, and their sizes."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantity", type=int, default=1_000_000)
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--skip-baseline", action="store_true", help="no one-core openpyxl baseline (10M games)")
    parser.add_argument("--skip-counter", action="store_true")
    parser.add_argument("--warm", action="store_true", help="keep the cached feasibility count of earlier runs")
    parser.add_argument("--keep-output", action="store_true", help="keep the benchmark's spreadsheets")
    parser.add_argument("--skip-marketplace", action="store_true")
    parser.add_argument("--marketplace-accounts", type=int, default=200)
    parser.add_argument("--marketplace-orders", type=int, default=500)
    parser.add_argument("--marketplace-items", type=int, default=200)
    parser.add_argument("--marketplace-latency-ms", type=float, default=30.0)
    parser.add_argument("--marketplace-concurrency", type=int, default=10)
    parser.add_argument("--skip-marketplace-notifications", action="store_true",
                        help="the marketplace sync lines without the notification lines")
    parser.add_argument("--skip-products", action="store_true")
    parser.add_argument("--products-rows", type=int, default=200_000)
    parser.add_argument("--products-bad-fraction", type=float, default=0.1)
    parser.add_argument("--products-baseline-rows", type=int, default=5_000,
                        help="rows the row-by-row baseline loads (its rows/s is compared)")
    parser.add_argument("--products-large-rows", type=int, default=0,
                        help="also process-products on a file of this many rows (e.g. 1000000): time and memory")
    parser.add_argument("--skip-turnstiles", action="store_true")
    parser.add_argument("--turnstile-participants", type=int, default=10_000)
    parser.add_argument("--turnstile-devices", type=int, default=10)
    parser.add_argument("--turnstile-latency-ms", type=float, default=50.0)
    parser.add_argument("--turnstile-seed-participants", type=int, default=300,
                        help="participants the seed's approach registers (its rate is compared)")
    parser.add_argument("--skip-turnstile-scenarios", action="store_true")
    parser.add_argument("--turnstile-scenario-participants", type=int, default=300)
    parser.add_argument("--turnstile-scenario-devices", type=int, default=3)
    parser.add_argument("--skip-prefect-api", action="store_true")
    parser.add_argument("--prefect-api-seconds", type=float, default=15.0,
                        help="how long each number of REST clients creates flow runs, per database")
    parser.add_argument("--skip-retention", action="store_true")
    parser.add_argument("--retention-runs", type=int, default=5)
    parser.add_argument("--retention-quantity", type=int, default=200_000)
    return parser


def _games_lines(args: argparse.Namespace) -> None:
    """The counter and the end-to-end generation lines."""
    if not args.skip_counter:
        lua, manager = bench_counter(lua_games=400_000, manager_games=4_000)
        print(f"counter claims, 2 processes: Lua batches {lua:,.0f} accepted games/s; "
              f"seed's Manager dict+Lock {manager:,.0f} games/s; ratio {lua / manager:,.0f}x "
              f"(target >= 50,000 games/s)", flush=True)
    if not args.skip_e2e:
        e2e = bench_end_to_end(args.quantity, args.warm, baseline=not args.skip_baseline)
        print(f"end to end, {args.quantity:,} games: {e2e['seconds']:.1f} s "
              f"(flow's own clock {e2e['flow_seconds']:.1f} s)")
        if e2e["baseline"] is not None:
            print(f"baseline, openpyxl write-only of the same rows on one core: {e2e['baseline']:.1f} s")
            print(f"ratio end-to-end / baseline: {e2e['seconds'] / e2e['baseline']:.2f} "
                  f"(target <= 0.35, stretch <= 0.25)")
            print(f"the flow's writer alone, the same rows on one core: {e2e['writer']:.1f} s "
                  f"({e2e['baseline'] / e2e['writer']:.0f}x faster than the baseline)")
        print(f"peak memory of the run's processes (+ Redis growth): {e2e['peak_bytes'] / 2**30:.2f} GiB "
              f"(target < 2 GiB); the run's processes alone {e2e['peak_run_bytes'] / 2**30:.2f} GiB, "
              f"Redis growth alone {e2e['peak_redis_bytes'] / 2**30:.2f} GiB")
        if not args.keep_output:
            shutil.rmtree(e2e["run_dir"], ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if "OUTPUT_DIR" not in os.environ:  # the benchmark's files in a folder of their own, linked as file:// URIs:
        # serving that folder would replace the file server `make up` started for the operator's OUTPUT_DIR
        os.environ["OUTPUT_DIR"] = tempfile.mkdtemp(prefix="games-bench-")
        os.environ.setdefault("OUTPUT_BASE_URL", Path(os.environ["OUTPUT_DIR"]).as_uri())

    print(f"machine: {os.cpu_count()} cores; DASK_N_WORKERS={os.environ.get('DASK_N_WORKERS', '2')}", flush=True)
    _games_lines(args)
    if not args.skip_marketplace:
        from benchmarks.marketplace import bench_marketplace, print_marketplace

        print_marketplace(
            bench_marketplace(
                args.marketplace_accounts, args.marketplace_orders, args.marketplace_items,
                args.marketplace_latency_ms, args.marketplace_concurrency,
                notifications=not args.skip_marketplace_notifications,
            )
        )
    if not args.skip_products:
        from benchmarks.products import bench_products, print_products

        print_products(bench_products(args.products_rows, args.products_bad_fraction, args.products_baseline_rows))
    if args.products_large_rows:
        from benchmarks.products import bench_large_products, print_large_products

        print_large_products(bench_large_products(args.products_large_rows, args.products_bad_fraction))
    if not args.skip_turnstiles:
        from benchmarks.registration import bench_turnstiles, print_turnstiles

        print_turnstiles(bench_turnstiles(
            args.turnstile_participants, args.turnstile_devices, args.turnstile_latency_ms,
            args.turnstile_seed_participants,
        ))
    if not args.skip_turnstile_scenarios:
        from benchmarks.turnstile_scenarios import bench_turnstile_scenarios, print_turnstile_scenarios

        print_turnstile_scenarios(bench_turnstile_scenarios(args.turnstile_scenario_participants,
                                                            args.turnstile_scenario_devices))
    if not args.skip_prefect_api:
        from benchmarks.prefect_api import bench_prefect_api, print_prefect_api

        print_prefect_api(bench_prefect_api(args.prefect_api_seconds))
    if not args.skip_retention:
        from benchmarks.retention import bench_retention, print_retention

        print_retention(bench_retention(args.retention_runs, args.retention_quantity))
    return 0


if __name__ == "__main__":
    sys.exit(main())
