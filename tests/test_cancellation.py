"""The stop check of a run's work, and figures that count every attempt of a task."""

from __future__ import annotations

import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.states import Cancelling, Running

from operations.cancellation import Cancelled, after, never, raise_if_stopped
from tasks.attempts import attempt_tally
from tasks.cancellation import current_flow_run_id, run_stop_check, watch_termination


def test_a_loop_stops_between_units_once_asked():
    done = []
    should_stop = after(3)
    try:
        for unit in range(10):
            raise_if_stopped(should_stop, f"unit {unit}")
            done.append(unit)
    except Cancelled as exc:
        assert str(exc) == "cancelled before unit 3"
    assert done == [0, 1, 2] and not never()


def test_the_stop_check_follows_the_flow_runs_state(prefect_api_url):
    @flow
    def placeholder() -> None:
        pass

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(placeholder)
        flow_run = client.create_flow_run(placeholder, state=Running())
        should_stop = run_stop_check(flow_run.id, interval=0)
        assert flow_id and not should_stop()
        client.set_flow_run_state(flow_run.id, Cancelling(), force=True)
        assert should_stop()
        assert should_stop()  # sticky once stopped


def test_outside_a_run_the_check_never_stops():
    assert current_flow_run_id() is None and run_stop_check() is never


def test_a_tasks_figures_count_every_attempt(prefect_api_url):
    @task(retries=2, retry_delay_seconds=0)
    def commits_then_fails_twice(units: int) -> int:
        tally = attempt_tally(lambda: {"committed": 0, "attempts": 0})
        tally["attempts"] += 1
        tally["committed"] += units  # committed before the fault
        if tally["attempts"] < 3:
            raise ConnectionResetError("dropped")
        return tally["committed"]

    @flow
    def probe() -> int:
        return commits_then_fails_twice(5)

    assert probe() == 15


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the lost signal, on purpose
def test_watching_for_sigterm_keeps_prefects_bridge_and_notes_a_signal_lost_in_a_callback(prefect_api_url):
    import gc

    from prefect.exceptions import TerminationSignal
    from prefect.utilities.engine import is_prefect_sigterm_handler_installed

    import tasks.cancellation as cancellation

    class RaisesWhenCollected:
        def __del__(self):
            raise TerminationSignal(15)  # as Prefect's handler does when the signal lands in a finalizer

    @flow
    def watching() -> tuple[bool, bool, bool]:
        watch_termination()
        bridge_kept = is_prefect_sigterm_handler_installed()  # the worker's cancel is acknowledged only then
        should_stop = run_stop_check(interval=3600)
        before = should_stop()
        RaisesWhenCollected()
        gc.collect()
        return bridge_kept, before, should_stop()

    try:
        assert watching() == (True, False, True)
    finally:
        cancellation._terminating.clear()
