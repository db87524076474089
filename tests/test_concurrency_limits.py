"""Global concurrency limits created by runs that start together (the session's PostgreSQL-backed server)."""

from __future__ import annotations

import threading
import uuid

from prefect.client.orchestration import get_client

from flows.concurrency import upsert_concurrency_limit


def _race(names: list[str], slots: int) -> list[BaseException]:
    """4 clients upserting each name at the same moment (Prefect's own upsert fails this with 409s here)."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def one() -> None:
        with get_client(sync_client=True) as client:
            for name in names:
                try:
                    barrier.wait(timeout=30)
                    upsert_concurrency_limit(client, name, slots)
                except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                    errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return errors


def test_runs_creating_the_same_limit_at_once_all_succeed_and_leave_one_limit():
    names = [f"race-{uuid.uuid4().hex[:8]}" for _ in range(15)]
    assert _race(names, 3) == []
    with get_client(sync_client=True) as client:
        for name in names:
            assert client.read_global_concurrency_limit_by_name(name).limit == 3
            client.delete_global_concurrency_limit_by_name(name)
