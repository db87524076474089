"""The local stack: the project database (the embedded PostgreSQL, migrated to head), a real Prefect server (its
own database "prefect" on that PostgreSQL, or SQLite: STACK_PREFECT_DATABASE), the embedded Redis, the
emulators of the outside systems (the marketplace API, the turnstiles), the blocks, the process work pool with
the deployments of prefect.yaml, and a worker.

    python -m deployments.stack up      # start (or reuse) everything, deploy, print the UI address
    python -m deployments.stack down    # stop what `up` started (worker, server, embedded Redis and PostgreSQL,
                                        # emulators)
    python -m deployments.stack status  # what is running, without starting anything

Services configured by environment (PREFECT_API_URL, REDIS_URL, DATABASE_URL, MARKETPLACE_API_URL) are used as
they are and never started (DATABASE_URL's database is still migrated); TURNSTILE_EMULATOR_DEVICES=0 starts no
emulated turnstiles.
Prefect is imported only after PREFECT_API_URL is set, so this process and the Dask workers it spawns all
talk to the same server.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from deployments.prefect_server import (
    ensure_local_prefect_server,
    running_prefect_server,
    stop_prefect_server,
    use_prefect_server,
)
from deployments.prefect_worker import (
    LOCAL_WORK_POOL,
    ensure_prefect_worker,
    ensure_work_pool,
    running_prefect_worker,
    stop_prefect_worker,
)
from operations.infra.database import migrate_to_head, redact_url
from operations.infra.embedded_postgres import (
    resolve_database_url,
    running_embedded_postgres,
    stop_embedded_postgres,
)
from emulators import turnstiles as turnstile_emulator
from emulators.marketplace import (
    EmulatorConfig,
    running_emulator_process,
    start_emulator_process,
    stop_emulator_process,
)
from operations.infra.embedded_redis import ensure_embedded_redis, running_embedded_redis, stop_embedded_redis
from operations.infra.file_server import ensure_file_server, running_file_server, stop_file_server
from operations.infra.links import output_base_url
from operations.settings import PROJECT_ROOT, Settings, get_settings


# The emulated marketplace of the local stack and the demo: a few sellers, a little latency.
DEMO_MARKETPLACE = EmulatorConfig(sellers=5, orders_per_seller=300, items_per_seller=80, latency_ms=10)
EMULATED_TURNSTILE = "emulated-turnstile-{}"  # block names of the emulated turnstiles (1-based)


@dataclass(frozen=True)
class LocalStack:
    api_url: str
    ui_url: str
    redis_url: str
    counter_block: str
    database_url: str  # may hold a password: show it with redact_url
    marketplace_api_url: str = ""
    marketplace_emulated: bool = False  # the local emulator stands in for the marketplace API
    emulated_turnstiles: tuple[str, ...] = ()  # TurnstileDevice blocks of the emulated turnstiles
    output_url: str = ""  # where OUTPUT_DIR is served: OUTPUT_BASE_URL or the local file server

    def __repr__(self) -> str:  # passwords redacted
        return (
            f"LocalStack(api_url={self.api_url!r}, ui_url={self.ui_url!r}, redis_url={redact_url(self.redis_url)!r}, "
            f"counter_block={self.counter_block!r}, database_url={redact_url(self.database_url)!r})"
        )


def start_local_stack(settings: Settings | None = None) -> LocalStack:
    """Start or reuse the Prefect server and Redis, point this process at them, register and save blocks."""
    settings = settings or get_settings()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # PostgreSQL first: the local Prefect server's database is on it (deployments/prefect_server.py)
    database_url = resolve_database_url(settings)  # the embedded PostgreSQL when DATABASE_URL is unset
    api_url = os.environ.get("PREFECT_API_URL")
    if api_url:
        ui_url = api_url.removesuffix("/api")
    else:
        server = ensure_local_prefect_server(settings)
        api_url, ui_url = server.api_url, server.ui_url
        use_prefect_server(api_url, settings.stack_auth_string)  # with PREFECT_API_AUTH_STRING for every client
    if settings.redis_url:
        redis_url = settings.redis_url.get_secret_value()
    else:
        redis_url = ensure_embedded_redis(settings.redis_dir).url
    migrate_to_head(database_url)
    register_blocks(settings, redis_url)
    ensure_generation_limit(settings)
    if settings.marketplace_api_url:
        marketplace_url = settings.marketplace_api_url
    else:  # no marketplace configured: the local emulator (a real HTTP server) stands in for it
        marketplace_url = start_emulator_process(DEMO_MARKETPLACE, settings.marketplace_emulator_dir).base_url
    save_marketplace_app_block(settings, marketplace_url)
    turnstiles = start_emulated_turnstiles(settings)
    output_url = start_file_server(settings)
    return LocalStack(
        api_url=api_url,
        ui_url=ui_url,
        redis_url=redis_url,
        counter_block=settings.counter_block_name,
        database_url=database_url,
        marketplace_api_url=marketplace_url,
        marketplace_emulated=not settings.marketplace_api_url,
        emulated_turnstiles=turnstiles,
        output_url=output_url,
    )


def start_file_server(settings: Settings) -> str:
    """Where artifacts link OUTPUT_DIR: OUTPUT_BASE_URL as it is, else the local file server, started or reused
    (refused beyond loopback without STACK_AUTH_STRING: `make up` fails rather than link files it cannot serve)."""
    return output_base_url(settings) if settings.output_base_url else ensure_file_server(settings).url


def save_marketplace_app_block(settings: Settings, api_url: str, emulator: EmulatorConfig | None = None) -> None:
    """Register the MarketplaceApp block type and save the default block: from MARKETPLACE_* settings when they
    name the API and the app's credentials, for the emulator at `api_url` when MARKETPLACE_API_URL is unset.
    With MARKETPLACE_API_URL set but no credentials, an existing block (filled in the UI) is left as it is."""
    from pydantic import SecretStr

    from blocks.marketplace_app import MarketplaceApp  # imports Prefect: only once the API URL is set

    MarketplaceApp.register_type_and_schema()
    name = settings.marketplace_app_block
    if not settings.marketplace_api_url:
        config = emulator or DEMO_MARKETPLACE
        block = MarketplaceApp(
            api_base_url=api_url, client_id=config.client_id, client_secret=SecretStr(config.client_secret),
            redirect_uri=config.redirect_uri,
        )
    elif settings.marketplace_client_id and settings.marketplace_client_secret:
        block = MarketplaceApp(
            api_base_url=settings.marketplace_api_url, client_id=settings.marketplace_client_id,
            client_secret=settings.marketplace_client_secret, redirect_uri=settings.marketplace_redirect_uri or "",
        )
    else:
        try:
            MarketplaceApp.load(name)
            return
        except ValueError:
            block = MarketplaceApp(api_base_url=settings.marketplace_api_url)  # credentials to be filled in the UI
    block.save(name, overwrite=True)


def register_blocks(settings: Settings, redis_url: str) -> None:
    """Register the project's Redis block types and save their default blocks, on the project's Redis: the
    game counter, the products queue and the turnstile cache (idempotent)."""
    from blocks.products_queue import ProductsQueue  # imports Prefect: only once the API URL is set
    from blocks.redis_game_counter import RedisGameCounter
    from blocks.turnstile_device import TurnstileCache

    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    for block_class, name in ((RedisGameCounter, settings.counter_block_name),
                              (ProductsQueue, settings.products_queue_block),
                              (TurnstileCache, settings.turnstile_cache_block)):
        block_class.register_type_and_schema()
        block_class.from_url(redis_url, password).save(name, overwrite=True)


def ensure_generation_limit(settings: Settings) -> None:
    """The global concurrency limit 'generate-games' every generation run holds a slot of around its cluster
    work, whatever deployment started it: created, or its slots set, from GAMES_CONCURRENCY_LIMIT."""
    from flows.concurrency import ensure_games_limit  # imports Prefect: only once the API URL is set

    ensure_games_limit(settings.games_concurrency_limit, update=True)


def start_emulated_turnstiles(settings: Settings) -> tuple[str, ...]:
    """Start (or reuse) the turnstile emulator with TURNSTILE_EMULATOR_DEVICES devices and save a TurnstileDevice
    block for each (`emulated-turnstile-N`); none when the setting is 0. Returns the block names."""
    from pydantic import SecretStr

    from blocks.turnstile_device import TurnstileDevice  # imports Prefect: only once the API URL is set

    TurnstileDevice.register_type_and_schema()
    if not settings.turnstile_emulator_devices:
        return ()
    config = turnstile_emulator.EmulatorConfig(devices=settings.turnstile_emulator_devices, latency_ms=5)
    emulator = turnstile_emulator.start_emulator_process(config, settings.turnstile_emulator_dir)
    names = []
    for i, url in enumerate(emulator.base_urls, start=1):
        names.append(EMULATED_TURNSTILE.format(i))
        TurnstileDevice(base_url=url, login=emulator.config.login,
                        password=SecretStr(emulator.config.password)).save(names[-1], overwrite=True)
    return tuple(names)


def deploy_all(api_url: str, project_dir: Path = PROJECT_ROOT) -> None:
    """The work pool (created if missing), then `prefect deploy --all` from the project folder (prefect.yaml);
    idempotent; raises with prefect's output on failure."""
    ensure_work_pool(LOCAL_WORK_POOL)
    env = dict(os.environ, PREFECT_API_URL=api_url)
    done = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"],
        cwd=project_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"prefect deploy --all failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


