"""Turnstile registration figures for `make bench`, each beside a baseline measured in the same run.

PARTICIPANTS participants x DEVICES emulated turnstiles (the emulator in its own process, LATENCY ms per request,
1 request at a time per device, as the blocks say):
- `register-participants` wall time on the thread pool and on Dask, from empty devices and cache, against the
  floor (the busiest device's requests x LATENCY: devices work in parallel, each one request at a time);
- the same file again: everything cached, no write request, only the turnstiles' identity checks (target: under
  10% of the first run);
- the same file after one turnstile is factory reset: the check notices it and registers it in full (its
  requests, the others', the time);
- where the time goes: the flow's own clock, the busiest turnstile's task, the rest (the flow run's creation and
  end, the file, blocks, checks, limits, artifacts);
- baseline: the seed's approach, one request per participant per device from 20 workers, measured on
  SEED_PARTICIPANTS participants and scaled to the whole file by its rate. Targets: <= 1.5 x the floor,
  >= 50 x faster than the seed's approach.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.memory import PeakMemory


def bench_turnstiles(participants: int, devices: int, latency_ms: float, seed_participants: int) -> dict:
    from deployments.stack import start_local_stack
    from emulators import controlid as emulator_module
    from operations.settings import get_settings

    settings = get_settings()
    stack = start_local_stack(settings)  # the Prefect server and Redis
    from blocks.turnstile_device import TurnstileCache  # imports Prefect: only once the API URL is set
    from operations.turnstiles.sample import write_participants_file

    state_dir = Path(tempfile.mkdtemp(prefix="turnstile-bench-"))
    config = emulator_module.EmulatorConfig(devices=devices, latency_ms=latency_ms, max_concurrent_requests=1)
    emulator = emulator_module.start_emulator_process(config, state_dir)
    try:
        names = _save_devices(emulator, f"bench-{uuid.uuid4().hex[:6]}")
        cache_name = "turnstile-cache-bench"
        cache = TurnstileCache.from_url(stack.redis_url, key_prefix=f"bench-turnstiles-{uuid.uuid4().hex[:6]}")
        cache.save(cache_name, overwrite=True)
        source = state_dir / "participants.csv"
        write_participants_file(source, participants)
        figures: dict = {"participants": participants, "devices": devices, "latency_ms": latency_ms}
        for runner in ("threads", "dask"):
            emulator.control.wipe()
            _forget(cache)
            figures[runner] = _flow(source, names, cache_name, runner, emulator, latency_ms)
        figures["cached"] = _flow(source, names, cache_name, "threads", emulator, latency_ms)
        emulator.control.wipe(0)
        figures["reset"] = _flow(source, names, cache_name, "threads", emulator, latency_ms)
        figures["reset"]["restored"] = len(emulator.control.users(0))
        emulator.control.wipe()
        figures["seed"] = _seed_approach(emulator, source, seed_participants, participants)
        _forget(cache)
        return figures
    finally:
        emulator_module.stop_emulator_process(state_dir)


def _save_devices(emulator, tag: str) -> list[str]:
    from pydantic import SecretStr

    from blocks.turnstile_device import TurnstileDevice

    names = []
    for i, url in enumerate(emulator.base_urls):
        names.append(f"{tag}-{i}")
        TurnstileDevice(base_url=url, password=SecretStr(emulator.config.password)).save(names[-1], overwrite=True)
    return names


def _forget(cache) -> None:
    client = cache.get_client()
    for key in client.scan_iter(f"{cache.key_prefix}:*", count=10_000):
        client.delete(key)


def _flow(source: Path, names: list[str], cache_name: str, runner: str, emulator, latency_ms: float) -> dict:
    from flows.register_participants import register_participants
    from operations import settings as settings_module

    os.environ["TURNSTILES_TASK_RUNNER"] = runner
    settings_module.get_settings.cache_clear()
    emulator.control.reset_stats()
    with PeakMemory({os.getpid()}) as memory:
        started = time.perf_counter()
        state = asyncio.run(register_participants(participants_file=str(source), turnstiles=names,
                                                  cache_block=cache_name, return_state=True))
        wall = time.perf_counter() - started
    if not state.is_completed():
        raise SystemExit(f"register-participants on {runner} failed: {state.message}")
    per_device = [emulator.control.stats(d) for d in range(len(names))]
    busiest = max(s["total"] for s in per_device)
    result = state.result()
    return {"seconds": wall, "peak_bytes": memory.peak, "result": result, "busiest_requests": busiest,
            "floor": busiest * latency_ms / 1000, "writes": sum(s["write_calls"] for s in per_device),
            "requests": sum(s["total"] for s in per_device), "per_device": [s["total"] for s in per_device],
            "flow_seconds": result["seconds"], "device_seconds": max(r["seconds"] for r in result["reports"])}


def _seed_approach(emulator, source: Path, participants: int, whole: int) -> dict:
    """The old system: 20 workers, each task one participant on one device, one create request each."""
    from pydantic import SecretStr

    from operations.turnstiles.client import ControlIdClient
    from operations.turnstiles.participants import read_participants
    from operations.turnstiles.registration import user_values

    people = read_participants(source).participants[:participants]
    clients = [ControlIdClient(url, emulator.config.login, SecretStr(emulator.config.password), name=f"seed-{i}")
               for i, url in enumerate(emulator.base_urls)]
    pairs = [(client, p, 100_000_000 + i) for i, p in enumerate(people) for client in clients]

    def register(pair) -> None:
        client, participant, user_id = pair
        client.write("users", [user_values(participant, user_id)])

    started = time.perf_counter()
    with ThreadPoolExecutor(20) as pool:
        list(pool.map(register, pairs))
    seconds = time.perf_counter() - started
    rate = len(pairs) / seconds
    return {"pairs": len(pairs), "seconds": seconds, "rate": rate, "whole_seconds": whole * len(clients) / rate}


def print_turnstiles(figures: dict) -> None:
    n, d, latency = figures["participants"], figures["devices"], figures["latency_ms"]
    seed = figures["seed"]
    print(f"register-participants, {n:,} participants x {d} turnstiles ({n * d:,} registrations), {latency:.0f} ms "
          f"per request, 1 request at a time per turnstile:")
    for runner in ("threads", "dask"):
        f = figures[runner]
        r = f["result"]
        print(
            f"  {runner:8} {f['seconds']:6.1f} s; floor {f['floor']:.1f} s ({f['busiest_requests']} requests on the "
            f"busiest turnstile) -> {f['seconds'] / f['floor']:.2f}x the floor (target <= 1.5); "
            f"{seed['whole_seconds'] / f['seconds']:,.0f}x faster than the seed's approach (target >= 50); "
            f"{r['successes']:,} successes, {r['errors']} errors, {f['requests']:,} requests, {f['writes']} writes; "
            f"peak memory {f['peak_bytes'] / 2**20:,.0f} MiB"
        )
        print(f"           where it goes: flow body {f['flow_seconds']:.1f} s (the rest, {f['seconds'] - f['flow_seconds']:.1f} s: "
              f"the flow run's creation and end); slowest turnstile task {f['device_seconds']:.1f} s against "
              f"{f['floor']:.1f} s of latency; the flow's own stages {f['flow_seconds'] - f['device_seconds']:.1f} s "
              f"(file, blocks, checks, limits, task start, artifacts)")
    c = figures["cached"]
    share = 100 * c["seconds"] / figures["threads"]["seconds"]
    print(f"  second run, everything cached: {c['seconds']:.2f} s = {share:.1f}% of the first (target < 10%), "
          f"{c['writes']} write requests, {c['requests']} requests in all (the identity checks); flow body "
          f"{c['flow_seconds']:.1f} s")
    w = figures["reset"]
    reset = [r["device"] for r in w["result"]["reports"] if r.get("reset")]
    print(f"  after turnstile 0 is factory reset: {w['seconds']:.1f} s, reset noticed on {len(reset)} turnstile(s), "
          f"{w['restored']:,} of {n:,} users back on it; requests per turnstile {w['per_device']}")
    print(f"  baseline, the seed's approach (one request per participant per turnstile, 20 workers): "
          f"{seed['pairs']:,} registrations in {seed['seconds']:.1f} s = {seed['rate']:,.0f}/s -> "
          f"{seed['whole_seconds']:,.0f} s for all {n * d:,}")
