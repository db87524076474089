"""The local services (PostgreSQL, Redis, the file server, the Prefect server and worker, the emulators): one
small base class, so each service declares only what differs: how it starts, how it answers, what it exports.

Each service runs in the foreground as a program of its folder's supervisord (operations/infra/supervision.py:
one per DATA_DIR, the parent of the services' folders unless the registry says otherwise), which starts it
again within seconds when it dies, with the same command line: the address chosen at its first start (a port,
a socket) is kept across restarts. A service lives in its own folder: a JSON state file (its address and first
pid), its log, and a lock file that serialises starts and stops across processes. `find()` only looks (flows'
settings lookups and `make status` use it); `ensure()` reuses a running one or starts one; `stop()` takes it off
the supervisor. Only the stack (deployments/services.py: `make up`, `make demo`) and the test session call
`ensure()`: flow, task and block code never starts a process, it names the setting to set instead
(`NotConfigured`).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Generic, Mapping, TypeVar

from pydantic import SecretStr

from operations.errors import UserError

from operations.infra.processes import folder_lock, pid_alive, read_state, stop_process_group, tail, write_state
from operations.infra.supervision import Program, Supervisor

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
    restarts: int = 0  # how often it died and its supervisor started it again
    supervisor_state: str = ""  # supervisord's state of its program when it is not answering (BACKOFF, FATAL)

    def line(self) -> str:
        if self.running:
            state = f"running, pid {self.pid}, {self.address}, restarts {self.restarts}"
        elif self.supervisor_state:
            state = f"not running (supervisor: {self.supervisor_state}), restarts {self.restarts}"
        else:
            state = "not running"
        note = f" ({self.note})" if self.note else ""
        return f"{state}{note}; log {self.log}"


@dataclass(frozen=True)
class Spawned:
    """A service's process just started under its supervisor (its pid changes when it is started again)."""

    pid: int


class ServiceFailed(RuntimeError):
    """A service did not start (the message ends with its log)."""


def program_name(folder: Path, home: Path) -> str:
    """The supervisord program of a service folder: its path below the supervisor's folder, as a slug
    (DATA_DIR/postgres: postgres, DATA_DIR/prefect/worker: prefect-worker)."""
    try:
        relative = folder.relative_to(home)
    except ValueError:
        relative = Path(folder.name)
    return re.sub(r"[^A-Za-z0-9_-]+", "-", "-".join(relative.parts)).strip("-") or "service"


