"""The Prefect server under concurrent REST clients, for `make bench`: the stack's server beside a plain one.

    python -m benchmarks.prefect_api [--seconds 15] [--rounds 4] [--clients 1,5,20] [--skip-sqlite]

Two fresh servers on two fresh databases of one fresh embedded PostgreSQL, both up for the whole measurement:
the stack's server, started as deployments/prefect_server.py starts it, and the baseline, a plain
`prefect server start` with nothing set but its database, PREFECT_LOGGING_SERVER_LEVEL=WARNING and the UI off.
For N = 1, 5 and 20 client threads, each thread creates flow runs through `POST /api/flow_runs/` on its own
keep-alive connection, as other applications starting runs do, each run scheduled an hour ahead: a run nobody
picks up is marked Late by the server's late-runs service ~15 s after its time, a second state change as costly
as the create, which would land on the next rounds (on 2 cores it cost the 20-client round a third of its rate).
Each N is measured in ROUNDS short rounds alternating between the two servers, so that both see the same load
from the rest of the machine; the median round is printed. Then, for context, the stack's server on SQLite (a
fresh one, one round per N).
Printed per server and N: successful creates/s, the share of attempts that failed (503, other error statuses,
dropped connections, timeouts), the 95th percentile latency of the successful ones, and the stack's rate as a
share of the plain server's. (SQLite's 503s are its "database is locked", which the server answers as retryable.)
Targets: no failure at 20 concurrent clients on the stack's PostgreSQL server, and its rate >= 0.8 x the plain
server's at every N (the spread of one run's medians on a shared 2-core machine: the two servers are alike).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx

CLIENTS = (1, 5, 20)
ROUNDS = 4  # even: each server goes first in half of them (the first one meets the other's leftover work)
SCHEDULED_AHEAD = 3600.0  # seconds: the runs' scheduled time, out of the late-runs service's reach (docstring)
REQUEST_TIMEOUT = 30.0  # seconds one create may take before it counts as a timeout
START_TIMEOUT = 180.0  # seconds a server may take to answer after it started (a busy machine, migrations)
SETTLE = 10.0  # seconds after both servers answer: their services' first passes end before the first round
DRAIN = 3.0  # seconds between measurements: the server just loaded persists its events meanwhile
# The stack's server against the plain one, at every N: on a shared 2-core machine one bench's medians of
# ~4 s rounds still vary by +-15% between runs, for either server.
TARGET_SHARE = 0.8
# The baseline's whole configuration besides its home and database.
PLAIN_SERVER_ENV = {"PREFECT_LOGGING_SERVER_LEVEL": "WARNING", "PREFECT_SERVER_UI_ENABLED": "false"}
STACK, PLAIN, SQLITE = "stack", "plain", "stack on SQLite"


@dataclass
class Load:
    """What N clients got from one server in one measurement."""

    clients: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # of the successful creates
    failures: Counter = field(default_factory=Counter)  # "503", "500", "dropped", "timeout", ...

    @property
    def created(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.created / self.seconds if self.seconds else 0.0

    @property
    def failed_share(self) -> float:
        attempts = self.created + sum(self.failures.values())
        return sum(self.failures.values()) / attempts if attempts else 0.0

    @property
    def p95_ms(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[int(0.95 * (len(ordered) - 1))] * 1000 if ordered else 0.0


@dataclass
class Rounds:
    """The rounds of one server at one N: the median round's rate, the failures and latencies of all."""

    clients: int
    loads: list[Load] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return statistics.median(load.rate for load in self.loads) if self.loads else 0.0

    @property
    def merged(self) -> Load:
        """Every round's creates and failures as one load (its rate is not the median's)."""
        return Load(self.clients, latencies=[s for load in self.loads for s in load.latencies],
                    failures=sum((load.failures for load in self.loads), Counter()))

    @property
    def failures(self) -> Counter:
        return self.merged.failures

    @property
    def created(self) -> int:
        return self.merged.created

    @property
    def failed_share(self) -> float:
        return self.merged.failed_share

    @property
    def p95_ms(self) -> float:
        return self.merged.p95_ms


@dataclass(frozen=True)
class Target:
    """A server under test: its API and the flow its runs belong to."""

    name: str
    api_url: str
    flow_id: str
    headers: dict[str, str] = field(default_factory=dict)


