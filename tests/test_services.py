"""The stack's services: flow, task and block code never starts one (a missing setting fails at once, naming it),
the running stack's services are found read-only, and the registry brings real services up, shows them and stops
them, in a temporary DATA_DIR."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis

from deployments import services as registry
from deployments.services import Registered
from operations.infra.database import project_engine
from operations.infra.embedded_postgres import resolve_database_url
from operations.infra.embedded_redis import RedisService, resolve_redis_url
from operations.infra.file_server import FileServerService
from operations.infra.links import output_link
from operations.infra.processes import free_port, pid_alive
from operations.infra.services import NotConfigured
from operations.settings import PROJECT_ROOT, DatabaseSettings, RedisSettings, Settings, StackSettings


def _bare_settings(tmp_path: Path, redis_url: str | None = None) -> Settings:
    """Settings of a machine that runs no stack: nothing configured, an empty DATA_DIR."""
    stack = {"data_dir": tmp_path / "data", "output_dir": tmp_path / "data" / "output", "output_base_url": None,
             "file_server_port": free_port()}
    return Settings(stack=StackSettings(**stack), database=DatabaseSettings(url=None),
                    redis=RedisSettings(url=redis_url))


def _processes_under(folder: Path) -> list[int]:
    """Pids of live processes whose command line names `folder` (a service started for it would)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(folder).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_the_project_database_is_never_started_by_flow_code(tmp_path):
    settings = _bare_settings(tmp_path)
    started = time.monotonic()
    with pytest.raises(NotConfigured, match="DATABASE_URL is not set") as refused:
        project_engine(settings)
    assert time.monotonic() - started < 5  # at once, not after a start attempt
    assert "make up" in str(refused.value) and str(settings.stack.data_dir) in str(refused.value)
    with pytest.raises(NotConfigured, match="DATABASE_URL"):
        resolve_database_url(settings)
    assert not settings.stack.postgres_dir.exists() and _processes_under(tmp_path) == []


