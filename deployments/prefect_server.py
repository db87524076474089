"""A real local `prefect server` (analytics off), a service of the stack (a program of its supervisor, started
again on the same port when it dies) reused by later processes, on its own database: by default database "prefect" on the project's embedded PostgreSQL, or SQLite under its folder
(STACK_PREFECT_DATABASE).

Prefect's ephemeral in-process API cannot serve Dask process workers, so every local run talks to this one.
SQLite serialises every write: under a few concurrent REST clients the server answers 503 ("database is
locked"), which is why PostgreSQL is the default (benchmarks/prefect_api.py measures both).

Which database, in order: PREFECT_API_DATABASE_CONNECTION_URL (or PREFECT_SERVER_DATABASE_CONNECTION_URL) when
set in the environment, as is: Prefect's own setting, an operator who wrote it means it. Else
STACK_PREFECT_DATABASE=sqlite: `prefect.db` in the server's folder. Else database "prefect" on the embedded
PostgreSQL, also when DATABASE_URL names an external server: DATABASE_URL is where the project's data lives, and
its role may not create databases; the local server's state stays with the local server, as it did on SQLite.
Putting the Prefect server's database on a shared PostgreSQL is PREFECT_API_DATABASE_CONNECTION_URL's job.

Access: the server listens on STACK_HOST (127.0.0.1 by default). Any other address needs STACK_AUTH_STRING
(HTTP basic auth, `user:password`): the server gets PREFECT_SERVER_API_AUTH_STRING, every client the stack
starts PREFECT_API_AUTH_STRING (through this process's environment), and the health checks here send it.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx
from pydantic import SecretStr
from sqlalchemy.engine import make_url

from operations.infra.database import redact_url
from operations.infra.embedded_postgres import EmbeddedPostgres, ensure_database, ensure_embedded_postgres
from operations.infra.http import default_ssl_context
from operations.infra.processes import (
    basic_auth_headers, client_host, folder_lock, free_port, port_free, require_auth_off_loopback,
)
from operations.infra.services import Service
from operations.settings import Settings

STATE_FILE = "prefect-server.json"
DEFAULT_PORT = 4200
# One lock on the machine for the choice of DEFAULT_PORT, whatever the stack's DATA_DIR.
DEFAULT_PORT_LOCK = Path(tempfile.gettempdir()) / f"prefect-server-port-{DEFAULT_PORT}"
PREFECT_DATABASE = "prefect"  # the server's own database on the embedded PostgreSQL
# Prefect's names of its database URL; it reads the first one when both are set.
DATABASE_URL_VARIABLES = ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")
AUTH_VARIABLES = ("PREFECT_SERVER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING")


@dataclass(frozen=True)
class ServerDatabase:
    url: str  # may hold a password: never shown, the label is
    backend: str  # "postgresql" or "sqlite"
    label: str  # what `make status` shows: backend, where, and why


@dataclass(frozen=True)
class PrefectServer:
    api_url: str
    ui_url: str
    port: int
    pid: int
    started: bool
    database: str = "sqlite"  # the ServerDatabase label recorded when it started
    host: str = "127.0.0.1"  # the address it listens on
    auth: bool = False  # whether it asks for basic auth


class PrefectServerMismatch(RuntimeError):
    """The folder's running server was started with another database, address or auth than asked now."""


def _secret(value: SecretStr | str | None) -> str | None:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def sqlite_database(prefect_dir: Path) -> ServerDatabase:
    path = Path(prefect_dir).resolve() / "prefect.db"
    return ServerDatabase(f"sqlite+aiosqlite:///{path}", "sqlite", f"sqlite {path}")


def embedded_prefect_database(postgres: EmbeddedPostgres) -> ServerDatabase:
    """Database "prefect" (created if missing) on this embedded PostgreSQL, with Prefect's async driver."""
    url = make_url(ensure_database(postgres, PREFECT_DATABASE)).set(drivername="postgresql+asyncpg")
    return ServerDatabase(
        url.render_as_string(hide_password=False), "postgresql",
        f"postgresql, database {PREFECT_DATABASE!r} on the embedded PostgreSQL (socket {postgres.socket_dir})",
    )


def resolve_server_database(settings: Settings) -> ServerDatabase:
    """The local server's database (module docstring); starts the embedded PostgreSQL when it is the one."""
    for variable in DATABASE_URL_VARIABLES:
        if os.environ.get(variable):
            url = os.environ[variable]
            backend = "sqlite" if make_url(url).get_backend_name() == "sqlite" else "postgresql"
            return ServerDatabase(url, backend, f"{backend} {redact_url(url)} ({variable})")
    if settings.stack.prefect_database == "sqlite":
        return sqlite_database(settings.stack.prefect_dir)
    return embedded_prefect_database(ensure_embedded_postgres(settings.stack.postgres_dir))


