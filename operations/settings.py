"""The project's one settings class: environment variables and `.env`, documented in the README."""

from __future__ import annotations

from functools import lru_cache
from typing import Literal
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Where the services are and how big the work is cut. Unset services are started embedded."""

    # hide_input_in_errors: a malformed secret (STACK_AUTH_STRING, DATABASE_URL with a password) is never echoed
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True, hide_input_in_errors=True)

    redis_url: SecretStr | None = Field(
        default=None,
        description="Redis to use (redis://host:port/db). Unset: an embedded redis-server is started on 127.0.0.1.",
    )
    redis_password: SecretStr | None = Field(
        default=None, description="Password for REDIS_URL when it is not written in the URL."
    )
    dask_scheduler_address: str | None = Field(
        default=None,
        description="Existing Dask scheduler (tcp://host:8786). Unset: a LocalCluster is started per flow run.",
    )
    dask_n_workers: int = Field(default=2, ge=1, le=256, description="LocalCluster worker processes.")
    dask_threads_per_worker: int = Field(default=1, ge=1, le=64, description="Threads per LocalCluster worker.")
    dask_connect_timeout_seconds: float = Field(
        default=15.0, gt=0, le=600, description="How long to wait for DASK_SCHEDULER_ADDRESS before failing the run."
    )
    data_dir: Path = Field(
        default=PROJECT_ROOT / "data",
        description="Embedded Redis and Prefect server state (append-only file, SQLite database, pid files).",
    )
    output_dir: Path = Field(
        default=PROJECT_ROOT / "data" / "output",
        description="Where spreadsheets and counter snapshots are written; must be shared by all Dask workers.",
    )
    in_process_max_quantity: int = Field(
        default=20_000,
        ge=0,
        description="Runs asking for fewer games run in the flow's process, without starting a Dask cluster.",
    )
    min_games_per_chunk: int = Field(
        default=50_000,
        ge=1_000,
        description="Smallest chunk mapped to a Dask task; keeps Prefect's ~110 ms per task run a few percent.",
    )
    max_games_per_chunk: int = Field(default=250_000, ge=1_000, description="Largest chunk mapped to one task.")
    rows_per_sheet: int = Field(
        default=1_000_000, ge=10, le=1_048_575, description="Game rows per worksheet (Excel holds 1,048,576)."
    )
    max_rows_per_file: int = Field(
        default=1_000_000, ge=10, description="Game rows per spreadsheet file; files are written in parallel."
    )
    past_draws_file: Path | None = Field(
        default=None,
        description="Caixa's Mega-Sena results .xlsx used to exclude past draws. Unset: the bundled sample.",
    )
    counter_block_name: str = Field(
        default="games-counter", description="Name of the saved RedisGameCounter block flows load by default."
    )

    # -- project database ------------------------------------------------------------------------------
    database_url: SecretStr | None = Field(
        default=None,
        description="Any SQLAlchemy URL (postgresql+psycopg://user:pass@host/db, sqlite:///file for a single "
        "process). Unset: an embedded PostgreSQL is started under DATA_DIR/postgres.",
    )
    database_pool_size: int = Field(
        default=10, ge=1, le=100,
        description="Connections per process pool (each flow, worker and Dask worker process has its own pool); "
        "at least MARKETPLACE_CONCURRENCY, or account tasks wait for connections.",
    )
    database_max_overflow: int = Field(
        default=0, ge=0, le=100, description="Extra connections a process pool may open beyond its size when busy."
    )
    database_pool_timeout_seconds: float = Field(
        default=30.0, gt=0, le=3600, description="How long a checkout waits for a free pooled connection."
    )
    database_statement_timeout_seconds: float = Field(
        default=60.0, ge=0, le=86_400,
        description="Longest statement on PostgreSQL (statement_timeout; 0 disables it). Migrations are not limited.",
    )

    # -- marketplace sync -------------------------------------------------------------------------------
    marketplace_app_block: str = Field(
        default="marketplace-app", description="Name of the MarketplaceApp block the marketplace flows load."
    )
    marketplace_api_url: str | None = Field(
        default=None,
        description="Marketplace API base URL saved in the app block by `make up`. Unset: the local emulator.",
    )
    marketplace_client_id: str | None = Field(default=None, description="The marketplace app's client id.")
    marketplace_client_secret: SecretStr | None = Field(
        default=None, description="The marketplace app's client secret."
    )
    marketplace_redirect_uri: str | None = Field(default=None, description="The app's registered redirect URI.")
    marketplace_task_runner: Literal["threads", "dask"] = Field(
        default="threads",
        description="Where account tasks run: the flow's thread pool, or Dask (DASK_SCHEDULER_ADDRESS or a "
        "LocalCluster of DASK_N_WORKERS processes with threads enough for MARKETPLACE_CONCURRENCY).",
    )
    marketplace_concurrency: int = Field(default=10, ge=1, le=200, description="Accounts synced at once per run.")
    marketplace_account_timeout_seconds: float = Field(
        default=300.0, gt=0, le=86_400, description="Time one account's sync may take (the old system's 5 minutes)."
    )
    marketplace_lookback_hours: float = Field(
        default=2.0, ge=0, le=24 * 30,
        description="Each incremental sync re-reads orders updated this long before the checkpoint.",
    )
    marketplace_initial_history_days: float = Field(
        default=90.0, gt=0, le=3650, description="How far back the first sync of an account reads orders."
    )
    marketplace_max_window_days: float = Field(
        default=30.0, gt=0, le=3650,
        description="Longest date window of one order search; the checkpoint advances after each window.",
    )
    marketplace_lock_wait_seconds: float = Field(
        default=30.0, ge=0, le=3600,
        description="How long a run waits for an account another run is syncing before skipping it.",
    )
    marketplace_task_retries: int = Field(
        default=2, ge=0, le=10, description="Task retries of an account after transient faults (429/5xx/network)."
    )
    marketplace_retry_delay_seconds: float = Field(
        default=10.0, ge=0, le=3600, description="Delay before an account task's retry (with jitter)."
    )

    # -- product files ----------------------------------------------------------------------------------
    products_queue_block: str = Field(
        default="products-queue", description="Name of the ProductsQueue block (Redis stream) process-products loads."
    )
    products_in_process_max_rows: int = Field(
        default=20_000, ge=0,
        description="Files of fewer rows are loaded by the flow's thread pool; larger ones on Dask process workers.",
    )
    products_min_chunk_rows: int = Field(
        default=2_000, ge=100, le=1_000_000,
        description="Smallest chunk of rows mapped to one task (keeps Prefect's per-task cost a few percent).",
    )
    products_max_chunk_rows: int = Field(
        default=20_000, ge=100, le=1_000_000,
        description="Largest chunk of rows mapped to one task (bounds the memory of a task and of a retry).",
    )
    products_task_retries: int = Field(
        default=3, ge=0, le=10, description="Retries of a chunk after a transient database fault (nothing committed)."
    )

    # -- turnstile registration -------------------------------------------------------------------------
    participants_file: Path | None = Field(
        default=None,
        description="Participants file the scheduled register-participants run reads when given no file.",
    )
    turnstile_emulator_devices: int = Field(
        default=3, ge=0, le=64,
        description="Emulated turnstiles `make up` starts and saves as TurnstileDevice blocks (emulated-turnstile-N); "
        "0 on a site with real devices.",
    )
    turnstile_cache_block: str = Field(
        default="turnstile-cache", description="Name of the TurnstileCache block (Redis) register-participants loads."
    )
    turnstiles_task_runner: Literal["threads", "dask"] = Field(
        default="threads",
        description="Where turnstile tasks run: the flow's thread pool, or Dask (DASK_SCHEDULER_ADDRESS or a "
        "LocalCluster with threads enough for TURNSTILES_CONCURRENCY).",
    )
    turnstiles_concurrency: int = Field(default=10, ge=1, le=200, description="Turnstiles worked on at once per run.")
    turnstile_task_retries: int = Field(
        default=2, ge=0, le=10,
        description="Task retries of a turnstile that stayed unreachable past its request retries.",
    )
    turnstiles_timezone: str = Field(
        default="America/Sao_Paulo",
        description="Time zone of validity dates written without one in participants files.",
    )

    # -- the local stack (issue 10) -----------------------------------------------------------------------
    stack_host: str = Field(
        default="127.0.0.1",
        description="Address the local Prefect server and file server listen on. Anything but a loopback address "
        "needs STACK_AUTH_STRING: the stack refuses to start open to the network.",
    )
    stack_auth_string: SecretStr | None = Field(
        default=None,
        description="'user:password' of HTTP basic auth for the local Prefect server "
        "(PREFECT_SERVER_API_AUTH_STRING; clients get PREFECT_API_AUTH_STRING) and the file server.",
    )
    stack_prefect_database: Literal["postgresql", "sqlite"] = Field(
        default="postgresql",
        description="Database of the local Prefect server: its own database 'prefect' on the project's embedded "
        "PostgreSQL, or SQLite under DATA_DIR/prefect (fails under concurrent REST load).",
    )
    file_server_port: int = Field(
        default=4280, ge=1, le=65_535,
        description="Port of the local file server serving OUTPUT_DIR (another free port if it is taken).",
    )
    output_base_url: str | None = Field(
        default=None,
        description="URL under which OUTPUT_DIR is served; links in artifacts are this + the file's path under "
        "OUTPUT_DIR. Unset: the local file server's URL. Several machines: the server of the shared storage.",
    )
    stack_schedules: bool = Field(
        default=False,
        description="Keep the schedules of prefect.yaml's deployments active after `make up` deploys them (on, "
        "as production does). Off: `make up` pauses every schedule, so a laptop runs only what is started by hand.",
    )
    games_concurrency_limit: int = Field(
        default=1, ge=1, le=64,
        description="Generation runs at once on this stack, whatever deployment started them (the Prefect global "
        "concurrency limit 'generate-games' `make up` creates); raise it on a machine with cores to spare.",
    )
    run_retention_days: float = Field(
        default=30.0, gt=0, le=3650,
        description="Completed generation runs older than this lose their folder and Redis keys to the scheduled "
        "cleanup-runs flow.",
    )
    keep_chunk_files: bool = Field(
        default=False,
        description="Keep a completed generation run's chunk files beside its spreadsheets (removed by default).",
    )
    redis_start_timeout_seconds: float = Field(
        default=300.0, gt=0, le=3600,
        description="Longest wait for the embedded Redis to load its append-only file and answer.",
    )

    @field_validator("stack_auth_string")
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


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings of this process (read once)."""
    return Settings()
