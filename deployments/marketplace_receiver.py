"""The stack's receiver of the marketplace's notifications: the app's callback URL.

A small Starlette app under uvicorn, a service of the stack (a state file and its log in
DATA_DIR/marketplace-receiver, started by `make up`, shown by `make status`, stopped by `make down`):

    POST /marketplace/notifications   a notification of the marketplace (its JSON body as the API sends it)
    GET  /-/health                    liveness (behind the same auth as the rest)
    GET  /-/stats                     what it received, stored, took as redeliveries, dropped

Each notification of this app (`application_id` equal to the app's id) is stored in the project database
(table marketplace_notifications, keyed by its `_id`: a redelivery changes nothing) before the answer: 200 once
stored, 400 for a body that is no notification (the marketplace would only send it again), 500 when the database
failed (the marketplace tries again, then keeps it for the missed-feeds catch-up). Those of other apps are
answered 200 and dropped. Notifications arriving together are written in one transaction (a group commit), so a
burst of thousands is answered well within the marketplace's 500 ms. It never calls the marketplace's API.

After storing new ones it emits the Prefect event `project.marketplace.notifications.received` (at most once per
MARKETPLACE_NOTIFICATIONS_EVENT_SECONDS), which the trigger of deployment `marketplace-notifications/on-event`
(prefect.yaml) turns into a run of the consumer.

It listens on STACK_HOST like the other services: anything but loopback needs STACK_AUTH_STRING (HTTP basic auth
on every request; the callback URL then carries `user:password@`). docs/marketplace-notifications.md says how to
expose it to the marketplace.

    python -m deployments.marketplace_receiver --host 127.0.0.1 --port 4282 --app-id APP_ID   # what the service runs
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from operations.events import NOTIFICATIONS_RECEIVED
from operations.infra.processes import basic_auth_headers, client_host, free_port, port_free, require_auth_off_loopback
from operations.infra.services import Service
from operations.marketplace.notifications import CALLBACK_PATH, BadNotification, parse_notification

STATE_FILE = "marketplace-receiver.json"
HEALTH_PATH = "/-/health"
STATS_PATH = "/-/stats"
AUTH_ENV = "MARKETPLACE_RECEIVER_AUTH_STRING"  # how the process gets its credentials: never on its command line
MAX_BATCH = 1_000  # notifications written per transaction at most

logger = logging.getLogger("deployments.marketplace_receiver")


@dataclass(frozen=True)
class MarketplaceReceiver:
    url: str  # base URL on this machine, no trailing slash
    host: str
    port: int
    pid: int
    app_id: str
    auth: bool
    started: bool  # False when an already-running receiver was reused

    @property
    def callback_url(self) -> str:
        return self.url + CALLBACK_PATH


# -- the app (runs in the receiver process) ----------------------------------------------------------------------
@dataclass
class ReceiverStats:
    received: int = 0
    stored: int = 0
    redelivered: int = 0  # already stored (same `_id`)
    other_app: int = 0  # dropped: another application's
    bad: int = 0  # answered 400
    failed: int = 0  # answered 500 (the database failed)
    events: int = 0
    batches: int = 0
    started_at: float = field(default_factory=time.time)


class GroupWriter:
    """Writes the rows handed to `put` in transactions of whatever arrived meanwhile (one at a time): `put`
    returns once its row is committed (True: new, False: already stored) or raises what the write raised."""

    def __init__(self, store: Callable[[list[dict[str, Any]]], list[bool]]):
        self.store = store
        self.queue: asyncio.Queue | None = None

    async def put(self, row: dict[str, Any]) -> bool:
        if self.queue is None:
            self.queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._run())
        done = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((row, done))
        return await done

    async def _run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while not self.queue.empty() and len(batch) < MAX_BATCH:
                batch.append(self.queue.get_nowait())
            try:
                new = await asyncio.to_thread(self.store, [row for row, _ in batch])
            except Exception as exc:  # noqa: BLE001 - each waiting request answers 500
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            for (_, done), is_new in zip(batch, new):
                if not done.done():
                    done.set_result(is_new)


def store_rows(engine) -> Callable[[list[dict[str, Any]]], list[bool]]:
    """The writer's store: insert the rows (nothing for an `_id` already stored), say which were new."""
    from operations.marketplace.notifications import store_notifications

    def store(rows: list[dict[str, Any]]) -> list[bool]:
        new_ids = store_notifications(engine, rows)
        new = []
        for row in rows:  # the same `_id` twice in one batch: the first is the new one
            new.append(row["id"] in new_ids)
            new_ids.discard(row["id"])
        return new

    return store


