"""DASK_SCHEDULER_ADDRESS: the flow runs on an existing Dask cluster (a `dask scheduler` and two
`dask worker` processes started here, as on other machines) instead of starting a LocalCluster."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest
from distributed import Client

from flows.generate_games import generate_games
from operations.infra.processes import free_port, stop_process_group
from operations.settings import PROJECT_ROOT, get_settings
from run_checks import check_generated_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dask_cluster(prefect_api_url, tmp_path_factory):
    """A scheduler and two single-thread workers; the workers reach the Prefect API and Redis of the tests
    through their environment, as remote workers would through theirs."""
    logs = tmp_path_factory.mktemp("dask")
    address = f"tcp://127.0.0.1:{free_port()}"
    env = dict(os.environ, DASK_LOGGING__DISTRIBUTED="warning")
    commands = [
        ["scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1], "--no-dashboard"],
        *[["worker", address, "--nthreads", "1", "--no-dashboard", "--name", f"remote-{i}"] for i in range(2)],
    ]
    processes = []
    for i, args in enumerate(commands):
        with open(logs / f"dask-{i}.log", "wb") as log:
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "dask", *args],
                    cwd=PROJECT_ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with Client(address, timeout=5) as client:
                    if len(client.scheduler_info(n_workers=-1)["workers"]) == 2:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the dask cluster did not come up"
            time.sleep(0.5)
        yield address
    finally:
        for process in reversed(processes):
            stop_process_group(process.pid, 10)


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
