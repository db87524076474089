"""Checks of a finished flow run read back from the Prefect server: where its task runs ran, and how it ended
on an expected user error."""

from __future__ import annotations

from run_checks import run_texts


def assert_failed_in_one_line(state, *words: str) -> None:
    """The run ended Failed on an expected user error: its message and its log name the problem (every one of
    `words`), and no log line or artifact holds a traceback."""
    assert state.is_failed(), state
    assert all(word in state.message for word in words), state.message
    texts = run_texts(state.state_details.flow_run_id)
    assert any(all(word in text for word in words) for text in texts), texts
    assert not [text for text in texts if "Traceback" in text], texts


def task_runs_of_flow_run(flow_run_id) -> tuple[list, list]:
    """(the task runs of the flow run `flow_run_id`, its subflow runs)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id]))
        )
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
        )
    return runs, children