# The server's own settings, over whatever the caller's environment says. benchmarks/prefect_api.py measures the
# server so started beside a plain `prefect server start` (log at WARNING, UI off) in the same run: neither these
# nor the UI cost a measurable share of its REST rate.
SERVER_SETTINGS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Errors and warnings only: at INFO uvicorn's access log would also write a line per request.
    "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
    # The UI calls the API of the server that served it (the default is port 4200 whatever --port says, so a
    # second server's UI would show the first one's runs).
    "PREFECT_UI_API_URL": "/api",
    # Expired concurrency leases (a slot holder killed with no run waiting for its slot) are freed within 5 s
    # of expiring, not 15 (tasks/slots.py: a waiting run frees them sooner).
    "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "5",
}


def prefect_server_env(prefect_dir: Path, database_url: str, auth_string: str | None = None) -> dict[str, str]:
    """Environment of the server process: its own home and database, SERVER_SETTINGS, basic auth when given."""
    inherited = ("PREFECT_API_URL", "PREFECT_PROFILES_PATH", *DATABASE_URL_VARIABLES, *AUTH_VARIABLES)
    env = {k: v for k, v in os.environ.items() if k not in inherited}
    env.update({"PREFECT_HOME": str(prefect_dir), "PREFECT_API_DATABASE_CONNECTION_URL": database_url})
    env.update(SERVER_SETTINGS)
    if auth_string:
        env["PREFECT_SERVER_API_AUTH_STRING"] = auth_string
    return env


def _healthy(api_url: str) -> bool:
    """GET /health (Prefect lets it through without auth)."""
    try:
        return httpx.get(f"{api_url}/health", timeout=2, verify=default_ssl_context()).status_code == 200
    except httpx.HTTPError:
        return False


def _accepts(api_url: str, headers: dict[str, str]) -> bool:
    """Whether an authenticated-only route answers with these headers (a 401 means another auth string)."""
    try:
        answer = httpx.get(f"{api_url}/admin/version", headers=headers, timeout=5, verify=default_ssl_context())
        return answer.status_code == 200
    except httpx.HTTPError:
        return False


def _check_reusable(running: PrefectServer, database: ServerDatabase, host: str, auth_string: str | None) -> None:
    """Refuse to reuse a server started with other choices: restarting it under running flows is the operator's
    call, and a silent switch of database would hide every earlier run."""
    wanted = {"database": database.label, "address": host, "basic auth": bool(auth_string)}
    found = {"database": running.database, "address": running.host, "basic auth": running.auth}
    differ = [f"{what} {found[what]!r} (asked: {wanted[what]!r})" for what in wanted if wanted[what] != found[what]]
    if not differ and auth_string and not _accepts(running.api_url, basic_auth_headers(auth_string)):
        differ = ["basic auth: it refuses STACK_AUTH_STRING (changed since it started?)"]
    if differ:
        raise PrefectServerMismatch(
            f"the Prefect server running at {running.ui_url} (pid {running.pid}) was started with "
            + "; ".join(differ)
            + ": stop it (`make down`) and start again to switch, or change the settings back"
        )


