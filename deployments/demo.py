"""`make demo`: start the local stack on embedded defaults and run every flow end to end: generate-games, then
the marketplace sync (emulated sellers onboarded through onboard-account, then sync-marketplace, then a few changes
applied from the marketplace's notifications), then a generated products file with some bad rows through
process-products (dealers loaded from a file first), then a generated participants file registered on the emulated
turnstiles through register-participants, then a dry run of cleanup-runs (what the daily retention would remove).

    python -m deployments.demo [--quantity 200000] [--run-key demo-...]

Prints the links of the spreadsheets (served by the local file server), where the counter snapshot is and the runs
in the UI; exits 0 on success.
The stack is left running so the run can be looked at in the UI (`make down` stops it).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from deployments.stack import start_local_stack
from operations.infra.links import output_link


def _result(flow_name: str, state) -> dict | None:
    """The finished run's result, or None after saying how it ended."""
    if state.is_completed():
        return state.result()
    print(f"{flow_name} ended {state.type.value}: {state.message}", file=sys.stderr)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quantity", type=int, default=200_000, help="games to generate (default 200,000)")
    parser.add_argument("--run-key", default=None, help="run key (default demo-<timestamp>)")
    parser.add_argument("--sellers", type=int, default=3, help="emulated seller accounts to onboard (default 3)")
    parser.add_argument("--skip-marketplace", action="store_true", help="no marketplace sync")
    parser.add_argument("--products-rows", type=int, default=30_000, help="rows of the demo products file (30,000)")
    parser.add_argument("--participants", type=int, default=500, help="participants to register (500)")
    args = parser.parse_args(argv)

    stack = start_local_stack()
    from flows.generate_games import generate_games  # imports Prefect: only once the API URL is set

    run_key = args.run_key or time.strftime("demo-%Y%m%d-%H%M%S")
    print(f"Prefect UI {stack.ui_url}; generating {args.quantity:,} games as run {run_key} ...", flush=True)
    state = generate_games(quantity=args.quantity, run_key=run_key, return_state=True)
    result = _result("generate-games", state)
    if result is None:
        return 1
    print(f"\n{result['games']:,} games in {result['seconds']:.1f} s")
    for path in result["spreadsheets"]:
        print(f"  spreadsheet: {output_link(Path(path))}")
    print(f"  counter snapshot: {result['counter_snapshot']}")
    print(f"  flow run: {stack.ui_url}/runs/flow-run/{state.state_details.flow_run_id}")
    if not args.skip_marketplace and demo_marketplace(stack, args.sellers) != 0:
        return 1
    if args.products_rows and demo_products(stack, args.products_rows, run_key) != 0:
        return 1
    if args.products_rows and demo_outbox(stack) != 0:
        return 1
    if args.participants and demo_turnstiles(stack, args.participants) != 0:
        return 1
    if demo_cleanup(stack) != 0:
        return 1
    print("The local stack is still running for the UI; `make down` stops it.")
    return 0


def demo_marketplace(stack, sellers: int) -> int:
    """Onboard the emulated sellers not onboarded yet (through the onboard-account flow, as an operator would
    from the UI form), then sync every active account."""
    from emulators.marketplace import EmulatorControl
    from flows.onboard_account import onboard_account
    from flows.sync_marketplace import sync_marketplace
    from operations.infra.database import get_engine
    from operations.marketplace.store import list_accounts

    if not stack.marketplace_emulated:
        print("\nmarketplace: MARKETPLACE_API_URL is set, so the demo does not onboard emulated sellers")
    else:
        control = EmulatorControl(stack.marketplace_api_url)
        known = {a.seller_id for a in list_accounts(get_engine(stack.database_url))}
        for seller in control.sellers()[:sellers]:
            if seller["seller_id"] in known:
                continue
            state = onboard_account(
                authorization_code=control.authorize(seller["seller_id"]), nickname=seller["nickname"],
                return_state=True,
            )
            if _result("onboard-account", state) is None:
                return 1
        control.mutate(orders_updated=20, orders_new=10, items_updated=5)  # the next sync has news to fetch
    print(f"\nsyncing the marketplace accounts from {stack.marketplace_api_url} ...", flush=True)
    state = sync_marketplace(return_state=True)
    result = _result("sync-marketplace", state)
    if result is None:
        return 1
    print(
        f"{result['accounts']} account(s) in {result['seconds']:.1f} s: orders {result['orders_new']:,} new / "
        f"{result['orders_updated']:,} updated, items {result['items_new']:,} new / {result['items_updated']:,} "
        f"updated, {result['requests']:,} API requests"
    )
    print(f"  flow run: {stack.ui_url}/runs/flow-run/{state.state_details.flow_run_id}")
    print("  accounts: .venv/bin/python -m deployments.marketplace_accounts list")
    return demo_notifications(stack) if stack.marketplace_emulated else 0


def demo_notifications(stack) -> int:
    """Change a few orders and items in the emulator, which notifies the stack's marketplace receiver; then apply
    the notifications (here in the demo's process; on the stack, the receiver's event starts the same flow)."""
    import time

    from emulators.marketplace import EmulatorControl
    from flows.marketplace_notifications import marketplace_notifications

    control = EmulatorControl(stack.marketplace_api_url)
    control.mutate(orders_updated=5, items_updated=5)
    deadline = time.monotonic() + 30
    while control.notifications()["pending"] and time.monotonic() < deadline:
        time.sleep(0.2)
    print(f"\napplying the marketplace's notifications ({control.notifications()['delivered']:,} delivered) ...",
          flush=True)
    result = _result("marketplace-notifications", marketplace_notifications(idle_seconds=0, return_state=True))
    if result is None:
        return 1
    print(f"{result['notifications']:,} notification(s) of {result['accounts']} account(s): orders "
          f"{result['orders']['updated']:,} updated, items {result['items']['updated']:,} updated, "
          f"{result['requests']:,} API requests; unknown sellers {len(result['unknown_sellers'])}")
    return 0


