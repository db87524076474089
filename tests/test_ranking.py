"""The run's ranking: computed once from the chunk files, every writer reading only its slice of it."""

from __future__ import annotations

import numpy as np
import pytest

from operations.lottery.engine import games_to_masks, masks_to_games
from operations.lottery.generation import RepeatedGames, chunk_path, rank_games, rank_run


def _write_chunks(run_dir, masks_per_chunk: list[np.ndarray]) -> list:
    paths = []
    for i, masks in enumerate(masks_per_chunk):
        games = masks_to_games(masks, 6)
        scores = np.round(games.astype(np.int64).sum(axis=1) / 400.0, 6)  # ties on purpose: equal sums
        path = chunk_path(run_dir, i)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, masks=masks, games=games, scores=scores)
        paths.append(path)
    return paths


def _distinct_masks(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    games = np.sort(np.argsort(rng.random((n * 2, 60)), axis=1)[:, :6] + 1, axis=1).astype(np.uint8)
    masks = np.unique(games_to_masks(games))
    return rng.permutation(masks)[:n]


def test_slices_of_the_saved_ranking_are_the_run_ranked_by_score_then_mask(tmp_path):
    masks = _distinct_masks(3_000, seed=3)
    files = _write_chunks(tmp_path, [masks[:1_000], masks[1_000:2_200], masks[2_200:]])
    ranking = rank_run(files, tmp_path)
    games, scores = rank_games(files)
    assert np.all(np.diff(scores) <= 0)
    ties = np.diff(scores) == 0
    ranked_masks = games_to_masks(games)
    assert ties.any() and np.all(ranked_masks[1:][ties] > ranked_masks[:-1][ties]), "equal scores by mask"
    parts = [ranking.slice(start, min(start + 700, 3_000)) for start in range(0, 3_000, 700)]
    assert np.array_equal(np.concatenate([g for g, _ in parts]), games)
    assert np.array_equal(np.concatenate([s for _, s in parts]), scores)
    assert ranking.slice(2_999, 5_000)[0].shape == (1, 6) and ranking.slice(3_000, 3_000)[0].shape == (0, 6)
    again = rank_run(files, tmp_path)  # a retried ranking rewrites the same files, whole
    assert again == ranking and np.array_equal(again.slice(0, 3_000)[0], games)
    assert sorted(p.name for p in (tmp_path / "chunks").iterdir() if "tmp" in p.name) == []


def test_a_game_in_two_chunks_is_refused(tmp_path):
    masks = _distinct_masks(500, seed=4)
    files = _write_chunks(tmp_path, [masks[:300], np.concatenate([masks[300:], masks[10:11]])])
    with pytest.raises(RepeatedGames, match="repeated game"):
        rank_run(files, tmp_path)
    assert not (tmp_path / "chunks" / "ranked-games.npy").exists()
