"""Task runners built from settings, on real Dask clusters."""

from __future__ import annotations

import logging

import httpx
import pytest
from prefect import flow, task
from prefect_dask import DaskTaskRunner

from flows.dask_runners import LocalDaskTaskRunner
from flows.task_runners import LocalClusterInBackground, dask_task_runner, in_process_task_runner
from operations.settings import DaskSettings, Settings

DASHBOARD_LINE = "The Dask dashboard is available at "


@task
def _double(x: int) -> int:
    return 2 * x


def _run_on(runner) -> int:
    @flow(task_runner=runner)
    def doubled() -> int:
        return _double.submit(21).result()

    return doubled()


@pytest.fixture
def task_runner_lines():
    """INFO lines of prefect's task runner loggers (the suite runs with PREFECT_LOGGING_LEVEL=WARNING)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    parent = logging.getLogger("prefect.task_runner")
    level = parent.level
    parent.setLevel(logging.INFO)
    parent.addHandler(handler)
    yield records
    parent.removeHandler(handler)
    parent.setLevel(level)


def test_no_dashboard_line_for_a_local_cluster_started_without_dashboard(task_runner_lines):
    settings = Settings(dask=DaskSettings(n_workers=1))
    cluster = LocalClusterInBackground(settings)
    try:
        runner = cluster.task_runner()
        assert isinstance(runner, LocalDaskTaskRunner)
        assert _run_on(runner) == 42
        assert _run_on(DaskTaskRunner(address=runner.address)) == 42  # the same cluster through prefect-dask's own
    finally:
        cluster.close()
    lines = [r.getMessage() for r in task_runner_lines]
    [baseline] = [line for line in lines if line.startswith(DASHBOARD_LINE)]  # only the plain runner's
    link = baseline.removeprefix(DASHBOARD_LINE)
    assert link.endswith("/status"), baseline
    assert any("Connecting to an existing Dask cluster" in line for line in lines), lines  # our runner did log


def test_the_dashboard_link_prefect_dask_prints_serves_no_dashboard():
    """Why the line is dropped: with dashboard_address=None the scheduler answers /health but has no dashboard."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        link = cluster.dashboard_link
        assert link.endswith("/status")
        assert httpx.get(link, timeout=10).status_code == 404
        assert httpx.get(link.replace("/status", "/health"), timeout=10).text == "ok"


@task
def _add(x: int, y: int) -> int:
    return x + y


@pytest.mark.parametrize("kind", ["threads", "dask"])
def test_a_runner_used_inside_a_flow_run_runs_its_tasks_as_the_flow_runs_own(kind, task_runner_lines):
    """A runner chosen per task inside the flow (no subflow): its task runs belong to the calling flow run,
    on a thread pool as on Dask process workers (prefect-dask's client carries the flow-run context). The Dask
    runner of settings starts a LocalCluster of its own and drops the dashboard line too."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.futures import as_completed
    from prefect.runtime import flow_run
    from prefect.utilities.annotations import unmapped

    settings = Settings(dask=DaskSettings(n_workers=1))

    @flow
    def parent() -> tuple[list[int], int, str]:
        runner = in_process_task_runner(settings) if kind == "threads" else dask_task_runner(settings)
        with runner:
            mapped = runner.map(_add, {"x": [1, 2, 3], "y": unmapped(10)})
            sums = sorted(f.result() for f in as_completed(mapped))
            single = runner.submit(_add, {"x": 20, "y": 22}).result()
        return sums, single, str(flow_run.get_id())

    if kind == "dask":
        assert isinstance(dask_task_runner(settings), LocalDaskTaskRunner)
    state = parent(return_state=True)
    sums, single, run_id = state.result()
    assert (sums, single) == ([11, 12, 13], 42)
    if kind == "dask":
        lines = [r.getMessage() for r in task_runner_lines]
        assert any("Creating a new Dask cluster" in line for line in lines), lines
        assert not [line for line in lines if line.startswith(DASHBOARD_LINE)], lines
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id={"any_": [run_id]}))
        assert not runs, "a subflow run was created"
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    assert len(task_runs) == 4 and {str(t.flow_run_id) for t in task_runs} == {run_id}
    assert all(t.state.is_completed() for t in task_runs)
