"""The stop check of a run's work (operations/cancellation.py): True once the run is being cancelled.

Three signs, cheapest first:
- the worker's cancel intent, which Prefect's control channel records in the flow's process before the worker
  sends SIGTERM;
- a SIGTERM this process received (`watch_termination()`, called by the flow, notes it even when the
  `TerminationSignal` that Prefect raises from it is swallowed, e.g. inside a library's callback);
- the flow run's state through the API (CANCELLING, CANCELLED or CRASHED), asked at most every `interval`
  seconds per process and run, which also reaches tasks on Dask workers in other processes.
An unreachable API answers "not stopped": an outage must not look like a cancel.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import TerminationSignal

from operations.cancellation import StopCheck, never

STOPPED_STATES = frozenset({StateType.CANCELLING, StateType.CANCELLED, StateType.CRASHED})
logger = logging.getLogger(__name__)

_terminating = threading.Event()
_pollers: dict[UUID, _StatePoller] = {}
_pollers_lock = threading.Lock()


def watch_termination(forward: bool = True) -> None:
    """Note a SIGTERM in this process even when the exception it raises is lost. Call it in the flow's body.

    `forward=True`: under Prefect's engine its own SIGTERM bridge stays in place: the worker's control channel
    acknowledges a cancel only while that exact handler is installed (`prefect.utilities.engine.
    can_ack_control_intent`), and without the acknowledgement the worker's cancel ends the run Crashed instead of
    Cancelled, unless the flow ends itself Cancelled first. There the cancel intent (committed before the SIGTERM)
    is the sign, and a `TerminationSignal` swallowed as "Exception ignored" (a library's GC callback) is noted
    through `sys.unraisablehook`. Outside the engine's bridge (only the main thread can install a handler) the
    handler in place is wrapped to note the signal first.

    `forward=False`: only note it, replacing Prefect's bridge. For a flow whose every loop asks the stop check and
    which returns its own Cancelled state: the exception Prefect raises may otherwise land at any line of the main
    thread, e.g. inside pydantic's serialisation of an API call, where it becomes another error and crashes the run
    without its report. The worker's SIGKILL, 30 s after its SIGTERM, still bounds the run."""
    _note_lost_termination()
    if threading.current_thread() is not threading.main_thread():
        return
    from prefect.utilities.engine import is_prefect_sigterm_handler_installed

    if forward and is_prefect_sigterm_handler_installed():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if getattr(previous, "notes_termination", False):
        return

    def note_then_forward(signum, frame):
        _terminating.set()
        if not forward:
            return
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            raise SystemExit(128 + signum)

    note_then_forward.notes_termination = True  # type: ignore[attr-defined]
    signal.signal(signal.SIGTERM, note_then_forward)


def note_termination() -> None:
    """Mark this process as terminating (a flow that caught the `TerminationSignal` to report before ending):
    its tasks' stop checks answer True from now on."""
    _terminating.set()


def _note_lost_termination() -> None:
    """Wrap `sys.unraisablehook` (once) so that a `TerminationSignal` Python could only report, not raise,
    still marks this process as terminating."""
    previous = sys.unraisablehook
    if getattr(previous, "notes_termination", False):
        return

    def note_then_report(unraisable) -> None:
        if isinstance(unraisable.exc_value, TerminationSignal):
            _terminating.set()
        previous(unraisable)

    note_then_report.notes_termination = True  # type: ignore[attr-defined]
    sys.unraisablehook = note_then_report


def _cancel_intent() -> bool:
    try:
        from prefect._internal.control_listener import get_intent
    except ImportError:  # a Prefect without the control channel: the API answers instead
        return False
    return get_intent() == "cancel"


class _StatePoller:
    """The flow run's state, asked at most every `interval` seconds; sticky once stopped."""

    def __init__(self, flow_run_id: UUID, interval: float):
        self.flow_run_id, self.interval = flow_run_id, interval
        self._lock = threading.Lock()
        self._checked_at = float("-inf")
        self._stopped = False

    def stopped(self) -> bool:
        if self._stopped or time.monotonic() - self._checked_at < self.interval:
            return self._stopped
        if not self._lock.acquire(blocking=False):  # another thread is asking the API: its last answer stands
            return self._stopped
        try:
            if self._stopped or time.monotonic() - self._checked_at < self.interval:
                return self._stopped
            self._checked_at = time.monotonic()
            try:
                with get_client(sync_client=True) as client:
                    state = client.read_flow_run(self.flow_run_id).state
            except Exception as exc:  # noqa: BLE001 - an unreachable API is not a cancel
                logger.debug("could not read the state of flow run %s: %s", self.flow_run_id, exc)
                return False
            self._stopped = state is not None and state.type in STOPPED_STATES
            return self._stopped
        finally:
            self._lock.release()


def current_flow_run_id() -> UUID | None:
    """The flow run of the calling task or flow (on threads or on a Dask worker), None outside a run."""
    task_context = TaskRunContext.get()
    if task_context is not None and task_context.task_run.flow_run_id:
        return task_context.task_run.flow_run_id
    flow_context = FlowRunContext.get()
    if flow_context is not None and flow_context.flow_run is not None:
        return flow_context.flow_run.id
    return None


def run_stop_check(flow_run_id: UUID | None = None, interval: float = 1.0) -> StopCheck:
    """The stop check of the calling run (or of `flow_run_id`): a plain callable for the domains' loops.
    Outside a run it never stops."""
    flow_run_id = flow_run_id or current_flow_run_id()
    if flow_run_id is None:
        return never
    with _pollers_lock:
        poller = _pollers.get(flow_run_id)
        if poller is None:
            poller = _pollers[flow_run_id] = _StatePoller(flow_run_id, interval)

    def should_stop() -> bool:
        return _terminating.is_set() or _cancel_intent() or poller.stopped()

    return should_stop
