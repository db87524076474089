"""The project's process work pool and a local `prefect worker` on it, started detached and reused.

The worker runs each flow run of the pool's deployments in its own process, from the project folder
(the `set_working_directory` pull step of prefect.yaml), with the worker's environment.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx

from operations.infra.processes import (
    basic_auth_headers,
    folder_lock,
    pid_alive,
    read_state,
    stop_detached_service,
    stop_process_group,
    wait_until_ready,
    write_state,
)

STATE_FILE = "prefect-worker.json"
LOCAL_WORK_POOL = "operations-local"


@dataclass(frozen=True)
class PrefectWorker:
    name: str
    pool: str
    pid: int
    started: bool


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
        response = httpx.post(f"{api_url}/work_pools/{pool}/workers/filter", json={}, headers=headers, timeout=5)
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


def running_prefect_worker(worker_dir: Path) -> dict | None:
    """The state (pid, pool, api_url, name) of this folder's worker if its process is alive."""
    state = read_state(Path(worker_dir).resolve() / STATE_FILE)
    return state if state and pid_alive(state["pid"]) else None


def worker_name(pool: str) -> str:
    return f"{pool}@{socket.gethostname()}"


def ensure_prefect_worker(
    worker_dir: Path,
    api_url: str,
    project_dir: Path,
    pool: str = LOCAL_WORK_POOL,
    query_seconds: float = 5.0,
    timeout: float = 90.0,
    extra_env: dict[str, str] | None = None,
) -> PrefectWorker:
    """Reuse this folder's running worker, or start one polling `pool` every `query_seconds`.

    Flow runs inherit the worker's environment (plus `extra_env`): settings such as OUTPUT_DIR or REDIS_URL
    given here apply to every run it starts, and PREFECT_API_AUTH_STRING, which the readiness check sends too.
    Ready means a heartbeat of the new process: newer than the one the server held for this name before."""
    worker_dir = Path(worker_dir).resolve()
    name = worker_name(pool)
    with folder_lock(worker_dir):
        state = running_prefect_worker(worker_dir)
        if state and state.get("api_url") == api_url and state.get("pool") == pool:
            return PrefectWorker(name, pool, state["pid"], False)
        if state:  # a worker of another server or pool: replace it
            stop_process_group(state["pid"], 30)
        env = dict(os.environ)
        env.update(
            {
                "PREFECT_API_URL": api_url,
                "PREFECT_WORKER_QUERY_SECONDS": str(query_seconds),
                "PREFECT_WORKER_PREFETCH_SECONDS": str(max(10.0, query_seconds)),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                **(extra_env or {}),
            }
        )
        headers = basic_auth_headers(env.get("PREFECT_API_AUTH_STRING"))
        since = last_heartbeat(api_url, pool, name, headers)
        log = worker_dir / "worker.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
                 "--name", name],
                cwd=project_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until_ready(
            process, lambda: worker_heartbeat_since(api_url, pool, name, since, headers), timeout, log,
            f"prefect worker did not come online on pool {pool!r} (no heartbeat of its own)", poll=0.5,
        )
        write_state(worker_dir / STATE_FILE, {"pid": process.pid, "pool": pool, "api_url": api_url, "name": name})
        return PrefectWorker(name, pool, process.pid, True)


def stop_prefect_worker(worker_dir: Path, timeout: float = 30.0) -> bool:
    """Stop this folder's worker and the flow runs it started (its process group). True if one was running."""
    return stop_detached_service(worker_dir, STATE_FILE, timeout)