def _client(target: Target, deadline: float, load: Load, lock: threading.Lock) -> None:
    latencies, failures = [], Counter()
    ahead = (datetime.now(timezone.utc) + timedelta(seconds=SCHEDULED_AHEAD)).isoformat()
    body = {"flow_id": target.flow_id, "state": {"type": "SCHEDULED", "state_details": {"scheduled_time": ahead}}}
    with httpx.Client(base_url=target.api_url, headers=target.headers, timeout=REQUEST_TIMEOUT) as client:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                response = client.post("/flow_runs/", json=body)
            except httpx.TimeoutException:
                failures["timeout"] += 1
                continue
            except httpx.TransportError:  # reset, refused, closed without an answer: the client reconnects
                failures["dropped"] += 1
                continue
            if response.status_code in (200, 201):
                latencies.append(time.perf_counter() - started)
            else:
                failures[str(response.status_code)] += 1
    with lock:
        load.latencies.extend(latencies)
        load.failures.update(failures)


def measure(target: Target, clients: int, seconds: float) -> Load:
    """`clients` threads creating flow runs for `seconds`; the rate is over the time until the last one returned."""
    load, lock = Load(clients), threading.Lock()
    started = time.monotonic()
    threads = [
        threading.Thread(target=_client, args=(target, started + seconds, load, lock)) for _ in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    load.seconds = time.monotonic() - started
    return load


def _target(name: str, api_url: str, headers: dict[str, str] | None = None) -> Target:
    flow = httpx.post(f"{api_url}/flows/", json={"name": "api-bench"}, headers=headers, timeout=REQUEST_TIMEOUT)
    flow.raise_for_status()
    return Target(name, api_url, flow.json()["id"], headers or {})


def start_plain_server(folder: Path, database_url: str) -> tuple[subprocess.Popen, str]:
    """The baseline: `prefect server start` with its home, its database and PLAIN_SERVER_ENV, no other PREFECT_*
    variable of this process; (process, API URL) once it answers."""
    from operations.infra.processes import free_port, wait_until_ready

    folder.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PLAIN_SERVER_ENV, PREFECT_HOME=str(folder), PREFECT_API_DATABASE_CONNECTION_URL=database_url)
    port = free_port()
    log = folder / "server.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    api_url = f"http://127.0.0.1:{port}/api"

    def ready() -> bool:
        try:
            return httpx.get(f"{api_url}/admin/version", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until_ready(process, ready, START_TIMEOUT, log, f"the plain prefect server did not answer on {api_url}")
    return process, api_url


def _asyncpg_url(sync_url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(sync_url).set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


def bench_stack_and_plain(seconds: float, clients: tuple[int, ...] = CLIENTS, rounds: int = ROUNDS) -> dict:
    """The stack's server and the plain one side by side on a fresh embedded PostgreSQL (module docstring);
    {server name: {N: Rounds}}. Everything started here is stopped and removed."""
    from deployments.prefect_server import ServerDatabase, ensure_prefect_server, stop_prefect_server
    from operations.infra.embedded_postgres import ensure_database, ensure_embedded_postgres, stop_embedded_postgres
    from operations.infra.processes import free_port, stop_process_group

    root = Path(tempfile.mkdtemp(prefix="prefect-api-bench-"))
    plain = None
    try:
        postgres = ensure_embedded_postgres(root / "postgres")
        stack_url = _asyncpg_url(ensure_database(postgres, "stack"))
        stack = ensure_prefect_server(
            root / "stack", port=free_port(), database=ServerDatabase(stack_url, "postgresql", "bench: stack"),
            timeout=START_TIMEOUT,
        )
        plain, plain_api = start_plain_server(root / "plain", _asyncpg_url(ensure_database(postgres, "plain")))
        targets = [_target(STACK, stack.api_url), _target(PLAIN, plain_api)]
        time.sleep(SETTLE)
        results = {target.name: {n: Rounds(n) for n in clients} for target in targets}
        for n in clients:
            for i in range(rounds):
                for target in targets if i % 2 == 0 else targets[::-1]:  # neither always goes first
                    results[target.name][n].loads.append(measure(target, n, seconds / rounds))
                    time.sleep(DRAIN)
        return results
    finally:
        if plain is not None:
            stop_process_group(plain.pid, 20)
        stop_prefect_server(root / "stack")
        stop_embedded_postgres(root / "postgres")
        shutil.rmtree(root, ignore_errors=True)


def bench_stack_on_sqlite(seconds: float, clients: tuple[int, ...] = CLIENTS) -> dict[int, Rounds]:
    """The stack's server on SQLite in a temporary folder, one round of `seconds` per N."""
    from deployments.prefect_server import ensure_prefect_server, sqlite_database, stop_prefect_server
    from operations.infra.processes import free_port

    root = Path(tempfile.mkdtemp(prefix="prefect-api-bench-"))
    try:
        server = ensure_prefect_server(
            root / "prefect", port=free_port(), database=sqlite_database(root / "prefect"), timeout=START_TIMEOUT
        )
        target = _target(SQLITE, server.api_url)
        results = {}
        for n in clients:
            results[n] = Rounds(n, [measure(target, n, seconds)])
            time.sleep(DRAIN)
        return results
    finally:
        stop_prefect_server(root / "prefect")
        shutil.rmtree(root, ignore_errors=True)


def bench_prefect_api(
    seconds: float, clients: tuple[int, ...] = CLIENTS, rounds: int = ROUNDS, sqlite: bool = True
) -> dict:
    """{"seconds", "rounds", "servers": {name: {N: Rounds}}}: the stack's server and the plain one, then SQLite."""
    servers = bench_stack_and_plain(seconds, clients, rounds)
    if sqlite:
        servers[SQLITE] = bench_stack_on_sqlite(seconds, clients)
    return {"seconds": seconds, "rounds": rounds, "servers": servers}


def _line(name: str, result: Rounds, baseline: Rounds | None) -> str:
    failures = ", ".join(f"{k} {v}" for k, v in sorted(result.failures.items())) or "none"
    versus = f"; {result.rate / baseline.rate:.2f} x the plain server" if baseline and baseline.rate else ""
    return (f"  {name:16} {result.clients:>2} client(s): {result.rate:6.1f} creates/s, {result.failed_share:6.1%} "
            f"failed ({failures}), p95 {result.p95_ms:,.0f} ms{versus}")


def print_prefect_api(results: dict) -> None:
    servers = results["servers"]
    print(f"Prefect API, POST /api/flow_runs/ from N client threads: the stack's server beside a plain "
          f"`prefect server start` (log WARNING, UI off), both on the embedded PostgreSQL, {results['rounds']} "
          f"alternating rounds of ~{results['seconds'] / results['rounds']:.0f} s per N (median round):")
    for n in servers[STACK]:
        print(_line("plain server", servers[PLAIN][n], None), flush=True)
        print(_line("stack's server", servers[STACK][n], servers[PLAIN][n]), flush=True)
    for n, result in servers.get(SQLITE, {}).items():
        print(_line("stack on SQLite", result, servers[PLAIN].get(n)), flush=True)
    top = servers[STACK][max(servers[STACK])]
    failed = sum(top.failures.values())
    verdict = "met" if not failed and top.created else "NOT met"
    print(f"  target: no failure at {top.clients} concurrent clients on the stack's server (PostgreSQL): "
          f"{verdict} ({failed} failed of {top.created + failed})")
    shares = {n: servers[STACK][n].rate / servers[PLAIN][n].rate for n in servers[STACK] if servers[PLAIN][n].rate}
    worst = min(shares, key=shares.get) if shares else None
    verdict = "met" if shares and shares[worst] >= TARGET_SHARE else "NOT met"
    print(f"  target: the stack's server >= {TARGET_SHARE} x the plain server's rate at every N: {verdict}"
          + (f" (lowest {shares[worst]:.2f} x at {worst} client(s))" if worst else ""), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0, help="load time per N and server, over all rounds")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="alternating rounds per N (median printed)")
    parser.add_argument("--clients", default=",".join(map(str, CLIENTS)), help="numbers of client threads")
    parser.add_argument("--skip-sqlite", action="store_true", help="no SQLite server after the two")
    args = parser.parse_args(argv)
    clients = tuple(int(n) for n in args.clients.split(","))
    print_prefect_api(bench_prefect_api(args.seconds, clients, args.rounds, sqlite=not args.skip_sqlite))
    return 0


if __name__ == "__main__":
    sys.exit(main())
