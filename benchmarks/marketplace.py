"""Marketplace sync figures for `make bench`, each beside a baseline measured in the same run.

ACCOUNTS seller accounts x ORDERS orders + ITEMS items each, the emulator in its own process answering every
request after LATENCY ms, CONCURRENCY accounts at a time:
- wall time of `sync-marketplace` on the thread pool and on Dask, against the floor (requests x latency /
  concurrency) and against the old behaviour (the same accounts synced one after another, measured here);
- Prefect's overhead per account (task run time outside the sync code), and the peak memory;
- `onboard-account`: seconds per flow run against the same onboarding code called without a flow run.
Each measured sync starts from empty order/item tables and checkpoints, so every run does the same requests.
"""

from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.marketplace_notifications import measure_notifications, print_notifications
from benchmarks.memory import PeakMemory



def _task_overheads(flow_run_id, reports: list[dict]) -> float:
    """Seconds per account that the task runs spent outside the sync code (Prefect's own cost: per task when each
    account has its own task, shared by the accounts of a group task)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, TaskRunFilter, TaskRunFilterFlowRunId

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
        )
        ids = [flow_run_id, *[c.id for c in children]]
        runs, offset = [], 0
        while True:  # the API pages task runs by at most 200
            page = client.read_task_runs(
                task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=ids)), limit=200, offset=offset
            )
            runs += page
            offset += len(page)
            if len(page) < 200:
                break
    durations = [(r.end_time - r.start_time).total_seconds() for r in runs if r.start_time and r.end_time]
    domain = sum(r.get("seconds", 0.0) for r in reports)
    return (sum(durations) - domain) / max(1, len(reports))


def bench_marketplace(
    accounts: int, orders: int, items: int, latency_ms: float, concurrency: int, notifications: bool = True
) -> dict:
    """Every figure of the module's docstring; `notifications=False` leaves the notification lines out."""
    from deployments.stack import start_local_stack
    from emulators.marketplace import EmulatorConfig, start_emulator_process, stop_emulator_process
    from operations.infra.database import get_engine, migrate_to_head
    from operations.infra.embedded_postgres import ensure_database, running_embedded_postgres
    from operations.marketplace.store import clear_marketplace_data
    from operations.settings import get_settings

    settings = get_settings()
    start_local_stack(settings)  # the Prefect server; the sync gets a database of its own below
    if settings.database.url:
        url = settings.database.url.get_secret_value()
    else:
        server = running_embedded_postgres(settings.stack.postgres_dir)  # started by the stack
        url = ensure_database(server, "marketplace_bench")
    migrate_to_head(url)
    os.environ["DATABASE_URL"] = url
    os.environ["MARKETPLACE_CONCURRENCY"] = str(concurrency)
    get_settings.cache_clear()  # the onboard-account flow runs below must write to this database, not the stack's
    engine = get_engine(url)
    clear_marketplace_data(engine, accounts=True, truncate=True)
    state_dir = Path(tempfile.mkdtemp(prefix="marketplace-bench-"))
    config = EmulatorConfig(
        sellers=accounts, orders_per_seller=orders, items_per_seller=items, latency_ms=latency_ms, seed=11
    )
    emulator = start_emulator_process(config, state_dir, start_timeout=180.0)  # 100,000 orders to generate
    try:
        return _measure(emulator.base_url, config, engine, latency_ms, concurrency, settings, emulator.pid, notifications)
    finally:
        stop_emulator_process(state_dir)


