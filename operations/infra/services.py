"""The detached local services (PostgreSQL, Redis, the file server, the Prefect server and worker, the emulators):
one small base class, so each service declares only what differs: how it starts, how it answers, what it exports.

A service lives in its own folder under DATA_DIR: a JSON state file (its pid and address), its log, and a lock
file that serialises starts and stops across processes. `find()` only looks (flows' settings lookups and
`make status` use it); `ensure()` reuses a running one or starts one; `stop()` ends its process group. Only the
stack (deployments/services.py: `make up`, `make demo`) and the test session call `ensure()`: flow, task and
block code never starts a process, it names the setting to set instead (`NotConfigured`).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Generic, Mapping, TypeVar

from pydantic import SecretStr

from operations.errors import UserError

from operations.infra.processes import (
    folder_lock,
    pid_alive,
    read_state,
    stop_process_group,
    wait_until_ready,
    write_state,
)

Handle = TypeVar("Handle")


class NotConfigured(UserError, RuntimeError):
    """A setting that names a service is unset and no local stack runs that service on this machine: the
    operator sets it or starts the stack (a user error: one line, never retried)."""


def not_configured(setting: str, what: str, data_dir: Path) -> NotConfigured:
    """The error of flow and block code that needs `what` when `setting` is unset and no stack runs one."""
    return NotConfigured(
        f"{setting} is not set and no local stack runs {what} under DATA_DIR ({data_dir}): set {setting}, "
        "or start the local stack with `make up`"
    )


def configured_or_running(
    configured: SecretStr | str | None, setting: str, running: Callable[[], str | None], what: str, data_dir: Path
) -> str:
    """The address a setting gives (`configured`), else the one of the service the local stack runs here
    (`running()`, a look-up that starts nothing), else NotConfigured naming the setting."""
    if configured:
        return configured.get_secret_value() if isinstance(configured, SecretStr) else configured
    address = running()
    if address is None:
        raise not_configured(setting, what, data_dir)
    return address


@dataclass(frozen=True)
class ServiceStatus:
    """What `make status` shows of one service."""

    name: str
    running: bool
    pid: int | None
    address: str  # where clients reach it ("" when not running)
    log: Path
    note: str = ""  # a detail (its database, its auth) or why the stack does not run it

    def line(self) -> str:
        state = f"running, pid {self.pid}, {self.address}" if self.running else "not running"
        note = f" ({self.note})" if self.note else ""
        return f"{state}{note}; log {self.log}"


class Service(Generic[Handle]):
    """A detached process with a state file and a log in its folder.

    Subclasses set `name`, `state_file` and `log_file` and implement `find` (the running one, without starting
    anything), `start` (called under the folder's lock when none runs) and `address`; they may override `reuse`
    (whether a running one serves what is asked now), `exports` (the environment variables by which clients
    reach it) and `stop` (a gentler stop than SIGTERM to its process group)."""

    name: ClassVar[str]
    state_file: ClassVar[str]
    log_file: ClassVar[str]
    stop_timeout: ClassVar[float] = 10.0

    def __init__(self, folder: Path):
        self.folder = Path(folder).resolve()

    @property
    def log(self) -> Path:
        return self.folder / self.log_file

    def state(self) -> dict | None:
        return read_state(self.folder / self.state_file)

    def find(self) -> Handle | None:
        """The running one if it answers; starts nothing."""
        raise NotImplementedError

    def start(self) -> Handle:
        """Start one (called by `ensure` under the folder's lock, none running)."""
        raise NotImplementedError

    def address(self, running: Handle) -> str:
        """Where clients reach it, for `make status`."""
        raise NotImplementedError

    def reuse(self, running: Handle) -> bool:
        """Whether the running one serves what this service is asked for now (else it is replaced)."""
        return True

    def exports(self, running: Handle) -> dict[str, str]:
        """The environment variables the stack hands to the processes it starts (the worker, flow runs)."""
        return {}

    def note(self, running: Handle) -> str:
        """A detail `make status` shows beside the address."""
        return ""

    def ensure(self) -> Handle:
        """The running one if it can be reused, else a new one (a running one that cannot is stopped first)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with folder_lock(self.folder):
            running = self.find()
            if running is not None:
                if self.reuse(running):
                    return running
                stop_process_group(running.pid, self.stop_timeout)  # type: ignore[attr-defined]
                (self.folder / self.state_file).unlink(missing_ok=True)
            return self.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop it (SIGTERM to its process group, SIGKILL after `timeout`). True if one was running."""
        with folder_lock(self.folder):
            state = self.state()
            (self.folder / self.state_file).unlink(missing_ok=True)
            if not state or not pid_alive(state["pid"]):
                return False
            stop_process_group(state["pid"], self.stop_timeout if timeout is None else timeout)
            return True

    def status(self) -> ServiceStatus:
        """Running or not, pid, address, log; starts nothing."""
        running = self.find()
        if running is None:
            return ServiceStatus(self.name, False, None, "", self.log)
        pid = running.pid  # type: ignore[attr-defined]
        return ServiceStatus(self.name, True, pid, self.address(running), self.log, self.note(running))

    def spawn(
        self,
        command: list[str],
        ready: Callable[[], bool],
        timeout: float,
        state: Mapping[str, object],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        poll: float = 0.1,
        failure: str | None = None,
        wait: Callable[[subprocess.Popen], None] | None = None,
    ) -> subprocess.Popen:
        """Start `command` detached (its own session: it outlives the caller), its output appended to the log;
        wait until `ready()` (or `wait(process)` where readiness needs more than a yes/no), else stop it and
        raise `failure` with the end of its log; then record `state` and its pid."""
        with open(self.log, "ab") as out:
            process = subprocess.Popen(
                command, env=None if env is None else dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        if wait is not None:
            wait(process)
        else:
            wait_until_ready(process, ready, timeout, self.log, failure or f"the {self.name} did not start", poll=poll)
        write_state(self.folder / self.state_file, {**state, "pid": process.pid})
        return process
