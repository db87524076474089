"""Redis and disk after consecutive generation runs: what completed runs leave behind.

    python -m benchmarks.run --skip-e2e --skip-counter --skip-marketplace --skip-products --skip-turnstiles \
        [--retention-runs 5] [--retention-quantity 200000]

RUNS runs of QUANTITY games one after another on the local stack (embedded Redis, LocalCluster), with the
default settings (chunk files removed). Baseline, measured in the same runs: each run's own peak (Redis
used_memory and its `seen` set while it generates: what every run would keep without retention). Figures after
the runs: used_memory against the start, MEMORY USAGE summed over the runs' keys, the append-only file against
the start and what the cleanup's rewrite rule says of it, and the run folders on disk.

Then cleanup-runs on those runs (a retention short enough to expire them): a dry run (listing only), then the
real run, each timed as a flow run; what they freed against what the runs held just before (the baseline, the
same runs). The runs have a key prefix and an OUTPUT_DIR of their own, so the cleanup never sees the operator's
runs.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
import uuid
from pathlib import Path

BENCH_BLOCK = "retention-bench-counter"
EXPIRE_EVERYTHING_DAYS = 1e-9  # ~0.1 ms: every run completed before the cleanup starts is past it


class RedisPeak:
    """Samples used_memory and the MEMORY USAGE of one key every 0.2 s; keeps the peaks."""

    def __init__(self, client, key: str):
        self.client, self.key = client, key
        self.used_memory = self.key_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.used_memory = max(self.used_memory, int(self.client.info("memory")["used_memory"]))
            self.key_bytes = max(self.key_bytes, int(self.client.memory_usage(self.key) or 0))
            self._stop.wait(0.2)

    def __enter__(self) -> RedisPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _timed(flow, **parameters) -> tuple[dict, float]:
    """A flow run's result and wall seconds; a run that did not complete ends the benchmark."""
    started = time.perf_counter()
    state = flow(**parameters, return_state=True)
    seconds = time.perf_counter() - started
    if not state.is_completed():
        raise SystemExit(f"{flow.name} failed: {state.message}")
    return state.result(), seconds


def bench_retention(runs: int, quantity: int) -> dict:
    output_dir = tempfile.mkdtemp(prefix="retention-bench-")  # the cleanup below sees only these runs' folders
    os.environ.update({"KEEP_CHUNK_FILES": "false",  # the default, whatever the environment says
                       "OUTPUT_DIR": output_dir, "OUTPUT_BASE_URL": Path(output_dir).as_uri()})
    from deployments.stack import start_local_stack
    from operations.settings import get_settings

    get_settings.cache_clear()
    settings = get_settings()
    start_local_stack(settings)
    from blocks.redis_game_counter import RedisGameCounter
    from flows.cleanup_runs import cleanup_runs
    from flows.generate_games import generate_games
    from operations.lottery.retention import aof_rewrite_needed, folder_bytes

    default = RedisGameCounter.load_or_create_default(settings.lottery.counter_block_name, settings.lottery.counter_block_name,
                                                      settings)
    block = default.model_copy(update={"key_prefix": f"retention-bench-{uuid.uuid4().hex[:8]}"})
    block.save(BENCH_BLOCK, overwrite=True)  # ... and only these runs' keys
    client = block.get_client()
    start_memory = int(client.info("memory")["used_memory"])
    start_aof = int(client.info("persistence")["aof_current_size"])
    rows, keys = [], []
    for i in range(runs):
        run_key = f"retention-bench-{uuid.uuid4().hex[:8]}"
        counter = block.counter(run_key)
        with RedisPeak(client, f"{counter.prefix}:seen") as peak:
            _, seconds = _timed(generate_games, quantity=quantity, run_key=run_key, counter_block=BENCH_BLOCK)
        keys.append(counter)
        rows.append({
            "run": i + 1,
            "seconds": seconds,
            "peak_used_memory": peak.used_memory,
            "peak_seen_bytes": peak.key_bytes,
            "used_memory": int(client.info("memory")["used_memory"]),
            "run_key_bytes": counter.memory_usage(),
            "run_keys": len(counter.run_keys()),
            "folder_bytes": folder_bytes(settings.stack.output_dir / run_key),
            "aof": int(client.info("persistence")["aof_current_size"]),
        })
    persistence = client.info("persistence")
    dataset = int(client.info("memory")["used_memory_dataset"])
    rule = aof_rewrite_needed(persistence, dataset)
    result = {
        "runs": rows,
        "quantity": quantity,
        "start_memory": start_memory,
        "start_aof": start_aof,
        "runs_key_bytes": sum(c.memory_usage() for c in keys),
        "runs_keys": sum(len(c.run_keys()) for c in keys),
        "runs_folder_bytes": folder_bytes(Path(output_dir)),
        "dataset": dataset,
        "aof_rule": rule,
    }
    for dry_run in (True, False):
        report, seconds = _timed(cleanup_runs, retention_days=EXPIRE_EVERYTHING_DAYS, dry_run=dry_run,
                                 counter_block=BENCH_BLOCK)
        result["cleanup_dry_run" if dry_run else "cleanup"] = {**report, "seconds": seconds}
    result["left_keys"] = sum(len(c.run_keys()) for c in keys)
    result["left_folder_bytes"] = folder_bytes(Path(output_dir))
    for counter in keys:  # the bench leaves no runs behind, whatever the cleanup did
        counter.delete_run()
    RedisGameCounter.delete(BENCH_BLOCK)
    return result


