"""The one retry rule of every task: retry what may heal, never what cannot."""

from __future__ import annotations

from typing import Callable

from prefect import Task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

RetryCondition = Callable[[Task, TaskRun, State], bool]


def retry_transient(permanent: tuple[type[BaseException], ...] = ()) -> RetryCondition:
    """A `retry_condition_fn`: never retry the `permanent` errors; an error that says whether it is transient
    (a `transient` attribute, as the domains' failures do) is retried when it is; anything else unforeseen (a
    worker lost mid-call, a network hiccup) is worth one more try."""

    def condition(task: Task, task_run: TaskRun, state: State) -> bool:
        try:
            state.result()
        except permanent:
            return False
        except Exception as exc:  # noqa: BLE001 - classified below
            return bool(getattr(exc, "transient", True))
        return False

    return condition
