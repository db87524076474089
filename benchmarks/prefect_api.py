"""The Prefect server under concurrent REST clients, for `make bench`, on both databases in the same run.

A fresh `prefect server` per backend, each in its own temporary folder: SQLite there (the old default, the
baseline) or database "prefect" on a fresh embedded PostgreSQL there (the stack's default). For N = 1, 5 and 20
client threads, each thread creates flow runs through `POST /api/flow_runs/` on its own keep-alive connection for
SECONDS, as other applications starting runs do. Printed per backend and N: successful creates/s, the share of
attempts that failed (503, other error statuses, dropped connections, timeouts), the 95th percentile latency of
the successful ones. (SQLite's 503s are its "database is locked", which the server answers as retryable.)
Target: no failure at 20 concurrent clients with the default stack (PostgreSQL).
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

CLIENTS = (1, 5, 20)
BACKENDS = ("sqlite", "postgresql")
REQUEST_TIMEOUT = 30.0  # seconds one create may take before it counts as a timeout


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


def _client(api_url: str, flow_id: str, deadline: float, load: Load, lock: threading.Lock) -> None:
    latencies, failures = [], Counter()
    with httpx.Client(base_url=api_url, timeout=REQUEST_TIMEOUT) as client:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                response = client.post("/flow_runs/", json={"flow_id": flow_id, "state": {"type": "SCHEDULED"}})
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


def measure(api_url: str, flow_id: str, clients: int, seconds: float) -> Load:
    """`clients` threads creating flow runs for `seconds`; the rate is over the time until the last one returned."""
    load, lock = Load(clients), threading.Lock()
    started = time.monotonic()
    threads = [
        threading.Thread(target=_client, args=(api_url, flow_id, started + seconds, load, lock))
        for _ in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    load.seconds = time.monotonic() - started
    return load


def bench_backend(backend: str, seconds: float, clients: tuple[int, ...] = CLIENTS) -> dict:
    """A fresh server on `backend` in a temporary folder, measured at each number of clients, then removed."""
    from deployments.prefect_server import (
        embedded_prefect_database,
        ensure_prefect_server,
        sqlite_database,
        stop_prefect_server,
    )
    from operations.infra.embedded_postgres import ensure_embedded_postgres, stop_embedded_postgres
    from operations.infra.processes import free_port

    root = Path(tempfile.mkdtemp(prefix="prefect-api-bench-"))
    try:
        if backend == "postgresql":
            database = embedded_prefect_database(ensure_embedded_postgres(root / "postgres"))
        else:
            database = sqlite_database(root / "prefect")
        server = ensure_prefect_server(root / "prefect", port=free_port(), database=database)
        flow = httpx.post(f"{server.api_url}/flows/", json={"name": "api-bench"}, timeout=REQUEST_TIMEOUT)
        flow.raise_for_status()
        loads = []
        for n in clients:
            loads.append(measure(server.api_url, flow.json()["id"], n, seconds))
            time.sleep(2)  # let the server drain what the last clients left before the next measurement
        return {"backend": backend, "loads": loads}
    finally:
        stop_prefect_server(root / "prefect")
        stop_embedded_postgres(root / "postgres")
        shutil.rmtree(root, ignore_errors=True)


def bench_prefect_api(seconds: float, clients: tuple[int, ...] = CLIENTS) -> list[dict]:
    return [bench_backend(backend, seconds, clients) for backend in BACKENDS]


def print_prefect_api(results: list[dict]) -> None:
    seconds = results[0]["loads"][0].seconds if results and results[0]["loads"] else 0.0
    print(f"Prefect API, POST /api/flow_runs/ from N client threads for ~{seconds:.0f} s each, a fresh server per "
          "database (baseline: SQLite, the old default):")
    by_backend = {r["backend"]: {load.clients: load for load in r["loads"]} for r in results}
    for result in results:
        for load in result["loads"]:
            failures = ", ".join(f"{k} {v}" for k, v in sorted(load.failures.items())) or "none"
            baseline = by_backend.get("sqlite", {}).get(load.clients)
            versus = (
                f"; {load.rate / baseline.rate:.1f} x SQLite's rate"
                if result["backend"] != "sqlite" and baseline and baseline.rate else ""
            )
            print(f"  {result['backend']:10} {load.clients:>2} client(s): {load.rate:6.1f} creates/s, "
                  f"{load.failed_share:6.1%} failed ({failures}), p95 {load.p95_ms:,.0f} ms{versus}", flush=True)
    postgresql = by_backend.get("postgresql")
    if postgresql:
        top = postgresql[max(postgresql)]
        failed = sum(top.failures.values())
        verdict = "met" if not failed and top.created else "NOT met"
        print(f"  target: no failure at {top.clients} concurrent clients with the default stack (PostgreSQL): "
              f"{verdict} ({failed} failed of {top.created + failed})")
