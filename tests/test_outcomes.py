"""Expected user errors end a flow run Failed with one clear line and no traceback; other errors keep theirs
(the session's real Prefect server holds the logs)."""

from __future__ import annotations

import asyncio

import pytest
from prefect import flow, task
from prefect.utilities.callables import parameter_schema
from pydantic import Field
from typing_extensions import Annotated

from flows.forms import form_field
from flows.outcomes import ends_failed_on_user_error
from operations.errors import UserError, is_user_error
from run_checks import run_texts


class _BadInput(UserError, ValueError):
    pass


@task
def _check(value: int) -> int:
    if value < 0:
        raise _BadInput(f"value {value} is negative: give 0 or more")
    return value


@flow(name="outcome-probe")
@ends_failed_on_user_error
def _probe(
    value: Annotated[int, Field(ge=-10, le=10)] = form_field(1, "Value", "A number.", ), bug: bool = False
) -> int:
    if bug:
        raise RuntimeError("an unexpected fault")
    if value == -1:
        raise _BadInput("value -1 is refused: give 0 or more")
    return _check.submit(value).result()


def test_user_errors_are_told_apart_from_faults():
    assert is_user_error(_BadInput("x")) and not is_user_error(ValueError("x"))
    assert _BadInput("x").transient is False


def test_the_decorated_flow_keeps_its_parameter_form_and_validation():
    schema = parameter_schema(_probe).model_dump()
    assert schema["properties"]["value"]["title"] == "Value"
    assert (schema["properties"]["value"]["minimum"], schema["properties"]["value"]["maximum"]) == (-10, 10)
    assert _probe(value=3) == 3
    with pytest.raises(Exception, match="less than or equal to 10"):
        _probe(value=11)


@pytest.mark.parametrize("value", [-1, -2], ids=["in-the-flow", "in-a-task"])
def test_a_user_error_fails_the_run_with_one_line_and_no_traceback(value):
    state = _probe(value=value, return_state=True)
    assert state.is_failed()
    assert "is negative" in state.message or "is refused" in state.message
    error = state.result(raise_on_failure=False)
    assert isinstance(error, _BadInput)
    with pytest.raises(_BadInput):
        state.result()
    texts = run_texts(state.state_details.flow_run_id)
    flow_lines = [t for t in texts if "give 0 or more" in t]
    assert flow_lines, texts
    if value == -1:  # raised by the flow itself: no traceback anywhere in the run's logs
        assert not [t for t in texts if "Traceback" in t], texts


def test_an_unexpected_error_keeps_its_traceback():
    state = _probe(bug=True, return_state=True)
    assert state.is_failed()
    texts = run_texts(state.state_details.flow_run_id)
    assert any("Traceback" in t and "an unexpected fault" in t for t in texts), texts


@flow(name="outcome-probe-async")
@ends_failed_on_user_error
async def _probe_async(value: Annotated[int, Field(ge=-10, le=10)] = form_field(1, "Value", "A number.")) -> int:
    if value == -1:
        raise _BadInput("value -1 is refused: give 0 or more")
    return _check(value)


def test_an_async_flow_stays_async_and_a_user_error_fails_it_with_one_line():
    assert _probe_async.isasync, "Prefect runs it on its async engine"
    assert parameter_schema(_probe_async).model_dump()["properties"]["value"]["title"] == "Value"
    assert asyncio.run(_probe_async(value=3)) == 3
    state = asyncio.run(_probe_async(value=-1, return_state=True))
    assert state.is_failed() and state.message == "value -1 is refused: give 0 or more"
    assert isinstance(state.result(raise_on_failure=False), _BadInput)
    texts = run_texts(state.state_details.flow_run_id)
    assert [t for t in texts if "give 0 or more" in t] and not [t for t in texts if "Traceback" in t], texts
