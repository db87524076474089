"""The local stack: the services of the registry (deployments/services.py: the embedded PostgreSQL, the embedded
Redis, a real Prefect server with its own database "prefect" on that PostgreSQL or SQLite, the file server of
OUTPUT_DIR, the emulators of the outside systems, the notification receiver, the drop-folder watcher, the worker),
the project database migrated to head, the blocks, the process work pool with the deployments of prefect.yaml (and
their triggers), the project's automations (deployments/automations.py: notifications, zombie runs Crashed), and the
drop folders (PRODUCTS_INBOX_DIR, TURNSTILES_INBOX_DIR: docs/inbox.md).

    python -m deployments.stack up      # start (or reuse) every service in order, deploy, print the UI address
    python -m deployments.stack down    # stop the services in reverse order
    python -m deployments.stack status  # each service: running or not, pid, address, restarts, log, and each
                                        # drop folder's files; starts nothing

Services configured by environment (DATABASE_URL, REDIS_URL, PREFECT_API_URL, OUTPUT_BASE_URL, MARKETPLACE_API_URL)
are used as they are and never started (DATABASE_URL's database is still migrated); TURNSTILE_EMULATOR_DEVICES=0
starts no emulated turnstiles. The addresses of the started ones reach the worker, its flow runs and their Dask
workers through the environment (DATABASE_URL, REDIS_URL, OUTPUT_BASE_URL, PREFECT_API_URL).
Prefect is imported only after PREFECT_API_URL is set, so this process and the Dask workers it spawns all
talk to the same server.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import yaml
from pydantic import SecretStr

from deployments import services as registry
from deployments.marketplace_receiver import callback_url, emulator_callback_url
from deployments.after_deploy import apply_after_deploy, describe_schedules
from deployments.automations import apply_automations, notifications_at
from deployments.prefect_server import running_prefect_server, use_prefect_server
from deployments.prefect_worker import LOCAL_WORK_POOL, ensure_work_pool
from deployments.inbox_watcher import describe_counts
from deployments.services import AFTER_DEPLOY, DEMO_MARKETPLACE
from emulators.marketplace import EmulatorConfig
from operations.infra.database import migrate_to_head, redact_url
from operations.infra.inbox import DropFolder
from operations.infra.links import output_base_url
from operations.marketplace.tokens import ensure_key_file
from operations.settings import PROJECT_ROOT, Settings, get_settings

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
    redeployed: bool = True  # False: prefect.yaml and the flows' code unchanged since the server's deployments

    def __repr__(self) -> str:  # passwords redacted
        return (
            f"LocalStack(api_url={self.api_url!r}, ui_url={self.ui_url!r}, redis_url={redact_url(self.redis_url)!r}, "
            f"counter_block={self.counter_block!r}, database_url={redact_url(self.database_url)!r})"
        )


def start_local_stack(settings: Settings | None = None) -> LocalStack:
    """Start or reuse every service of the registry but those started after the deploy (the drop-folder watcher
    and the worker; their addresses exported to this process), migrate the project database, register and save
    the blocks."""
    settings = settings or get_settings()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # flow runs of this process (the demo's, the benchmarks') beat as often as the worker's: the zombie automation
    # judges every run of the server (Prefect's own default, 180 s, is longer than its window)
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(settings.alerts.heartbeat_seconds))
    running = registry.up(registry.without(registry.stack_services(settings), *AFTER_DEPLOY))
    # each address as configured, else as the started service exported it (what the worker's flow runs get)
    database_url = _secret(settings.database.url) or os.environ["DATABASE_URL"]
    redis_url = _secret(settings.redis.url) or os.environ["REDIS_URL"]
    api_url = os.environ["PREFECT_API_URL"]
    if settings.marketplace.token_key is None:  # the embedded default: a key under DATA_DIR, made before the
        ensure_key_file(settings.stack.data_dir)  # migration so that it encrypts tokens stored in plain text
    migrate_to_head(database_url)
    register_blocks(settings, redis_url)
    ensure_generation_limit(settings)
    marketplace = running.get("marketplace emulator")
    if marketplace is not None and running.get("marketplace receiver") is not None:  # the emulator notifies it
        marketplace.control.configure(notification_url=emulator_callback_url(running["marketplace receiver"], settings))
    save_marketplace_app_block(settings, marketplace.base_url if marketplace else settings.marketplace.api_url or "")
    turnstiles = save_emulated_turnstiles(running.get("turnstile emulator"))
    return LocalStack(
        api_url=api_url,
        ui_url=api_url.removesuffix("/api"),
        redis_url=redis_url,
        counter_block=settings.lottery.counter_block_name,
        database_url=database_url,
        marketplace_api_url=marketplace.base_url if marketplace else settings.marketplace.api_url or "",
        marketplace_emulated=marketplace is not None,
        emulated_turnstiles=turnstiles,
        output_url=output_base_url(settings) if settings.stack.output_base_url else os.environ["OUTPUT_BASE_URL"],
    )


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value else None


def save_marketplace_app_block(settings: Settings, api_url: str, emulator: EmulatorConfig | None = None) -> None:
    """Register the MarketplaceApp block type and save the default block: from MARKETPLACE_* settings when they
    name the API and the app's credentials, for the emulator at `api_url` when MARKETPLACE_API_URL is unset.
    With MARKETPLACE_API_URL set but no credentials, an existing block (filled in the UI) is left as it is."""
    from pydantic import SecretStr

    from blocks.marketplace_app import MarketplaceApp  # imports Prefect: only once the API URL is set

    MarketplaceApp.register_type_and_schema()
    name = settings.marketplace.app_block
    if not settings.marketplace.api_url:
        config = emulator or DEMO_MARKETPLACE
        block = MarketplaceApp(
            api_base_url=api_url, client_id=config.client_id, client_secret=SecretStr(config.client_secret),
            redirect_uri=config.redirect_uri,
        )
    elif settings.marketplace.client_id and settings.marketplace.client_secret:
        block = MarketplaceApp(
            api_base_url=settings.marketplace.api_url, client_id=settings.marketplace.client_id,
            client_secret=settings.marketplace.client_secret, redirect_uri=settings.marketplace.redirect_uri or "",
        )
    else:
        try:
            MarketplaceApp.load(name)
            return
        except ValueError:
            block = MarketplaceApp(api_base_url=settings.marketplace.api_url)  # credentials to be filled in the UI
    block.save(name, overwrite=True)


def register_blocks(settings: Settings, redis_url: str) -> None:
    """Register the project's Redis block types and save their default blocks, on the project's Redis: the
    game counter, the products queue and the turnstile cache (idempotent)."""
    from blocks.products_queue import ProductsQueue  # imports Prefect: only once the API URL is set
    from blocks.redis_game_counter import RedisGameCounter
    from blocks.turnstile_device import TurnstileCache

    password = settings.redis.password.get_secret_value() if settings.redis.password else None
    for block_class, name in ((RedisGameCounter, settings.lottery.counter_block_name),
                              (ProductsQueue, settings.products.queue_block),
                              (TurnstileCache, settings.turnstiles.cache_block)):
        block_class.register_type_and_schema()
        block_class.from_url(redis_url, password).save(name, overwrite=True)


def ensure_generation_limit(settings: Settings) -> None:
    """The global concurrency limit 'generate-games' every generation run holds a slot of around its cluster
    work, whatever deployment started it: created, or its slots set, from GAMES_CONCURRENCY_LIMIT."""
    from flows.concurrency import ensure_games_limit  # imports Prefect: only once the API URL is set

    ensure_games_limit(settings.lottery.games_concurrency_limit, update=True)


def save_emulated_turnstiles(emulator) -> tuple[str, ...]:
    """Register the TurnstileDevice block type and save a block for each device of the running turnstile
    emulator (`emulated-turnstile-N`); none without one (TURNSTILE_EMULATOR_DEVICES=0). Returns the names."""
    from pydantic import SecretStr

    from blocks.turnstile_device import TurnstileDevice  # imports Prefect: only once the API URL is set

    TurnstileDevice.register_type_and_schema()
    if emulator is None:
        return ()
    names = []
    for i, url in enumerate(emulator.base_urls, start=1):
        names.append(EMULATED_TURNSTILE.format(i))
        TurnstileDevice(base_url=url, login=emulator.config.login,
                        password=SecretStr(emulator.config.password)).save(names[-1], overwrite=True)
    return tuple(names)


DEPLOYED_STAMP = "deployed.sha256"  # under the Prefect server's folder: what its deployments were made from
# what a deployment is made of: prefect.yaml, and the code its flows' parameter schemas and entrypoints come from
DEPLOYMENT_SOURCES = ("prefect.yaml", "flows/*.py", "tasks/*.py", "blocks/*.py", "operations/**/*.py")


def deployment_digest(api_url: str, project_dir: Path = PROJECT_ROOT) -> str:
    """A digest of what `prefect deploy --all` would send to the server at `api_url`."""
    digest = hashlib.sha256(api_url.encode())
    for pattern in DEPLOYMENT_SOURCES:
        for path in sorted(project_dir.glob(pattern)):
            digest.update(path.relative_to(project_dir).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _deployment_names(project_dir: Path) -> Counter[str]:
    """The deployments' names in prefect.yaml, each counted once per flow that has one (on-demand is several)."""
    with open(project_dir / "prefect.yaml") as f:
        return Counter(entry["name"] for entry in yaml.safe_load(f)["deployments"])


