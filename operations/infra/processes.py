"""The process helpers of the detached local services (operations/infra/services.py): ports, pid checks, state
files, folder locks, readiness waits and clean stops, and the address and auth checks of those that listen."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_free(port: int) -> bool:
    """Whether a server could listen on the port now (servers set SO_REUSEADDR, so TIME_WAIT is no obstacle)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Serialise starts and stops of one folder's service across processes."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_state(path: Path, state: dict) -> None:
    path.write_text(json.dumps(state))


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a service's log, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_process_group(pid: int, timeout: float) -> None:
    """SIGTERM the process group a detached service leads, SIGKILL it after `timeout` seconds."""
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
    reap(pid)


def stop_process(pid: int, first: int = signal.SIGTERM, timeout: float = 10.0) -> None:
    """Send `first` to one process (SIGTERM, or a gentler signal the program knows: PostgreSQL's SIGINT is its
    fast shutdown), SIGKILL it if it is still alive `timeout` seconds later, then reap it."""
    for sig, wait in ((first, timeout), (signal.SIGKILL, 5.0)):
        if not pid_alive(pid):
            break
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    reap(pid)


def wait_until_ready(
    process: subprocess.Popen, ready: Callable[[], bool], timeout: float, log: Path, what: str, poll: float = 0.1
) -> None:
    """Wait for a just-started detached service to answer; if it exits or `timeout` passes first, stop its
    process group and raise with the end of its log."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process_group(process.pid, 5)
            raise RuntimeError(f"{what}:\n{tail(log)}")
        time.sleep(poll)


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) only reaches this machine."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another name: it may resolve to any interface


class ExposedWithoutAuth(RuntimeError):
    """A service would listen beyond this machine with no authentication."""


def require_auth_off_loopback(service: str, host: str, auth_configured: bool) -> None:
    """Refuse to expose `service` on a non-loopback address without authentication (STACK_AUTH_STRING)."""
    if not is_loopback(host) and not auth_configured:
        raise ExposedWithoutAuth(
            f"{service} would listen on {host}, reachable from other machines, with no authentication: "
            "set STACK_AUTH_STRING (user:password) or keep STACK_HOST=127.0.0.1 behind a reverse proxy with auth"
        )


def client_host(bind_host: str) -> str:
    """The address clients on this machine use for a server listening on `bind_host` (in URL form)."""
    if bind_host in ("0.0.0.0", "", "::"):
        return "127.0.0.1"
    return f"[{bind_host}]" if ":" in bind_host else bind_host


def basic_auth_headers(auth_string: str | None) -> dict[str, str]:
    """The Authorization header of HTTP basic auth for `user:password` (none without a string)."""
    if not auth_string:
        return {}
    return {"Authorization": "Basic " + base64.b64encode(auth_string.encode()).decode()}
