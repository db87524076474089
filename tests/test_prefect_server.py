"""The local Prefect server: PostgreSQL by default (its own database "prefect"), SQLite still selectable, basic
auth when it listens beyond loopback, and a worker readiness check that only a heartbeat of the new worker
process satisfies."""

from __future__ import annotations

import sqlite3
import uuid

import httpx
import psycopg
import pytest
from sqlalchemy.engine import make_url

from deployments.prefect_server import (
    PREFECT_DATABASE,
    STATE_FILE,
    PrefectServerMismatch,
    ensure_local_prefect_server,
    resolve_server_database,
    stop_prefect_server,
)
from deployments.prefect_worker import (
    ensure_prefect_worker,
    ensure_work_pool,
    last_heartbeat,
    stop_prefect_worker,
    worker_heartbeat_since,
    worker_name,
)
from deployments.stack import stack_status
from operations.infra.embedded_postgres import running_embedded_postgres
from operations.infra.processes import ExposedWithoutAuth, basic_auth_headers, free_port, read_state
from operations.settings import PROJECT_ROOT, Settings, StackSettings

pytestmark = pytest.mark.slow


def _create_flow_run(client: httpx.Client) -> str:
    """A flow and a scheduled flow run through the REST API, as another application would; the run's id."""
    flow = client.post("/flows/", json={"name": f"rest-{uuid.uuid4().hex[:8]}"})
    assert flow.status_code in (200, 201), flow.text
    run = client.post("/flow_runs/", json={"flow_id": flow.json()["id"], "state": {"type": "SCHEDULED"}})
    assert run.status_code in (200, 201), run.text
    assert client.get(f"/flow_runs/{run.json()['id']}").json()["state_type"] == "SCHEDULED"
    return run.json()["id"]


def test_session_server_keeps_its_flow_runs_in_the_prefect_database(prefect_api_url, database_url):
    """The default backend: runs created through the session server's REST API are rows of database "prefect"
    on the embedded PostgreSQL that also holds the project database."""
    with httpx.Client(base_url=prefect_api_url, timeout=30) as client:
        run_id = _create_flow_run(client)
    socket_dir = make_url(database_url).query["host"]
    with psycopg.connect(host=socket_dir, user="postgres", dbname=PREFECT_DATABASE) as conn:
        found = conn.execute("SELECT count(*) FROM flow_run WHERE id = %s", (run_id,)).fetchone()
    assert found == (1,)


def test_an_explicit_prefect_database_url_wins(tmp_path, monkeypatch):
    url = "postgresql+asyncpg://prefect:s3cret@db.internal:5432/prefect"
    monkeypatch.setenv("PREFECT_API_DATABASE_CONNECTION_URL", url)
    database = resolve_server_database(Settings(stack=StackSettings(data_dir=tmp_path / "data")))  # the default: PostgreSQL
    assert (database.url, database.backend) == (url, "postgresql")
    assert "s3cret" not in database.label and "PREFECT_API_DATABASE_CONNECTION_URL" in database.label
    assert not (tmp_path / "data" / "postgres").exists()  # nothing started for it


def test_an_exposed_address_without_auth_is_refused_before_anything_starts(tmp_path):
    settings = Settings(stack=StackSettings(data_dir=tmp_path / "data", host="0.0.0.0"))
    with pytest.raises(ExposedWithoutAuth, match="STACK_AUTH_STRING"):
        ensure_local_prefect_server(settings)
    assert not settings.stack.postgres_dir.exists() and not settings.stack.prefect_dir.exists()


@pytest.fixture
def authenticated_stack(tmp_path):
    """The stack's own server from settings for an open address with basic auth, on SQLite (STACK_PREFECT_DATABASE):
    one server start checks both, the default PostgreSQL backend being the session server's (above)."""
    secret = f"ops:{uuid.uuid4().hex}"
    settings = Settings(stack=StackSettings(data_dir=tmp_path / "data", host="0.0.0.0", auth_string=secret,
                                            prefect_database="sqlite"))
    server = ensure_local_prefect_server(settings, port=free_port())
    yield settings, server, secret
    stop_prefect_worker(tmp_path / "worker")
    stop_prefect_server(settings.stack.prefect_dir)


