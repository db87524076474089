"""Session fixtures: one real embedded PostgreSQL (database "operations_test", migrated to head, exported as
DATABASE_URL), one real Prefect server on it (its own database "prefect", the stack's default), in a temp folder,
and one real embedded redis-server.

The server is started in `pytest_configure`, before any test module imports Prefect, so that both this
process and the Dask worker processes it spawns point at it through PREFECT_API_URL.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

pytest_plugins = ["marketplace_fixtures"]

_STATE: dict = {}


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config, "workerinput"):  # pragma: no cover - xdist workers share the controller's server
        return
    root = Path(tempfile.mkdtemp(prefix="ops-tests-"))
    _STATE["root"] = root
    os.environ.update(
        {
            "PREFECT_HOME": str(root / "prefect-client"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING",
            # runs held by a deployment concurrency limit retry after this many seconds (30 by default)
            "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "1",
            "DATA_DIR": str(root / "data"),
            "OUTPUT_DIR": str(root / "data" / "output"),
        }
    )
    for var in ("PREFECT_API_URL", "REDIS_URL", "DASK_SCHEDULER_ADDRESS", "PREFECT_PROFILES_PATH", "DATABASE_URL",
                "PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL",
                "PREFECT_API_AUTH_STRING"):
        os.environ.pop(var, None)
    from deployments.prefect_server import embedded_prefect_database, ensure_prefect_server
    from operations.infra.embedded_postgres import ensure_database, ensure_embedded_postgres
    from operations.infra.embedded_redis import ensure_embedded_redis
    from operations.infra.processes import free_port

    postgres = ensure_embedded_postgres(root / "postgres")  # first: the server's database "prefect" is on it
    _STATE["postgres"] = postgres
    server = ensure_prefect_server(  # 4200 stays the operator's
        root / "prefect-server", port=free_port(), database=embedded_prefect_database(postgres)
    )
    os.environ["PREFECT_API_URL"] = server.api_url
    redis_server = ensure_embedded_redis(root / "redis")
    os.environ["REDIS_URL"] = redis_server.url
    _STATE["server"], _STATE["redis"] = server, redis_server

    from operations.infra.database import migrate_to_head
    from operations.settings import get_settings

    database_url = ensure_database(postgres, "operations_test")
    migrate_to_head(database_url)
    os.environ["DATABASE_URL"] = database_url  # child processes (Prefect and Dask workers) inherit it
    _STATE["database_url"] = database_url
    get_settings.cache_clear()


def pytest_unconfigure(config: pytest.Config) -> None:
    root = _STATE.get("root")
    if root is None:
        return
    from deployments.prefect_server import stop_prefect_server
    from operations.infra.embedded_redis import stop_embedded_redis

    try:  # send the last run logs before the server goes away
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
    except Exception:  # noqa: BLE001 - best effort at shutdown
        pass
    stop_prefect_server(root / "prefect-server")
    stop_embedded_redis(root / "redis")
    if "postgres" in _STATE:
        from operations.infra.database import dispose_engines
        from operations.infra.embedded_postgres import stop_embedded_postgres

        dispose_engines()
        stop_embedded_postgres(root / "postgres")
    # -- the file server (issue 10): no fixture starts it; the first link a flow makes does (links.output_link),
    # serving the OUTPUT_DIR of the flow's settings
    from operations.infra.file_server import stop_file_server
    from operations.settings import Settings

    stop_file_server(Settings().file_server_dir)
    # -- end of the file server
    shutil.rmtree(root, ignore_errors=True)


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
    """Fresh settings with outputs in this test's folder."""
    from operations import settings as settings_module

    monkeypatch.setenv("OUTPUT_DIR", str(tmp_path / "output"))
    settings_module.get_settings.cache_clear()
    yield settings_module.get_settings()
    settings_module.get_settings.cache_clear()
