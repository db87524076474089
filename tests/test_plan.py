"""Planning: caps from exact shares, and infeasible requests rejected with the culprit named."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pydantic import ValidationError

from operations.lottery.engine import GameSpace
from operations.lottery.parameters import DEFAULT_REGIONS, FirstNumberRegion, GameRules, GenerationRequest
from operations.lottery.plan import InfeasibleRequest, build_plan

NO_DRAWS = np.zeros(0, dtype=np.uint64)
NO_RULES = GameRules(historical_defaults=False, exclude_past_draws=False)


def test_default_shares_without_rules_are_the_exact_first_number_probabilities():
    plan = build_plan(GenerationRequest(quantity=1_000_000, rules=NO_RULES), "p", NO_DRAWS)
    total = math.comb(60, 6)
    expected = [sum(math.comb(60 - m, 5) for m in range(r.first, r.last + 1)) / total for r in plan.regions]
    assert [r.share for r in plan.regions] == pytest.approx(expected, abs=1e-12)
    assert [r.cap for r in plan.regions] == [math.ceil(s * 1_000_000 - 1e-9) for s in expected]
    assert plan.feasibility.exact and plan.feasibility.total == total


def test_default_rules_give_feasible_caps_and_chunks_that_add_up():
    plan = build_plan(GenerationRequest(quantity=1_000_000), "p", NO_DRAWS, workers=2)
    assert sum(plan.chunk_quotas) == 1_000_000
    assert all(q <= 250_000 for q in plan.chunk_quotas)
    assert sum(min(r.cap, r.feasible) for r in plan.regions) >= 1_000_000
    # no game of 6 numbers with smallest number >= 41 sums to 248 or less
    assert plan.regions[-1].feasible == 0 and plan.regions[-1].cap == 0


def test_rules_leaving_too_few_games_are_rejected_naming_the_rule():
    request = GenerationRequest(quantity=100, rules=GameRules(sum_min=21, sum_max=22))
    with pytest.raises(InfeasibleRequest, match=r"leave 0 distinct games.*sum 21\.\.22 removes"):
        build_plan(request, "p", NO_DRAWS)


def test_asking_for_almost_every_feasible_game_is_rejected():
    rules = GameRules(historical_defaults=False, exclude_past_draws=False, required_numbers=[1, 2, 3, 4, 5])
    with pytest.raises(InfeasibleRequest, match="at most 80%"):
        build_plan(GenerationRequest(quantity=50, rules=rules), "p", NO_DRAWS)


def test_caps_that_cannot_add_up_are_rejected():
    regions = [FirstNumberRegion(first=1, last=10, share=0.5), FirstNumberRegion(first=11, last=55, share=0.2)]
    with pytest.raises(InfeasibleRequest, match="caps add up to 7,000"):
        build_plan(GenerationRequest(quantity=10_000, regions=regions), "p", NO_DRAWS)


def test_a_region_that_cannot_hold_its_cap_is_named():
    regions = [FirstNumberRegion(first=1, last=40, share=0.5), FirstNumberRegion(first=41, last=55, share=0.5)]
    with pytest.raises(InfeasibleRequest, match="region 41-55 holds 0 games"):
        build_plan(GenerationRequest(quantity=10_000, regions=regions), "p", NO_DRAWS)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"regions": [{"first": 56, "last": 60}]}, "unknown region 56-60"),
        ({"regions": [{"first": 1, "last": 20}, {"first": 15, "last": 30}]}, "overlap"),
        ({"regions": [{"first": 20, "last": 10}]}, "must not be greater"),
        ({"rules": {"sum_min": 300, "sum_max": 200}}, "rule 'sum'"),
        ({"rules": {"excluded_numbers": [7], "required_numbers": [7]}}, "both name"),
        ({"rules": {"excluded_numbers": [61]}}, "less than or equal to 60"),
        ({"quantity": 0}, "greater than or equal to 1"),
        ({"numbers_per_game": 21}, "less than or equal to 20"),
        ({"rules": {"max_consecutive": 0}}, "rule 'max_consecutive': 0 is below 1; -1 leaves the rule empty"),
        ({"regions": [{"first": 1, "last": 55, "share": -0.5}]}, "neither a fraction 0..1 nor -1"),
    ],
)
def test_bad_parameters_fail_validation_with_a_message(kwargs, message):
    with pytest.raises(ValidationError, match=message):
        GenerationRequest(**kwargs)


def test_larger_games_are_estimated_by_sampling():
    plan = build_plan(GenerationRequest(quantity=100_000, numbers_per_game=10), "p", NO_DRAWS)
    assert not plan.feasibility.exact
    assert plan.feasibility.total > 1e8
    assert sum(r.cap for r in plan.regions) >= 100_000


@pytest.mark.parametrize(("k", "n", "quantity", "exist"), [
    (20, 20, 5_000, "only 1 distinct game exists with 20 numbers out of 1..20"),
    (19, 20, 21, "only 20 distinct games exist with 19 numbers out of 1..20"),
])
def test_a_request_the_universe_cannot_satisfy_is_refused_for_the_universe(k, n, quantity, exist):
    with pytest.raises(ValidationError, match=f"{exist}, fewer than the {quantity:,} games asked for") as refused:
        GenerationRequest(quantity=quantity, numbers_per_game=k, highest_number=n)
    assert "region" not in str(refused.value), "the default regions are not what is wrong"


def test_the_whole_universe_is_not_refused_for_the_universe():
    whole = GenerationRequest(quantity=1, numbers_per_game=20, highest_number=20)
    assert [r.label for r in whole.regions] == ["1-10"]  # the default regions fitted: the one game starts at 1
    with pytest.raises(ValidationError, match="unknown region 11-20"):  # regions an operator wrote are kept
        GenerationRequest(quantity=1, numbers_per_game=20, highest_number=20,
                          regions=[FirstNumberRegion(first=1, last=10), FirstNumberRegion(first=11, last=20)])


def test_default_regions_fit_a_smaller_universe_and_its_plan_adds_up():
    request = GenerationRequest(quantity=20_000, highest_number=45, rules=NO_RULES)
    # 41-55 dropped: no game of 6 numbers out of 1..45 starts above 40
    assert [r.label for r in request.regions] == ["1-10", "11-20", "21-30", "31-40"]
    plan = build_plan(request, "small-universe", NO_DRAWS)
    assert sum(r.cap for r in plan.regions) >= 20_000 and sum(plan.chunk_quotas) == 20_000
    assert GenerationRequest().regions == list(DEFAULT_REGIONS)  # the slip's universe keeps all five
    assert GenerationRequest(highest_number=50).regions == list(DEFAULT_REGIONS)  # 41-55 still holds 41..45


def test_empty_rule_limits_are_minus_one_and_a_zero_is_a_real_limit():
    space = GameSpace.build(6, 60)
    assert space.resolve(GameRules(evens_min=-1)).evens_range == (2, 4)  # -1: the historical default
    assert space.resolve(GameRules(evens_min=0)).evens_range == (0, 4)
    assert space.resolve(GameRules(historical_defaults=False, evens_max=0)).evens_range == (0, 0)  # all odd
    regions = [FirstNumberRegion(first=1, last=10, share=0.0), FirstNumberRegion(first=11, last=55, share=1.0)]
    plan = build_plan(GenerationRequest(quantity=1_000, rules=NO_RULES, regions=regions), "p", NO_DRAWS)
    assert [r.cap for r in plan.regions] == [0, 1_000]  # a share of 0 is a real share: no game starts at 1..10


def test_fingerprints_of_runs_started_when_empty_limits_were_null_are_kept():
    """Pinned from the code before the limits became plain numbers: a run started then resumes after."""
    default = build_plan(GenerationRequest(quantity=10_000), "p", NO_DRAWS)
    assert default.fingerprint == "5e1205e859a00a0d"
    regions = [FirstNumberRegion(first=1, last=10), FirstNumberRegion(first=11, last=55, share=1.0)]
    rules = GameRules(sum_min=130, evens_max=4, historical_defaults=False)
    request = GenerationRequest(quantity=5_000, rules=rules, regions=regions)
    assert build_plan(request, "p", NO_DRAWS).fingerprint == "1316a02bf21bac5b"


def test_null_limits_from_rest_callers_of_the_old_form_are_still_the_empty_value():
    rules = GameRules.model_validate({"sum_min": None, "evens_max": 0, "historical_defaults": False})
    assert (rules.sum_min, rules.evens_max) == (-1, 0)
    assert FirstNumberRegion.model_validate({"first": 1, "last": 10, "share": None}).share == -1
    with pytest.raises(ValueError, match="below 1"):
        GameRules.model_validate({"max_consecutive": 0})
