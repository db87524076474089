"""Past Mega-Sena draws from the results spreadsheet Caixa publishes (columns Concurso, Data do Sorteio,
Bola1..Bola6)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from operations.errors import UserError
from operations.infra.tabular import UnreadableFile, cell_text, is_blank, open_records
from operations.lottery.engine import games_to_masks

SAMPLE_RESULTS = Path(__file__).parent / "data" / "mega_sena_results_sample.xlsx"
BALL_COLUMNS = tuple(f"Bola{i}" for i in range(1, 7))


class DrawsFileError(UserError, ValueError):
    """The results file is missing or not in Caixa's format."""


def load_past_draws(path: Path) -> np.ndarray:
    """Masks (uint64) of every draw in the file; raises DrawsFileError naming what is wrong."""
    if not path.exists():
        raise DrawsFileError(f"past draws file {path} does not exist")
    try:
        with open_records(path) as rows:
            draws = _draws(path, rows)
    except UnreadableFile as exc:
        raise DrawsFileError(f"past draws file {path} is not readable: {exc}") from exc
    if not draws:
        return np.zeros(0, dtype=np.uint64)
    return np.unique(games_to_masks(np.array(draws, dtype=np.uint8)))


def _draws(path: Path, rows) -> list[list[int]]:
    """The balls of every draw, the header being the sheet's first row."""
    header = [cell_text(cell) for cell in next(rows, ())]
    missing = [c for c in ("Concurso", *BALL_COLUMNS) if c not in header]
    if missing:
        raise DrawsFileError(f"past draws file {path} lacks the columns {missing} (found {header})")
    idx = [header.index(c) for c in BALL_COLUMNS]
    draws = []
    for line, row in enumerate(rows, start=2):
        if all(is_blank(v) for v in row):
            continue
        try:
            balls = sorted(int(row[i]) for i in idx)
        except (TypeError, ValueError, IndexError) as exc:
            raise DrawsFileError(f"past draws file {path}, row {line}: balls are not numbers") from exc
        if len(set(balls)) != 6 or not all(1 <= b <= 60 for b in balls):
            raise DrawsFileError(f"past draws file {path}, row {line}: {balls} is not a Mega-Sena draw")
        draws.append(balls)
    return draws
