"""The stack's notification receiver: where the automations' notifications land when NOTIFY_BLOCK names no block
of the operator's own (e-mail, Slack, a webhook: docs/notifications.md).

A small Starlette app under uvicorn on 127.0.0.1, a service of the stack (a state file and its log in
DATA_DIR/notifications, started by `make up`, shown by `make status`, stopped by `make down`). The Prefect server
posts each notification to it through a Custom Webhook block (`make up` saves it, deployments/automations.py);
it appends each one as a JSON line to DATA_DIR/notifications/notifications.jsonl and serves them, newest first:

    GET  /                    a page to read them
    GET  /notifications.json  the same as JSON (scripts, tests)
    POST /notify              {"subject": ..., "body": ...}: what the webhook block sends

It listens on loopback only: the Prefect server of the stack runs on this machine. A server elsewhere needs a
block it can reach (NOTIFY_BLOCK).

    python -m deployments.notification_receiver --folder DIR --port 4281   # what NotificationReceiverService runs
"""

from __future__ import annotations

import argparse
import html
import http.client
import json
import re
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from operations.infra.processes import free_port, port_free
from operations.infra.services import Service

STATE_FILE = "notification-receiver.json"
NOTIFICATIONS_FILE = "notifications.jsonl"
HEALTH_PATH = "/-/health"
HOST = "127.0.0.1"
PAGE_LIMIT = 200  # the newest ones the page shows; the file keeps them all
_LINK = re.compile(r"https?://[^\s<>\"']+")


@dataclass(frozen=True)
class NotificationReceiver:
    url: str  # base URL, no trailing slash
    port: int
    pid: int
    file: str  # the JSON-lines file of the notifications
    started: bool  # False when an already-running receiver was reused

    @property
    def notify_url(self) -> str:
        return f"{self.url}/notify"


# -- the app (runs in the receiver process) ----------------------------------------------------------------------

def read_notifications(file: Path) -> list[dict]:
    """The notifications in the file, oldest first (a torn last line is skipped)."""
    if not file.exists():
        return []
    found = []
    for line in file.read_text(encoding="utf-8").splitlines():
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return found


def _linked(text: str) -> str:
    """The text escaped for HTML, its URLs as links."""
    out, last = [], 0
    for match in _LINK.finditer(text):
        out += [html.escape(text[last:match.start()]),
                f'<a href="{html.escape(match.group())}">{html.escape(match.group())}</a>']
        last = match.end()
    return "".join(out) + html.escape(text[last:])


def render_page(notifications: list[dict], file: Path) -> str:
    """The page of the notifications, newest first."""
    newest = list(reversed(notifications))[:PAGE_LIMIT]
    items = "\n".join(
        f"<article><h2>{html.escape(str(n.get('subject', '')))}</h2>"
        f"<p class=when>{html.escape(str(n.get('received', '')))}</p>"
        f"<pre>{_linked(str(n.get('body', '')))}</pre></article>"
        for n in newest
    ) or "<p>No notification yet.</p>"
    return (
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=30>"
        "<title>Notifications</title><style>body{font-family:sans-serif;margin:2em;max-width:60em}"
        "article{border-bottom:1px solid #ccc;padding:.5em 0}h2{font-size:1.1em;margin:.2em 0}"
        ".when{color:#666;margin:0}pre{white-space:pre-wrap}</style></head><body>"
        f"<h1>Notifications ({len(notifications)})</h1><p>Newest first; all of them in {html.escape(str(file))}.</p>"
        f"{items}</body></html>"
    )


def build_app(file: Path):
    """The ASGI app appending to and serving `file`."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    async def notify(request: Request) -> Response:
        raw = await request.body()
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            data = {"subject": "", "body": raw.decode("utf-8", "replace")}
        entry = {"received": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), **data}
        with open(file, "a", encoding="utf-8") as out:  # one line per notification, written at once
            out.write(json.dumps(entry, ensure_ascii=False) + "\n")
        return Response(status_code=204)

    async def page(request: Request) -> Response:
        return HTMLResponse(render_page(read_notifications(file), file))

    async def as_json(request: Request) -> Response:
        return JSONResponse(read_notifications(file))

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    return Starlette(routes=[
        Route("/", page, methods=["GET", "HEAD"]),
        Route("/notifications.json", as_json, methods=["GET"]),
        Route("/notify", notify, methods=["POST"]),
        Route(HEALTH_PATH, health, methods=["GET", "HEAD"]),
    ])


def serve(folder: Path, port: int) -> None:
    """Run the receiver in this process (the detached child of NotificationReceiverService) until SIGTERM."""
    import uvicorn

    uvicorn.run(build_app(folder / NOTIFICATIONS_FILE), host=HOST, port=port, log_level="warning",
                access_log=False, server_header=False, proxy_headers=False, lifespan="off")


# -- starting, finding and stopping it ---------------------------------------------------------------------------

def _healthy(port: int) -> bool:
    connection = http.client.HTTPConnection(HOST, port, timeout=2)
    try:
        connection.request("GET", HEALTH_PATH)
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


class NotificationReceiverService(Service[NotificationReceiver]):
    """The receiver of a folder (DATA_DIR/notifications) on 127.0.0.1, port `port` (another free port if taken)."""

    name = "notification receiver"
    state_file = STATE_FILE
    log_file = "notification-receiver.log"

    def __init__(self, folder: Path, port: int = 4281, start_timeout: float = 30.0):
        super().__init__(folder)
        self.port, self.start_timeout = port, start_timeout

    @property
    def file(self) -> Path:
        return self.folder / NOTIFICATIONS_FILE

    def _handle(self, port: int, pid: int, started: bool) -> NotificationReceiver:
        return NotificationReceiver(f"http://{HOST}:{port}", port, pid, str(self.file), started)

    def find(self) -> NotificationReceiver | None:
        state = self.state()
        pid = self.current_pid(state)
        if not state or pid is None or not _healthy(state["port"]):
            return None
        return self._handle(state["port"], pid, False)

    def start(self) -> NotificationReceiver:
        port = self.port if port_free(self.port) else free_port()
        pid = self.supervise(
            [sys.executable, "-m", "deployments.notification_receiver", "--folder", str(self.folder),
             "--port", str(port)],
            lambda: _healthy(port), self.start_timeout, {"port": port},
            failure=f"the notification receiver did not start on {HOST}:{port}",
        )
        return self._handle(port, pid, True)

    def address(self, running: NotificationReceiver) -> str:
        return f"{running.url}/"

    def note(self, running: NotificationReceiver) -> str:
        return f"notifications in {running.file}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", required=True, type=Path, help="where notifications.jsonl is kept")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    serve(args.folder.resolve(), args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