class PrefectServerService(Service[PrefectServer]):
    """A `prefect server` in `folder` (port 4200 if free, else any free port, unless `port` is given), on
    `database` (SQLite in the folder by default; a callable is resolved only when a server starts), listening on
    `host`, asking for basic auth when `auth_string` is given. A running server started with other choices is
    refused (PrefectServerMismatch), not restarted; an exposed host without auth is refused before anything
    starts (ExposedWithoutAuth)."""

    name = "prefect server"
    state_file = STATE_FILE
    log_file = "server.log"
    stop_timeout = 20.0

    def __init__(
        self,
        folder: Path,
        port: int | None = None,
        timeout: float = 120.0,
        *,
        database: ServerDatabase | Callable[[], ServerDatabase] | None = None,
        host: str = "127.0.0.1",
        auth_string: SecretStr | str | None = None,
    ):
        super().__init__(folder)
        self.port, self.timeout, self.host, self.auth = port, timeout, host, _secret(auth_string)
        self.start_wait = timeout
        self._database = database
        self._resolved: ServerDatabase | None = None

    @property
    def database(self) -> ServerDatabase:
        if self._resolved is None:
            chosen = self._database() if callable(self._database) else self._database
            self._resolved = chosen or sqlite_database(self.folder)
        return self._resolved

    def find(self) -> PrefectServer | None:
        """The folder's server if it is running and healthy."""
        state = self.state()
        pid = self.current_pid(state)
        if not state or pid is None:
            return None
        p, host = state["port"], state.get("host", "127.0.0.1")
        base = f"http://{client_host(host)}:{p}"
        if not _healthy(f"{base}/api"):
            return None
        # a state file without a database was written before the server had a choice: SQLite
        database = state.get("database", f"sqlite {self.folder / 'prefect.db'}")
        return PrefectServer(f"{base}/api", base, p, pid, False, database, host, state.get("auth", False))

    def ensure(self) -> PrefectServer:
        require_auth_off_loopback("the Prefect server", self.host, bool(self.auth))
        return super().ensure()

    def reuse(self, running: PrefectServer) -> bool:
        _check_reusable(running, self.database, self.host, self.auth)
        return True

    def start(self) -> PrefectServer:
        if self.port:
            return self._start(self.port)
        # Held until the server answers: a stack starting at the same moment waits, then finds DEFAULT_PORT taken
        # and takes another port, instead of also choosing it and being answered by this stack's server.
        with folder_lock(DEFAULT_PORT_LOCK):
            return self._start(DEFAULT_PORT if port_free(DEFAULT_PORT) else free_port())

    def _start(self, port: int) -> PrefectServer:
        database, host = self.database, self.host
        base = f"http://{client_host(host)}:{port}"
        headers = basic_auth_headers(self.auth)
        pid = self.supervise(
            [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)],
            lambda: _accepts(f"{base}/api", headers), self.timeout,  # a 200 there: up and serving us
            {"port": port, "host": host, "backend": database.backend, "database": database.label,
             "auth": bool(self.auth)},
            env=prefect_server_env(self.folder, database.url, self.auth), poll=0.5,
            failure=f"prefect server did not become healthy on {base}/api ({database.label})",
        )
        return PrefectServer(f"{base}/api", base, port, pid, True, database.label, host, bool(self.auth))

    def address(self, running: PrefectServer) -> str:
        return running.ui_url

    def note(self, running: PrefectServer) -> str:
        return running.database + (", basic auth" if running.auth else "")

    def exports(self, running: PrefectServer) -> dict[str, str]:
        """PREFECT_API_URL, and PREFECT_API_AUTH_STRING for a server behind basic auth."""
        return {"PREFECT_API_URL": running.api_url, **({"PREFECT_API_AUTH_STRING": self.auth} if self.auth else {})}


def local_prefect_server(settings: Settings, port: int | None = None) -> PrefectServerService:
    """The stack's server from settings: DATA_DIR/prefect, STACK_HOST, STACK_AUTH_STRING, its database (module
    docstring; the embedded PostgreSQL is started for it when it is the one)."""
    return PrefectServerService(
        settings.stack.prefect_dir, port, database=lambda: resolve_server_database(settings), host=settings.stack.host,
        auth_string=settings.stack.auth_string,
    )


def running_prefect_server(prefect_dir: Path) -> PrefectServer | None:
    """This folder's server if it is running and healthy, without starting one."""
    return PrefectServerService(prefect_dir).find()


def ensure_prefect_server(
    prefect_dir: Path,
    port: int | None = None,
    timeout: float = 120.0,
    *,
    database: ServerDatabase | None = None,
    host: str = "127.0.0.1",
    auth_string: SecretStr | str | None = None,
) -> PrefectServer:
    """Reuse this folder's running server or start one (PrefectServerService)."""
    return PrefectServerService(
        prefect_dir, port, timeout, database=database, host=host, auth_string=auth_string
    ).ensure()


def ensure_local_prefect_server(settings: Settings, port: int | None = None) -> PrefectServer:
    """The stack's server from settings, reused or started (`local_prefect_server`)."""
    return local_prefect_server(settings, port).ensure()


def use_prefect_server(api_url: str, auth_string: SecretStr | str | None) -> None:
    """Point this process, and every process it starts (worker, flow runs, Dask workers), at the server."""
    os.environ["PREFECT_API_URL"] = api_url
    if _secret(auth_string):
        os.environ["PREFECT_API_AUTH_STRING"] = _secret(auth_string)


def stop_prefect_server(prefect_dir: Path, timeout: float = 20.0) -> bool:
    """Stop this folder's server. True if one was running."""
    return PrefectServerService(prefect_dir).stop(timeout)
