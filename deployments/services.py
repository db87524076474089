"""The registry of the local stack's services: the one ordered list `make up`, `make down` and `make status` (and
the demo, the benchmarks and the test session) loop over.

Order: the embedded PostgreSQL (the Prefect server's database is on it), the embedded Redis, the Prefect server,
the file server of OUTPUT_DIR, the marketplace and turnstile emulators, the notification receiver, the
marketplace receiver (the app's callback URL for the marketplace's notifications), the drop-folder watcher, the
worker. `up` starts them in this order, `down` stops them in reverse; `make up` starts the last two (AFTER_DEPLOY)
once the deployments and their triggers exist. Each runs as a program of one supervisord per DATA_DIR
(operations/infra/supervision.py), which starts it again within seconds when it dies; its event listener here
(deployments/service_events.py) counts the restarts (`make status`) and emits `project.service.restarted`. The last
service stopped shuts the supervisor down. A service configured by environment is not started (`replaced_by` says
which setting): REDIS_URL, PREFECT_API_URL, OUTPUT_BASE_URL, MARKETPLACE_API_URL, TURNSTILE_EMULATOR_DEVICES=0,
NOTIFY_BLOCK; DATABASE_URL replaces the embedded PostgreSQL unless the local Prefect server keeps its own database
on it.

What started services export (DATABASE_URL, REDIS_URL, PREFECT_API_URL, OUTPUT_BASE_URL) goes into this
process's environment, so the worker the stack starts, its flow runs and their Dask workers all inherit the
addresses: flow code never looks for, let alone starts, a service of its own.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from typing import Any

from deployments.marketplace_receiver import MarketplaceReceiverService
from deployments.inbox_watcher import InboxWatcherService
from deployments.notification_receiver import NotificationReceiverService
from deployments.prefect_server import DATABASE_URL_VARIABLES, local_prefect_server
from deployments.prefect_worker import LOCAL_WORK_POOL, PrefectWorkerService
from emulators import marketplace as marketplace_emulator
from emulators import controlid as turnstile_emulator
from operations.infra.embedded_postgres import PostgresService
from operations.infra.embedded_redis import RedisService
from operations.infra.file_server import FileServerService
from operations.infra.services import Service, ServiceStatus
from operations.infra.supervision import Supervisor
from operations.settings import PROJECT_ROOT, Settings, get_settings

# The emulated marketplace of the local stack and the demo: a few sellers, a little latency.
DEMO_MARKETPLACE = marketplace_emulator.EmulatorConfig(
    sellers=5, orders_per_seller=300, items_per_seller=80, latency_ms=10
)
# Started by `make up` only once prefect.yaml is deployed: the watcher's events need the deployments' triggers,
# the worker their runs.
AFTER_DEPLOY = ("inbox watcher", "prefect worker")


@dataclass(frozen=True)
class Registered:
    """A service of the stack, and whether the stack runs it here."""

    service: Service
    replaced_by: str | None = None  # why the stack does not start it: the setting that names an outside one
    exports: bool = True  # whether its addresses go to the processes the stack starts

    @property
    def name(self) -> str:
        return self.service.name


def _postgres_replaced_by(settings: Settings) -> str | None:
    """DATABASE_URL, unless the local Prefect server keeps its database on the embedded PostgreSQL anyway."""
    if not settings.database.url:
        return None
    server_elsewhere = (
        os.environ.get("PREFECT_API_URL")
        or settings.stack.prefect_database == "sqlite"
        or any(os.environ.get(variable) for variable in DATABASE_URL_VARIABLES)
    )
    return "DATABASE_URL is set" if server_elsewhere else None


def marketplace_app_id(settings: Settings) -> str:
    """The marketplace application whose notifications the receiver keeps: MARKETPLACE_CLIENT_ID (the app's id)
    with MARKETPLACE_API_URL, else the local emulator's."""
    if settings.marketplace.api_url:
        return settings.marketplace.client_id or ""
    return DEMO_MARKETPLACE.client_id


def stack_services(settings: Settings | None = None, worker_query_seconds: float = 5.0) -> list[Registered]:
    """The stack's services in start order (module docstring)."""
    settings = settings or get_settings()
    devices = settings.turnstiles.emulator_devices
    services = [
        Registered(PostgresService(settings.stack.postgres_dir), _postgres_replaced_by(settings),
                   exports=not settings.database.url),
        Registered(RedisService(settings.stack.redis_dir, settings.redis.start_timeout_seconds),
                   "REDIS_URL is set" if settings.redis.url else None),
        Registered(local_prefect_server(settings),
                   "PREFECT_API_URL is set" if os.environ.get("PREFECT_API_URL") else None),
        Registered(FileServerService(settings), "OUTPUT_BASE_URL is set" if settings.stack.output_base_url else None),
        Registered(marketplace_emulator.MarketplaceEmulatorService(settings.stack.marketplace_emulator_dir, DEMO_MARKETPLACE),
                   "MARKETPLACE_API_URL is set" if settings.marketplace.api_url else None),
        Registered(
            turnstile_emulator.TurnstileEmulatorService(
                settings.stack.turnstile_emulator_dir,
                turnstile_emulator.EmulatorConfig(devices=max(devices, 1), latency_ms=5),
            ),
            None if devices else "TURNSTILE_EMULATOR_DEVICES=0",
        ),
        Registered(NotificationReceiverService(settings.stack.data_dir / "notifications",
                                               settings.alerts.receiver_port),
                   "NOTIFY_BLOCK is set" if settings.alerts.notify_block else None),
        Registered(MarketplaceReceiverService(
            settings.stack.data_dir / "marketplace-receiver", marketplace_app_id(settings), settings.stack.host,
            settings.marketplace_notifications.receiver_port,
            settings.stack.auth_string.get_secret_value() if settings.stack.auth_string else None,
            settings.marketplace_notifications.event_seconds,
        ), None if marketplace_app_id(settings) else "MARKETPLACE_API_URL is set without MARKETPLACE_CLIENT_ID"),
        Registered(InboxWatcherService(settings.stack.data_dir / "inbox-watcher", settings.inboxes)),
        Registered(PrefectWorkerService(settings.stack.prefect_worker_dir, project_dir=PROJECT_ROOT, pool=LOCAL_WORK_POOL,
                                        query_seconds=worker_query_seconds,
                                        heartbeat_seconds=settings.alerts.heartbeat_seconds)),
    ]
    for entry in services:  # one supervisor for the whole stack, in DATA_DIR
        entry.service.supervise_in(settings.stack.data_dir)
    return services


def listener_command(supervisor: Supervisor) -> list[str]:
    """The stack's event listener of a supervisor: restart counts and `project.service.restarted` events."""
    return [sys.executable, "-m", "deployments.service_events", str(supervisor.home)]


def supervisors(services: list[Registered]) -> list[Supervisor]:
    """The supervisors the services run under (one for the stack), each once."""
    found: dict = {}
    for entry in services:
        found.setdefault(entry.service.supervisor.home, entry.service.supervisor)
    return list(found.values())


def only(services: list[Registered], *names: str) -> list[Registered]:
    """The registered services of these names, in registry order; the others left out (not started, not stopped)."""
    unknown = set(names) - {entry.name for entry in services}
    if unknown:
        raise ValueError(f"no service named {sorted(unknown)} in the registry")
    return [entry for entry in services if entry.name in names]


def without(services: list[Registered], *names: str) -> list[Registered]:
    """The registered services but these."""
    return [entry for entry in services if entry.name not in names]


def up(services: list[Registered]) -> dict[str, Any]:
    """Start (or reuse) each service not replaced by a setting, in order, and put what it exports into this
    process's environment (so later services and every process started from here find it). Returns the
    running handles by service name."""
    running: dict[str, Any] = {}
    started = [entry for entry in services if not entry.replaced_by]
    for supervisor in supervisors(started):  # started here (unless it runs) with the stack's event listener,
        # which reads the settings (.env) from the project folder, for the supervisor's DATA_DIR
        supervisor.ensure(listener_command(supervisor), {**os.environ, "DATA_DIR": str(supervisor.home)},
                          PROJECT_ROOT)
    for entry in started:
        handle = entry.service.ensure()
        running[entry.name] = handle
        if entry.exports:
            os.environ.update(entry.service.exports(handle))
    get_settings.cache_clear()  # this process's settings now see the exported addresses
    return running


def down(services: list[Registered]) -> list[str]:
    """Stop the services in reverse order (also those replaced by a setting now, if one still runs from
    before), then their supervisor once it has no program left. Returns the names of those that were running."""
    stopped = [entry.name for entry in reversed(services) if entry.service.stop()]
    for supervisor in supervisors(services):
        if not supervisor.programs():
            supervisor.shutdown()
    return stopped


def supervisor_status(services: list[Registered]) -> list[str]:
    """A line per supervisor of these services for `make status`: running or not, pid, config, log."""
    lines = []
    for supervisor in supervisors(services):
        pid = supervisor.pid() if supervisor.running() else None
        state = f"running, pid {pid}, config {supervisor.conf}" if pid else "not running"
        lines.append(f"{state}; log {supervisor.log}")
    return lines


def status(services: list[Registered]) -> list[ServiceStatus]:
    """Each service's state, without starting anything."""
    found = []
    for entry in services:
        state = entry.service.status()
        if entry.replaced_by and not state.running:
            state = replace(state, note=f"not used: {entry.replaced_by}")
        found.append(state)
    return found
