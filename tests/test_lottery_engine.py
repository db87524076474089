"""Pure engine logic: encoding, rules, exact counting, sampling, scoring (no services needed)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from operations.lottery.engine import (
    GameSpace,
    RuleChecker,
    Scorer,
    game_features,
    games_per_first_number,
    games_to_masks,
    masks_to_games,
    rank_order,
    sample_games_by_first_number,
)
from operations.lottery.parameters import GameRules
from operations.lottery.plan import _count_exact, _estimate


def test_masks_round_trip_every_size():
    rng = np.random.default_rng(3)
    for k in (6, 13, 20):
        games = np.sort(np.array([rng.choice(60, k, replace=False) + 1 for _ in range(200)]), axis=1)
        masks = games_to_masks(games.astype(np.uint8))
        assert len(np.unique(masks)) == len(np.unique(games, axis=0))
        np.testing.assert_array_equal(masks_to_games(masks, k), games)


def test_features_of_a_known_game():
    feats = game_features(np.array([[1, 2, 3, 11, 42, 60]], dtype=np.uint8))
    assert feats["sum"][0] == 119
    assert feats["evens"][0] == 3
    assert feats["run"][0] == 3
    assert feats["per_row"][0] == 3  # 1, 2, 3 in the first row
    assert feats["rows"][0] == 4  # rows 1-10, 11-20, 41-50, 51-60
    assert feats["cols"][0] == 4  # columns of 1, 2, 3 and 10 (11 and 1 share one; 42 and 2; 60 is column 10)


def test_defaults_for_six_numbers_follow_the_historical_ranges():
    rules = GameSpace.build(6, 60).resolve(GameRules())
    assert rules.sum_range == (118, 248)
    assert rules.evens_range == (2, 4)
    assert rules.max_consecutive == 2
    assert rules.max_per_row == 3
    assert rules.min_rows == 3
    off = GameSpace.build(6, 60).resolve(GameRules(historical_defaults=False))
    assert (off.sum_range, off.evens_range, off.max_consecutive, off.max_per_row, off.min_rows) == (None,) * 5


def _brute_force(k, n, checker):
    by_first = np.zeros(n + 1)
    for combo in itertools.combinations(range(1, n + 1), k):
        ok, _ = checker.check(np.array([combo], dtype=np.uint8))
        by_first[combo[0]] += ok[0]
    return by_first


@pytest.mark.parametrize(
    "rules",
    [
        GameRules(sum_min=40, sum_max=90, evens_min=2, evens_max=4, max_consecutive=2, max_per_row=3, min_rows=2),
        GameRules(historical_defaults=False, excluded_numbers=[3, 7], required_numbers=[12]),
        GameRules(max_consecutive=1, max_per_row=2, min_rows=3, excluded_numbers=[20]),
    ],
)
def test_exact_count_matches_brute_force(rules):
    k, n = 6, 22
    resolved = GameSpace.build(k, n).resolve(rules)
    draws = games_to_masks(np.array([[1, 4, 9, 13, 17, 21], [2, 5, 8, 11, 15, 19]], dtype=np.uint8))
    checker = RuleChecker(rules=resolved, k=k, past_draw_masks=np.sort(draws))
    exact = _count_exact(k, n, checker)
    brute = np.zeros(n + 1)
    games = np.array(list(itertools.combinations(range(1, n + 1), k)), dtype=np.uint8)
    ok, _ = checker.check(games)
    np.add.at(brute, games[ok][:, 0], 1)
    np.testing.assert_array_equal(exact.by_first, brute)
    estimate = _estimate(k, n, checker, seed=1)
    assert estimate.total == pytest.approx(exact.total, rel=0.1)


def test_candidates_per_first_number_without_rules_is_the_binomial():
    counts = games_per_first_number(6, 60, (), ())
    assert counts.sum() == math.comb(60, 6)
    assert counts[1] == math.comb(59, 5) and counts[55] == 1 and counts[56] == 0


def test_stratified_sampler_respects_first_number_and_number_rules():
    rng = np.random.default_rng(5)
    weights = np.zeros(61)
    weights[[4, 30]] = [3.0, 1.0]
    games = sample_games_by_first_number(rng, 20_000, 6, 60, weights, excluded=(50,), required=(33,))
    assert set(np.unique(games[:, 0])) == {4, 30}
    assert (np.diff(games.astype(int), axis=1) > 0).all()
    assert not (games == 50).any()
    assert (games == 33).any(axis=1).all()
    share_4 = np.mean(games[:, 0] == 4)
    assert 0.72 < share_4 < 0.78


def test_score_is_highest_for_the_most_common_profile_and_ranks_descending():
    space = GameSpace.build(6, 60)
    scorer = Scorer.for_space(space)
    games = np.array([[1, 2, 3, 4, 5, 6], [7, 18, 29, 36, 44, 53], [55, 56, 57, 58, 59, 60]], dtype=np.uint8)
    scores = scorer.score(games)
    assert ((scores > 0) & (scores <= 1)).all()
    assert scores[1] > scores[0] and scores[1] > scores[2]
    order = rank_order(scores, games_to_masks(games))
    assert list(order)[0] == 1
    assert (np.diff(scores[order]) <= 0).all()


@pytest.mark.parametrize("scale", [1e6, 1e5, None])  # 6-decimal scores (two sorts), coarser, arbitrary (lexsort)
def test_rank_order_is_score_descending_then_mask_ascending(scale):
    rng = np.random.default_rng(7)
    masks = rng.permutation(rng.integers(0, 2**60, 50_000, dtype=np.uint64))
    raw = rng.random(50_000) * (1 if scale else 3) - (0 if scale else 1)
    scores = np.round(np.round(raw * 40) / 40 * scale) / scale if scale else raw  # many ties when rounded
    order = rank_order(scores, masks)
    assert np.array_equal(order, np.lexsort((masks, -scores)))
    assert sorted(order.tolist()) == list(range(50_000))
