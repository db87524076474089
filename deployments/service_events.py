"""The stack supervisor's event listener: counts each service's restarts (operations/infra/supervision.py) and
emits the Prefect event `project.service.restarted` (operations/events.py) once a restarted service runs again,
for the automation that tells the operator.

The event waits for the Prefect server to answer (when the server itself was restarted, or its database): up to
EMIT_WAIT_SECONDS, on a thread of its own, since supervisord waits for this listener's answer before it sends the
next state change. The server is PREFECT_API_URL, else the stack's own under DATA_DIR.

    python -m deployments.service_events HOME   # what the registry gives the supervisor of HOME as its listener
"""

from __future__ import annotations

import asyncio
import logging
import queue
import re
import sys
import threading
import time
from pathlib import Path

import httpx

from operations.events import RESOURCE_PREFIX, SERVICE_RESTARTED
from operations.infra.http import default_ssl_context
from operations.infra.supervision import listen

EMIT_WAIT_SECONDS = 600.0  # how long an event waits for the Prefect server to answer
POLL_SECONDS = 1.0

logger = logging.getLogger("deployments.service_events")


def service_subject(service: str) -> str:
    """The service's part of the event's resource id: `project.service.<this>` (embedded postgres:
    embedded-postgres)."""
    return re.sub(r"[^a-z0-9_-]+", "-", service.lower()).strip("-")


def _api_url() -> str | None:
    from deployments.stack import local_api_url  # PREFECT_API_URL, else the local server (and its auth)

    try:
        return local_api_url()
    except Exception:  # noqa: BLE001 - no settings, no server yet: asked again
        return None


def _answers(api_url: str) -> bool:
    try:
        return httpx.get(f"{api_url}/health", timeout=2, verify=default_ssl_context()).status_code == 200
    except httpx.HTTPError:
        return False


def emit_when_reachable(service: str, restarts: int, wait: float = EMIT_WAIT_SECONDS) -> bool:
    """Emit `project.service.restarted` for `service` once the Prefect server answers and takes it (tried again
    until then); False if it did not within `wait` seconds (the restart stays counted for `make status`)."""
    deadline = time.monotonic() + wait
    while True:
        api_url = _api_url()
        if api_url and _answers(api_url):
            try:
                asyncio.run(_send(api_url, service, restarts))
            except Exception as exc:  # noqa: BLE001 - the server went away again: tried again below
                logger.info("%s restarted (%d): the event waits for the Prefect server (%s)", service, restarts, exc)
            else:
                logger.info("%s restarted (%d): event emitted to %s", service, restarts, api_url)
                return True
        if time.monotonic() > deadline:
            logger.warning("%s restarted (%d) but no Prefect server took the event", service, restarts)
            return False
        time.sleep(POLL_SECONDS)


async def _send(api_url: str, service: str, restarts: int) -> None:
    """The event over the server's events socket: an error when it cannot be delivered (Prefect's own
    `emit_event` queues it and drops it silently when the server is away)."""
    from prefect.events import Event  # imported once PREFECT_API_URL (and its auth) are in this environment
    from prefect.events.clients import PrefectEventsClient

    event = Event(
        event=SERVICE_RESTARTED,
        resource={"prefect.resource.id": RESOURCE_PREFIX[SERVICE_RESTARTED] + service_subject(service),
                  "prefect.resource.name": service},
        payload={"restarts": restarts},
    )
    async with PrefectEventsClient(api_url=api_url, reconnection_attempts=1) as client:
        await client.emit(event)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m deployments.service_events HOME", file=sys.stderr)
        return 2
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    todo: queue.Queue[tuple[str, int]] = queue.Queue()

    def emitter() -> None:
        while True:
            service, restarts = todo.get()
            try:
                emit_when_reachable(service, restarts)
            except Exception as exc:  # noqa: BLE001 - the next restart still gets its event
                logger.warning("could not emit the restart of %s: %s", service, exc)

    threading.Thread(target=emitter, name="service-events", daemon=True).start()
    listen(Path(args[0]), lambda program, service, restarts: todo.put((service, restarts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