def start_operator_stack(settings: Settings | None = None, worker_query_seconds: float = 5.0) -> LocalStack:
    """Everything an operator needs: server, Redis, blocks, work pool, deployments and a worker."""
    settings = settings or get_settings()
    stack = start_local_stack(settings)
    deploy_all(stack.api_url)
    ensure_prefect_worker(
        settings.prefect_worker_dir, stack.api_url, PROJECT_ROOT, LOCAL_WORK_POOL, worker_query_seconds
    )
    return stack


def stop_local_stack(settings: Settings | None = None) -> list[str]:
    """Stop the services this project started (worker first); configured external ones are left alone."""
    settings = settings or get_settings()
    stopped = []
    if stop_prefect_worker(settings.prefect_worker_dir):
        stopped.append("prefect worker")
    if stop_prefect_server(settings.prefect_dir):
        stopped.append("prefect server")
    if stop_embedded_redis(settings.redis_dir):
        stopped.append("embedded redis")
    if stop_embedded_postgres(settings.postgres_dir):
        stopped.append("embedded postgres")
    if stop_emulator_process(settings.marketplace_emulator_dir):
        stopped.append("marketplace emulator")
    if turnstile_emulator.stop_emulator_process(settings.turnstile_emulator_dir):
        stopped.append("turnstile emulator")
    if stop_file_server(settings.file_server_dir):
        stopped.append("file server")
    return stopped


