"""Each fault's own data and its ground truth: products files of dealers of its own, a marketplace seller of its
own, an emulated turnstile of its own; and what the stores hold of them, read with plain SQL, redis-py and the
emulators' control APIs.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from faults.harness import Harness
from faults.truth import Tally, compare_keys, compare_values, expected_offers

_OFFERS = """
SELECT d.code, p.sku, pd.price, pd.stock, pd.id, pd.version
FROM product_dealers pd JOIN dealers d ON d.id = pd.dealer_id JOIN products p ON p.id = pd.product_id
WHERE d.code = ANY(CAST(:codes AS text[]))
"""
_OFFER_COUNT = """
SELECT count(*) FROM product_dealers pd JOIN dealers d ON d.id = pd.dealer_id WHERE d.code = ANY(CAST(:codes AS text[]))
"""
# the messages of these dealers in outbox rows not marked published (a row holds a batch of messages, each
# [key, message_key, type, outbox_id, payload])
_UNPUBLISHED = """
SELECT count(*) FROM outbox_batches b CROSS JOIN LATERAL json_array_elements(CAST(b.messages AS json)) AS m(message)
WHERE b.published_at IS NULL AND CAST(m.message ->> 4 AS json) ->> 'dealer_code' = ANY(CAST(:codes AS text[]))
"""


def now_ms() -> int:
    return int(time.time() * 1000)


# -- products --------------------------------------------------------------------------------------------------
@dataclass
class ProductsData:
    path: Path
    dealers: list[str]
    expected: dict[tuple[str, str], tuple[Decimal, int]]  # from the file, read with the csv module
    good_rows: int                                      # what the generator says it wrote

    @property
    def rows(self) -> int:
        return len(self.expected)


def products_data(harness: Harness, tag: str, rows: int) -> ProductsData:
    """A products CSV of `rows` rows (10% bad) for four dealers of this fault alone, the dealers in the
    database. The expected offers are read back from the file and checked against the generator's count."""
    from operations.products.sample import generate_products_file
    from operations.products.store import upsert_dealers

    dealers = [f"{tag}-{n}" for n in range(1, 5)]
    path = harness.root / "files" / f"products-{tag}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    stats = generate_products_file(path, rows, dealers, bad_fraction=0.1, seed=5)
    upsert_dealers(harness.engine, [(code, f"Dealer {code}") for code in dealers])
    expected = expected_offers(path, dealers)
    if len(expected) != stats.good_rows:
        raise RuntimeError(f"ground truth of {path.name}: {len(expected)} offers read, generator wrote {stats.good_rows}")
    return ProductsData(path, dealers, expected, stats.good_rows)


def offers_loaded(harness: Harness, data: ProductsData) -> int | None:
    return harness.scalar(_OFFER_COUNT, codes=data.dealers)


def unpublished(harness: Harness, data_sets: list[ProductsData]) -> int | None:
    return harness.scalar(_UNPUBLISHED, codes=[code for data in data_sets for code in data.dealers])


@dataclass
class ProductsTruth:
    rows: Tally       # the file's good rows against the offers stored (price, stock)
    messages: Tally   # one stream entry per committed offer version
    waiting: int      # outbox rows of these dealers not marked published

    def text(self) -> str:
        return (f"{self.rows.found:,}/{self.rows.expected:,} rows stored, {self.messages.found:,}/"
                f"{self.messages.expected:,} messages in the stream, {self.waiting:,} waiting in the outbox")


def products_truth(harness: Harness, data_sets: list[ProductsData], stream: str, since_ms: int) -> ProductsTruth | None:
    """The files' good rows against the database, the committed offer versions against the stream entries
    (by the payload's offer id and version); None while PostgreSQL or Redis cannot answer."""
    codes = [code for data in data_sets for code in data.dealers]
    stored_rows = harness.sql(_OFFERS, codes=codes)
    counts = harness.stream_counts(stream, since_ms)
    waiting = harness.scalar(_UNPUBLISHED, codes=codes)
    if stored_rows is None or counts is None or waiting is None:
        return None
    expected = {key: value for data in data_sets for key, value in data.expected.items()}
    stored = {(code, sku): (Decimal(price), int(stock)) for code, sku, price, stock, _, _ in stored_rows}
    offer_ids = {offer_id for *_, offer_id, _ in stored_rows}
    wanted = {(offer_id, version) for *_, offer_id, last in stored_rows for version in range(1, last + 1)}
    mine = Counter({key: n for key, n in counts.items() if key[0] in offer_ids})
    return ProductsTruth(compare_values(expected, stored), compare_keys(wanted, mine), waiting)


# -- marketplace -------------------------------------------------------------------------------------------------
@dataclass
class SellerData:
    seller_id: int
    orders: set[str]   # the emulator's order ids
    items: set[str]    # the emulator's item ids

    @property
    def total(self) -> int:
        return len(self.orders) + len(self.items)


