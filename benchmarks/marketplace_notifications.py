"""Marketplace notification figures for `make bench` (called by benchmarks/marketplace.py on its accounts, once
its syncs have filled the database):

- a scheduled sync with nothing changed, with MARKETPLACE_NOTIFICATIONS on (no item scan) against the same sync
  with it off (the baseline, measured in the same run): requests per account and wall time (target <= 3 requests
  per account, < 5 s for 200 accounts);
- a burst of CHANGES order and item changes per account made in the emulator (its own process), which notifies
  the receiver's app (served from this process, storing into the bench's database); the consumer flow
  `marketplace-notifications` runs meanwhile: seconds from the last notification delivered until every change is
  in the database (target <= 10 s), and the consumer's requests per account.
"""

from __future__ import annotations

import os
import threading
import time

CHANGES = 20  # per account: half orders, half items


def measure_notifications(base_url: str, control, engine) -> dict:
    from operations import settings as settings_module

    # On the default runner (threads), whatever runner an earlier line measured (benchmarks/marketplace.py leaves
    # MARKETPLACE_TASK_RUNNER=dask behind: every figure here then paid a LocalCluster's start and Dask's cost per
    # task, which is what made the scheduled sync 5x slower and the burst late in `make bench`).
    os.environ.pop("MARKETPLACE_TASK_RUNNER", None)
    figures = {}
    for notifications in (False, True):
        os.environ["MARKETPLACE_NOTIFICATIONS"] = "true" if notifications else "false"
        settings_module.get_settings.cache_clear()
        from flows.sync_marketplace import sync_marketplace

        control.reset_stats()
        started = time.perf_counter()
        state = sync_marketplace(return_state=True)
        wall = time.perf_counter() - started
        if not state.is_completed():
            raise SystemExit(f"sync-marketplace failed: {state.message}")
        figures["unchanged_on" if notifications else "unchanged_off"] = {"wall": wall,
                                                                         "requests": control.stats()["total"]}
    figures["burst"] = _burst(control, engine)
    return figures


