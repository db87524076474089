"""Sample dealers and products files for the demo, the benchmarks and the tests.

A products file mixes good rows with bad ones of known categories, spread evenly through the file, and says
how many of each it wrote, so that a run's successes and failures can be checked exactly. Everything is
deterministic for a seed and written row by row (large files never sit in memory).
"""

from __future__ import annotations

import csv
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from operations.infra.tabular import open_row_writer
from operations.products.reader import REQUIRED_COLUMNS, Reason

UNKNOWN_DEALER_CODE = "ZZ-UNKNOWN"
EXTRA_COLUMNS = ("brand", "color")
# The bad rows cycle through these, in this order.
BAD_ROW_REASONS = (
    Reason.UNKNOWN_DEALER,
    Reason.NEGATIVE_PRICE,
    Reason.EMPTY_SKU,
    Reason.PRICE_NOT_A_NUMBER,
    Reason.REPEATED_SKU,
)

_PARTS = (
    "Filtro de óleo",
    "Pastilha de freio",
    "Amortecedor dianteiro",
    "Correia dentada",
    "Vela de ignição",
    "Bateria 60Ah",
    "Pneu aro 15",
    "Lâmpada do farol",
)
_BRANDS = ("Bosch", "Cofap", "Fras-le", "Moura", "NGK", "Pirelli")
_COLORS = ("preto", "prata", "branco", "vermelho", "azul")


@dataclass(frozen=True, slots=True)
class SampleStats:
    """What a generated products file holds: `good_rows` must end as successes, and `bad_by_reason` counts the
    other rows by the `Reason` they must fail with (only the reasons that occur)."""

    rows: int
    good_rows: int
    bad_by_reason: dict[str, int]


def dealer_codes(count: int) -> list[str]:
    """'D0001', 'D0002', ...: the codes of `write_dealers_file`."""
    return [f"D{number:04d}" for number in range(1, count + 1)]


def write_dealers_file(path: Path, count: int) -> list[str]:
    """A CSV of `count` dealers (header `code,name`); returns their codes."""
    codes = dealer_codes(count)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(("code", "name"))
        writer.writerows((code, f"Dealer {code[1:]} Ltda") for code in codes)
    return codes


def generate_products_file(
    path: Path,
    rows: int,
    dealers: Sequence[str],
    *,
    bad_fraction: float = 0.1,
    seed: int = 0,
    reprice_every: int = 0,
    extra_columns: bool = True,
) -> SampleStats:
    """Write a products file (.xlsx or .csv, by suffix) of `rows` data rows and say what it holds.

    Good row i (0-based) belongs to dealer `dealers[i % len(dealers)]` with SKU `SKU-{i:07d}`, so dealer and SKU
    never repeat among good rows. `bad_fraction` of the rows, evenly spread, are bad in the `BAD_ROW_REASONS`
    ways in turn; a repeated SKU repeats the latest good row. With `reprice_every` k > 0, the good rows whose
    i is a multiple of k cost 1.00 more and the file is otherwise the same, for testing a re-run's updates.
    Prices are numbers in .xlsx and text with a decimal point in .csv.
    """
    if not 0 <= bad_fraction < 1:
        raise ValueError(f"bad_fraction must be in [0, 1), not {bad_fraction}")
    if not dealers:
        raise ValueError("at least one dealer is needed")
    path = Path(path)
    prices_as_text = path.suffix.lower() == ".csv"
    rng = random.Random(seed)
    bad_by_reason: Counter[str] = Counter()
    latest_good = ("", "")
    with open_row_writer(path, "Products") as append:
        append([*REQUIRED_COLUMNS, *(EXTRA_COLUMNS if extra_columns else ())])
        for i in range(rows):
            # Every row draws the same values, so the files of one seed differ only where asked.
            dealer, sku = dealers[i % len(dealers)], f"SKU-{i:07d}"
            name = f"{rng.choice(_PARTS)} {rng.randint(100, 999)}"
            cents = rng.randint(100, 500_000)
            stock = rng.randint(0, 500)
            extras = [rng.choice(_BRANDS), rng.choice(_COLORS)]
            reason = None
            if int((i + 1) * bad_fraction) > int(i * bad_fraction):  # evenly spread: about i * bad_fraction so far
                reason = BAD_ROW_REASONS[bad_by_reason.total() % len(BAD_ROW_REASONS)]
                bad_by_reason[reason] += 1
            if reason is None:
                latest_good = dealer, sku
                if reprice_every and i % reprice_every == 0:
                    cents += 100
            elif reason == Reason.UNKNOWN_DEALER:
                dealer = UNKNOWN_DEALER_CODE
            elif reason == Reason.NEGATIVE_PRICE:
                cents = -cents
            elif reason == Reason.EMPTY_SKU:
                sku = ""
            elif reason == Reason.REPEATED_SKU:
                dealer, sku = latest_good
            price = "abc" if reason == Reason.PRICE_NOT_A_NUMBER else _money(cents, as_text=prices_as_text)
            append([dealer, sku or None, name, price, stock, *(extras if extra_columns else ())])
    return SampleStats(rows=rows, good_rows=rows - bad_by_reason.total(), bad_by_reason=dict(bad_by_reason))


def _money(cents: int, *, as_text: bool) -> float | str:
    """A price in cents as an xlsx number (12.34) or as CSV text ('12.34')."""
    return str(Decimal(cents).scaleb(-2)) if as_text else cents / 100
