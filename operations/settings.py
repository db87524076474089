"""The project's one settings class: environment variables and `.env`, documented in the README."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Where the services are and how big the work is cut. Unset services are started embedded."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

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

    @property
    def redis_dir(self) -> Path:
        return self.data_dir / "redis"

    @property
    def prefect_dir(self) -> Path:
        return self.data_dir / "prefect"

    @property
    def prefect_worker_dir(self) -> Path:
        return self.prefect_dir / "worker"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings of this process (read once)."""
    return Settings()
