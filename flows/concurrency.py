"""Prefect global concurrency limits of the flows: created or updated safely when runs do it at once
(`upsert_concurrency_limit`), and the `generate-games` limit that lets one generation at a time run per
machine, whatever deployment starts it (`ensure_games_limit`, `generation_slot`).

The `generate-games` limit has GAMES_CONCURRENCY_LIMIT slots; a generation run holds one around its cluster
work. `make up` creates the limit or sets its slots from the setting (deployments/stack.py); a run that finds no
limit (a server the stack did not set up) creates it from the setting, and never changes the slots of one that
exists (`prefect gcl update generate-games --limit N` holds until the next `make up`).

A slot is a lease the run renews while it works: a run that fails or is cancelled releases it on the way out,
and the slot of a run whose process was killed returns when its lease runs out (LEASE_SECONDS, plus up to the
server's 15 s repossessor loop).
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack, contextmanager
from typing import Iterator

from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency.sync import concurrency
from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
from prefect.exceptions import ObjectAlreadyExists
from prefect.runtime import flow_run

GAMES_LIMIT = "generate-games"
# The server's shortest lease: a killed run's slot is back within ~75 s. Prefect renews it every 3/4 of it (45 s),
# retrying a failed renewal, so a renewal has 15 s to get through.
LEASE_SECONDS = 60
WAIT_LOG_SECONDS = 60  # while waiting, a line this often


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


def _slot(max_retries: int | None = None, timeout_seconds: float | None = None):
    run_id = flow_run.get_id()
    return concurrency(
        GAMES_LIMIT,
        strict=True,  # the limit was ensured: its absence now is an error, not a run without a limit
        max_retries=max_retries,
        timeout_seconds=timeout_seconds,
        lease_duration=LEASE_SECONDS,
        holder=ConcurrencyLeaseHolder(type="flow_run", id=run_id) if run_id else None,
        # A renewal that fails (the server busy or restarting) must not stop a run that holds its cores.
        raise_on_lease_renewal_failure=False,
    )


@contextmanager
def generation_slot(slots: int, logger: logging.Logger | logging.LoggerAdapter) -> Iterator[float]:
    """Hold a slot of the `generate-games` limit for the block; yields the seconds waited for it. A run that
    has to wait says so at once and every WAIT_LOG_SECONDS, then how long it waited."""
    ensure_games_limit(slots, update=False)
    started = time.monotonic()
    with ExitStack() as held:
        try:
            held.enter_context(_slot(max_retries=0))  # free: no line
        except ConcurrencySlotAcquisitionError as exc:
            if getattr(getattr(exc.__cause__, "response", None), "status_code", None) != 423:  # 423: all taken
                raise
            while not _waited_for_slot(held, logger, started):
                pass
            logger.info("generation slot taken after waiting %.1f s", time.monotonic() - started)
        yield time.monotonic() - started


def _waited_for_slot(held: ExitStack, logger: logging.Logger | logging.LoggerAdapter, started: float) -> bool:
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(GAMES_LIMIT)
    logger.info(
        "waiting for a generation slot: %d of %d taken by other generation runs (global concurrency limit "
        "'%s', GAMES_CONCURRENCY_LIMIT); %.0f s so far", limit.active_slots, limit.limit, GAMES_LIMIT,
        time.monotonic() - started,
    )
    try:
        held.enter_context(_slot(timeout_seconds=WAIT_LOG_SECONDS))
    except TimeoutError:
        return False
    return True