def test_sqlite_and_basic_auth_refuse_strangers_and_serve_the_stack_clients(authenticated_stack, tmp_path,
                                                                           monkeypatch):
    """SQLite still starts and serves (its runs are rows of prefect.db, no PostgreSQL started for it); basic
    auth refuses strangers and wrong strings and serves the REST API, Prefect's client and a worker; a running
    server with another string or database is refused; the string is in no log, state file or status."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    settings, server, secret = authenticated_stack
    assert server.auth and server.api_url.startswith("http://127.0.0.1:")  # 0.0.0.0 reached over loopback
    state = read_state(settings.stack.prefect_dir / STATE_FILE)
    assert state["backend"] == "sqlite" and state["auth"] is True

    stranger = httpx.post(f"{server.api_url}/flows/filter", json={}, timeout=10)
    assert stranger.status_code == 401
    wrong = httpx.post(f"{server.api_url}/flows/filter", json={}, headers=basic_auth_headers("ops:guess"), timeout=10)
    assert wrong.status_code == 401
    with httpx.Client(base_url=server.api_url, headers=basic_auth_headers(secret), timeout=30) as client:
        run_id = _create_flow_run(client)
    with sqlite3.connect(settings.stack.prefect_dir / "prefect.db") as conn:
        assert conn.execute("SELECT count(*) FROM flow_run WHERE id = ?", (run_id,)).fetchone() == (1,)
    assert running_embedded_postgres(settings.stack.postgres_dir) is None  # SQLite needs no PostgreSQL

    pool = "auth-pool"
    with temporary_settings({PREFECT_API_URL: server.api_url, PREFECT_API_AUTH_STRING: secret}):
        with get_client(sync_client=True) as client:  # Prefect's own client, configured with the string
            flow_id = client.create_flow_from_name("auth-check")
            assert client.read_flow(flow_id).name == "auth-check"
        ensure_work_pool(pool)
    worker = ensure_prefect_worker(  # heartbeats and the readiness check both need the string
        tmp_path / "worker", server.api_url, PROJECT_ROOT, pool, query_seconds=1,
        extra_env={"PREFECT_API_AUTH_STRING": secret}, timeout=120,
    )
    assert worker.started

    # a second `up` reuses it; one with another string or database is refused, not restarted
    assert ensure_local_prefect_server(settings).pid == server.pid
    with pytest.raises(PrefectServerMismatch, match="refuses STACK_AUTH_STRING"):
        ensure_local_prefect_server(settings.replace(stack={"auth_string": "ops:other"}))
    with monkeypatch.context() as other:  # another database, named without starting anything for it
        other.setenv("PREFECT_API_DATABASE_CONNECTION_URL", "postgresql+asyncpg://prefect@db.internal:5432/prefect")
        with pytest.raises(PrefectServerMismatch, match="database"):
            ensure_local_prefect_server(settings)

    status = "\n".join(stack_status(settings).values())
    assert "basic auth" in status and "sqlite" in status
    assert "sqlite" in stack_status(settings)["prefect server"]
    # no access log: the server keeps warnings and errors, not a line per REST request
    server_log = settings.stack.prefect_dir / "server.log"
    assert "POST /api/flow_runs/" not in server_log.read_text()
    logs = [server_log, tmp_path / "worker" / "worker.log", settings.stack.prefect_dir / STATE_FILE]
    shown = [status, *(path.read_text() for path in logs)]
    assert not any(secret.split(":")[1] in text for text in shown)  # the password, alone or in the string


def test_a_stale_online_worker_row_does_not_make_a_new_worker_ready(prefect_api_url, tmp_path):
    """A worker killed without a goodbye leaves its row ONLINE for a while: a new start of the same name must
    wait for its own heartbeat, and fail when that never comes."""
    pool = f"stale-{uuid.uuid4().hex[:6]}"
    ensure_work_pool(pool)
    name = worker_name(pool)
    beat = httpx.post(f"{prefect_api_url}/work_pools/{pool}/workers/heartbeat",
                      json={"name": name, "heartbeat_interval_seconds": 30}, timeout=10)
    assert beat.status_code == 204, beat.text
    stale = last_heartbeat(prefect_api_url, pool, name)
    assert stale and worker_heartbeat_since(prefect_api_url, pool, name, None)  # ONLINE, as the old check saw it
    assert not worker_heartbeat_since(prefect_api_url, pool, name, stale)

    unreachable = f"http://127.0.0.1:{free_port()}/api"  # this process can never heartbeat
    # The stale row is ONLINE from the first readiness poll (every 0.5 s): a few seconds show it is not taken.
    with pytest.raises(RuntimeError, match="did not come online"):
        ensure_prefect_worker(tmp_path / "mute", prefect_api_url, PROJECT_ROOT, pool, query_seconds=1, timeout=5,
                              extra_env={"PREFECT_API_URL": unreachable})

    try:
        worker = ensure_prefect_worker(tmp_path / "worker", prefect_api_url, PROJECT_ROOT, pool, query_seconds=1)
        assert worker.started and worker_heartbeat_since(prefect_api_url, pool, name, stale)
    finally:
        stop_prefect_worker(tmp_path / "worker")


@pytest.mark.parametrize("value", ["ops", "ops:", ":pw"])
def test_a_malformed_auth_string_is_refused_without_showing_it(tmp_path, value):
    with pytest.raises(ValueError, match="'user:password'") as refused:
        Settings(stack=StackSettings(data_dir=tmp_path / "data", auth_string=value))
    assert value not in str(refused.value).replace("'user:password'", "")


def test_two_stacks_starting_at_once_do_not_both_choose_the_default_port(tmp_path, monkeypatch):
    """Each `start` holds the machine's lock of DEFAULT_PORT until its server answers: the second one finds the
    port taken and takes another, instead of starting a server that cannot bind while the first one's answers
    its health check. The servers are stand-ins that listen on the port they are given after 0.3 s."""
    import socket
    import threading
    import time

    from deployments import prefect_server

    monkeypatch.setattr(prefect_server, "DEFAULT_PORT", free_port())  # free now, as 4200 is on a fresh machine
    monkeypatch.setattr(prefect_server, "DEFAULT_PORT_LOCK", tmp_path / "port-lock")
    listening: list[socket.socket] = []

    def start_listening(service, port: int) -> int:
        time.sleep(0.3)  # the server's start-up, during which the port still looks free
        sock = socket.socket()
        sock.bind(("127.0.0.1", port))  # a second server on the same port would fail here
        sock.listen()
        listening.append(sock)
        return port

    monkeypatch.setattr(prefect_server.PrefectServerService, "_start", start_listening)
    services = [prefect_server.PrefectServerService(tmp_path / name) for name in ("one", "two")]
    ports: list[int] = []
    threads = [threading.Thread(target=lambda s=s: ports.append(s.start())) for s in services]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert len(ports) == 2 and prefect_server.DEFAULT_PORT in ports and len(set(ports)) == 2, ports
    finally:
        for sock in listening:
            sock.close()
