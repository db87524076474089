"""How a flow ends on an expected user error: Failed, with the error's message as one log line, no traceback.

Put `@ends_failed_on_user_error` under `@flow` (of a `def` or an `async def` function). A `UserError`
(operations/errors.py) raised by the flow body, or by a task whose result the body reads, becomes the run's
final state `Failed(message=...)`, logged once at ERROR without a traceback; every other exception propagates,
so Prefect logs it with its traceback. The error itself stays the state's data: `state.result()` raises it,
`state.result(raise_on_failure=False)` returns it.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Callable, TypeVar

from prefect import get_run_logger
from prefect.states import Failed

from operations.errors import UserError

F = TypeVar("F", bound=Callable)


def user_error_state(exc: BaseException):
    """The final state of a run that stopped on the user error `exc` (logged as one line)."""
    get_run_logger().error("%s", exc)
    return Failed(message=str(exc), data=exc)


def ends_failed_on_user_error(fn: F) -> F:
    """Decorate a flow function (under `@flow`): user errors end the run Failed with their message alone."""
    expected, failed = UserError, user_error_state  # in the closure: the wrapper runs in `fn`'s globals

    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except expected as exc:
            return failed(exc)

    async def run_async(*args, **kwargs):  # an `async def` flow stays one: Prefect runs it on its async engine
        try:
            return await fn(*args, **kwargs)
        except expected as exc:
            return failed(exc)

    body = run_async if inspect.iscoroutinefunction(fn) else run
    # Prefect resolves a flow's string annotations (`from __future__ import annotations`) in the globals of the
    # function it is given: the wrapper takes `fn`'s, so the parameters validate as they would undecorated.
    wrapper = types.FunctionType(body.__code__, fn.__globals__, fn.__name__, None, body.__closure__)
    return functools.wraps(fn)(wrapper)  # type: ignore[return-value]
