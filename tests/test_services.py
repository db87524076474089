"""The stack's services: flow, task and block code never starts one (a missing setting fails at once, naming it),
the running stack's services are found read-only, and the registry brings real services up, shows them and stops
them, in a temporary DATA_DIR."""

from __future__ import annotations

import os
import subprocess
import sys
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
                     "marketplace emulator", "turnstile emulator", "notification receiver", "prefect worker"]
