"""The process supervisor of the local services: one `supervisord` (the `supervisor` package) per stack folder
(DATA_DIR), which runs each service in the foreground as one of its programs and starts it again within seconds
when it dies.

Under the folder `home`: `supervisord.conf`, its log `supervisord.log`, its pid file and its control socket (a
short path under the temp folder when `home` is too deep for a unix socket), `programs/<name>.conf` (one per
service, included by supervisord.conf), `programs/<name>.env` (the program's exact environment, 0600: it may
hold STACK_AUTH_STRING; the program starts through a one-line exec that loads it, so nothing secret is on a
command line or in supervisord's config), and `restarts/<name>` (how often the program died and was started
again).

Restarts are counted by an event listener, a program of the same supervisord (`listen`): supervisord keeps no
count of its own, and its log rotates. The listener counts, per program, its deaths: PROCESS_STATE_EXITED (it died
running) and PROCESS_STATE_BACKOFF (it died within START_SECONDS of a start), a stop that was asked for being
STOPPED; the failed attempts of one restart (BACKOFF again before it is RUNNING, e.g. PostgreSQL waiting for the
killed server's last backends to exit) count once, and so does a death within START_SECONDS of a restart. It calls `on_restart(program, service name, count)` once the
program is RUNNING again; the stack's listener (deployments/service_events.py) turns that into a Prefect event.

The supervisord lives as long as it has programs: the first service started in a folder starts it, the last
one stopped shuts it down (`Supervisor.remove`), so `make down`, a test or a benchmark leave no process behind.
A supervisord found dead is started afresh with no program: each service is then added again in the registry's
order (`make up`).

    python -m operations.infra.supervision listen HOME   # the count-only event listener
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import xmlrpc.client
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from operations.infra.processes import folder_lock, pid_alive, read_state, stop_process, tail

CONF_FILE = "supervisord.conf"
LOG_FILE = "supervisord.log"
PID_FILE = "supervisord.pid"
LISTENER = "restart-listener"  # the event listener's program name (never a service's: no dash-free clash)
SOCKET_PATH_LIMIT = 100  # unix socket paths are limited to 107 bytes on Linux, 103 on macOS
START_SECONDS = 1  # a program that stays up this long is RUNNING; one that dies sooner is retried with backoff
START_RETRIES = 20  # retries 1, 2, ... 20 s apart (supervisord's backoff) before it gives up (FATAL): ~3.5 min
ALIVE = ("STARTING", "RUNNING", "BACKOFF")  # states in which supervisord keeps (or brings) a program up
# The program's first process: loads its environment file and becomes the service (exec: same pid).
EXEC_WITH_ENV = "import json,os,sys;e=json.load(open(sys.argv[1]));os.execvpe(sys.argv[2],sys.argv[2:],e)"


class SupervisorError(RuntimeError):
    """supervisord did not start or refused a request."""


@dataclass(frozen=True)
class Program:
    """A service as a supervisord program: its foreground command, exact environment, log and stop rules."""

    name: str
    command: list[str]
    env: Mapping[str, str]
    log: Path
    directory: Path
    service: str = ""  # the service's name (`make status`, events)
    user: str | None = None  # the OS user it runs as (supervisord must be root to switch)
    stop_signal: str = "TERM"
    stop_seconds: float = 10.0  # then SIGKILL
    stop_as_group: bool = True  # the stop signal to its whole process group (its children too)
    extra: dict[str, str] = field(default_factory=dict)  # more supervisord options of the section


def _quoted(value: str) -> str:
    """A value of supervisord's ini file: `%` doubled (its expansion syntax), no line breaks."""
    if "\n" in value or "\r" in value:
        raise ValueError(f"a supervisord value cannot hold a line break: {value!r}")
    return value.replace("%", "%%")