def seller_data(harness: Harness, index: int, orders: int, items: int) -> SellerData:
    """Seller `index` of the marketplace emulator given `orders` and `items`, onboarded as a seller is (a code
    from the emulator's consent page, exchanged); its truth read from the emulator."""
    from blocks.marketplace_app import load_marketplace_app
    from deployments.marketplace_accounts import authorization_code
    from emulators.marketplace import EmulatorControl
    from operations.marketplace.onboarding import onboard_from_code

    with EmulatorControl(harness.market_url) as control:
        seller_id = control.sellers()[index]["seller_id"]
        control.set_seller(seller_id, orders=orders, items=items)
        truth_orders = {str(order["id"]) for order in control.orders(seller_id)}
        truth_items = {str(item["id"]) for item in control.items(seller_id)}
    app = load_marketplace_app(harness.settings.marketplace.app_block)
    onboard_from_code(harness.engine, app.client(), authorization_code(app, seller_id), f"faults-{index}")
    return SellerData(seller_id, truth_orders, truth_items)


def synced_count(harness: Harness, seller: SellerData) -> int | None:
    rows = harness.sql(
        "SELECT (SELECT count(*) FROM marketplace_orders WHERE seller_id = :s) "
        "+ (SELECT count(*) FROM marketplace_items WHERE seller_id = :s)", s=seller.seller_id)
    return rows[0][0] if rows else None


def sync_truth(harness: Harness, seller: SellerData) -> Tally | None:
    """The emulator's orders and items of the seller against the database's rows (raw rows: a doubled id counts)."""
    orders = harness.sql("SELECT id FROM marketplace_orders WHERE seller_id = :s", s=seller.seller_id)
    items = harness.sql("SELECT id FROM marketplace_items WHERE seller_id = :s", s=seller.seller_id)
    if orders is None or items is None:
        return None
    found = Counter([f"order:{i}" for (i,) in orders] + [f"item:{i}" for (i,) in items])
    expected = [f"order:{i}" for i in seller.orders] + [f"item:{i}" for i in seller.items]
    return compare_keys(expected, found)


def account_sync_status(harness: Harness, seller: SellerData) -> str:
    value = harness.scalar("SELECT last_sync_status FROM marketplace_accounts WHERE seller_id = :s", s=seller.seller_id)
    return value if value is not None else "?"


# -- turnstiles ------------------------------------------------------------------------------------------------
@dataclass
class TurnstileData:
    device: int
    name: str                 # the TurnstileDevice block
    path: Path                # the participants file
    registrations: list[str]
    cards: list[str]


def turnstile_data(harness: Harness, device: int, participants: int) -> TurnstileData:
    """Emulated turnstile `device` wiped, and a participants file of `participants` people for it."""
    from emulators.controlid import EmulatorControl
    from operations.turnstiles.sample import write_participants_file

    path = harness.root / "files" / f"participants-{device}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    people = write_participants_file(path, participants, seed=device)
    with EmulatorControl(list(harness.turnstile_urls)) as gates:
        gates.wipe(device)
    return TurnstileData(device, harness.turnstiles[device], path, [p.registration for p in people],
                         [str(p.card) for p in people if p.card is not None])


def device_writes(harness: Harness, data: TurnstileData) -> int | None:
    """Objects the device has written so far (its own counter)."""
    from emulators.controlid import EmulatorControl

    try:
        with EmulatorControl(list(harness.turnstile_urls)) as gates:
            return int(gates.stats(data.device)["objects_written"])
    except Exception:  # noqa: BLE001
        return None


def turnstile_truth(harness: Harness, data: TurnstileData) -> Tally | None:
    """The file's participants and cards against the device's users and cards (a user or card held twice
    counts as doubled)."""
    from emulators.controlid import EmulatorControl

    try:
        with EmulatorControl(list(harness.turnstile_urls)) as gates:
            users = gates.users(data.device)
    except Exception:  # noqa: BLE001
        return None
    found = Counter([f"user:{u.get('registration')}" for u in users]
                    + [f"card:{card}" for u in users for card in u.get("cards", [])])
    expected = [f"user:{r}" for r in data.registrations] + [f"card:{c}" for c in data.cards]
    return compare_keys(expected, found)


def set_turnstile_latency(harness: Harness, latency_ms: float) -> None:
    from emulators.controlid import EmulatorControl

    with EmulatorControl(list(harness.turnstile_urls)) as gates:
        gates.configure(latency_ms=latency_ms)


def set_market_latency(harness: Harness, latency_ms: float) -> None:
    from emulators.marketplace import EmulatorControl

    with EmulatorControl(harness.market_url) as control:
        control.configure(latency_ms=latency_ms)
