"""Sample participants files for the demo, the benchmarks and the tests.

A file is deterministic for a seed and says what it holds: the `Participant`s that `read_participants` must
give back for it. Files of one seed differ only where asked (`rename_every`), so that a second run can be
checked to write again exactly the participants whose data changed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

from operations.infra.tabular import open_row_writer
from operations.turnstiles.participants import DEFAULT_TIMEZONE, Participant

FIRST_CARD = 10_000_000
_FIRST_NAMES = ("Ana", "Bruno", "Camila", "Diego", "Fernanda", "Gabriel", "Helena", "João", "Larissa", "Marcos",
                "Natália", "Otávio", "Paula", "Rafael", "Sofia", "Thiago")
_SURNAMES = ("Almeida", "Barbosa", "Cardoso", "Costa", "Ferreira", "Gomes", "Lima", "Oliveira", "Pereira",
             "Ribeiro", "Santos", "Silva", "Souza")
_FIRST_DAY = date(2026, 1, 5)
_NO_VALIDITY_EVERY = 4  # with validity, one participant in four has no begin and end


def write_participants_file(
    path: Path,
    count: int,
    *,
    seed: int = 0,
    cards: bool = True,
    groups: Sequence[int] = (1, 2),
    validity: bool = True,
    rename_every: int = 0,
) -> list[Participant]:
    """Write a participants file (.xlsx or .csv, by suffix) of `count` rows, English headers, and return its
    participants as `read_participants(path)` (default time zone) reads them.

    Participant i (1-based) has registration `R{i:06d}` and, with `cards`, card value `FIRST_CARD + i`; with
    `groups`, group `groups[(i - 1) % len(groups)]`; with `validity`, begin and end dates a few weeks apart
    (dates in the .xlsx, `YYYY-MM-DD` text in the .csv), except every fourth participant, who has none. With
    `rename_every` k > 0, participants whose i is a multiple of k get ' Renomeado' after their name.
    """
    zone = ZoneInfo(DEFAULT_TIMEZONE)
    as_text = Path(path).suffix.lower() == ".csv"
    rng = random.Random(seed)
    header = ["registration", "name", *(["card"] if cards else []), *(["group"] if groups else []),
              *(["begin", "end"] if validity else [])]
    participants: list[Participant] = []
    with open_row_writer(path, "Participants") as append:
        append(header)
        for i in range(1, count + 1):
            # Every participant draws the same values whatever is asked, so the files of one seed differ only there.
            name = f"{rng.choice(_FIRST_NAMES)} {rng.choice(_SURNAMES)} {rng.choice(_SURNAMES)}"
            first_day = _FIRST_DAY + timedelta(days=rng.randrange(60))
            last_day = first_day + timedelta(days=rng.randrange(7, 90))
            if rename_every and i % rename_every == 0:
                name += " Renomeado"
            card = FIRST_CARD + i if cards else None
            group = groups[(i - 1) % len(groups)] if groups else None
            dated = validity and i % _NO_VALIDITY_EVERY != 0
            row: list[object] = [f"R{i:06d}", name, *([card] if cards else []), *([group] if groups else [])]
            if validity:
                days = (first_day, last_day) if dated else (None, None)
                row += [day.isoformat() if as_text and day else day for day in days]
            append(row)
            participants.append(Participant(
                row_number=i + 1,
                registration=f"R{i:06d}",
                name=name,
                card=card,
                group=group,
                begin=_unix_seconds(first_day, time.min, zone) if dated else None,
                end=_unix_seconds(last_day, time(23, 59, 59), zone) if dated else None,
            ))
    return participants


def _unix_seconds(day: date, time_of_day: time, zone: ZoneInfo) -> int:
    """A day at `time_of_day` in `zone`: how the reader reads a date without a time."""
    return int(datetime.combine(day, time_of_day, zone).timestamp())