def _burst(control, engine) -> dict:
    import uvicorn
    from sqlalchemy import delete, func, select

    from deployments.marketplace_receiver import build_app, store_rows
    from emulators.common import bind
    from flows.marketplace_notifications import marketplace_notifications
    from operations.marketplace.notifications import CALLBACK_PATH, NOTIFICATIONS
    from operations.marketplace.client import parse_time
    from operations.marketplace.store import ITEMS, ORDERS, utc

    with engine.begin() as conn:
        conn.execute(delete(NOTIFICATIONS))
    app_id = control.config()["client_id"]
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(build_app(store_rows(engine), app_id), log_level="warning",
                                           lifespan="off", backlog=2048))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    control.configure(notification_url=f"http://127.0.0.1:{sock.getsockname()[1]}{CALLBACK_PATH}")
    consumer: dict = {}
    thread = threading.Thread(target=lambda: consumer.update(state=marketplace_notifications(
        idle_seconds=8, return_state=True)), daemon=True)
    thread.start()
    time.sleep(3)  # the consumer's flow run is up and waiting
    control.reset_stats()
    changed = control.mutate(orders_updated=CHANGES // 2, items_updated=CHANGES - CHANGES // 2)
    expected = len(changed["orders_updated"]) + len(changed["items_updated"])
    while control.notifications()["pending"]:
        time.sleep(0.1)
    last = control.notifications()["last_delivered_at"]
    orders, items = changed["orders_updated"], changed["items_updated"]
    done = None
    while time.time() - last < 60:
        with engine.connect() as conn:
            pending = conn.execute(select(func.count()).select_from(NOTIFICATIONS)
                                   .where(NOTIFICATIONS.c.processed_at.is_(None))).scalar()
            stored = conn.execute(select(func.count()).select_from(NOTIFICATIONS)).scalar()
        if stored >= expected and not pending:
            done = time.time()
            break
        time.sleep(0.1)
    requests = control.stats()["total"]
    truth = {o["id"]: parse_time(o["date_last_updated"]) for o in control.orders()}
    prices = {i["id"]: i["price"] for i in control.items()}
    with engine.connect() as conn:  # every change is there, as the emulator has it
        stored = {r.id: r.date_last_updated
                  for r in conn.execute(select(ORDERS.c.id, ORDERS.c.date_last_updated).where(ORDERS.c.id.in_(orders)))}
        stored_prices = {r.id: r.price for r in conn.execute(select(ITEMS.c.id, ITEMS.c.price)
                                                              .where(ITEMS.c.id.in_(items)))}
    stale = (sum(utc(stored.get(i)) != truth[i] for i in orders)
             + sum(float(stored_prices.get(i, -1)) != prices[i] for i in items))
    thread.join(60)
    server.should_exit = True
    control.configure(notification_url=None)
    return {"notifications": expected, "accounts": len(control.sellers()), "after_last": (done or time.time()) - last,
            "complete": done is not None and not stale, "stale": stale, "requests": requests}


def print_notifications(figures: dict, accounts: int) -> None:
    off, on, burst = figures["unchanged_off"], figures["unchanged_on"], figures["burst"]
    print(f"  scheduled sync, nothing changed, MARKETPLACE_NOTIFICATIONS on: {on['wall']:.1f} s, "
          f"{on['requests'] / accounts:.1f} requests per account (target <= 3 and < 5 s); baseline, off (every item "
          f"read): {off['wall']:.1f} s, {off['requests'] / accounts:.1f} requests per account")
    print(f"  burst of {burst['notifications']:,} notifications ({burst['accounts']} accounts x {CHANGES} changes): "
          f"all in the database {burst['after_last']:.1f} s after the last one was delivered (target <= 10 s), "
          f"{'complete' if burst['complete'] else 'INCOMPLETE'} ({burst['stale']:,} changes not in the database), "
          f"{burst['requests'] / burst['accounts']:.1f} "
          "consumer requests per account")


def bench_database(concurrency: int):
    """The stack's services (the Prefect server) and an empty database of the benchmark's own (as
    benchmarks/marketplace.py makes it): its engine."""
    from deployments.stack import start_local_stack
    from operations.infra.database import get_engine, migrate_to_head
    from operations.infra.embedded_postgres import ensure_database, running_embedded_postgres
    from operations.marketplace.store import clear_marketplace_data
    from operations.settings import get_settings

    settings = get_settings()
    start_local_stack(settings)
    if settings.database.url:
        url = settings.database.url.get_secret_value()
    else:
        url = ensure_database(running_embedded_postgres(settings.stack.postgres_dir), "marketplace_bench")
    migrate_to_head(url)
    os.environ["DATABASE_URL"] = url
    os.environ["MARKETPLACE_CONCURRENCY"] = str(concurrency)
    get_settings.cache_clear()  # the flows run here read this database
    engine = get_engine(url)
    clear_marketplace_data(engine, accounts=True)
    return engine


def main(argv: list[str] | None = None) -> int:
    """Only these figures (`make bench` measures them after its syncs): a stack of DATA_DIR, the emulator in its
    own process, every account onboarded and synced once, then `measure_notifications`."""
    import argparse
    import tempfile
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m benchmarks.marketplace_notifications", description=__doc__)
    parser.add_argument("--accounts", type=int, default=200)
    parser.add_argument("--orders", type=int, default=500)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--latency-ms", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=10)
    args = parser.parse_args(argv)
    engine = bench_database(args.concurrency)  # PREFECT_API_URL set before Prefect is imported (below)
    from pydantic import SecretStr

    from blocks.marketplace_app import MarketplaceApp
    from emulators.marketplace import EmulatorConfig, EmulatorControl, start_emulator_process, stop_emulator_process
    from operations.marketplace.onboarding import onboard_from_code
    from operations.marketplace.store import list_accounts
    from operations.marketplace.sync import SyncOptions, SyncResources, sync_account

    state_dir = Path(tempfile.mkdtemp(prefix="marketplace-bench-"))
    config = EmulatorConfig(sellers=args.accounts, orders_per_seller=args.orders, items_per_seller=args.items,
                            latency_ms=args.latency_ms, seed=11)
    emulator = start_emulator_process(config, state_dir, start_timeout=180)  # 200 sellers' data take a while
    try:
        control = EmulatorControl(emulator.base_url)
        app = MarketplaceApp(api_base_url=emulator.base_url, client_id=config.client_id,
                             client_secret=SecretStr(config.client_secret), redirect_uri=config.redirect_uri,
                             max_connections=max(20, args.concurrency * 2))
        app.save("marketplace-bench", overwrite=True)
        os.environ["MARKETPLACE_APP_BLOCK"] = "marketplace-bench"
        with ThreadPoolExecutor(args.concurrency) as pool:
            sellers = [(s["seller_id"], s["nickname"]) for s in control.sellers()]
            list(pool.map(lambda s: onboard_from_code(engine, app.client(), control.authorize(s[0]), s[1]), sellers))
            list(pool.map(lambda a: sync_account(engine, app.client(), a, SyncResources.both, SyncOptions()),
                          list_accounts(engine)))
        print_notifications(measure_notifications(emulator.base_url, control, engine), args.accounts)
    finally:
        stop_emulator_process(state_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