class Service(Generic[Handle]):
    """A supervised process with a state file and a log in its folder.

    Subclasses set `name`, `state_file` and `log_file` and implement `find` (the running one, without starting
    anything), `start` (called under the folder's lock when none runs: it calls `supervise`) and `address`; they
    may override `reuse` (whether a running one serves what is asked now), `exports` (the environment variables
    by which clients reach it), `note` and `stop_signal`/`stop_timeout` (how its supervisor stops it)."""

    name: ClassVar[str]
    state_file: ClassVar[str]
    log_file: ClassVar[str]
    stop_timeout: ClassVar[float] = 10.0
    stop_signal: ClassVar[str] = "TERM"
    stop_as_group: ClassVar[bool] = True
    start_wait: float = 30.0  # how long `ensure` waits for one its supervisor is (re)starting

    def __init__(self, folder: Path):
        self.folder = Path(folder).resolve()
        self.supervise_in(self.folder.parent)  # the stack's registry says DATA_DIR (`supervise_in`)

    def supervise_in(self, home: Path) -> Service[Handle]:
        """Run it under the supervisord of folder `home` (the stack's DATA_DIR); returns the service."""
        self.supervisor = Supervisor(home)
        self.program = program_name(self.folder, self.supervisor.home)
        return self

    @property
    def log(self) -> Path:
        return self.folder / self.log_file

    def state(self) -> dict | None:
        return read_state(self.folder / self.state_file)

    def current_pid(self, state: Mapping | None) -> int | None:
        """The pid of its process: the state file's while alive (its first start: no call to the supervisor,
        which links of every file look up), else its supervisor's (it was started again)."""
        if state and state.get("pid") and pid_alive(int(state["pid"])):
            return int(state["pid"])
        return self.supervisor.program_pid(self.program)

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

    def supervised(self, running: Handle) -> bool:
        """Whether the running one is its supervisor's program (not one left behind by a dead supervisord)."""
        return self.supervisor.program_pid(self.program) == running.pid  # type: ignore[attr-defined]

    def ensure(self) -> Handle:
        """The running one if it can be reused, else a new one (a running one that cannot is stopped first);
        one its supervisor is restarting right now is waited for, not started twice."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with folder_lock(self.folder):
            running = self.find()
            if running is not None:
                if self.supervised(running) and self.reuse(running):
                    return running
                self._stop(running.pid, replacing=True)  # type: ignore[attr-defined]
            elif self._restarting():
                deadline = time.monotonic() + self.start_wait
                while time.monotonic() < deadline:
                    running = self.find()
                    if running is not None and self.reuse(running):
                        return running
                    time.sleep(0.2)
                self._stop(None, replacing=True)
            elif self.supervisor.info(self.program) is not None:
                self._stop(None, replacing=True)  # a program its supervisor gave up on (FATAL) is replaced
            self.supervisor.ensure()
            return self.start()

    def _restarting(self) -> bool:
        info = self.supervisor.info(self.program)
        return bool(info and info["statename"] in ("STARTING", "BACKOFF", "RUNNING"))

    def _stop(self, pid: int | None, timeout: float | None = None, replacing: bool = False) -> bool:
        """Take the program off its supervisor (shut down with its last program unless `replacing`), or stop a
        process left outside one (`stop_orphan`)."""
        was_up = self.supervisor.remove(
            self.program, self.stop_timeout if timeout is None else timeout, shutdown_when_empty=not replacing
        )
        if pid is not None and pid_alive(pid):
            self.stop_orphan(pid, self.stop_timeout if timeout is None else timeout)
            was_up = True
        return was_up

    def stop_orphan(self, pid: int, timeout: float) -> None:
        """Stop a running one that is no program of the supervisor (SIGTERM to its process group)."""
        stop_process_group(pid, timeout)

    def stop(self, timeout: float | None = None) -> bool:
        """Stop it and take it off its supervisor (the last one stopped shuts the supervisor down). True if one
        was running."""
        with folder_lock(self.folder):
            state = self.state()
            pid = self.current_pid(state)
            (self.folder / self.state_file).unlink(missing_ok=True)
            return self._stop(pid, timeout)

    def restarts(self) -> int:
        """How often it died and its supervisor started it again (since the stack started it)."""
        return self.supervisor.restarts(self.program)

    def status(self) -> ServiceStatus:
        """Running or not, pid, address, restarts, log; starts nothing."""
        running = self.find()
        restarts = self.restarts()
        if running is None:
            info = self.supervisor.info(self.program)
            return ServiceStatus(self.name, False, None, "", self.log, restarts=restarts,
                                 supervisor_state=info["statename"] if info else "")
        pid = running.pid  # type: ignore[attr-defined]
        return ServiceStatus(self.name, True, pid, self.address(running), self.log, self.note(running), restarts)

    def supervise(
        self,
        command: list[str],
        ready: Callable[[], bool],
        timeout: float,
        state: Mapping[str, object] | None,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        poll: float = 0.1,
        failure: str | None = None,
        wait: Callable[[Callable[[], bool]], None] | None = None,
        user: str | None = None,
    ) -> int:
        """Run `command` in the foreground as its supervisor's program (`env`: its whole environment, this
        process's by default; output to the log); wait until `ready()` (or `wait(exited)` where readiness
        needs more than a yes/no; `exited()` says whether the process died), else take it off the supervisor
        and raise ServiceFailed (`failure`) with the end of its log; then record `state` and its pid (no state
        file when `state` is None: the service keeps its own)."""
        import os

        self.supervisor.add(Program(
            self.program, list(command), dict(os.environ if env is None else env), self.log, cwd or self.folder,
            self.name, user, self.stop_signal, self.stop_timeout, self.stop_as_group,
        ))
        what = failure or f"the {self.name} did not start"
        try:
            if wait is not None:
                wait(self._exited)
            else:
                deadline = time.monotonic() + timeout
                while not ready():
                    if self._exited() or time.monotonic() > deadline:
                        raise ServiceFailed(f"{what}:\n{tail(self.log)}")
                    time.sleep(poll)
        except BaseException:
            self.supervisor.remove(self.program, 5)
            raise
        pid = self.supervisor.program_pid(self.program)
        if pid is None:
            self.supervisor.remove(self.program, 5)
            raise ServiceFailed(f"{what} (it exited):\n{tail(self.log)}")
        if state is not None:
            write_state(self.folder / self.state_file, {**state, "pid": pid})
        return pid

    def spawn(self, command: list[str], ready: Callable[[], bool], timeout: float, state: Mapping[str, object] | None,
              **options) -> Spawned:
        """`supervise`, its pid as `.pid` (what a service's `start` records in its handle)."""
        return Spawned(self.supervise(command, ready, timeout, state, **options))

    def _exited(self) -> bool:
        """Whether the program's process died since it was added (supervisord retries it: not our case)."""
        info = self.supervisor.info(self.program)
        return info is None or info["statename"] not in ("STARTING", "RUNNING")
