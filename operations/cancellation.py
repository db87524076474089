"""Stopping between units of work: the domains' loops take a plain `should_stop` callable.

A cancelled run must start no new chunk, batch, page or device write within seconds, whatever happened to the
SIGTERM the worker sends (it may land in a library's callback and be lost). So every loop that commits work in
units asks `should_stop()` before the next unit and raises `Cancelled` when it answers True: what was committed
stays committed, and the caller reports it. The callable comes from the task layer (tasks/cancellation.py: the
run's state through the Prefect API, the worker's cancel intent, the process's SIGTERM); here it is only a
`Callable[[], bool]`, so the domains stay free of Prefect and their tests pass `never` or a counter.
"""

from __future__ import annotations

from typing import Callable

from operations.errors import UserError

StopCheck = Callable[[], bool]


class Cancelled(UserError):
    """The run was cancelled; the work stopped between two units (what was committed before stays)."""


def never() -> bool:
    """The stop check of work that is never cancelled (unit tests, benchmarks, command-line tools)."""
    return False


def raise_if_stopped(should_stop: StopCheck, before: str) -> None:
    """Raise `Cancelled` if `should_stop()`; `before` names the unit not started (for the message)."""
    if should_stop():
        raise Cancelled(f"cancelled before {before}")


def after(count: int) -> StopCheck:
    """A stop check that answers True from its `count + 1`-th call on (tests: stop after `count` units)."""
    calls = 0

    def check() -> bool:
        nonlocal calls
        calls += 1
        return calls > count

    return check
