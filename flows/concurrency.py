"""Prefect global concurrency limits of the flows: created or updated safely when runs do it at once
(`upsert_concurrency_limit`), and the `generate-games` limit that lets one generation at a time run per
machine, whatever deployment starts it (`ensure_games_limit`, `generation_slot`).

The `generate-games` limit has GAMES_CONCURRENCY_LIMIT slots; a generation run holds one around its cluster
work. `make up` creates the limit or sets its slots from the setting (deployments/stack.py); a run that finds no
limit (a server the stack did not set up) creates it from the setting, and never changes the slots of one that
exists (`prefect gcl update generate-games --limit N` holds until the next `make up`).

A slot is held with tasks/slots.py: a run that fails or is cancelled releases it on the way out, and the slot
of a run whose process was killed is freed by the next run that waits for it, within ~20 s of the kill (its
heartbeat stops); a waiting run says every ~30 s what it waits for and which flow run holds the slot.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.exceptions import ObjectAlreadyExists

from operations.cancellation import StopCheck, never
from tasks.slots import held_slot

GAMES_LIMIT = "generate-games"


def upsert_concurrency_limit(client: SyncPrefectClient, name: str, slots: int) -> None:
    """Create the global concurrency limit `name` with `slots`, or set the slots of the existing one.

    Prefect's upsert reads, then creates: two runs starting together both find no limit and one create is
    refused with 409 (seen on the PostgreSQL-backed server). The loser updates the limit the other created."""
    try:
        client.upsert_global_concurrency_limit_by_name(name, slots)
    except ObjectAlreadyExists:
        client.upsert_global_concurrency_limit_by_name(name, slots)  # it exists now: an update


def ensure_games_limit(slots: int, update: bool) -> None:
    """Create the limit with `slots` if it does not exist; with `update`, also set the slots of an existing one."""
    with get_client(sync_client=True) as client:
        if update:
            upsert_concurrency_limit(client, GAMES_LIMIT, slots)
            return
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GAMES_LIMIT, limit=slots))
        except ObjectAlreadyExists:  # `make up` or another run made it: its slots stand
            pass


@contextmanager
def generation_slot(slots: int, logger: logging.Logger | logging.LoggerAdapter,
                    should_stop: StopCheck = never) -> Iterator[float]:
    """Hold a slot of the `generate-games` limit for the block; yields the seconds waited for it. A run that
    has to wait says so at once and every ~30 s (which runs hold the slots), then how long it waited; a
    cancelled run stops waiting."""
    ensure_games_limit(slots, update=False)
    with held_slot(GAMES_LIMIT, logger, what="generation slot", should_stop=should_stop,
                   context=f" by other generation runs (global concurrency limit '{GAMES_LIMIT}', "
                           "GAMES_CONCURRENCY_LIMIT)") as waited:
        yield waited
