"""Prefect global concurrency limits created or updated by flows, safe when two runs do it at once."""

from __future__ import annotations

from prefect.client.orchestration import SyncPrefectClient
from prefect.exceptions import ObjectAlreadyExists


def upsert_concurrency_limit(client: SyncPrefectClient, name: str, slots: int) -> None:
    """Create the global concurrency limit `name` with `slots`, or set the slots of the existing one.

    Prefect's upsert reads, then creates: two runs starting together both find no limit and one create is
    refused with 409 (seen on the PostgreSQL-backed server). The loser updates the limit the other created."""
    try:
        client.upsert_global_concurrency_limit_by_name(name, slots)
    except ObjectAlreadyExists:
        client.upsert_global_concurrency_limit_by_name(name, slots)  # it exists now: an update
