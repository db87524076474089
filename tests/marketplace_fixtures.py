"""Fixtures of the marketplace tests: a real emulator over HTTP, the session's PostgreSQL (or a fresh SQLite
file), clients with short backoffs, and onboarded accounts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import pytest
from pydantic import SecretStr
from sqlalchemy import Engine

from emulators.marketplace import EmulatorConfig, EmulatorControl, run_in_thread
from operations.infra.database import get_engine
from operations.infra.http import RetryPolicy, shared_http_client
from operations.marketplace.client import AppCredentials, MarketplaceClient, RequestStats
from operations.marketplace.onboarding import onboard_from_code
from operations.marketplace.store import AccountView, clear_marketplace_data
from operations.marketplace.sync import SyncOptions

FAST_RETRY = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05)
OPTIONS = SyncOptions(lookback=timedelta(hours=2), initial_history=timedelta(days=90), lock_wait_seconds=5)


@dataclass
class Marketplace:
    """An emulator, its control API and a database to sync into."""

    base_url: str
    control: EmulatorControl
    config: EmulatorConfig
    engine: Engine

    def client(self, retry: RetryPolicy = FAST_RETRY, **kwargs) -> MarketplaceClient:
        credentials = AppCredentials(self.config.client_id, SecretStr(self.config.client_secret), self.config.redirect_uri)
        return MarketplaceClient(shared_http_client(self.base_url), credentials, retry, RequestStats(), **kwargs)

    def onboard(self, seller_id: int) -> AccountView:
        nickname = next(s["nickname"] for s in self.control.sellers() if s["seller_id"] == seller_id)
        return onboard_from_code(self.engine, self.client(), self.control.authorize(seller_id), nickname)

    def seller_ids(self) -> list[int]:
        return [s["seller_id"] for s in self.control.sellers()]


@pytest.fixture(params=["postgresql", "sqlite"])
def any_database(request, database_url, tmp_path) -> Engine:
    """The session's PostgreSQL (emptied of marketplace rows) and a fresh, migrated SQLite file."""
    if request.param == "postgresql":
        engine = get_engine(database_url)
    else:
        engine = get_engine(request.getfixturevalue("sqlite_database_url"))
    clear_marketplace_data(engine, accounts=True)
    return engine


@pytest.fixture
def pg_engine(database_url) -> Engine:
    engine = get_engine(database_url)
    clear_marketplace_data(engine, accounts=True)
    return engine


@pytest.fixture
def emulator_factory():
    """Start emulators with the given config (stopped at the end of the test)."""
    running = []

    def start(engine: Engine, **config) -> Marketplace:
        cfg = EmulatorConfig(**{"sellers": 3, "orders_per_seller": 120, "items_per_seller": 40, **config})
        emulator = run_in_thread(cfg)
        running.append(emulator)
        return Marketplace(emulator.base_url, EmulatorControl(emulator.base_url), cfg, engine)

    yield start
    for emulator in running:
        emulator.stop()
