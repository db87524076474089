"""A real local `prefect server` (SQLite under its folder, analytics off), started detached and reused.

Prefect's ephemeral in-process API cannot serve Dask process workers, so every local run talks to this one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from operations.infra.embedded_redis import folder_lock, free_port, pid_alive

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
        }
    )
    return env


def _healthy(api_url: str) -> bool:
    try:
        return httpx.get(f"{api_url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def ensure_prefect_server(prefect_dir: Path, port: int | None = None, timeout: float = 120.0) -> PrefectServer:
    """Reuse this folder's running server or start one (port 4200 if free, else any free port)."""
    prefect_dir = Path(prefect_dir).resolve()
    with folder_lock(prefect_dir):
        try:
            state = json.loads((prefect_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            state = None
        if state and pid_alive(state["pid"]) and _healthy(f"http://127.0.0.1:{state['port']}/api"):
            p = state["port"]
            return PrefectServer(f"http://127.0.0.1:{p}/api", f"http://127.0.0.1:{p}", p, state["pid"], False)
        if port is None:
            port = DEFAULT_PORT if _port_free(DEFAULT_PORT) else free_port()
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
        deadline = time.monotonic() + timeout
        while not _healthy(api_url):
            if process.poll() is not None or time.monotonic() > deadline:
                _stop_group(process.pid, 5)
                raise RuntimeError(f"prefect server did not become healthy on {api_url}:\n{_tail(log)}")
            time.sleep(0.5)
        (prefect_dir / STATE_FILE).write_text(json.dumps({"port": port, "pid": process.pid}))
        return PrefectServer(api_url, f"http://127.0.0.1:{port}", port, process.pid, True)


def _stop_group(pid: int, timeout: float) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_prefect_server(prefect_dir: Path, timeout: float = 20.0) -> bool:
    """Stop this folder's server. True if one was running."""
    prefect_dir = Path(prefect_dir).resolve()
    with folder_lock(prefect_dir):
        try:
            state = json.loads((prefect_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return False
        (prefect_dir / STATE_FILE).unlink(missing_ok=True)
        if not pid_alive(state["pid"]):
            return False
        _stop_group(state["pid"], timeout)
        return True