class EventEmitter:
    """Emits `project.marketplace.notifications.received` at most once per `interval` seconds (never raises)."""

    def __init__(self, interval: float, stats: ReceiverStats):
        self.interval, self.stats = interval, stats
        self.last = 0.0
        self.lock = threading.Lock()

    def __call__(self, count: int) -> None:
        with self.lock:
            if time.monotonic() - self.last < self.interval:
                return
            self.last = time.monotonic()
        try:
            from prefect.events import emit_event

            emit_event(NOTIFICATIONS_RECEIVED, resource={"prefect.resource.id": "project.marketplace.notifications"},
                       payload={"stored": count})
            self.stats.events += 1
        except Exception as exc:  # noqa: BLE001 - the minute catch-up drains what an event failed to start
            logger.warning("could not emit %s: %s", NOTIFICATIONS_RECEIVED, exc)


def build_app(store: Callable[[list[dict[str, Any]]], list[bool]], app_id: str,
              on_stored: Callable[[int], None] = lambda count: None, auth_string: str | None = None,
              stats: ReceiverStats | None = None):
    """The ASGI app: notifications of `app_id` written through `store`, `on_stored(new)` after new ones."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    from operations.infra.file_server import _BasicAuth

    stats = stats or ReceiverStats()
    writer = GroupWriter(store)

    async def notify(request: Request) -> Response:
        stats.received += 1
        try:
            row = parse_notification(json.loads(await request.body()), app_id)
        except (ValueError, BadNotification) as exc:
            stats.bad += 1
            return PlainTextResponse(f"not a notification: {exc}", status_code=400)
        if row is None:
            stats.other_app += 1
            return Response(status_code=200)
        try:
            new = await writer.put(row)
        except Exception as exc:  # noqa: BLE001 - the marketplace delivers it again
            stats.failed += 1
            logger.error("could not store notification %s: %s", row["id"], exc)
            return PlainTextResponse("not stored", status_code=500)
        if new:
            stats.stored += 1
            await asyncio.to_thread(on_stored, 1)
        else:
            stats.redelivered += 1
        return Response(status_code=200)

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def as_json(request: Request) -> Response:
        return JSONResponse({**stats.__dict__, "app_id": app_id})

    app = Starlette(routes=[
        Route(CALLBACK_PATH, notify, methods=["POST"]),
        Route(HEALTH_PATH, health, methods=["GET", "HEAD"]),
        Route(STATS_PATH, as_json, methods=["GET"]),
    ])
    app.state.stats = stats
    return _BasicAuth(app, auth_string) if auth_string else app


def serve(host: str, port: int, app_id: str, event_seconds: float) -> None:
    """Run the receiver in this process (MarketplaceReceiverService's supervised program) until SIGTERM."""
    import uvicorn

    from operations.infra.database import get_engine
    from operations.infra.embedded_postgres import resolve_database_url
    from operations.settings import get_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    engine = get_engine(resolve_database_url(get_settings()), purpose="marketplace-receiver", pool_size=4)
    stats = ReceiverStats()
    app = build_app(store_rows(engine), app_id, EventEmitter(event_seconds, stats),
                    os.environ.pop(AUTH_ENV, None) or None, stats)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, server_header=False,
                proxy_headers=False, lifespan="off", backlog=2048)


# -- starting, finding and stopping it ---------------------------------------------------------------------------
def _healthy(host: str, port: int, auth_string: str | None) -> bool:
    connection = http.client.HTTPConnection(host.strip("[]"), port, timeout=2)
    try:
        connection.request("GET", HEALTH_PATH, headers=basic_auth_headers(auth_string))
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


