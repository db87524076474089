"""Generation of one chunk of games against the shared counter, and the run's final ranking."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from operations.lottery.counter import FirstNumberCounter
from operations.lottery.engine import games_to_masks, masks_to_games, rank_order, sample_games_by_first_number
from operations.lottery.plan import GenerationPlan

MAX_CANDIDATES_PER_CLAIM = 30_000
MAX_EMPTY_ROUNDS = 200


class GenerationStalled(RuntimeError):
    """A chunk could not find new games: the rules and caps leave too few (permanent, not retried)."""


class RepeatedGames(RuntimeError):
    """The chunks of a run hold the same game twice: the counter's claims were bypassed (permanent)."""


class InjectedFault(RuntimeError):
    """A failure injected on purpose after a chunk's claims (chaos drills and tests)."""


@dataclass
class ChunkResult:
    chunk: int
    games: int
    path: str
    candidates: int = 0
    rejected_by_rule: dict[str, int] = field(default_factory=dict)
    repeats: int = 0
    region_full: int = 0
    unused: int = 0  # passed the rules, drawn past the chunk's quota: never claimed
    released: int = 0
    seconds: float = 0.0
    resumed: bool = False

    def to_json(self) -> dict:
        return asdict(self)


def chunk_path(run_dir: Path, chunk: int) -> Path:
    return run_dir / "chunks" / f"chunk-{chunk:05d}.npz"


def pending_chunks(chunks: int, committed: set[int] | list[int], run_dir: Path) -> list[int]:
    """The chunks a run still has to generate: those not committed, or whose file is gone."""
    done = set(committed)
    return [i for i in range(chunks) if i not in done or not chunk_path(run_dir, i).exists()]


def _save_atomically(path: Path, save: Callable[[BinaryIO], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as fh:
            save(fh)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def generate_chunk(
    plan: GenerationPlan, counter: FirstNumberCounter, chunk: int, run_dir: Path
) -> ChunkResult:
    """Generate chunk `chunk`'s quota of distinct games, claimed through the shared counter.

    Idempotent: an already committed chunk returns its saved result; a new attempt releases the claims of
    any earlier attempt of the same chunk before claiming its own.
    """
    started = time.perf_counter()
    quota = plan.chunk_quotas[chunk]
    n_regions = len(plan.regions)
    token = uuid.uuid4().hex
    start = counter.begin_chunk(chunk, token, n_regions)
    if start.committed is not None and Path(start.committed["path"]).exists():
        return ChunkResult(**{**start.committed, "resumed": True})
    region_of = plan.region_of_first()
    rng = np.random.default_rng([plan.request.seed, chunk])
    counts = start.region_counts
    result = ChunkResult(chunk=chunk, games=0, path=str(chunk_path(run_dir, chunk)), released=start.released)
    accepted: list[np.ndarray] = []
    need, empty_rounds = quota, 0
    while need > 0:
        weights = plan.first_number_weights(counts)
        if weights.sum() <= 0:
            raise GenerationStalled(f"chunk {chunk}: every first-number region is full with {need} games to go")
        acceptance = max(plan.expected_acceptance(weights), 0.01)
        size = int(min(MAX_CANDIDATES_PER_CLAIM, max(256, need * 1.15 / acceptance)))
        games = _sample(plan, rng, size, weights)
        masks = games_to_masks(games)
        ok, rejected = plan.checker.check(games, masks)
        for rule, n in rejected.items():
            result.rejected_by_rule[rule] = result.rejected_by_rule.get(rule, 0) + n
        result.candidates += size
        games, masks = games[ok], masks[ok]
        firsts = games[:, 0]
        claim = counter.claim(chunk, token, need, masks, firsts, region_of[firsts], n_regions)
        result.repeats += claim.repeats
        result.region_full += claim.region_full
        counts = claim.region_counts
        got = int(np.count_nonzero(claim.accepted))
        result.unused += len(games) - got - claim.repeats - claim.region_full
        if got:
            accepted.append(masks[claim.accepted])
            need -= got
            empty_rounds = 0
        else:
            empty_rounds += 1
            if empty_rounds >= MAX_EMPTY_ROUNDS:
                raise GenerationStalled(
                    f"chunk {chunk}: {MAX_EMPTY_ROUNDS} rounds found no new game ({need} to go); "
                    "the rules and caps leave too few games"
                )
    if counter.take_fault(chunk):
        raise InjectedFault(f"chunk {chunk}: failure injected after claiming {quota} games")
    chunk_masks = np.concatenate(accepted) if accepted else np.zeros(0, np.uint64)
    games = masks_to_games(chunk_masks, plan.k)
    scores = plan.scorer.score(games)
    _save_atomically(
        chunk_path(run_dir, chunk), lambda fh: np.savez(fh, masks=chunk_masks, games=games, scores=scores)
    )
    result.games = len(chunk_masks)
    result.seconds = round(time.perf_counter() - started, 3)
    counter.commit_chunk(chunk, token, result.to_json())
    return result


def _sample(plan: GenerationPlan, rng: np.random.Generator, size: int, weights: np.ndarray) -> np.ndarray:
    return sample_games_by_first_number(
        rng, size, plan.k, plan.n, weights, plan.rules.excluded, plan.rules.required
    )


def rank_games(chunk_files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Every chunk's (already scored) games, sorted by score descending across the whole run (ties by mask)."""
    parts = []
    for path in chunk_files:
        with np.load(path) as data:
            parts.append((data["masks"], data["games"], data["scores"]))
    masks = np.concatenate([p[0] for p in parts])
    scores = np.concatenate([p[2] for p in parts])
    order = rank_order(scores, masks)
    ranked_masks = masks[order]
    # one game has one score, so in this order a repeated game sits right after itself
    if np.any(ranked_masks[1:] == ranked_masks[:-1]):
        raise RepeatedGames("the chunks hold a repeated game; the counter's claims were bypassed")
    return np.concatenate([p[1] for p in parts])[order], scores[order]


@dataclass(frozen=True)
class Ranking:
    """A run's games and scores in rank order, two .npy files: each spreadsheet writer maps just its slice."""

    games: Path
    scores: Path

    def slice(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Ranks start+1..stop, read from the files (memory-mapped: the rest of the run is never loaded)."""
        games = np.load(self.games, mmap_mode="r")[start:stop]
        scores = np.load(self.scores, mmap_mode="r")[start:stop]
        return np.asarray(games), np.asarray(scores)


def rank_run(chunk_files: list[Path], run_dir: Path) -> Ranking:
    """Rank the whole run once (rather than in every writer: at 10M games that is seconds and ~0.5 GB each)
    and save it beside the chunks, atomically (a retried or re-run ranking rewrites the same files)."""
    games, scores = rank_games(chunk_files)
    ranking = Ranking(games=run_dir / "chunks" / "ranked-games.npy", scores=run_dir / "chunks" / "ranked-scores.npy")
    _save_atomically(ranking.games, lambda fh: np.save(fh, games))
    _save_atomically(ranking.scores, lambda fh: np.save(fh, scores))
    return ranking
