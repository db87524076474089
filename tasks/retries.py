"""The one retry mechanism of the tasks: retry what may heal, never what cannot.

`retrying_task(retries=..., delays=..., permanent=...)` is `@task` with the retry rule (`retry_transient`), the
delays and their jitter; `with_retries(task, n)` is the same task with `n` retries (a count from settings,
chosen by the flow that runs it), its delays kept; `retrying_step` the same rule for a stage of a flow's own body
that is not a task run.
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Sequence
from typing import Callable, TypeVar

from prefect import Task, task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

RetryCondition = Callable[[Task, TaskRun, State], bool]
T = TypeVar("T")
JITTER = 0.5  # each delay varies by up to half of it, so retries of many tasks do not arrive together
# OS errors that may heal on their own (a busy or interrupted call, a network hiccup); any other (no such file,
# no permission, disk full, read-only) fails the same way on every attempt.
TRANSIENT_ERRNOS = frozenset({
    errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
    errno.ECONNABORTED, errno.EPIPE, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.ESTALE,
})


def is_transient(exc: BaseException) -> bool:
    """Whether a retry may help: an error that says (a `transient` attribute, as the domains' failures and
    UserError do) is taken at its word; an OSError heals only when it is a connection or timeout error or its
    errno is in TRANSIENT_ERRNOS; anything else unforeseen (a worker lost mid-call) is worth one more try."""
    said = getattr(exc, "transient", None)
    if said is not None:
        return bool(said)
    if isinstance(exc, OSError):
        return isinstance(exc, (ConnectionError, TimeoutError)) or exc.errno in TRANSIENT_ERRNOS
    return True


def retry_transient(permanent: tuple[type[BaseException], ...] = ()) -> RetryCondition:
    """A `retry_condition_fn`: never retry the `permanent` errors; otherwise retry what `is_transient`."""
    def condition(task: Task, task_run: TaskRun, state: State) -> bool:
        try:
            state.result()
        except permanent:
            return False
        except Exception as exc:  # noqa: BLE001 - classified below
            return is_transient(exc)
        return False
    return condition


def retrying_task(
    *, retries: int, delays: Sequence[float], permanent: tuple[type[BaseException], ...] = (), **task_options
) -> Callable[[Callable], Task]:
    """`@task(**task_options)` that retries transient failures `retries` times after `delays` seconds (the last
    one repeated), with jitter, and never the `permanent` errors."""
    return task(
        retries=retries,
        retry_delay_seconds=list(delays),
        retry_jitter_factor=JITTER,
        retry_condition_fn=retry_transient(permanent),
        **task_options,
    )


def with_retries(task_: Task, retries: int, delays: Sequence[float] | None = None) -> Task:
    """`task_` with `retries` retries (a count from settings) and, when given, those `delays`; its jitter and
    retry rule are kept."""
    options: dict = {} if retries == task_.retries else {"retries": retries}
    if delays is not None:
        options["retry_delay_seconds"] = list(delays)
    return task_.with_options(**options) if options else task_


def retrying_step(step: Callable[[], T], *, retries: int, delays: Sequence[float], what: str,
                  logger: logging.Logger | logging.LoggerAdapter) -> T:
    """`step()`, tried again `retries` times after `delays` seconds (the last one repeated, with the tasks'
    jitter) when it fails with what may heal (`is_transient`); what cannot heal is raised at once. For a stage
    of a flow's own body that is no task run (a task run costs its own start and end on the API)."""
    for attempt in range(retries + 1):
        try:
            return step()
        except Exception as exc:  # noqa: BLE001 - classified: what cannot heal is raised at once
            if attempt == retries or not is_transient(exc):
                raise
            delay = delays[min(attempt, len(delays) - 1)] * (1 + random.uniform(-JITTER, JITTER))
            logger.warning("%s failed (%s); trying again in %.1f s", what, exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # the loop returns or raises