class MarketplaceReceiverService(Service[MarketplaceReceiver]):
    """The receiver of a folder (DATA_DIR/marketplace-receiver) on `host`:`port` (another free port if taken),
    for the notifications of application `app_id`."""

    name = "marketplace receiver"
    state_file = STATE_FILE
    log_file = "marketplace-receiver.log"

    def __init__(self, folder: Path, app_id: str, host: str = "127.0.0.1", port: int = 4282,
                 auth_string: str | None = None, event_seconds: float = 5.0, start_timeout: float = 60.0):
        super().__init__(folder)
        self.app_id, self.host, self.port, self.auth = app_id, host, port, auth_string
        self.event_seconds, self.start_timeout = event_seconds, start_timeout

    def _handle(self, state: dict, pid: int, started: bool) -> MarketplaceReceiver:
        host = state.get("host", "127.0.0.1")
        return MarketplaceReceiver(f"http://{client_host(host)}:{state['port']}", host, state["port"], pid,
                                   state.get("app_id", ""), state.get("auth", False), started)

    def find(self) -> MarketplaceReceiver | None:
        state = self.state()
        pid = self.current_pid(state)
        if not state or pid is None or not _healthy(client_host(state.get("host", "127.0.0.1")), state["port"],
                                                    self.auth):
            return None
        return self._handle(state, pid, False)

    def reuse(self, running: MarketplaceReceiver) -> bool:
        return running.app_id == self.app_id and running.host == self.host and running.auth == bool(self.auth)

    def start(self) -> MarketplaceReceiver:
        require_auth_off_loopback("the marketplace receiver", self.host, bool(self.auth))
        port = self.port if port_free(self.port) else free_port()
        env = {**os.environ, **({AUTH_ENV: self.auth} if self.auth else {})}
        state = {"port": port, "host": self.host, "app_id": self.app_id, "auth": bool(self.auth)}
        pid = self.supervise(
            [sys.executable, "-m", "deployments.marketplace_receiver", "--host", self.host, "--port", str(port),
             "--app-id", self.app_id, "--event-seconds", str(self.event_seconds)],
            lambda: _healthy(client_host(self.host), port, self.auth), self.start_timeout, state, env=env,
            failure=f"the marketplace receiver did not start on {self.host}:{port}",
        )
        return self._handle(state, pid, True)

    def address(self, running: MarketplaceReceiver) -> str:
        return running.callback_url

    def note(self, running: MarketplaceReceiver) -> str:
        return f"app {running.app_id}" + (", basic auth" if running.auth else "")


def callback_url(settings, running: MarketplaceReceiver | None = None) -> str:
    """The callback URL to register in the marketplace's app: MARKETPLACE_CALLBACK_BASE_URL's, else the running
    receiver's local one (never with credentials)."""
    if settings.marketplace_notifications.public_url:
        return settings.marketplace_notifications.public_url.rstrip("/") + CALLBACK_PATH
    if running is None:
        from deployments.services import only, stack_services

        [entry] = only(stack_services(settings), "marketplace receiver")
        running = entry.service.find()
    return running.callback_url if running else "(the marketplace receiver is not running)"


def emulator_callback_url(running: MarketplaceReceiver, settings) -> str:
    """The callback URL the local emulator posts to: the receiver's, with the stack's credentials when it asks."""
    if not settings.stack.auth_string:
        return running.callback_url
    from urllib.parse import quote

    user, _, password = settings.stack.auth_string.get_secret_value().partition(":")
    return running.callback_url.replace("://", f"://{quote(user, safe='')}:{quote(password, safe='')}@", 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--app-id", required=True, help="the marketplace application whose notifications are kept")
    parser.add_argument("--event-seconds", type=float, default=5.0,
                        help="at most one received event per this many seconds")
    args = parser.parse_args(argv)
    serve(args.host, args.port, args.app_id, args.event_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
