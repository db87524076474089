"""Ground truth of the fault-injection suite, computed outside the project's flow code: what a products file, the
turnstile emulator and the marketplace emulator hold, compared with what the project database and the Redis
stream hold. Pure functions over plain values (the suite reads the values with SQL, redis-py and HTTP); no
Prefect, no project domain code.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Iterable, Mapping


@dataclass(frozen=True)
class Tally:
    """Expected units of work against what was found: `lost` expected and absent, `doubled` found more than once
    (or, for values, found with a different value: `wrong`), `extra` found but never expected."""

    expected: int
    found: int
    lost: int
    doubled: int
    wrong: int = 0
    extra: int = 0

    @property
    def exact(self) -> bool:
        return not (self.lost or self.doubled or self.wrong or self.extra)


def count_keys(keys: Iterable[str]) -> Counter[str]:
    """How many times each key occurs (stream entries per message key, device users per registration)."""
    return Counter(keys)


def compare_keys(expected: Iterable[str], found: Mapping[str, int]) -> Tally:
    """Expected keys against the number of times each was found: lost = expected keys found 0 times, doubled =
    keys found more than once (expected or not), extra = keys found but not expected."""
    wanted = set(expected)
    present = {key for key, n in found.items() if n > 0}
    return Tally(
        expected=len(wanted),
        found=len(present & wanted),
        lost=len(wanted - present),
        doubled=sum(1 for n in found.values() if n > 1),
        extra=len(present - wanted),
    )


def compare_values(expected: Mapping[object, object], found: Mapping[object, object]) -> Tally:
    """Expected key -> value against the stored key -> value (one entry per key: doubles are counted where the
    store can hold them, e.g. `compare_keys` over the raw rows)."""
    return Tally(
        expected=len(expected),
        found=sum(1 for key in expected if key in found),
        lost=sum(1 for key in expected if key not in found),
        doubled=0,
        wrong=sum(1 for key, value in expected.items() if key in found and found[key] != value),
        extra=sum(1 for key in found if key not in expected),
    )


def expected_offers(path: Path, dealers: Iterable[str]) -> dict[tuple[str, str], tuple[Decimal, int]]:
    """(dealer code, SKU) -> (price, stock) of every row of a products CSV that must end in the database: a
    known dealer, a SKU, a number >= 0 as price, a whole number >= 0 as stock, the first row of a dealer's SKU
    (later repeats fail). Read with the csv module, not the project's reader."""
    known = set(dealers)
    offers: dict[tuple[str, str], tuple[Decimal, int]] = {}
    with Path(path).open(encoding="utf-8", newline="") as file:
        reader = csv.reader(file)
        next(reader)  # header: dealer code, SKU, name, price, stock, extras
        for record in reader:
            if not any(cell.strip() for cell in record):
                continue
            dealer, sku, _name, price_text, stock_text = (record + [""] * 5)[:5]
            dealer, sku = dealer.strip(), sku.strip()
            try:
                price, stock = Decimal(price_text.strip()), int(stock_text.strip())
            except (InvalidOperation, ValueError):
                continue
            if dealer not in known or not sku or price < 0 or stock < 0 or not price.is_finite():
                continue
            offers.setdefault((dealer, sku), (price, stock))
    return offers


def writes_after(samples: list[tuple[float, int]], moment: float) -> tuple[int, float]:
    """From (time, count) samples taken while polling a store: how many units were added after `moment`
    (the count at the last sample minus the last count seen at or before it) and how many seconds after
    `moment` the count last changed (0.0 when it never changed after it)."""
    before = [count for at, count in samples if at <= moment]
    base = before[-1] if before else (samples[0][1] if samples else 0)
    last_change, previous = moment, None
    for at, count in samples:
        if previous is not None and count != previous and at > moment:
            last_change = at
        previous = count
    final = samples[-1][1] if samples else base
    return final - base, round(last_change - moment, 1)


@dataclass
class Row:
    """One line of the fault table."""

    fault: str
    states: str = ""
    lost: str = "-"
    doubled: str = "-"
    healed: str = "-"
    note: str = ""


COLUMNS = ("fault", "final states", "lost", "doubled", "healed without a person", "note")


def format_table(rows: list[Row]) -> str:
    """The rows as a Markdown table (the note column last, unpadded)."""
    cells = [COLUMNS] + [tuple(" ".join(str(value).split()).replace("|", "/")
                               for value in (r.fault, r.states, r.lost, r.doubled, r.healed, r.note)) for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS) - 1)]

    def line(values: tuple[str, ...]) -> str:
        padded = [value.ljust(width) for value, width in zip(values, widths)]
        return "| " + " | ".join([*padded, values[-1]]) + " |"

    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|---|"
    return "\n".join([line(cells[0]), rule, *(line(values) for values in cells[1:])])


def healed_text(seconds: float | None, waited: float) -> str:
    """'12.3 s', or 'not healed after N s' when `seconds` is None."""
    return f"{seconds:.1f} s" if seconds is not None else f"not healed after {waited:.0f} s"