def local_api_url(settings: Settings | None = None) -> str | None:
    """PREFECT_API_URL when set, else the API of the running local server (None if there is none); for the
    local server, this process's clients also get its auth string (PREFECT_API_AUTH_STRING)."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    settings = settings or get_settings()
    server = running_prefect_server(settings.prefect_dir)
    if server is None:
        return None
    use_prefect_server(server.api_url, settings.stack_auth_string)
    return server.api_url


def stack_status(settings: Settings | None = None) -> dict[str, str]:
    settings = settings or get_settings()
    server = running_prefect_server(settings.prefect_dir)
    worker = running_prefect_worker(settings.prefect_worker_dir)
    redis_server = running_embedded_redis(settings.redis_dir)
    postgres = running_embedded_postgres(settings.postgres_dir)
    emulator = running_emulator_process(settings.marketplace_emulator_dir)
    turnstiles = turnstile_emulator.running_emulator_process(settings.turnstile_emulator_dir)
    file_server = running_file_server(settings.file_server_dir)
    return {
        "prefect server": (
            f"{server.ui_url} (pid {server.pid}), {server.database}{', basic auth' if server.auth else ''}"
            if server else "not running"
        ),
        "prefect worker": (
            f"{worker['name']} on pool {worker['pool']} (pid {worker['pid']})" if worker else "not running"
        ),
        "embedded redis": (
            f"127.0.0.1:{redis_server.port} (pid {redis_server.pid})"
            if redis_server
            else ("not used: REDIS_URL is set" if settings.redis_url else "not running")
        ),
        "embedded postgres": (
            f"socket {postgres.socket_dir} (pid {postgres.pid})"
            + (" for the Prefect server only: DATABASE_URL is set" if settings.database_url else "")
            if postgres
            else ("not used: DATABASE_URL is set" if settings.database_url else "not running")
        ),
        "marketplace": (
            f"{settings.marketplace_api_url} (MARKETPLACE_API_URL)"
            if settings.marketplace_api_url
            else (f"emulator {emulator.base_url} (pid {emulator.pid})" if emulator else "emulator not running")
        ),
        "turnstiles": (
            f"emulator of {len(turnstiles.base_urls)} device(s), ports {', '.join(map(str, turnstiles.ports))} "
            f"(pid {turnstiles.pid})" if turnstiles
            else ("no emulator (TURNSTILE_EMULATOR_DEVICES=0)" if not settings.turnstile_emulator_devices
                  else "emulator not running")
        ),
        "file server": (
            f"{file_server.url} serving {file_server.root}{' (basic auth)' if file_server.auth else ''} "
            f"(pid {file_server.pid})" if file_server
            else (f"not used: OUTPUT_BASE_URL is {redact_url(settings.output_base_url)}" if settings.output_base_url
                  else "not running")
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "status"])
    args = parser.parse_args(argv)
    if args.command == "down":
        stopped = stop_local_stack()
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        return 0
    if args.command == "status":
        for service, state in stack_status().items():
            print(f"{service + ':':19}{state}")
        return 0
    stack = start_operator_stack()
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        deployments = client.read_deployments()
        flows = {f.id: f.name for f in client.read_flows()}
    print(f"Prefect UI:    {stack.ui_url}")
    print(f"Prefect API:   {stack.api_url}")
    print(f"Redis:         {redact_url(stack.redis_url)}")
    print(f"Database:      {redact_url(stack.database_url)}")
    print(f"Counter block: {stack.counter_block} (RedisGameCounter)")
    print(f"Products queue: {get_settings().products_queue_block} (ProductsQueue, a Redis stream)")
    print(f"Marketplace:   {stack.marketplace_api_url}{' (emulator)' if stack.marketplace_emulated else ''}, "
          f"app block {get_settings().marketplace_app_block}")
    if stack.emulated_turnstiles:
        print(f"Turnstiles:    emulated: {', '.join(stack.emulated_turnstiles)} (TurnstileDevice blocks)")
    print(f"Output files:  {stack.output_url}/ (OUTPUT_DIR {get_settings().output_dir})")
    print(f"Worker:        pool {LOCAL_WORK_POOL}, log {get_settings().prefect_worker_dir / 'worker.log'}")
    print("Deployments:")
    for d in sorted(deployments, key=lambda d: (flows.get(d.flow_id, ""), d.name)):
        print(f"  {flows.get(d.flow_id, '?')}/{d.name}: {stack.ui_url}/deployments/deployment/{d.id}")
    print("Start a run: python -m deployments.start_run generate-games/on-demand quantity=100000")
    return 0


if __name__ == "__main__":
    sys.exit(main())
