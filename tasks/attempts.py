"""Figures that count every attempt of a task, not only the last one.

A task that commits work in units (orders, users, messages) and then fails on a transient fault is retried:
the retry finds the committed units done and does only the rest, so its own figures would show only its
share. `attempt_tally(Factory)` returns the same accumulator to every attempt of one task run (retries run in
the same process, with the same task run id), so the domain code adds to it as each unit is committed and the
task returns the run's whole figures. Outside a task run (unit tests, benchmarks) it is a fresh one each time.
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar
from uuid import UUID

from prefect.context import TaskRunContext

T = TypeVar("T")

_tallies: dict[UUID, object] = {}
_lock = threading.Lock()


def attempt_tally(factory: Callable[[], T]) -> T:
    """The accumulator of the calling task run, created by `factory()` on its first attempt."""
    context = TaskRunContext.get()
    if context is None:
        return factory()
    with _lock:
        tally = _tallies.get(context.task_run.id)
        if tally is None:
            tally = _tallies[context.task_run.id] = factory()
        return tally  # type: ignore[return-value]


def release_tally() -> None:
    """Forget the calling task run's accumulator (call it once the task's figures are returned)."""
    context = TaskRunContext.get()
    if context is not None:
        with _lock:
            _tallies.pop(context.task_run.id, None)
