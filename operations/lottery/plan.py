"""Turns a GenerationRequest into a checked plan: resolved rules, exact or estimated feasible counts,
first-number caps and chunk quotas. Infeasible requests fail here, before any chunk runs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from operations.errors import UserError
from operations.lottery.engine import (
    GameSpace,
    _longest_run,
    bucket_histogram,
    games_to_masks,
    masks_to_games,
    ResolvedRules,
    RuleChecker,
    Scorer,
    games_per_first_number,
    sample_games_by_first_number,
)
from operations.lottery.draws import load_past_draws
from operations.lottery.parameters import EMPTY, SLIP_COLUMNS, GenerationRequest

EXACT_COUNT_LIMIT = 60_000_000  # C(60,6) = 50,063,860 games are enumerated in a few seconds
MAX_FEASIBLE_FRACTION = 0.8  # drawing more than this share of all feasible games without repeats stalls
SAMPLES_PER_FIRST_NUMBER = 4_000
PARALLEL_WRITE_MIN_ROWS = 50_000  # below this, one file: a second writer costs more than it saves


class InfeasibleRequest(UserError, ValueError):
    """The request cannot be met; the message names the rule or region responsible."""


@dataclass(frozen=True)
class RegionPlan:
    label: str
    first: int
    last: int
    share: float
    cap: int
    feasible: float  # games the rules allow whose smallest number is in the region (exact or estimated)
    candidates: float  # games with that smallest number that respect excluded/required numbers


@dataclass(frozen=True)
class Feasibility:
    exact: bool
    by_first: np.ndarray = field(repr=False)  # feasible games per first number (index 1..n)
    candidates_by_first: np.ndarray = field(repr=False)  # games respecting excluded/required, per first number
    rejected_by_rule: dict[str, float] = field(default_factory=dict)  # funnel: games each rule removed

    @property
    def total(self) -> float:
        return float(self.by_first.sum())


@dataclass(frozen=True)
class GenerationPlan:
    """Everything a chunk needs; small and picklable (sent to Dask workers)."""

    request: GenerationRequest
    run_key: str
    rules: ResolvedRules
    regions: tuple[RegionPlan, ...]
    feasibility: Feasibility
    checker: RuleChecker
    scorer: Scorer
    chunk_quotas: tuple[int, ...]
    fingerprint: str

    @property
    def k(self) -> int:
        return self.request.numbers_per_game

    @property
    def n(self) -> int:
        return self.request.highest_number

    def region_of_first(self) -> np.ndarray:
        """region index per first number (index 1..n), -1 where no region applies."""
        out = np.full(self.n + 1, -1, dtype=np.int16)
        for i, r in enumerate(self.regions):
            out[r.first : min(r.last, self.n) + 1] = i
        return out

    def first_number_weights(self, region_counts: list[int]) -> np.ndarray:
        """Sampling weight per first number: regions with more room left and lower rule acceptance get more
        candidates; within a region, games are uniform. Full regions get none."""
        weights = np.zeros(self.n + 1)
        cand = self.feasibility.candidates_by_first
        for i, r in enumerate(self.regions):
            room = r.cap - region_counts[i]
            if room <= 0 or r.feasible <= 0:
                continue
            span = slice(r.first, min(r.last, self.n) + 1)
            weights[span] = room * cand[span] / r.feasible
        return weights

    def expected_acceptance(self, weights: np.ndarray) -> float:
        cand = self.feasibility.candidates_by_first
        with np.errstate(divide="ignore", invalid="ignore"):
            acc = np.where(cand > 0, self.feasibility.by_first / np.maximum(cand, 1e-300), 0.0)
        total = weights.sum()
        return float((weights * acc).sum() / total) if total > 0 else 0.0


@lru_cache(maxsize=4)
def _combinations(n: int, r: int) -> np.ndarray:
    """All r-subsets of 1..n in lexicographic order, as uint8 rows (built column by column in numpy)."""
    rows = np.arange(1, n + 1, dtype=np.uint8)[:, None]
    for _ in range(r - 1):
        last = rows[:, -1].astype(np.int64)
        counts = n - last
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        following = np.repeat(last, counts) + 1 + (np.arange(counts.sum()) - starts)
        rows = np.column_stack([np.repeat(rows, counts, axis=0), following.astype(np.uint8)])
    return rows


@dataclass(frozen=True)
class _TailFeatures:
    """Features of every (k-1)-subset of 1..n, from which those of k-games (first number + tail) follow."""

    first: np.ndarray  # smallest number of the tail
    sums: np.ndarray
    evens: np.ndarray
    row_counts: np.ndarray  # (T, 6)
    most_per_row: np.ndarray
    rows: np.ndarray
    run: np.ndarray  # longest run inside the tail
    prefix_run: np.ndarray  # run starting at the tail's first number
    masks: np.ndarray


@lru_cache(maxsize=2)
def _tail_features(n: int, r: int, cache_dir: Path | None = None) -> _TailFeatures:
    """The features of every r-subset of 1..n (5,461,512 tails for 6 of 60: ~2.3 s to build, ~0.5 s to load).
    They do not depend on the rules, so with `cache_dir` they are built once per machine and kept on disk."""
    cached = cache_dir / f"tail-features-{n}-{r}.npz" if cache_dir else None
    if cached is not None and cached.exists():
        try:
            with np.load(cached) as data:
                return _TailFeatures(**{f.name: data[f.name] for f in dataclasses.fields(_TailFeatures)})
        except (OSError, ValueError, KeyError):
            cached.unlink(missing_ok=True)  # damaged: rebuild below
    features = _build_tail_features(n, r)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **dataclasses.asdict(features))
        os.replace(tmp, cached)
    return features


def _build_tail_features(n: int, r: int) -> _TailFeatures:
    tails = _combinations(n, r)
    g = tails.astype(np.int16)
    row_counts = bucket_histogram((tails - 1) // SLIP_COLUMNS, 6).astype(np.int8)
    consecutive = np.diff(g, axis=1) == 1
    prefix = np.ones(len(g), dtype=np.int8)
    alive = np.ones(len(g), dtype=bool)
    for j in range(consecutive.shape[1]):
        alive &= consecutive[:, j]
        prefix += alive
    return _TailFeatures(
        first=tails[:, 0],
        sums=g.sum(axis=1),
        evens=(g % 2 == 0).sum(axis=1).astype(np.int8),
        row_counts=row_counts,
        most_per_row=row_counts.max(axis=1),
        rows=(row_counts > 0).sum(axis=1).astype(np.int8),
        run=_longest_run(tails).astype(np.int8),
        prefix_run=prefix,
        masks=games_to_masks(tails),
    )


def _count_exact(k: int, n: int, checker: RuleChecker, cache_dir: Path | None = None) -> Feasibility:
    """Count every game by first number m, deriving its features from those of its (k-1)-number tail."""
    t = _tail_features(n, k - 1, cache_dir)
    rules = checker.rules
    by_first = np.zeros(n + 1)
    rejected: dict[str, float] = {}
    excl = games_to_masks(np.array([rules.excluded], dtype=np.uint8))[0] if rules.excluded else np.uint64(0)
    req = games_to_masks(np.array([rules.required], dtype=np.uint8))[0] if rules.required else np.uint64(0)
    for m in range(1, n - k + 2):
        s = slice(int(np.searchsorted(t.first, m + 1)), len(t.first))
        ok = np.ones(s.stop - s.start, dtype=bool)
        tests = []
        if rules.sum_range:
            total = t.sums[s] + m
            tests.append(("sum", (total >= rules.sum_range[0]) & (total <= rules.sum_range[1])))
        if rules.evens_range:
            evens = t.evens[s] + (m % 2 == 0)
            tests.append(("evens", (evens >= rules.evens_range[0]) & (evens <= rules.evens_range[1])))
        if rules.max_consecutive is not None and rules.max_consecutive < k:
            joined = np.where(t.first[s] == m + 1, t.prefix_run[s] + 1, 1)
            tests.append(("consecutive", np.maximum(t.run[s], joined) <= rules.max_consecutive))
        in_row = t.row_counts[s, (m - 1) // SLIP_COLUMNS]
        if rules.max_per_row is not None:
            tests.append(("per_row", np.maximum(t.most_per_row[s], in_row + 1) <= rules.max_per_row))
        if rules.min_rows is not None:
            tests.append(("rows", t.rows[s] + (in_row == 0) >= rules.min_rows))
        if rules.excluded or rules.required:
            masks = t.masks[s] | (np.uint64(1) << np.uint64(m - 1))
            tests.append(("numbers", ((masks & excl) == 0) & ((masks & req) == req)))
        for name, passed in tests:
            rejected[name] = rejected.get(name, 0) + int(np.count_nonzero(ok & ~passed))
            ok &= passed
        by_first[m] = np.count_nonzero(ok)
    if len(checker.past_draw_masks):
        # Past draws are few: check them directly and take out those the other rules let through.
        draws = masks_to_games(checker.past_draw_masks, k) if k == 6 else None
        if draws is not None:
            others = RuleChecker(rules=replace(rules, exclude_past_draws=False), k=k, past_draw_masks=checker.past_draw_masks)
            passing, _ = others.check(draws)
            for m in draws[passing][:, 0]:
                by_first[m] -= 1
            rejected["past_draws"] = int(np.count_nonzero(passing))
    candidates = games_per_first_number(k, n, rules.excluded, rules.required)
    return Feasibility(exact=True, by_first=by_first, candidates_by_first=candidates, rejected_by_rule=rejected)


def _estimate(k: int, n: int, checker: RuleChecker, seed: int) -> Feasibility:
    candidates = games_per_first_number(k, n, checker.rules.excluded, checker.rules.required)
    rng = np.random.default_rng(seed)
    by_first = np.zeros(n + 1)
    rejected: dict[str, float] = {}
    for m in np.nonzero(candidates)[0]:
        one_hot = np.zeros(n + 1)
        one_hot[m] = 1.0
        games = sample_games_by_first_number(
            rng, SAMPLES_PER_FIRST_NUMBER, k, n, one_hot, checker.rules.excluded, checker.rules.required
        )
        ok, rej = checker.check(games)
        scale = candidates[m] / SAMPLES_PER_FIRST_NUMBER
        by_first[m] = np.count_nonzero(ok) * scale
        for name, count in rej.items():
            rejected[name] = rejected.get(name, 0) + count * scale
    return Feasibility(exact=False, by_first=by_first, candidates_by_first=candidates, rejected_by_rule=rejected)


def count_feasible_games(k: int, n: int, checker: RuleChecker, cache_dir: Path | None = None) -> Feasibility:
    """Feasible games per first number: exact when C(n, k) is small enough to enumerate, else estimated.

    With `cache_dir`, results are kept on disk by (k, n, rules, past draws): the same rules count once.
    """
    key = hashlib.sha256(
        repr((k, n, checker.rules, EXACT_COUNT_LIMIT, SAMPLES_PER_FIRST_NUMBER)).encode()
        + checker.past_draw_masks.tobytes()
    ).hexdigest()[:24]
    cached = cache_dir / f"feasibility-{key}.json" if cache_dir else None
    if cached and cached.exists():
        data = json.loads(cached.read_text())
        return Feasibility(
            exact=data["exact"],
            by_first=np.array(data["by_first"]),
            candidates_by_first=np.array(data["candidates_by_first"]),
            rejected_by_rule=data["rejected_by_rule"],
        )
    exact = math.comb(n, k) <= EXACT_COUNT_LIMIT and (
        k == 6 or not checker.rules.exclude_past_draws or not len(checker.past_draw_masks)
    )
    feas = _count_exact(k, n, checker, cache_dir) if exact else _estimate(k, n, checker, seed=12345)
    if cached:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(
            json.dumps(
                {
                    "exact": feas.exact,
                    "by_first": feas.by_first.tolist(),
                    "candidates_by_first": feas.candidates_by_first.tolist(),
                    "rejected_by_rule": feas.rejected_by_rule,
                }
            )
        )
        os.replace(tmp, cached)
    return feas


@lru_cache(maxsize=16)
def game_space(k: int, n: int) -> GameSpace:
    return GameSpace.build(k, n)


def _chunk_quotas(quantity: int, workers: int, min_chunk: int, max_chunk: int) -> tuple[int, ...]:
    """Chunks big enough that Prefect's per-task overhead stays small, and at least two per worker."""
    size = min(max_chunk, max(min_chunk, math.ceil(quantity / (2 * workers))))
    full, last = divmod(quantity, size)
    return tuple([size] * full + ([last] if last else []))