def _measure(base_url, config, engine, latency_ms, concurrency, settings, emulator_pid=None, notifications=True) -> dict:
    from pydantic import SecretStr

    from blocks.marketplace_app import MarketplaceApp
    from emulators.marketplace import EmulatorControl
    from flows.sync_marketplace import sync_options
    from operations import settings as settings_module
    from operations.marketplace.store import clear_marketplace_data, list_accounts
    from operations.marketplace.sync import SyncResources, sync_account

    control = EmulatorControl(base_url)
    block_name = "marketplace-bench"
    app = MarketplaceApp(
        api_base_url=base_url, client_id=config.client_id, client_secret=SecretStr(config.client_secret),
        redirect_uri=config.redirect_uri, max_connections=max(20, concurrency * 2),
    )
    app.save(block_name, overwrite=True)
    os.environ["MARKETPLACE_APP_BLOCK"] = block_name
    figures: dict = {"accounts": config.sellers, "latency_ms": latency_ms, "concurrency": concurrency}
    figures["onboarding"] = _onboard_all(control, engine, app, block_name, concurrency)

    for runner in ("threads", "dask"):
        clear_marketplace_data(engine, truncate=True)
        os.environ["MARKETPLACE_TASK_RUNNER"] = runner
        settings_module.get_settings.cache_clear()
        from flows.sync_marketplace import sync_marketplace

        control.reset_stats()
        with PeakMemory({os.getpid()}) as memory, CpuSplit(_sync_processes(settings, emulator_pid)) as cpu:
            started = time.perf_counter()
            state = sync_marketplace(return_state=True)
            wall = time.perf_counter() - started
        if not state.is_completed():
            raise SystemExit(f"sync-marketplace on {runner} failed: {state.message}")
        requests = control.stats()["total"]
        floor = requests * latency_ms / 1000 / concurrency
        flow_run_id = state.state_details.flow_run_id
        figures[runner] = {
            "wall": wall, "requests": requests, "floor": floor, "ratio": wall / floor,
            "task_overhead": _task_overheads(flow_run_id, _reports_of(flow_run_id)), "peak_bytes": memory.peak,
            "cpu": cpu.seconds, "load": os.getloadavg()[0],
        }

    # the old behaviour: one account after another, same code, no orchestration
    clear_marketplace_data(engine, truncate=True)
    options = sync_options(settings)
    control.reset_stats()
    started = time.perf_counter()
    for account in list_accounts(engine):
        sync_account(engine, app.client(), account, SyncResources.both, options)
    figures["sequential"] = {"wall": time.perf_counter() - started, "requests": control.stats()["total"]}
    if notifications:
        figures["notifications"] = measure_notifications(base_url, control, engine)  # on the synced accounts
    return figures


ONBOARDED_BY_FLOW = 20


def _onboard_all(control, engine, app, block_name: str, concurrency: int) -> dict:
    """Onboard every emulated seller. The first ONBOARDED_BY_FLOW one at a time through the `onboard-account`
    flow (as operators do from the UI), as many more one at a time by the domain call alone (the baseline:
    the same code with no flow run around it), the rest in parallel (set-up, not measured)."""
    from flows.onboard_account import onboard_account
    from operations.marketplace.onboarding import onboard_from_code

    sellers = [(s["seller_id"], s["nickname"]) for s in control.sellers()]
    by_flow, direct, rest = (
        sellers[:ONBOARDED_BY_FLOW], sellers[ONBOARDED_BY_FLOW : 2 * ONBOARDED_BY_FLOW], sellers[2 * ONBOARDED_BY_FLOW :]
    )
    started = time.perf_counter()
    for seller_id, nickname in by_flow:
        state = onboard_account(
            authorization_code=control.authorize(seller_id), nickname=nickname, app_block=block_name,
            return_state=True,
        )
        if not state.is_completed():
            raise SystemExit(f"onboard-account failed: {state.message}")
    flow_seconds = (time.perf_counter() - started) / max(1, len(by_flow))
    started = time.perf_counter()
    for seller_id, nickname in direct:
        onboard_from_code(engine, app.client(), control.authorize(seller_id), nickname)
    direct_seconds = (time.perf_counter() - started) / max(1, len(direct))
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda s: onboard_from_code(engine, app.client(), control.authorize(s[0]), s[1]), rest))
    return {"by_flow": len(by_flow), "flow_seconds": flow_seconds, "direct": len(direct), "direct_seconds": direct_seconds}


def _reports_of(flow_run_id) -> list[dict]:
    """The per-account rows of the run's table artifact (their `seconds` is time spent in the sync code)."""
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
                key=ArtifactFilterKey(any_=["marketplace-sync-accounts"]),
            )
        )
    data = artifact.data if isinstance(artifact.data, list) else json.loads(artifact.data)
    return data