def deploy_all(api_url: str, project_dir: Path = PROJECT_ROOT, stamp: Path | None = None) -> bool:
    """The work pool (created if missing), then `prefect deploy --all` from the project folder (prefect.yaml);
    idempotent; raises with prefect's output on failure. With `stamp` (a file recording what the server's
    deployments were made from), the deploy is skipped when nothing changed since and the server still has every
    deployment: a second `make up` takes seconds, not a redeploy. Returns whether it deployed."""
    from prefect.client.orchestration import get_client

    ensure_work_pool(LOCAL_WORK_POOL)
    digest = deployment_digest(api_url, project_dir)
    if stamp is not None and stamp.exists() and stamp.read_text() == digest:
        with get_client(sync_client=True) as client:
            on_server = Counter(d.name for d in client.read_deployments() if d.work_pool_name == LOCAL_WORK_POOL)
        if not _deployment_names(project_dir) - on_server:  # every deployment is still there
            apply_after_deploy()  # schedules as STACK_SCHEDULES says now
            return False
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
    apply_after_deploy()  # unknown parameters refused; schedules paused unless STACK_SCHEDULES=on
    if stamp is not None:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(digest)
    return True


def start_operator_stack(settings: Settings | None = None, worker_query_seconds: float = 5.0) -> LocalStack:
    """Everything an operator needs: the services, blocks, work pool, deployments, the drop folders, then the
    drop-folder watcher and the worker (the last services of the registry), whose environment carries the
    services' addresses to every flow run."""
    settings = settings or get_settings()
    stack = start_local_stack(settings)
    stack = replace(stack, redeployed=deploy_all(stack.api_url, stamp=settings.stack.prefect_dir / DEPLOYED_STAMP))
    apply_automations(settings, stack.api_url)  # notifications and zombie runs (deployments/automations.py)
    ensure_inboxes(settings)
    registry.up(registry.only(registry.stack_services(settings, worker_query_seconds), *AFTER_DEPLOY))
    return stack