def print_retention(result: dict) -> None:
    mb = 2**20
    print(f"retention: {len(result['runs'])} consecutive runs of {result['quantity']:,} games "
          f"(Redis used_memory {result['start_memory'] / mb:.1f} MiB and append-only file "
          f"{result['start_aof'] / mb:.1f} MiB before them)")
    for row in result["runs"]:
        print(f"  run {row['run']}: {row['seconds']:.1f} s; while generating (baseline: what it would keep "
              f"without retention) used_memory peak {row['peak_used_memory'] / mb:.1f} MiB, its seen set "
              f"{row['peak_seen_bytes'] / mb:.1f} MiB; after: used_memory {row['used_memory'] / mb:.1f} MiB, its "
              f"{row['run_keys']} keys {row['run_key_bytes']:,} bytes, its folder {row['folder_bytes'] / mb:.1f} MiB, "
              f"append-only file {row['aof'] / mb:.1f} MiB")
    last = result["runs"][-1]
    seen_total = sum(r["peak_seen_bytes"] for r in result["runs"])
    print(f"  after all: used_memory {last['used_memory'] / mb:.1f} MiB "
          f"(+{(last['used_memory'] - result['start_memory']) / mb:.1f} MiB); the runs' keys "
          f"{result['runs_key_bytes']:,} bytes against {seen_total / mb:.1f} MiB of seen sets they held while "
          f"generating (target: a few KB per run)")
    rewrite, reason = result["aof_rule"]
    print(f"  append-only file {last['aof'] / mb:.1f} MiB (+{(last['aof'] - result['start_aof']) / mb:.1f} MiB) for a "
          f"{result['dataset'] / mb:.1f} MiB dataset: cleanup-runs would {'rewrite it' if rewrite else 'leave it'} "
          f"({reason})")
    dry, real = result["cleanup_dry_run"], result["cleanup"]
    print(f"  cleanup-runs on these {len(result['runs'])} runs: dry run {dry['seconds']:.1f} s (lists "
          f"{len(dry['removed'])}, removes nothing); real run {real['seconds']:.1f} s: removed {len(real['removed'])} "
          f"run(s), {real['folder_bytes'] / mb:.1f} MiB on disk, {real['redis_keys']} Redis keys, "
          f"{real['redis_bytes']:,} bytes of Redis memory; baseline, what the runs held just before: "
          f"{result['runs_folder_bytes'] / mb:.1f} MiB of folders, {result['runs_keys']} keys, "
          f"{result['runs_key_bytes']:,} bytes; left after it: {result['left_folder_bytes']:,} bytes of folders, "
          f"{result['left_keys']} keys")
