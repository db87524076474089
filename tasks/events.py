"""The project's own Prefect events (names in operations/events.py), emitted with the flow run they concern."""

from __future__ import annotations

import logging
from typing import Any

from prefect.events import emit_event

from operations.events import RESOURCE_PREFIX
from tasks.cancellation import current_flow_run_id

logger = logging.getLogger(__name__)


def emit(event: str, subject: str, *, name: str | None = None, payload: dict[str, Any] | None = None) -> None:
    """Emit `event` about `subject` (a seller id, a turnstile block name, a stream, a service), related to the
    calling flow run if any. Never raises: a notification must not fail the work it reports on."""
    resource = {"prefect.resource.id": RESOURCE_PREFIX[event] + subject}
    if name:
        resource["prefect.resource.name"] = name
    flow_run_id = current_flow_run_id()
    related = (
        [{"prefect.resource.id": f"prefect.flow-run.{flow_run_id}", "prefect.resource.role": "flow-run"}]
        if flow_run_id else None
    )
    try:
        emit_event(event, resource=resource, related=related, payload=payload or {})
    except Exception as exc:  # noqa: BLE001 - reported in the log instead
        logger.warning("could not emit %s for %s: %s", event, subject, exc)