def ensure_inboxes(settings: Settings) -> dict[str, Path]:
    """The drop folders (PRODUCTS_INBOX_DIR, TURNSTILES_INBOX_DIR) and their subfolders, created."""
    for folder in settings.inboxes.values():
        DropFolder(folder).ensure()
    return settings.inboxes


def inbox_status(settings: Settings) -> dict[str, str]:
    """A line per drop folder for `make status`: where it is and its files; creates nothing."""
    return {kind: f"{folder}: " + (describe_counts(DropFolder(folder).counts()) if folder.is_dir()
                                   else "not created yet (make up)")
            for kind, folder in settings.inboxes.items()}


def stop_local_stack(settings: Settings | None = None) -> list[str]:
    """Stop the services of the registry, in reverse order; configured outside ones are left alone."""
    return registry.down(registry.stack_services(settings or get_settings()))


def local_api_url(settings: Settings | None = None) -> str | None:
    """PREFECT_API_URL when set, else the API of the running local server (None if there is none); for the
    local server, this process's clients also get its auth string (PREFECT_API_AUTH_STRING)."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    settings = settings or get_settings()
    server = running_prefect_server(settings.stack.prefect_dir)
    if server is None:
        return None
    use_prefect_server(server.api_url, settings.stack.auth_string)
    return server.api_url


def stack_status(settings: Settings | None = None) -> dict[str, str]:
    """Each service's line of `make status`: running or not, pid, address, restarts, what it serves, its log."""
    return {state.name: state.line() for state in registry.status(registry.stack_services(settings or get_settings()))}


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
            print(f"{service + ':':23}{state}")
        for line in registry.supervisor_status(registry.stack_services(get_settings())):
            print(f"{'supervisor:':23}{line}")
        print(f"{'schedules:':23}{describe_schedules(local_api_url())}")
        for kind, line in inbox_status(get_settings()).items():
            print(f"{kind + ' inbox:':23}{line}")
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
    print(f"Products queue: {get_settings().products.queue_block} (ProductsQueue, a Redis stream)")
    print(f"Marketplace:   {stack.marketplace_api_url}{' (emulator)' if stack.marketplace_emulated else ''}, "
          f"app block {get_settings().marketplace.app_block}")
    if stack.emulated_turnstiles:
        print(f"Turnstiles:    emulated: {', '.join(stack.emulated_turnstiles)} (TurnstileDevice blocks)")
    print(f"Output files:  {stack.output_url}/ (OUTPUT_DIR {get_settings().stack.output_dir})")
    print(f"Worker:        pool {LOCAL_WORK_POOL}, log {get_settings().stack.prefect_worker_dir / 'worker.log'}")
    print(f"Notifications: {notifications_at(get_settings())}")
    print(f"Marketplace notifications: callback URL {callback_url(get_settings())} (docs/marketplace-notifications.md)")
    print("Deployments:" + ("" if stack.redeployed else " (unchanged since the last deploy: not deployed again)"))
    for d in sorted(deployments, key=lambda d: (flows.get(d.flow_id, ""), d.name)):
        print(f"  {flows.get(d.flow_id, '?')}/{d.name}: {stack.ui_url}/deployments/deployment/{d.id}")
    print(f"Schedules:     {describe_schedules(stack.api_url)}")
    print('Start a run:   make run DEPLOYMENT=generate-games/on-demand PARAMS="quantity=100000"')
    print("Sample files:  make samples (the files and the run command of each flow)")
    inboxes = get_settings().inboxes
    print(f"Drop folders:  products {inboxes['products']} (process-products/inbox), participants "
          f"{inboxes['participants']} (register-participants/inbox): a file dropped there starts its run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
