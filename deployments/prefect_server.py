"""A real local `prefect server` (SQLite under its folder, analytics off), started detached and reused.

Prefect's ephemeral in-process API cannot serve Dask process workers, so every local run talks to this one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from operations.infra.processes import (
    folder_lock,
    free_port,
    pid_alive,
    port_free,
    read_state,
    stop_detached_service,
    wait_until_ready,
    write_state,
)

STATE_FILE = "prefect-server.json"
DEFAULT_PORT = 4200


@dataclass(frozen=True)
class PrefectServer:
    api_url: str
    ui_url: str
    port: int
    pid: int
    started: bool


def prefect_server_env(prefect_dir: Path) -> dict[str, str]:
    """Environment of the server process: its own home and SQLite database, no analytics."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_PROFILES_PATH")}
    env.update(
        {
            "PREFECT_HOME": str(prefect_dir),
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{prefect_dir / 'prefect.db'}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
            # The UI calls the API of the server that served it (the default is port 4200 whatever --port
            # says, so a second server's UI would show the first one's runs).
            "PREFECT_UI_API_URL": "/api",
        }
    )
    return env


def _healthy(api_url: str) -> bool:
    try:
        return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def running_prefect_server(prefect_dir: Path) -> PrefectServer | None:
    """This folder's server if it is running and healthy, without starting one."""
    state = read_state(Path(prefect_dir).resolve() / STATE_FILE)
    if not state or not pid_alive(state["pid"]):
        return None
    p = state["port"]
    if not _healthy(f"http://127.0.0.1:{p}/api"):
        return None
    return PrefectServer(f"http://127.0.0.1:{p}/api", f"http://127.0.0.1:{p}", p, state["pid"], False)


def ensure_prefect_server(prefect_dir: Path, port: int | None = None, timeout: float = 120.0) -> PrefectServer:
    """Reuse this folder's running server or start one (port 4200 if free, else any free port)."""
    prefect_dir = Path(prefect_dir).resolve()
    with folder_lock(prefect_dir):
        running = running_prefect_server(prefect_dir)
        if running is not None:
            return running
        if port is None:
            port = DEFAULT_PORT if port_free(DEFAULT_PORT) else free_port()
        log = prefect_dir / "server.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                env=prefect_server_env(prefect_dir),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        api_url = f"http://127.0.0.1:{port}/api"
        wait_until_ready(
            process, lambda: _healthy(api_url), timeout, log, f"prefect server did not become healthy on {api_url}",
            poll=0.5,
        )
        write_state(prefect_dir / STATE_FILE, {"port": port, "pid": process.pid})
        return PrefectServer(api_url, f"http://127.0.0.1:{port}", port, process.pid, True)


def stop_prefect_server(prefect_dir: Path, timeout: float = 20.0) -> bool:
    """Stop this folder's server. True if one was running."""
    return stop_detached_service(prefect_dir, STATE_FILE, timeout)