def test_a_second_machine_without_database_url_fails_at_once(tmp_path):
    """A flow-run process with DATABASE_URL unset and no stack under its DATA_DIR: exit 1 naming the setting."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "OUTPUT_BASE_URL")}
    env["DATA_DIR"] = str(tmp_path / "data")
    done = subprocess.run(
        [sys.executable, "-c", "from operations.infra.database import project_engine; project_engine()"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1 and "NotConfigured: DATABASE_URL is not set" in done.stderr, done.stderr
    assert not (tmp_path / "data" / "postgres").exists()


def test_the_operators_commands_outside_a_stack_name_the_setting(tmp_path):
    """The shell commands look the stack's services up; without one and without DATABASE_URL: one clear line."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL", "OUTPUT_BASE_URL")}
    env["DATA_DIR"] = str(tmp_path / "data")
    for command in (["deployments.dealers", "list"], ["deployments.marketplace_accounts", "list"],
                    ["operations.infra.database", "current"]):
        done = subprocess.run([sys.executable, "-m", *command], cwd=PROJECT_ROOT, env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode in (1, 2) and "Traceback" not in done.stderr, (command, done.stderr)
        assert "error: DATABASE_URL is not set" in done.stderr and "make up" in done.stderr, (command, done.stderr)
    assert not (tmp_path / "data" / "postgres").exists()


def test_redis_is_never_started_by_block_code(tmp_path):
    from blocks.redis_game_counter import RedisGameCounter

    settings = _bare_settings(tmp_path)
    with pytest.raises(NotConfigured, match="REDIS_URL is not set"):
        resolve_redis_url(settings)
    name = f"missing-{uuid.uuid4().hex[:8]}"  # no such block saved: the default would be created
    with pytest.raises(NotConfigured, match="REDIS_URL is not set.*make up"):
        RedisGameCounter.load_or_create_default(name, name, settings)
    with pytest.raises(ValueError, match=name):
        RedisGameCounter.load(name)  # nothing saved either
    assert not settings.stack.redis_dir.exists() and _processes_under(tmp_path) == []


def test_links_are_never_served_by_a_server_started_from_flow_code(tmp_path):
    settings = _bare_settings(tmp_path)
    target = settings.stack.output_dir / "run" / "games.xlsx"
    with pytest.raises(NotConfigured, match="OUTPUT_BASE_URL is not set.*make up"):
        output_link(target, settings)
    assert not settings.stack.file_server_dir.exists() and _processes_under(tmp_path) == []


def test_the_running_stacks_services_are_found_read_only(tmp_path):
    """Beside `make up` (a state file under DATA_DIR), an unset setting resolves to the running service."""
    settings = _bare_settings(tmp_path)
    service = RedisService(settings.stack.redis_dir)
    running = service.ensure()
    try:
        assert resolve_redis_url(settings) == running.url
        assert redis.Redis.from_url(resolve_redis_url(settings)).ping()
    finally:
        assert service.stop()
    with pytest.raises(NotConfigured, match="REDIS_URL"):
        resolve_redis_url(settings)
    files = FileServerService(settings)
    server = files.ensure()
    try:
        link = output_link(settings.stack.output_dir / "a b.csv", settings)
        assert link == f"{server.url}/a%20b.csv"
        other = settings.replace(stack={"output_dir": tmp_path / "elsewhere"})
        with pytest.raises(NotConfigured, match="OUTPUT_BASE_URL"):  # it serves another OUTPUT_DIR
            output_link(other.stack.output_dir / "x.csv", other)
    finally:
        files.stop()


def test_the_registry_brings_services_up_shows_them_and_stops_them(tmp_path, monkeypatch):
    settings = _bare_settings(tmp_path)
    for variable in ("REDIS_URL", "OUTPUT_BASE_URL"):  # up exports them here: restored afterwards
        monkeypatch.setenv(variable, os.environ.get(variable, ""))
    services = [Registered(RedisService(settings.stack.redis_dir)), Registered(FileServerService(settings))]
    before = {state.name: state for state in registry.status(services)}
    assert [state.running for state in before.values()] == [False, False]

    running = registry.up(services)
    try:
        redis_server, file_server = running["embedded redis"], running["file server"]
        assert os.environ["REDIS_URL"] == redis_server.url and os.environ["OUTPUT_BASE_URL"] == file_server.url
        states = {state.name: state for state in registry.status(services)}
        assert states["embedded redis"].pid == redis_server.pid and states["embedded redis"].address == redis_server.url
        assert states["file server"].pid == file_server.pid and states["file server"].address == file_server.url
        assert states["file server"].log == settings.stack.file_server_dir / "file-server.log"
        line = states["file server"].line()
        assert line.startswith(f"running, pid {file_server.pid}, {file_server.url}") and "file-server.log" in line
        assert httpx.get(f"{file_server.url}/-/health").status_code == 200

        again = registry.up(services)  # a second up reuses both
        assert (again["embedded redis"].pid, again["file server"].pid) == (redis_server.pid, file_server.pid)
    finally:
        stopped = registry.down(services)
    assert stopped == ["file server", "embedded redis"]  # reverse order
    assert not pid_alive(redis_server.pid) and not pid_alive(file_server.pid)
    assert [state.running for state in registry.status(services)] == [False, False]
    assert registry.down(services) == []


def test_a_service_replaced_by_a_setting_is_not_started(tmp_path, monkeypatch):
    settings = _bare_settings(tmp_path, redis_url="redis://redis.internal:6379/0")
    [entry] = registry.only(registry.stack_services(settings), "embedded redis")
    assert entry.replaced_by == "REDIS_URL is set"
    assert registry.up([entry]) == {}
    [state] = registry.status([entry])
    assert not state.running and "not used: REDIS_URL is set" in state.line()
    assert not settings.stack.redis_dir.exists()


def test_the_registry_order_is_the_stacks():
    names = [entry.name for entry in registry.stack_services(Settings())]
    assert names == ["embedded postgres", "embedded redis", "prefect server", "file server",
                     "marketplace emulator", "turnstile emulator", "notification receiver", "marketplace receiver",
                     "inbox watcher",
                     "prefect worker"]


def _answers_after(killed: int, check, timeout: float) -> float:
    """Seconds from SIGKILL of pid `killed` until `check()` is true (fails the test after `timeout`)."""
    os.kill(killed, 9)
    started = time.monotonic()
    while pid_alive(killed):  # gone (and reaped by its supervisor): what answers now is the new one
        time.sleep(0.01)
    while not check():
        assert time.monotonic() - started < timeout, f"not answering {timeout} s after the kill"
        time.sleep(0.05)
    return time.monotonic() - started


def _restart_events(api_url: str, since: str, subject: str) -> list[dict]:
    body = {"filter": {"event": {"name": ["project.service.restarted"]}, "occurred": {"since": since},
                       "resource": {"id": [f"project.service.{subject}"]}}, "limit": 10}
    return httpx.post(f"{api_url}/events/filter", json=body, timeout=10).json()["events"]


@pytest.fixture
def traversable_tmp():
    """A temp folder outside pytest's own (which every pytest start makes 0700 again, so PostgreSQL, run as
    another user when we are root, could not restart in it)."""
    root = Path(tempfile.mkdtemp(prefix="ops-restarts-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _running_postgres(service):
    """The service's PostgreSQL once its supervisor counts it RUNNING (up past its start: a death sooner is
    counted with the restart it interrupted)."""
    deadline = time.monotonic() + 20
    while (service.supervisor.info(service.program) or {}).get("statename") != "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return service.find()


def test_a_killed_postgres_or_redis_is_back_within_seconds_on_the_same_address(
    traversable_tmp, monkeypatch, prefect_api_url
):
    """kill -9 of the postmaster and of redis-server: the stack's supervisor starts each again on the same socket
    or port, clients made before the kill work after it, `make status` counts the restart, the listener emits
    `project.service.restarted` to the Prefect server, and `down` leaves no process (supervisord included)."""
    from datetime import datetime, timezone

    from blocks.redis_connection import RedisConnection
    from operations.infra.embedded_postgres import PostgresService, _answers
    from sqlalchemy import text

    from operations.infra.database import get_engine

    tmp_path = traversable_tmp
    settings = _bare_settings(tmp_path)
    for variable in ("REDIS_URL", "DATABASE_URL"):  # up exports them here: restored afterwards
        monkeypatch.setenv(variable, os.environ.get(variable, ""))
    data_dir = settings.stack.data_dir
    services = [Registered(PostgresService(settings.stack.postgres_dir).supervise_in(data_dir)),
                Registered(RedisService(settings.stack.redis_dir).supervise_in(data_dir))]
    since = datetime.now(timezone.utc).isoformat()
    running = registry.up(services)
    try:
        postgres, redis_server = running["embedded postgres"], running["embedded redis"]
        engine = get_engine(postgres.url)
        client = RedisConnection.from_url(redis_server.url, socket_timeout=2).get_client()
        with engine.connect() as connection:
            assert connection.execute(text("SELECT 1")).scalar() == 1
        assert client.ping()

        seconds = _answers_after(postgres.pid, lambda: _answers(postgres.socket_dir), 20)
        print(f"embedded postgres answered {seconds:.1f} s after kill -9")
        killed = _running_postgres(services[0].service).pid
        os.kill(killed, 9)
        while pid_alive(killed):
            time.sleep(0.01)
        again = registry.up(services)["embedded postgres"]  # `make up` meanwhile waits for the supervisor's restart
        assert again.socket_dir == postgres.socket_dir and _answers(postgres.socket_dir)
        with engine.connect() as connection:  # pool_pre_ping: the dead pooled connection is replaced
            assert connection.execute(text("SELECT 1")).scalar() == 1

        seconds = _answers_after(redis_server.pid, lambda: RedisService(settings.stack.redis_dir).find() is not None, 20)
        print(f"embedded redis answered {seconds:.1f} s after kill -9")
        assert client.ping()  # redis-py reconnects to the same port

        states = {state.name: state for state in registry.status(services)}
        assert states["embedded postgres"].address == f"socket {postgres.socket_dir}"
        assert states["embedded redis"].address == redis_server.url
        for name, before in (("embedded postgres", postgres), ("embedded redis", redis_server)):
            count = 2 if name == "embedded postgres" else 1
            assert states[name].running and states[name].pid != before.pid and states[name].restarts == count, states[name]
            assert f", restarts {count}" in states[name].line()
        waited = time.monotonic()
        deadline = waited + 60  # the listener imports Prefect, the server persists events in batches
        while not (_restart_events(prefect_api_url, since, "embedded-postgres")
                   and _restart_events(prefect_api_url, since, "embedded-redis")):
            assert time.monotonic() < deadline, "no project.service.restarted events"
            time.sleep(0.5)
        print(f"restart events found {time.monotonic() - waited:.1f} s later")
        [event] = _restart_events(prefect_api_url, since, "embedded-redis")  # one event per restart
        assert event["payload"] == {"restarts": 1} and event["resource"]["prefect.resource.name"] == "embedded redis"
        [line] = registry.supervisor_status(services)
        assert line.startswith("running, pid ") and f"config {data_dir / 'supervisord.conf'}" in line, line
    finally:
        engine.dispose()
        stopped = registry.down(services)
    assert stopped == ["embedded redis", "embedded postgres"]
    assert registry.supervisor_status(services) == [f"not running; log {data_dir / 'supervisord.log'}"]
    assert _processes_under(tmp_path) == []  # supervisord, its listener and the services


def test_a_refused_connection_names_the_service_and_stays_transient(tmp_path):
    """Nothing listens: the Redis and PostgreSQL errors say which server and what to do, and tasks retry them."""
    from blocks.redis_connection import RedisConnection
    from sqlalchemy import exc, text

    from operations.infra.database import get_engine
    from tasks.retries import is_transient

    port = free_port()
    with pytest.raises(redis.ConnectionError) as refused:
        RedisConnection(url=f"redis://127.0.0.1:{port}/0", socket_timeout=2).get_client().ping()
    assert f"the Redis at 127.0.0.1:{port} is not answering" in str(refused.value)
    assert "make up" in str(refused.value) and "REDIS_URL" in str(refused.value) and is_transient(refused.value)

    socket_dir = tmp_path / "no-server"
    engine = get_engine(f"postgresql+psycopg://postgres@/operations?host={socket_dir}")
    with pytest.raises(exc.OperationalError) as refused:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    message = str(refused.value)
    assert message.startswith(f"(the stack's PostgreSQL at socket {socket_dir} is not answering"), message
    assert "make up" in message and "DATABASE_URL" in message and is_transient(refused.value)
    engine.dispose()
