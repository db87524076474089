"""The Redis counter against a real redis-server: atomic batched claims, caps, repeats, exactly-once chunks."""

from __future__ import annotations

import multiprocessing
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis

from operations.lottery.counter import FirstNumberCounter, RunKeyConflict, SupersededAttempt
from operations.lottery.engine import games_to_masks, sample_uniform_games
from operations.lottery.generation import InjectedFault, generate_chunk
from operations.lottery.parameters import GenerationRequest
from operations.lottery.plan import build_plan

CAPS = [300, 200, 100]


def _region_of(first: np.ndarray) -> np.ndarray:
    return np.minimum((first - 1) // 5, 2)


def _race(url: str, run_key: str, worker: int, out) -> None:
    """One process claiming random candidates (many repeats: a 12-number universe) until the caps are full."""
    counter = FirstNumberCounter(redis.Redis.from_url(url), "test", run_key)
    token = uuid.uuid4().hex
    counter.begin_chunk(worker, token, len(CAPS))
    rng = np.random.default_rng(worker)
    accepted = []
    for _ in range(60):
        games = sample_uniform_games(rng, 200, 6, 14)
        masks = games_to_masks(games)
        res = counter.claim(worker, token, 10_000, masks, games[:, 0], _region_of(games[:, 0]), len(CAPS))
        accepted.extend(int(m) for m in masks[res.accepted])
    out.put(accepted)


def test_racing_processes_never_exceed_caps_nor_repeat(redis_url):
    run_key = f"race-{uuid.uuid4().hex[:8]}"
    counter = FirstNumberCounter(redis.Redis.from_url(redis_url), "test", run_key)
    counter.initialise("fp", 600, CAPS)
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(redis_url, run_key, w, out)) for w in range(3)]
    for p in procs:
        p.start()
    claimed = [m for _ in procs for m in out.get(timeout=120)]
    for p in procs:
        p.join(timeout=60)
    assert len(claimed) == len(set(claimed)), "a game was accepted twice"
    counts = counter.region_counts(len(CAPS))
    assert all(c <= cap for c, cap in zip(counts, CAPS))
    assert sum(counts) == len(claimed) == counter.seen_count() == counter.snapshot()["total_generated"]
    firsts = [min(i + 1 for i in range(64) if m >> i & 1) for m in claimed]
    by_region = np.bincount(_region_of(np.array(firsts)), minlength=3)
    assert by_region.tolist() == counts
    counter.delete_run()


def test_snapshot_has_the_seeds_format(redis_client):
    counter = FirstNumberCounter(redis_client, "test", f"snap-{uuid.uuid4().hex[:8]}")
    counter.initialise("fp", 10, [10])
    counter.begin_chunk(0, "t", 1)
    games = np.array([[1, 2, 3, 4, 5, 6], [1, 3, 5, 7, 9, 11], [2, 4, 6, 8, 10, 12]], dtype=np.uint8)
    counter.claim(0, "t", 10, games_to_masks(games), games[:, 0], np.zeros(3, int), 1)
    assert counter.snapshot() == {"counter": {"1": 2, "2": 1}, "total_generated": 3}
    counter.delete_run()


def test_run_key_reused_with_other_parameters_is_refused(redis_client):
    counter = FirstNumberCounter(redis_client, "test", f"conflict-{uuid.uuid4().hex[:8]}")
    assert counter.initialise("a", 10, [10]) is False
    assert counter.initialise("a", 10, [10]) is True
    with pytest.raises(RunKeyConflict):
        counter.initialise("b", 10, [10])
    counter.delete_run()


def test_a_superseded_attempt_cannot_claim_or_commit(redis_client):
    counter = FirstNumberCounter(redis_client, "test", f"sup-{uuid.uuid4().hex[:8]}")
    counter.initialise("fp", 10, [10])
    counter.begin_chunk(0, "old", 1)
    counter.begin_chunk(0, "new", 1)
    games = np.array([[1, 2, 3, 4, 5, 6]], dtype=np.uint8)
    with pytest.raises(SupersededAttempt):
        counter.claim(0, "old", 10, games_to_masks(games), games[:, 0], np.zeros(1, int), 1)
    with pytest.raises(SupersededAttempt):
        counter.commit_chunk(0, "old", {})
    counter.delete_run()


@pytest.fixture
def small_plan():
    return build_plan(GenerationRequest(quantity=30_000, seed=7), "exact-once", np.zeros(0, np.uint64),
                      min_chunk=1_000, max_chunk=10_000)


def test_a_chunk_retried_after_a_fault_after_its_claims_counts_once(redis_client, small_plan, tmp_path: Path):
    run_key = f"retry-{uuid.uuid4().hex[:8]}"
    plan = small_plan.__class__(**{**small_plan.__dict__, "run_key": run_key})
    counter = FirstNumberCounter(redis_client, "test", run_key)
    counter.initialise(plan.fingerprint, 30_000, [r.cap for r in plan.regions])
    quota = plan.chunk_quotas[1]
    counter.inject_faults(1, failures=2)
    for _ in range(2):
        with pytest.raises(InjectedFault):
            generate_chunk(plan, counter, 1, tmp_path)
        # the failed attempt's claims are still counted until the next attempt releases them
        assert counter.snapshot()["total_generated"] == quota
    result = generate_chunk(plan, counter, 1, tmp_path)
    assert result.released == quota and result.games == quota
    # every candidate drawn is accounted for: kept, failed a rule, repeated, region full or past the quota
    assert result.candidates == (result.games + sum(result.rejected_by_rule.values()) + result.repeats
                                 + result.region_full + result.unused)
    assert counter.snapshot()["total_generated"] == quota == counter.seen_count()
    # a recomputation of the finished chunk (Dask after a worker death) returns the committed result
    again = generate_chunk(plan, counter, 1, tmp_path)
    assert again.resumed and again.games == quota
    assert counter.snapshot()["total_generated"] == quota
    saved = np.load(result.path)["masks"]
    assert len(saved) == quota == len(np.unique(saved))
    counter.delete_run()


def test_the_first_attempts_chunking_is_kept(redis_client):
    counter = FirstNumberCounter(redis_client, "test", f"chunking-{uuid.uuid4().hex[:8]}")
    counter.initialise("a", 10, [10])
    assert counter.pin_chunk_quotas((4, 3, 3)) == (4, 3, 3)
    assert counter.pin_chunk_quotas((5, 5)) == (4, 3, 3)
    counter.delete_run()