def _describe_funnel(feas: Feasibility, rules: ResolvedRules) -> str:
    names = dict(rules.describe())
    labels = {
        "sum": f"sum {names['sum']}",
        "evens": f"even numbers {names['even numbers']}",
        "consecutive": f"longest run {names['longest consecutive run']}",
        "per_row": f"most per row {names['most numbers in one row']}",
        "rows": f"fewest rows {names['fewest rows occupied']}",
        "numbers": "excluded/required numbers",
        "past_draws": "past draws",
    }
    parts = [f"{labels.get(k, k)} removes {v:,.0f}" for k, v in sorted(feas.rejected_by_rule.items(), key=lambda kv: -kv[1]) if v]
    return "; ".join(parts) if parts else "no rule removes any game"


def build_plan(
    request: GenerationRequest,
    run_key: str,
    past_draw_masks: np.ndarray,
    workers: int = 2,
    min_chunk: int = 50_000,
    max_chunk: int = 250_000,
    cache_dir: Path | None = None,
) -> GenerationPlan:
    """Resolve rules, count feasible games and set the caps; raise InfeasibleRequest naming the culprit."""
    k, n, q = request.numbers_per_game, request.highest_number, request.quantity
    space = game_space(k, n)
    rules = space.resolve(request.rules)
    draws = np.sort(past_draw_masks.astype(np.uint64)) if rules.exclude_past_draws else np.zeros(0, np.uint64)
    checker = RuleChecker(rules=rules, k=k, past_draw_masks=draws)
    feas = count_feasible_games(k, n, checker, cache_dir)
    how = "exactly" if feas.exact else "by sampling (estimate)"
    if feas.total < q:
        raise InfeasibleRequest(
            f"the rules leave {feas.total:,.0f} distinct games (counted {how}), fewer than the {q:,} asked for: "
            f"{_describe_funnel(feas, rules)}. Relax the rule that removes most."
        )
    if q > MAX_FEASIBLE_FRACTION * feas.total:
        raise InfeasibleRequest(
            f"{q:,} games is {q / feas.total:.0%} of the {feas.total:,.0f} games the rules allow (counted {how}); "
            f"at most {MAX_FEASIBLE_FRACTION:.0%} can be drawn without repeats in reasonable time. "
            f"Relax a rule ({_describe_funnel(feas, rules)}) or ask for fewer games."
        )
    covered = 0.0
    for r in request.regions:
        covered += feas.by_first[r.first : min(r.last, n) + 1].sum()
    if covered <= 0:
        raise InfeasibleRequest("no region holds any game the rules allow; check the first-number regions")
    regions = []
    for r in request.regions:
        span = slice(r.first, min(r.last, n) + 1)
        feasible = float(feas.by_first[span].sum())
        share = r.share if r.share != EMPTY else feasible / covered
        regions.append(
            RegionPlan(
                label=r.label,
                first=r.first,
                last=min(r.last, n),
                share=share,
                cap=math.ceil(share * q - 1e-9),
                feasible=feasible,
                candidates=float(feas.candidates_by_first[span].sum()),
            )
        )
    total_caps = sum(r.cap for r in regions)
    if total_caps < q:
        raise InfeasibleRequest(
            f"the region caps add up to {total_caps:,}, fewer than the {q:,} games asked for "
            f"(shares add up to {sum(r.share for r in regions):.4f}); raise the shares or cover more first numbers"
        )
    reachable = sum(min(r.cap, math.floor(r.feasible)) for r in regions)
    if reachable < q:
        short = [r for r in regions if r.feasible < r.cap]
        detail = ", ".join(f"region {r.label} holds {r.feasible:,.0f} games under the rules but its cap is {r.cap:,}" for r in short)
        raise InfeasibleRequest(
            f"the regions can hold at most {reachable:,} games, fewer than the {q:,} asked for: {detail}. "
            "Lower those regions' shares or relax the rules."
        )
    fingerprint = hashlib.sha256(
        (request.fingerprint_json() + hashlib.sha256(draws.tobytes()).hexdigest()).encode()
    ).hexdigest()[:16]
    return GenerationPlan(
        request=request,
        run_key=run_key,
        rules=rules,
        regions=tuple(regions),
        feasibility=feas,
        checker=checker,
        scorer=Scorer.for_space(space),
        chunk_quotas=_chunk_quotas(q, workers, min_chunk, max_chunk),
        fingerprint=fingerprint,
    )


def plan_run(
    request: GenerationRequest,
    run_key: str,
    draws_file: Path,
    workers: int,
    min_chunk: int,
    max_chunk: int,
    cache_dir: Path | None = None,
) -> GenerationPlan:
    """`build_plan` with the past draws of `draws_file` (read only when the rules exclude past draws); raises
    DrawsFileError for a missing or malformed file, InfeasibleRequest naming the rule or region."""
    draws = load_past_draws(draws_file) if request.rules.exclude_past_draws else np.zeros(0, np.uint64)
    return build_plan(request, run_key, draws, workers=workers, min_chunk=min_chunk, max_chunk=max_chunk,
                      cache_dir=cache_dir)


def part_ranges(quantity: int, workers: int, max_rows_per_file: int) -> list[tuple[int, int]]:
    """Rank ranges of the spreadsheet files: enough files for every worker to write one at a time."""
    files = math.ceil(quantity / max_rows_per_file)
    if quantity >= PARALLEL_WRITE_MIN_ROWS:
        files = max(files, workers)
    size = math.ceil(quantity / files)
    return [(start, min(start + size, quantity)) for start in range(0, quantity, size)]