def _tree_cpu(pid: int) -> float:
    """CPU seconds of a process, its reaped children and its live descendants (0 when it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        times = root.cpu_times()
        total = times.user + times.system + times.children_user + times.children_system
        for child in root.children(recursive=True):
            try:
                child_times = child.cpu_times()
                total += child_times.user + child_times.system
            except psutil.Error:
                continue
        return total
    except psutil.Error:
        return 0.0


def _sync_processes(settings, emulator_pid: int | None) -> dict[str, int]:
    """The processes whose CPU a sync costs: this one (the flow, its threads, its Dask workers), the embedded
    PostgreSQL (when the stack runs it), the local Prefect server, the emulator."""
    import psutil
    from urllib.parse import urlparse

    found = {"flow process": os.getpid()}
    pid_file = settings.stack.postgres_dir / "data" / "postmaster.pid"
    if not settings.database.url and pid_file.exists():
        found["PostgreSQL"] = int(pid_file.read_text().split()[0])
    port = urlparse(os.environ.get("PREFECT_API_URL", "")).port
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if port and "server" in cmdline and "start" in cmdline and str(port) in cmdline and any(
            "prefect" in part for part in cmdline
        ):
            found["Prefect server"] = process.pid
            break
    if emulator_pid:
        found["emulator"] = emulator_pid
    return found


class CpuSplit:
    """CPU seconds each of the sync's processes (`_sync_processes`) spent while the block ran."""

    def __init__(self, processes: dict[str, int]):
        self.processes, self.seconds = processes, {}

    def __enter__(self) -> CpuSplit:
        self._start = {name: _tree_cpu(pid) for name, pid in self.processes.items()}
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = {name: _tree_cpu(pid) - self._start[name] for name, pid in self.processes.items()}


def cpu_line(figures: dict, runner: str) -> str:
    """Where a runner's sync spent CPU, per account, and how many requests were in flight on average."""
    f = figures[runner]
    per_account = ", ".join(f"{name} {seconds / figures['accounts'] * 1000:.0f} ms"
                            for name, seconds in f.get("cpu", {}).items())
    in_flight = f["requests"] * figures["latency_ms"] / 1000 / f["wall"]
    return (f"    CPU per account: {per_account}; requests in flight on average {in_flight:.1f} of "
            f"{figures['concurrency']}; machine load {f.get('load', 0.0):.1f} on {os.cpu_count()} cores")


def print_marketplace(figures: dict) -> None:
    n, latency, conc = figures["accounts"], figures["latency_ms"], figures["concurrency"]
    seq = figures["sequential"]
    print(f"marketplace sync, {n} accounts, {latency:.0f} ms per request, concurrency {conc}:")
    for runner in ("threads", "dask"):
        f = figures[runner]
        print(
            f"  {runner:8} {f['wall']:6.1f} s for {f['requests']:,} requests; floor {f['floor']:.1f} s "
            f"-> {f['ratio']:.2f}x the floor (target <= 1.5); {seq['wall'] / f['wall']:.1f}x faster than one "
            f"account after another; Prefect per account {f['task_overhead'] * 1000:.0f} ms; "
            f"peak memory {f['peak_bytes'] / 2**20:,.0f} MiB"
        )
        print(cpu_line(figures, runner))
    print(f"  baseline, one account after another (the old system): {seq['wall']:.1f} s for {seq['requests']:,} requests")
    if "notifications" in figures:
        print_notifications(figures["notifications"], n)
    o = figures["onboarding"]
    print(
        f"onboard-account, one seller at a time: {o['flow_seconds'] * 1000:.0f} ms per flow run ({o['by_flow']} runs); "
        f"baseline, the same code without a flow run: {o['direct_seconds'] * 1000:.0f} ms ({o['direct']} sellers); "
        f"Prefect's cost per onboarding {(o['flow_seconds'] - o['direct_seconds']) * 1000:.0f} ms"
    )
