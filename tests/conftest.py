"""Session fixtures: the session's services started through the stack's registry and service classes in a temp
DATA_DIR, exported as the stack exports them to its worker: one real embedded PostgreSQL (database
"operations_test", migrated to head: DATABASE_URL), one real Prefect server on it (its own database "prefect", the
stack's default: PREFECT_API_URL), one real embedded redis-server (REDIS_URL) and the file server of OUTPUT_DIR
(OUTPUT_BASE_URL). `pytest_sessionfinish` stops them in reverse order. Under xdist (`make test`: three workers)
each worker starts services of its own and the controller none; which tests run where: STACK_GROUPS below.

`deployed_stack`: the operator's `python -m deployments.stack up`, run once for the modules that need deployments,
a worker and the emulators, on those services; `down` at the end of the session.

The server is started in `pytest_configure`, before any test module imports Prefect, so that both this
process and the Dask worker processes it spawns point at it through PREFECT_API_URL.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest

pytest_plugins = ["marketplace_fixtures"]

_STATE: dict = {}


def session_services(settings) -> list:
    """The session's services, through the stack's registry and service classes: PostgreSQL (database
    "operations_test"), Redis, a Prefect server on a free port (4200 stays the operator's) with its database
    "prefect" on that PostgreSQL, and the file server of OUTPUT_DIR (flows' links need one), on a free port."""
    from deployments.prefect_server import PrefectServerService, embedded_prefect_database
    from deployments.services import Registered
    from operations.infra.embedded_postgres import PostgresService, running_embedded_postgres
    from operations.infra.embedded_redis import RedisService
    from operations.infra.file_server import FileServerService
    from operations.infra.processes import free_port

    return [
        Registered(PostgresService(settings.stack.postgres_dir, database="operations_test")),
        Registered(RedisService(settings.stack.redis_dir)),
        Registered(PrefectServerService(
            settings.stack.prefect_dir, port=free_port(),
            database=lambda: embedded_prefect_database(running_embedded_postgres(settings.stack.postgres_dir)),
        )),
        Registered(FileServerService(settings.replace(stack={"file_server_port": free_port()}))),
    ]


def _xdist_controller(config: pytest.Config) -> bool:
    """Whether this process only hands tests to xdist workers (`-n 3`): each worker starts its own services."""
    return not hasattr(config, "workerinput") and bool(getattr(config.option, "numprocesses", None))


def _one_certificate(root: Path) -> Path:
    """A CA file of one certificate (certifi's first), for PREFECT_API_SSL_CERT_FILE. The session's API is plain
    http on loopback, yet each Prefect client builds a verifying SSL context from that file, certifi's 140-odd
    certificates by default: ~13 ms of CPU per client, a third of a pytest worker's CPU in the flow modules (a
    client per block saved, per flow run, per log and event worker). With one certificate it is ~0.3 ms; an https
    API would be refused with it, not trusted."""
    import certifi

    bundle = Path(certifi.where()).read_text()
    end = "-----END CERTIFICATE-----\n"
    path = root / "api-ca.pem"
    path.write_text(bundle[bundle.index("-----BEGIN CERTIFICATE-----"):bundle.index(end) + len(end)])
    return path


def pytest_configure(config: pytest.Config) -> None:
    if _xdist_controller(config):
        return
    worker = getattr(config, "workerinput", {}).get("workerid", "main")
    root = Path(tempfile.mkdtemp(prefix=f"ops-tests-{worker}-"))
    _STATE["root"] = root
    os.environ.update(
        {
            "PREFECT_HOME": str(root / "prefect-client"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING",
            # runs held by a deployment concurrency limit retry after this many seconds (30 by default)
            "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "1",
            # flow runs of this process and its children beat as often as the worker's: once `deployed_stack` has
            # made the zombie automation, a run silent for ZOMBIE_AFTER_SECONDS is marked Crashed
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",
            "DATA_DIR": str(root / "data"),
            "OUTPUT_DIR": str(root / "data" / "output"),
            "PREFECT_API_SSL_CERT_FILE": str(_one_certificate(root)),
        }
    )
    for var in ("PREFECT_API_URL", "REDIS_URL", "DASK_SCHEDULER_ADDRESS", "PREFECT_PROFILES_PATH", "DATABASE_URL",
                "PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL",
                "PREFECT_API_AUTH_STRING", "OUTPUT_BASE_URL", "STACK_AUTH_STRING"):
        os.environ.pop(var, None)
    from deployments import services as registry
    from operations.settings import Settings, get_settings

    _STATE["services"] = session_services(Settings())
    # exports DATABASE_URL, REDIS_URL, PREFECT_API_URL and OUTPUT_BASE_URL, as the stack does for its worker:
    # child processes (Prefect and Dask workers) inherit them
    running = registry.up(_STATE["services"])
    _STATE["server"], _STATE["redis"] = running["prefect server"], running["embedded redis"]
    _STATE["file_server"] = running["file server"]

    from operations.infra.database import migrate_to_head

    _STATE["database_url"] = os.environ["DATABASE_URL"]
    migrate_to_head(_STATE["database_url"])
    get_settings.cache_clear()


# `make test` runs the suite on three xdist workers (`-n 3 --dist loadgroup`), each with services of its own
# (pytest_configure). A module runs whole on one worker, so its module fixtures start once. The modules that use
# `deployed_stack` form two groups (STACK_GROUPS), each run by one worker, which brings a stack up once for the
# modules of its group. Much of the suite is waiting (a flow-run process starting on the stack's worker, a cancel
# landing, a heartbeat missing): its processes kept ~1.2 of the two cores busy on two workers, the deployed stack's
# modules on one worker (~300 s) its critical path. On three workers with two stacks (a second `up`: a deploy, a
# worker, emulators, receivers, a watcher; ~25 s) each stack's group is about as long as the third worker's share.
# A module using it must be named there (the run stops at collection otherwise); the two groups share no run,
# limit or emulator, as each test of a group expects the stack's worker to run its runs alone. The longest groups
# start first, so that the last one to start is short and the workers finish close together (durations of
# `make test`; a module not named in LONGEST_FIRST starts after those named).
STACK_GROUPS = {
    "deployed-stack-operator": ("test_automations", "test_browser_ui", "test_inbox_e2e", "test_operator_commands"),
    "deployed-stack-runs": ("test_deployments_e2e",),
}
STACK_MODULES = {module: group for group, modules in STACK_GROUPS.items() for module in modules}
LONGEST_FIRST = (
    *STACK_GROUPS, "test_generate_games_flow", "test_process_products_flow", "test_run_retention",
    "test_sync_marketplace_flow", "test_cancellation", "test_docs", "test_register_participants_flow",
    "test_concurrency_limits", "test_services", "test_prefect_server", "test_plan", "test_database",
    "test_marketplace_sync", "test_products_store", "test_counter", "test_file_server", "test_turnstile_registration",
)


def group_of(nodeid: str) -> str:
    """The xdist group of a test id: its STACK_GROUPS group for a module on the deployed stack, else its module's
    name."""
    module = Path(nodeid.split("::", 1)[0]).stem
    return STACK_MODULES.get(module, module)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`--dist loadgroup`: xdist's scope scheduling over `group_of`, in the workers' collection order."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    config.option.loadscopereorder = False  # LONGEST_FIRST's order, not xdist's (the most tests first)
    return GroupScheduling(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On an xdist worker of `--dist loadgroup`: the groups in LONGEST_FIRST's order, each module's tests in their
    own order; a module on `deployed_stack` missing from STACK_GROUPS refused."""
    if not getattr(config.option, "loadgroup", False):
        return
    unlisted = sorted({item.path.name for item in items if "deployed_stack" in item.fixturenames
                       and group_of(item.nodeid) not in STACK_GROUPS})
    if unlisted:
        raise pytest.UsageError(f"{', '.join(unlisted)} use deployed_stack: add them to STACK_GROUPS in "
                                "tests/conftest.py, so that one worker brings the stack up, once")
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(group_of(item.nodeid), len(rank)))  # stable: each module in order


_GROUP_SECONDS: dict[str, float] = {}  # a worker's seconds per group (setup, call and teardown of its tests)
_WORKER_GROUPS: dict[str, dict[str, float]] = {}  # the controller's: each worker's


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _GROUP_SECONDS[group_of(report.nodeid)] = _GROUP_SECONDS.get(group_of(report.nodeid), 0.0) + report.duration


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    _WORKER_GROUPS[node.gateway.id] = getattr(node, "workeroutput", {}).get("group_seconds", {})


def pytest_terminal_summary(terminalreporter) -> None:
    """Under xdist: each worker's seconds of tests and its longest groups, to keep LONGEST_FIRST in step."""
    for worker, groups in sorted(_WORKER_GROUPS.items()):
        longest = sorted(groups.items(), key=lambda kv: -kv[1])[:6]
        terminalreporter.write_line(f"{worker}: {sum(groups.values()):.0f} s of tests in {len(groups)} groups; "
                                    + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in longest))


@pytest.hookimpl(trylast=True)  # after pytest's own, which tears the session fixtures down
def pytest_sessionfinish(session: pytest.Session) -> None:
    """The session's services stopped once its tests are done: on an xdist worker, before the worker reports
    that it finished (xdist terminates a worker 10 s after that, which would leave them running)."""
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["group_seconds"] = dict(_GROUP_SECONDS)
    _stop_services()


def pytest_unconfigure(config: pytest.Config) -> None:
    _stop_services()


def _stop_services() -> None:
    root = _STATE.pop("root", None)
    if root is None:
        return
    from deployments import services as registry
    from operations.infra.database import dispose_engines

    try:  # send the last run logs before the server goes away
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
    except Exception:  # noqa: BLE001 - best effort at shutdown
        pass
    dispose_engines()
    registry.down(_STATE.get("services", []))
    shutil.rmtree(root, ignore_errors=True)


def served_output(name: str) -> dict[str, str]:
    """OUTPUT_DIR and OUTPUT_BASE_URL of a folder `name` of its own under the session's OUTPUT_DIR, which the
    session's file server serves: what a test's flow runs (or a worker's) need for links that open."""
    server = _STATE["file_server"]
    folder = Path(server.root) / name
    folder.mkdir(parents=True, exist_ok=True)
    return {"OUTPUT_DIR": str(folder), "OUTPUT_BASE_URL": f"{server.url}/{quote(name)}"}


@pytest.fixture(scope="session")
def output_env():
    """`served_output`: a test's own OUTPUT_DIR served by the session's file server, as environment variables."""
    return served_output


# What the worker of `deployed_stack` runs its flow runs with, beyond the session's services: small chunks, so that
# a short generation run still has many to cancel between; small runs on a LocalCluster of one process (each Dask
# worker process imports Prefect and the flows: seconds of CPU that a second one would double); the schedules
# paused, the default, whatever a developer's .env says.
STACK_WORKER_SETTINGS = {
    "IN_PROCESS_MAX_QUANTITY": "10000",
    "MIN_GAMES_PER_CHUNK": "1000",
    "MAX_GAMES_PER_CHUNK": "2500",
    "DASK_N_WORKERS": "1",
    "STACK_SCHEDULES": "off",
}
# Started by `stack up` on the session's services; the others show "not used: <setting> is set".
STACK_STARTED = ("marketplace emulator", "turnstile emulator", "notification receiver", "marketplace receiver",
                 "inbox watcher",
                 "prefect worker")
STACK_CONFIGURED = {"embedded postgres": "DATABASE_URL", "embedded redis": "REDIS_URL",
                    "prefect server": "PREFECT_API_URL", "file server": "OUTPUT_BASE_URL"}


def stack_command(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m deployments.stack <args>` from the project folder, as the operator types it."""
    from operations.settings import PROJECT_ROOT

    return subprocess.run([sys.executable, "-m", "deployments.stack", *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@dataclass(frozen=True)
class DeployedStack:
    """The session's deployed stack: what `python -m deployments.stack up` printed and the shell it ran in."""

    env: dict[str, str]  # the operator's shell: the session's services configured, a DATA_DIR of its own
    up_output: str
    api_url: str
    settings: object  # operations.settings.Settings of the worker's flow runs (OUTPUT_DIR, chunk sizes, blocks)
    started: tuple[str, ...] = STACK_STARTED  # the services `up` started, in the registry's order
    configured: dict[str, str] = field(default_factory=lambda: dict(STACK_CONFIGURED))  # the others: the setting
    # that names each one


def pause_scheduled_deployments(api_url: str) -> list[str]:
    """Pause the deployments whose schedules `up` left active (the always-scheduled relay), their schedules
    left active: the server's scheduler then makes no run of them (a run a minute, each a process of the worker
    that imports Prefect and the flows: seconds of CPU on busy cores), while a run started over REST still
    runs and every schedule reads as `up` set it. Returns their names."""
    import httpx

    deployments = httpx.post(f"{api_url}/deployments/filter", json={}, timeout=30).json()
    paused = []
    for deployment in deployments:
        if any(schedule["active"] for schedule in deployment["schedules"]):
            response = httpx.post(f"{api_url}/deployments/{deployment['id']}/pause_deployment", timeout=30)
            assert response.status_code in (200, 204), response.text
            paused.append(deployment["name"])
    return paused


@pytest.fixture(scope="session")
def deployed_stack(prefect_api_url, redis_url, database_url, tmp_path_factory):
    """`python -m deployments.stack up` once, in a shell whose DATABASE_URL, REDIS_URL, PREFECT_API_URL and
    OUTPUT_BASE_URL name the session's services: it starts the marketplace and turnstile emulators and the worker,
    migrates the database, saves the blocks and deploys prefect.yaml. The deployments it left scheduled are paused
    (`pause_scheduled_deployments`). The worker's flow runs write under a folder of their own, served by the
    session's file server. `down` at the end stops what `up` started, in reverse
    order, and nothing of the session's."""
    from operations.settings import Settings

    root = tmp_path_factory.mktemp("stack")
    from operations.infra.processes import free_port
    from operations.marketplace.tokens import ensure_key_file

    # the tests onboard sellers in this process: the stack's flow runs decrypt their tokens with the same key, as
    # flows on several machines share MARKETPLACE_TOKEN_KEY
    token_key = (os.environ.get("MARKETPLACE_TOKEN_KEY")
                 or ensure_key_file(Path(os.environ["DATA_DIR"])).read_text().strip())
    settings_env = {"MARKETPLACE_TOKEN_KEY": token_key, **served_output(f"stack-{root.name}"),
                    "DATA_DIR": str(root / "data"), "REDIS_URL": redis_url,
                    "DATABASE_URL": database_url, **STACK_WORKER_SETTINGS,
                    # ports of their own: other stacks may run on the same machine
                    "NOTIFICATION_RECEIVER_PORT": str(free_port()), "MARKETPLACE_RECEIVER_PORT": str(free_port())}
    env = {k: v for k, v in os.environ.items()
           if k not in ("DASK_SCHEDULER_ADDRESS", "MARKETPLACE_API_URL", "TURNSTILE_EMULATOR_DEVICES")}
    env.update(settings_env, PREFECT_API_URL=prefect_api_url, PREFECT_WORKER_QUERY_SECONDS="1")
    up = stack_command(env, "up", timeout=600)  # minutes on a machine shared with other work
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        pause_scheduled_deployments(prefect_api_url)
        yield DeployedStack(env, up.stdout, prefect_api_url, Settings.from_env(settings_env))
    finally:
        down = stack_command(env, "down")
        status = stack_command(env, "status").stdout
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped: " + ", ".join(reversed(STACK_STARTED)) in down.stdout, down.stdout  # the registry, reversed
    for service in STACK_STARTED:
        assert re.search(rf"^{service}:\s+not running; log ", status, re.M), status
    for service, variable in STACK_CONFIGURED.items():
        assert re.search(rf"^{service}:\s+not running \(not used: {variable} is set\)", status, re.M), status
    import httpx

    assert httpx.get(f"{prefect_api_url}/health", timeout=10).status_code == 200  # the session's, left running


@pytest.fixture(scope="session")
def prefect_api_url() -> str:
    return _STATE["server"].api_url


@pytest.fixture(scope="session")
def redis_url() -> str:
    return _STATE["redis"].url


@pytest.fixture(scope="session")
def database_url() -> str:
    """The session's PostgreSQL database ("operations_test" on the embedded server), migrated to head."""
    return _STATE["database_url"]


@pytest.fixture(scope="session")
def dask_cluster(prefect_api_url, tmp_path_factory):
    """The session's Dask cluster: a `dask scheduler` and two single-thread `dask worker` processes (the shape of
    the default LocalCluster; without a nanny, which would only restart a dead worker), started on first use. The
    workers reach the Prefect API, PostgreSQL and Redis of the session through the environment they start with, as
    remote workers would through theirs: a test whose tasks need other settings on the workers, or that kills or
    cancels its run, starts a cluster of its own."""
    from distributed import Client

    from operations.infra.processes import free_port, stop_process_group
    from operations.settings import PROJECT_ROOT

    logs = tmp_path_factory.mktemp("dask")
    address = f"tcp://127.0.0.1:{free_port()}"
    env = dict(os.environ, DASK_LOGGING__DISTRIBUTED="warning")
    commands = [
        ["scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--no-dashboard"],
        *[["worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard", "--name", f"remote-{i}"]
          for i in range(2)],
    ]
    processes = []
    for i, args in enumerate(commands):
        with open(logs / f"dask-{i}.log", "wb") as log:
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "dask", *args],
                    cwd=PROJECT_ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with Client(address, timeout=5) as client:
                    if len(client.scheduler_info(n_workers=-1)["workers"]) == 2:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the dask cluster did not come up"
            time.sleep(0.5)
        yield address
    finally:
        for process in reversed(processes):
            stop_process_group(process.pid, 10)


@pytest.fixture(scope="module", autouse=True)
def fresh_settings_per_module():
    """Each module starts from settings read anew from the session's environment, whichever module ran before it
    on this worker (under xdist the modules run in LONGEST_FIRST's order, not the files' order): a test that
    changed the environment and restored it may have left settings of its own in `get_settings`' cache."""
    from operations.settings import get_settings

    get_settings.cache_clear()
    yield


@pytest.fixture
def on_session_cluster(dask_cluster, monkeypatch):
    """Flows of this test run their Dask work on the session's cluster (DASK_SCHEDULER_ADDRESS)."""
    from operations.settings import get_settings

    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", dask_cluster)
    get_settings.cache_clear()
    yield dask_cluster
    get_settings.cache_clear()


@pytest.fixture
def sqlite_database_url(tmp_path) -> str:
    """A fresh SQLite file migrated to head."""
    from operations.infra.database import migrate_to_head

    url = f"sqlite:///{tmp_path / 'operations.db'}"
    migrate_to_head(url)
    return url


@pytest.fixture
def redis_client(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=10)
    yield client
    client.close()


@pytest.fixture
def settings(tmp_path, monkeypatch):
    """Fresh settings with outputs in a folder of this test's own, served by the session's file server."""
    from operations import settings as settings_module

    for name, value in served_output(f"{tmp_path.parent.name}-{tmp_path.name}").items():
        monkeypatch.setenv(name, value)
    settings_module.get_settings.cache_clear()
    yield settings_module.get_settings()
    settings_module.get_settings.cache_clear()
