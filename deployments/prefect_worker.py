"""The project's process work pool and a local `prefect worker` on it: the last service of the stack, a program of
its supervisor (started again when it dies), reused by later processes.

The worker runs each flow run of the pool's deployments in its own process, from the project folder
(the `set_working_directory` pull step of prefect.yaml), with the worker's environment.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx

from operations.infra.http import default_ssl_context
from operations.infra.processes import basic_auth_headers
from operations.infra.services import Service

STATE_FILE = "prefect-worker.json"
LOCAL_WORK_POOL = "operations-local"


@dataclass(frozen=True)
class PrefectWorker:
    name: str
    pool: str
    pid: int
    started: bool
    api_url: str = ""
    heartbeat_seconds: int | None = None  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY of its flow runs


def ensure_work_pool(pool: str = LOCAL_WORK_POOL) -> None:
    """Create the process work pool if it is missing."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            try:
                client.create_work_pool(
                    WorkPoolCreate(
                        name=pool,
                        type="process",
                        description="Local process worker of this project (make up).",
                        base_job_template=ProcessWorker.get_default_base_job_template(),
                    )
                )
            except ObjectAlreadyExists:  # another `up` won the race
                pass


def _workers(api_url: str, pool: str, headers: dict[str, str]) -> list[dict] | None:
    """The pool's worker rows (None when the server cannot say)."""
    try:
        response = httpx.post(f"{api_url}/work_pools/{pool}/workers/filter", json={}, headers=headers, timeout=5,
                              verify=default_ssl_context())
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def last_heartbeat(api_url: str, pool: str, name: str, headers: dict[str, str] | None = None) -> str | None:
    """The server's time of the last heartbeat of worker `name` on `pool` (ISO text), None if it never had one."""
    rows = _workers(api_url, pool, headers or {}) or []
    return next((w.get("last_heartbeat_time") for w in rows if w["name"] == name), None)


def worker_heartbeat_since(
    api_url: str, pool: str, name: str, since: str | None, headers: dict[str, str] | None = None
) -> bool:
    """Whether worker `name` is ONLINE with a heartbeat later than `since` (a last_heartbeat before it started).

    A row left ONLINE by an earlier worker of the same name (killed, or stopped before the server marked it
    offline) says nothing about the new process: only a newer heartbeat does. Both times are the server's
    clock, so a client clock off the server's cannot fool it."""
    for w in _workers(api_url, pool, headers or {}) or []:
        if w["name"] == name and w.get("status") == "ONLINE" and w.get("last_heartbeat_time"):
            return since is None or _instant(w["last_heartbeat_time"]) > _instant(since)
    return False


def _instant(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


def worker_name(pool: str) -> str:
    return f"{pool}@{socket.gethostname()}"


class PrefectWorkerService(Service[PrefectWorker]):
    """A `prefect worker` of the process pool `pool` on the server at `api_url` (by default this process's
    PREFECT_API_URL when it starts), polling every `query_seconds` (PREFECT_WORKER_QUERY_SECONDS when set).

    Flow runs inherit the worker's environment (this process's, plus `extra_env`): settings such as OUTPUT_DIR
    or REDIS_URL given here apply to every run it starts, and PREFECT_API_AUTH_STRING, which the readiness check
    sends too. Each flow run sends a heartbeat event every `heartbeat_seconds` (PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
    FLOW_HEARTBEAT_SECONDS): the zombie automation (deployments/automations.py) marks a run Crashed when they
    stop. Ready means a heartbeat of the new process: newer than the one the server held for this name before. A
    running worker of another server, pool or heartbeat frequency is replaced."""

    name = "prefect worker"
    state_file = STATE_FILE
    log_file = "worker.log"
    stop_timeout = 30.0  # it stops the flow runs it started too (its process group)

    def __init__(
        self,
        folder: Path,
        api_url: str | None = None,
        project_dir: Path | None = None,
        pool: str = LOCAL_WORK_POOL,
        query_seconds: float = 5.0,
        timeout: float = 90.0,
        extra_env: dict[str, str] | None = None,
        heartbeat_seconds: int = 30,
    ):
        super().__init__(folder)
        self.start_wait = timeout
        self.api_url, self.project_dir, self.pool = api_url, project_dir, pool
        self.heartbeat_seconds = heartbeat_seconds
        self.query_seconds, self.timeout, self.extra_env = query_seconds, timeout, extra_env or {}

    def find(self) -> PrefectWorker | None:
        state = self.state()
        pid = self.current_pid(state)
        if not state or pid is None:
            return None
        return PrefectWorker(state["name"], state["pool"], pid, False, state.get("api_url", ""),
                             state.get("heartbeat_seconds"))

    def _api_url(self) -> str:
        """The server it works for: `api_url`, else this process's PREFECT_API_URL (the stack sets it)."""
        api_url = self.api_url or os.environ.get("PREFECT_API_URL")
        if not api_url:
            raise ValueError("a worker starts only for a Prefect API URL (PREFECT_API_URL)")
        return api_url

    def reuse(self, running: PrefectWorker) -> bool:
        return (running.api_url, running.pool, running.heartbeat_seconds) == (
            self._api_url(), self.pool, self.heartbeat_seconds)

    def start(self) -> PrefectWorker:
        api_url, pool, name = self._api_url(), self.pool, worker_name(self.pool)
        # PREFECT_WORKER_QUERY_SECONDS of this process (the shell of `make up`) wins over `query_seconds`
        query_seconds = float(os.environ.get("PREFECT_WORKER_QUERY_SECONDS") or self.query_seconds)
        env = dict(os.environ)
        env.update(
            {
                "PREFECT_API_URL": api_url,
                "PREFECT_WORKER_QUERY_SECONDS": str(query_seconds),
                "PREFECT_WORKER_PREFETCH_SECONDS": str(max(10.0, query_seconds)),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(self.heartbeat_seconds),
                **self.extra_env,
            }
        )
        headers = basic_auth_headers(env.get("PREFECT_API_AUTH_STRING"))
        since = last_heartbeat(api_url, pool, name, headers)
        pid = self.supervise(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process", "--name", name],
            lambda: worker_heartbeat_since(api_url, pool, name, since, headers), self.timeout,
            {"pool": pool, "api_url": api_url, "name": name, "heartbeat_seconds": self.heartbeat_seconds}, env=env,
            cwd=self.project_dir, poll=0.5,
            failure=f"prefect worker did not come online on pool {pool!r} (no heartbeat of its own)",
        )
        return PrefectWorker(name, pool, pid, True, api_url, self.heartbeat_seconds)

    def address(self, running: PrefectWorker) -> str:
        return f"{running.name} on pool {running.pool}"


def ensure_prefect_worker(
    worker_dir: Path,
    api_url: str,
    project_dir: Path,
    pool: str = LOCAL_WORK_POOL,
    query_seconds: float = 5.0,
    timeout: float = 90.0,
    extra_env: dict[str, str] | None = None,
) -> PrefectWorker:
    """Reuse this folder's running worker, or start one (PrefectWorkerService)."""
    return PrefectWorkerService(worker_dir, api_url, project_dir, pool, query_seconds, timeout, extra_env).ensure()


def stop_prefect_worker(worker_dir: Path, timeout: float = 30.0) -> bool:
    """Stop this folder's worker and the flow runs it started (its process group). True if one was running."""
    return PrefectWorkerService(worker_dir).stop(timeout)