def demo_products(stack, rows: int, run_key: str) -> int:
    """Load the demo dealers from a file (as `python -m deployments.dealers load` does), generate a products
    .xlsx with 10% bad rows and process it; the second demo run finds nothing changed."""
    from flows.process_products import process_products
    from operations.infra.database import get_engine
    from operations.products.dealers import read_dealers_file
    from operations.products.sample import generate_products_file, write_dealers_file
    from operations.products.store import upsert_dealers
    from operations.settings import get_settings

    folder = get_settings().stack.data_dir / "demo-products"
    folder.mkdir(parents=True, exist_ok=True)
    dealers_file, products_file = folder / "dealers.csv", folder / "products.xlsx"
    codes = write_dealers_file(dealers_file, 20)
    inserted, renamed = upsert_dealers(get_engine(stack.database_url), read_dealers_file(dealers_file))
    if not products_file.exists():
        generate_products_file(products_file, rows, codes, bad_fraction=0.1, seed=2026)
    print(f"\n{len(codes)} dealers from {dealers_file} ({inserted} new); processing {products_file} ...", flush=True)
    state = asyncio.run(process_products(  # an async flow: its run ends without a heartbeat's wait
        file_path=str(products_file), run_key=f"{run_key}-products", return_state=True))
    result = _result("process-products", state)
    if result is None:
        return 1
    print(
        f"{result['rows']:,} rows processed - Successes: {result['successes']:,}, Failures: {result['failures']:,} "
        f"in {result['seconds']:.1f} s ({result['created']:,} created, {result['updated']:,} updated, "
        f"{result['unchanged']:,} unchanged; {result['messages_published']:,} messages published)"
    )
    print(f"  failures spreadsheet: {output_link(Path(result['failures_file']))}")
    print(f"  flow run: {stack.ui_url}/runs/flow-run/{state.state_details.flow_run_id}")
    return 0


def demo_outbox(stack) -> int:
    """One pass of the outbox relay the stack's worker runs every minute: what the products run left (nothing,
    when Redis stayed up) is published, and the backlog is checked."""
    from flows.publish_outbox import publish_outbox

    print("\nRelaying the products outbox (publish-outbox, every minute on the stack's worker) ...", flush=True)
    state = publish_outbox(return_state=True)
    result = _result("publish-outbox", state)
    if result is None:
        return 1
    print(f"{result['published']:,} message(s) published, {result['unpublished']:,} left unpublished "
          f"(stream {result['stream']})")
    print(f"  flow run: {stack.ui_url}/runs/flow-run/{state.state_details.flow_run_id}")
    return 0


def demo_turnstiles(stack, participants: int) -> int:
    """Register a generated participants file on the emulated turnstiles; a second demo finds them cached."""
    from flows.register_participants import register_participants
    from operations.settings import get_settings
    from operations.turnstiles.sample import write_participants_file

    if not stack.emulated_turnstiles:
        print("\nturnstiles: TURNSTILE_EMULATOR_DEVICES=0, so the demo registers no participants")
        return 0
    source = get_settings().stack.data_dir / "demo-turnstiles" / "participants.xlsx"
    source.parent.mkdir(parents=True, exist_ok=True)
    if not source.exists():
        write_participants_file(source, participants)
    print(f"\nregistering {source} on {', '.join(stack.emulated_turnstiles)} ...", flush=True)
    state = asyncio.run(register_participants(  # an async flow: its run ends without a heartbeat's wait
        participants_file=str(source), turnstiles=list(stack.emulated_turnstiles), return_state=True
    ))
    result = _result("register-participants", state)
    if result is None:
        return 1
    print(
        f"{result['participants']:,} participants x {result['turnstiles']} turnstiles = {result['operations']:,} "
        f"operations in {result['seconds']:.1f} s: {result['successes']:,} successes, {result['cached']:,} skipped "
        f"(cache), {result['errors']:,} errors"
    )
    if result["failures_file"]:  # written only when a record failed
        print(f"  failures spreadsheet: {output_link(Path(result['failures_file']))}")
    print(f"  flow run: {stack.ui_url}/runs/flow-run/{state.state_details.flow_run_id}")
    return 0


def demo_cleanup(stack) -> int:
    """What the daily cleanup-runs deployment would remove now (a dry run: the demo's runs are recent)."""
    from flows.cleanup_runs import cleanup_runs

    print("\nlisting generation runs past RUN_RETENTION_DAYS (cleanup-runs, dry run) ...", flush=True)
    state = cleanup_runs(dry_run=True, return_state=True)
    result = _result("cleanup-runs", state)
    if result is None:
        return 1
    print(
        f"{len(result['removed'])} run(s) older than {result['retention_days']:g} days would be removed "
        f"({result['folder_bytes']:,} bytes on disk, {result['redis_keys']} Redis keys), {result['kept']} kept"
    )
    print(f"  flow run: {stack.ui_url}/runs/flow-run/{state.state_details.flow_run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