def _socket_path(home: Path) -> Path:
    preferred = home / "supervisor.sock"
    if len(str(preferred)) < SOCKET_PATH_LIMIT:
        return preferred
    digest = hashlib.sha256(str(home).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"ops-supervisor-{digest}.sock"


class Supervisor:
    """The supervisord of folder `home` (module docstring)."""

    def __init__(self, home: Path):
        self.home = Path(home).resolve()
        self.socket = _socket_path(self.home)
        self.programs_dir = self.home / "programs"
        self.restarts_dir = self.home / "restarts"

    @property
    def conf(self) -> Path:
        return self.home / CONF_FILE

    @property
    def log(self) -> Path:
        return self.home / LOG_FILE

    # -- talking to it ---------------------------------------------------------------------------------------
    def _rpc(self, timeout: float = 10.0):
        from supervisor.xmlrpc import SupervisorTransport

        transport = SupervisorTransport(serverurl=f"unix://{self.socket}")
        transport.timeout = timeout
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor

    def pid(self) -> int | None:
        """supervisord's own pid if it runs (from its pid file), else None."""
        state = read_state(self.home / PID_FILE)
        return state if isinstance(state, int) and pid_alive(state) else None

    def running(self) -> bool:
        """Whether this folder's supervisord runs and answers."""
        if self.pid() is None or not self.socket.exists():
            return False
        try:
            return self._rpc(5).getState()["statename"] == "RUNNING"
        except (OSError, xmlrpc.client.Error):
            return False

    def info(self, program: str) -> dict | None:
        """supervisord's record of a program (statename, pid, ...), None when it has none or does not run."""
        if not self.socket.exists():
            return None
        try:
            return self._rpc(5).getProcessInfo(program)
        except (OSError, xmlrpc.client.Error):
            return None

    def program_pid(self, program: str) -> int | None:
        """The pid of the program's process while it is up (STARTING or RUNNING)."""
        info = self.info(program)
        if info and info["statename"] in ("STARTING", "RUNNING") and info["pid"]:
            return int(info["pid"])
        return None

    def programs(self) -> list[str]:
        """The services' programs this supervisord has (the listener left out)."""
        return sorted(p.stem for p in self.programs_dir.glob("*.conf") if p.stem != LISTENER)

    def restarts(self, program: str) -> int:
        """How often the program died and was started again since it was added."""
        try:
            return int((self.restarts_dir / program).read_text() or 0)
        except (OSError, ValueError):
            return 0

    # -- starting and stopping it ----------------------------------------------------------------------------
    def ensure(
        self, listener: list[str] | None = None, listener_env: Mapping[str, str] | None = None,
        listener_dir: Path | None = None, timeout: float = 30.0,
    ) -> None:
        """Start this folder's supervisord unless it runs (afresh: no program, restart counts cleared), with
        `listener` as its event listener (the count-only `listen` by default), run in `listener_dir` (this
        folder by default) with `listener_env` (this process's environment by default)."""
        self.home.mkdir(parents=True, exist_ok=True)
        with folder_lock(self.home):
            if self.running():
                return
            old = self.pid()
            if old is not None:  # alive but not answering: replaced
                _kill(old, timeout)
            for stale in [*self.programs_dir.glob("*"), *self.restarts_dir.glob("*")]:
                stale.unlink(missing_ok=True)
            self.socket.unlink(missing_ok=True)
            self.programs_dir.mkdir(exist_ok=True)
            self.programs_dir.chmod(0o700)
            self.restarts_dir.mkdir(exist_ok=True)
            self._write_conf()
            default = [sys.executable, "-m", "operations.infra.supervision", "listen", str(self.home)]
            self._add_listener_files(listener or default, os.environ if listener_env is None else listener_env,
                                     listener_dir or self.home)
            env = _plain_env()
            with open(self.log, "ab") as out:  # supervisord daemonizes: this returns once it has forked
                done = subprocess.run(
                    [sys.executable, "-m", "supervisor.supervisord", "-c", str(self.conf)], env=env, cwd=self.home,
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                )
            deadline = time.monotonic() + timeout
            while not self.running():
                if done.returncode != 0 or time.monotonic() > deadline:
                    raise SupervisorError(f"supervisord did not start in {self.home}:\n{tail(self.log)}")
                time.sleep(0.05)

    def shutdown(self, timeout: float = 60.0) -> bool:
        """Stop every program and supervisord. True if it was running."""
        with folder_lock(self.home):
            return self._shutdown(timeout)

    def _shutdown(self, timeout: float) -> bool:
        pid = self.pid()
        if pid is None:
            return False
        try:
            self._rpc(timeout).shutdown()
        except (OSError, xmlrpc.client.Error):
            pass  # signalled below
        _kill(pid, timeout)
        for stale in self.programs_dir.glob("*"):
            stale.unlink(missing_ok=True)
        return True

    def _write_conf(self) -> None:
        socket = _quoted(str(self.socket))
        self.conf.write_text(
            "; written by operations.infra.supervision when this supervisord starts\n"
            f"[unix_http_server]\nfile={socket}\nchmod=0700\n\n"
            f"[supervisord]\nlogfile={_quoted(str(self.log))}\nlogfile_maxbytes=10MB\nlogfile_backups=2\n"
            f"pidfile={_quoted(str(self.home / PID_FILE))}\ndirectory={_quoted(str(self.home))}\n"
            f"childlogdir={_quoted(str(self.home))}\nloglevel=info\nnodaemon=false\n\n"
            "[rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n"
            f"[supervisorctl]\nserverurl=unix://{socket}\n\n"
            f"[include]\nfiles = {_quoted(str(self.programs_dir))}/*.conf\n"
        )

    # -- programs --------------------------------------------------------------------------------------------
    def add(self, program: Program) -> None:
        """Add a program (replacing one of the same name) and let supervisord start it; its restart count
        starts at 0. The caller waits for it to answer."""
        with folder_lock(self.home):
            if not self.running():
                raise SupervisorError(f"the supervisord of {self.home} is not running (`make up` starts it)")
            rpc = self._rpc(program.stop_seconds + 30)
            if self.info(program.name) is not None:
                _try(rpc.stopProcess, program.name)
                _try(rpc.removeProcessGroup, program.name)
            (self.restarts_dir / program.name).unlink(missing_ok=True)
            self._write_program(program)
            rpc.reloadConfig()
            rpc.addProcessGroup(program.name)  # autostart: supervisord spawns it now

    def remove(self, program: str, timeout: float | None = None, shutdown_when_empty: bool = True) -> bool:
        """Stop the program (its stop signal, SIGKILL after its stop time) and drop it; the last service's
        removal shuts supervisord down (unless `shutdown_when_empty` is False: it is being replaced). True if the
        program was up."""
        with folder_lock(self.home):
            info = self.info(program)
            was_up = bool(info and info["statename"] in ALIVE)
            if info is not None:
                rpc = self._rpc((timeout or 30) + 30)
                _try(rpc.stopProcess, program)
                _try(rpc.removeProcessGroup, program)
            for suffix in (".conf", ".env", ".json"):
                (self.programs_dir / f"{program}{suffix}").unlink(missing_ok=True)
            (self.restarts_dir / program).unlink(missing_ok=True)
            if shutdown_when_empty and not self.programs():
                self._shutdown(timeout or 30)
            return was_up

    def _write_env(self, name: str, env: Mapping[str, str]) -> Path:
        path = self.programs_dir / f"{name}.env"
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as fh:
            json.dump(dict(env), fh, sort_keys=True)
        return path

    def _command(self, env_file: Path, command: list[str]) -> str:
        return _quoted(shlex.join([sys.executable, "-I", "-S", "-c", EXEC_WITH_ENV, str(env_file), *command]))

    def _write_program(self, program: Program) -> None:
        if program.user and os.geteuid() == 0:
            # Another user may not reach this interpreter (a home folder): the command runs as it is, its few
            # plain variables in the section, over supervisord's own short environment (`_plain_env`).
            command = _quoted(shlex.join(program.command))
            environment = {"environment": ",".join(f'{k}="{_plain_value(v)}"' for k, v in program.env.items())}
        else:
            command = self._command(self._write_env(program.name, program.env), program.command)
            environment = {}
        options = {
            "command": command,
            **environment,
            "directory": _quoted(str(program.directory)),
            "autostart": "true",
            "autorestart": "true",
            "startsecs": str(START_SECONDS),
            "startretries": str(START_RETRIES),
            "stopsignal": program.stop_signal,
            "stopwaitsecs": str(int(program.stop_seconds)),
            "stopasgroup": str(program.stop_as_group).lower(),
            "killasgroup": "true",
            "redirect_stderr": "true",
            "stdout_logfile": _quoted(str(program.log)),
            "stdout_logfile_maxbytes": "50MB",
            "stdout_logfile_backups": "3",
            **({"user": program.user} if program.user and os.geteuid() == 0 else {}),
            **program.extra,
        }
        body = "".join(f"{key}={value}\n" for key, value in options.items())
        (self.programs_dir / f"{program.name}.conf").write_text(
            f"; {program.service or program.name}: written by operations.infra.supervision\n"
            f"[program:{program.name}]\n{body}"
        )
        (self.programs_dir / f"{program.name}.json").write_text(json.dumps({"service": program.service}))

    def _add_listener_files(self, command: list[str], env: Mapping[str, str], directory: Path) -> None:
        env_file = self._write_env(LISTENER, env)
        (self.programs_dir / f"{LISTENER}.conf").write_text(
            "; counts the programs' restarts (operations.infra.supervision)\n"
            f"[eventlistener:{LISTENER}]\n"
            f"command={self._command(env_file, command)}\n"
            f"directory={_quoted(str(directory))}\n"
            "events=PROCESS_STATE\nbuffer_size=1000\nautorestart=true\nstartsecs=1\nstartretries=100\n"
            "stdout_logfile=NONE\n"  # its standard output is supervisord's protocol channel
            f"stderr_logfile={_quoted(str(self.home / 'restart-listener.log'))}\n"
            "stderr_logfile_maxbytes=5MB\nstderr_logfile_backups=1\n"
        )

    def service_name(self, program: str) -> str:
        """The service name the program was added with (its own name if none)."""
        state = read_state(self.programs_dir / f"{program}.json") or {}
        return state.get("service") or program


def _plain_value(value: str) -> str:
    """A value of a program's `environment=` option: no quote, backslash or line break to escape."""
    if any(c in value for c in '"\\\n\r'):
        raise ValueError(f"an environment value of a program run as another user must be plain: {value!r}")
    return _quoted(value)


def _try(call: Callable, *args) -> None:
    """An RPC whose refusal (not running, no such group) is no error here."""
    try:
        call(*args)
    except xmlrpc.client.Fault:
        pass


def _kill(pid: int, timeout: float) -> None:
    """SIGTERM, SIGKILL after `timeout` (supervisord stops its programs on SIGTERM)."""
    stop_process(pid, timeout=timeout)


def _plain_env() -> dict[str, str]:
    """supervisord's own environment (its programs get theirs from their .env files)."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ", "VIRTUAL_ENV", "PYTHONPATH", "DATA_DIR")
    return {key: os.environ[key] for key in keep if key in os.environ}


# -- the event listener --------------------------------------------------------------------------------------
def listen(home: Path, on_restart: Callable[[str, str, int], None] | None = None) -> None:
    """supervisord's event listener protocol on stdin/stdout: count each program's deaths (EXITED, BACKOFF) into
    `restarts/<program>`, and call `on_restart(program, service name, count)` when it is RUNNING again (it
    must return at once: supervisord waits for this listener's answer before sending the next event)."""
    from supervisor import childutils

    supervisor = Supervisor(home)
    pending: set[str] = set()
    while True:
        headers, payload = childutils.listener.wait(sys.stdin, sys.stdout)
        event = headers.get("eventname", "")
        fields, _ = childutils.eventdata(payload + "\n")
        program = fields.get("processname", "")
        if program and program != LISTENER:
            if event == "PROCESS_STATE_EXITED" or (event == "PROCESS_STATE_BACKOFF" and program not in pending):
                # died running, or within START_SECONDS of a start that was no retry after a death
                count = supervisor.restarts(program) + 1
                path = supervisor.restarts_dir / program
                path.with_suffix(".tmp").write_text(str(count))
                path.with_suffix(".tmp").replace(path)
                pending.add(program)
                print(f"{program}: {event.removeprefix('PROCESS_STATE_').lower()}, restart {count}", file=sys.stderr, flush=True)
            elif event == "PROCESS_STATE_RUNNING" and program in pending:
                pending.discard(program)
                if on_restart is not None:
                    try:
                        on_restart(program, supervisor.service_name(program), supervisor.restarts(program))
                    except Exception as exc:  # noqa: BLE001 - the listener must keep answering
                        print(f"on_restart({program}) failed: {exc}", file=sys.stderr, flush=True)
        childutils.listener.ok(sys.stdout)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "listen":
        print("usage: python -m operations.infra.supervision listen HOME", file=sys.stderr)
        return 2
    listen(Path(args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
