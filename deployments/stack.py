"""The local stack: a real Prefect server (SQLite under DATA_DIR), the embedded Redis, the blocks.

    python -m deployments.stack up      # start (or reuse) everything, print the UI address
    python -m deployments.stack down    # stop what `up` started
    python -m deployments.stack status

Services configured by environment (PREFECT_API_URL, REDIS_URL) are used as they are and never started.
Prefect is imported only after PREFECT_API_URL is set, so this process and the Dask workers it spawns all
talk to the same server.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from deployments.prefect_server import ensure_prefect_server, stop_prefect_server
from operations.infra.embedded_redis import ensure_embedded_redis, stop_embedded_redis
from operations.settings import Settings, get_settings


@dataclass(frozen=True)
class LocalStack:
    api_url: str
    ui_url: str
    redis_url: str
    counter_block: str


def start_local_stack(settings: Settings | None = None) -> LocalStack:
    """Start or reuse the Prefect server and Redis, point this process at them, register and save blocks."""
    settings = settings or get_settings()
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    api_url = os.environ.get("PREFECT_API_URL")
    if api_url:
        ui_url = api_url.removesuffix("/api")
    else:
        server = ensure_prefect_server(settings.prefect_dir)
        api_url, ui_url = server.api_url, server.ui_url
        os.environ["PREFECT_API_URL"] = api_url
    if settings.redis_url:
        redis_url = settings.redis_url.get_secret_value()
    else:
        redis_url = ensure_embedded_redis(settings.redis_dir).url
    register_blocks(settings, redis_url)
    return LocalStack(api_url=api_url, ui_url=ui_url, redis_url=redis_url, counter_block=settings.counter_block_name)


def register_blocks(settings: Settings, redis_url: str) -> None:
    """Register the project's block types and save the default counter block (idempotent)."""
    from blocks.redis_game_counter import RedisGameCounter  # imports Prefect: only once the API URL is set

    RedisGameCounter.register_type_and_schema()
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    RedisGameCounter.from_url(redis_url, password).save(settings.counter_block_name, overwrite=True)


def stop_local_stack(settings: Settings | None = None) -> list[str]:
    """Stop the embedded services this project started; configured external ones are left alone."""
    settings = settings or get_settings()
    stopped = []
    if stop_prefect_server(settings.prefect_dir):
        stopped.append("prefect server")
    if stop_embedded_redis(settings.redis_dir):
        stopped.append("embedded redis")
    return stopped


def _redact(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return url.replace(parts.password, "***") if parts.password else url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "status"])
    args = parser.parse_args(argv)
    if args.command == "down":
        stopped = stop_local_stack()
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        return 0
    stack = start_local_stack()
    print(f"Prefect UI:   {stack.ui_url}")
    print(f"Prefect API:  {stack.api_url}")
    print(f"Redis:        {_redact(stack.redis_url)}")
    print(f"Counter block: {stack.counter_block} (RedisGameCounter)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
