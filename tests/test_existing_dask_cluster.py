"""DASK_SCHEDULER_ADDRESS: the flow runs on an existing Dask cluster (the session's `dask scheduler` and two
`dask worker` processes, as on other machines: tests/conftest.py) instead of starting a LocalCluster."""

from __future__ import annotations

import uuid

import pytest
from distributed import Client

from flows.generate_games import generate_games
from operations.settings import get_settings
from run_checks import check_generated_run

pytestmark = pytest.mark.slow


def test_the_flow_runs_its_tasks_on_the_configured_cluster(dask_cluster, settings, monkeypatch):
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", dask_cluster)
    monkeypatch.setenv("DASK_N_WORKERS", "5")  # ignored: the cluster's own size counts
    monkeypatch.setenv("IN_PROCESS_MAX_QUANTITY", "0")
    monkeypatch.setenv("MIN_GAMES_PER_CHUNK", "1000")
    monkeypatch.setenv("MAX_GAMES_PER_CHUNK", "5000")
    get_settings.cache_clear()

    def executed(dask_worker) -> int:
        return dask_worker.state.executed_count

    with Client(dask_cluster) as client:
        before = client.run(executed)
        quantity = 50_000
        state = generate_games(quantity=quantity, run_key=f"remote-{uuid.uuid4().hex[:6]}", return_state=True)
        assert state.is_completed(), state.message
        after = client.run(executed)
    result = state.result()
    check_generated_run(result["spreadsheets"], result["counter_snapshot"], quantity)
    assert len(result["spreadsheets"]) == 2, "one spreadsheet per worker of the cluster"
    done = {worker: after[worker] - before[worker] for worker in after}
    assert len(done) == 2 and all(n > 0 for n in done.values()), done
    assert sum(done.values()) == result["chunks"] + 1 + len(result["spreadsheets"])  # chunks, ranking, files
