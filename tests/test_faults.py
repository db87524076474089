"""The fault-injection suite's ground truth (faults/truth.py): pure comparisons, no stack (`make faults` runs the
suite itself)."""

from __future__ import annotations

from collections import Counter
from decimal import Decimal

from faults.truth import Row, compare_keys, compare_values, expected_offers, format_table, healed_text, writes_after
from operations.products.sample import generate_products_file


def test_stream_keys_lost_doubled_and_extra_are_counted_apart():
    found = Counter({"a": 1, "b": 2, "x": 1, "c": 0})  # b twice; c listed with no entry; x never expected
    tally = compare_keys(["a", "b", "c", "d"], found)
    assert (tally.expected, tally.found, tally.lost, tally.doubled, tally.extra) == (4, 2, 2, 1, 1)
    assert not tally.exact
    assert compare_keys(["a"], Counter({"a": 1})).exact


def test_stored_values_lost_wrong_and_extra():
    expected = {("D1", "S1"): (Decimal("1.00"), 3), ("D1", "S2"): (Decimal("2.50"), 0), ("D2", "S1"): (Decimal("9"), 1)}
    stored = {("D1", "S1"): (Decimal("1.0"), 3), ("D1", "S2"): (Decimal("2.60"), 0), ("D3", "S9"): (Decimal("1"), 1)}
    tally = compare_values(expected, stored)
    assert (tally.found, tally.lost, tally.wrong, tally.extra) == (2, 1, 1, 1)  # 1.00 == 1.0 as numbers


def test_expected_offers_read_from_the_csv_match_the_generators_count(tmp_path):
    dealers = ["F-1", "F-2", "F-3"]
    stats = generate_products_file(tmp_path / "p.csv", 500, dealers, bad_fraction=0.2, seed=3)
    offers = expected_offers(tmp_path / "p.csv", dealers)
    assert len(offers) == stats.good_rows < 500
    assert {dealer for dealer, _ in offers} == set(dealers)
    assert all(price >= 0 and stock >= 0 for price, stock in offers.values())
    assert len(expected_offers(tmp_path / "p.csv", dealers[:1])) < stats.good_rows  # other dealers' rows are not ours


def test_writes_after_a_cancel_and_when_they_stopped():
    samples = [(0.0, 10), (1.0, 20), (2.0, 35), (3.0, 50), (4.0, 50), (9.0, 50)]
    assert writes_after(samples, 1.5) == (30, 1.5)  # 20 -> 50; the last change seen at 3.0
    assert writes_after(samples, 3.5) == (0, 0.0)
    assert writes_after([], 1.0) == (0, 0.0)


def test_the_table_has_one_line_per_row_and_says_when_nothing_healed():
    rows = [Row("cancel-sync", "Cancelled", "0", "0", healed_text(3.21, 120), "note"),
            Row("kill-redis during a sync", "Running", "5 rows", "0", healed_text(None, 180), "")]
    lines = format_table(rows).splitlines()
    assert len(lines) == 4 and lines[0].startswith("| fault")
    assert "3.2 s" in lines[2] and "not healed after 180 s" in lines[3]
    assert len({line.index("|", 1) for line in lines}) == 1  # the columns line up
