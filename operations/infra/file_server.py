"""The local file server: OUTPUT_DIR over HTTP, so the spreadsheet links of artifacts open from the Prefect UI.

A Starlette app with `StaticFiles` under uvicorn, a service of the stack like the other embedded ones (a program of
the stack's supervisor, a state file in DATA_DIR/file-server, a folder lock, started by `make up`, reused by later
processes, started again on the same port when it dies, stopped by `make down`).
It only reads: GET and HEAD of regular files under OUTPUT_DIR; no directory listing, no hidden files, nothing
outside OUTPUT_DIR (`../`, its percent-encoded forms and symlinks that lead out all answer 404). With
STACK_AUTH_STRING set every request needs HTTP basic auth; without it the server refuses to listen beyond
loopback.

    python -m operations.infra.file_server --root DIR --host 127.0.0.1 --port 4280   # what FileServerService runs
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import http.client
import mimetypes
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from operations.infra.processes import (
    basic_auth_headers, client_host, free_port, port_free, require_auth_off_loopback,
)
from operations.infra.services import Service
from operations.settings import Settings

STATE_FILE = "file-server.json"
HEALTH_PATH = "/-/health"  # "-" is no run key's folder name, so the path never hides a file
AUTH_ENV = "FILE_SERVER_AUTH_STRING"  # how the server process gets its credentials: never on its command line
REALM = "operations files"

# The types the flows' files must be served with, whatever /etc/mime.types the machine has (or lacks).
CONTENT_TYPES = {
    ".xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    ".csv": "text/csv",
    ".json": "application/json",
}
for _suffix, _type in CONTENT_TYPES.items():
    mimetypes.add_type(_type, _suffix)


@dataclass(frozen=True)
class FileServer:
    url: str  # base URL of OUTPUT_DIR, no trailing slash
    root: str
    host: str
    port: int
    pid: int
    auth: bool
    started: bool  # False when an already-running server was reused


# -- the app (runs in the server process) ------------------------------------------------------------------------

def build_app(root: Path, auth_string: str | None = None):
    """The ASGI app serving `root` read-only; every request behind basic auth when `auth_string` is given."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import PlainTextResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    class OutputFiles(StaticFiles):
        """StaticFiles (which keeps requests inside its folder, resolving symlinks) without hidden files: nothing
        of `..`, and no dotfile an editor or a tool leaves beside the run files."""

        async def get_response(self, path: str, scope):
            if any(part.startswith(".") for part in Path(path).parts):
                raise HTTPException(status_code=404)
            return await super().get_response(path, scope)

    async def health(request):
        return PlainTextResponse("ok")

    app = Starlette(routes=[
        Route(HEALTH_PATH, health, methods=["GET", "HEAD"]),
        Mount("/", app=OutputFiles(directory=root, follow_symlink=False)),
    ])
    return _SecurityHeaders(_BasicAuth(app, auth_string) if auth_string else app)


class _SecurityHeaders:
    """Headers on every answer: a served file never acts as a page of this origin (nosniff, a sandbox), and
    browsers revalidate (a re-run rewrites files under the same path)."""

    HEADERS = [
        (b"x-content-type-options", b"nosniff"),
        (b"content-security-policy", b"sandbox"),
        (b"cache-control", b"no-cache"),
    ]

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _BasicAuth:
    """HTTP basic auth in front of the whole app: the 'user:password' is compared in constant time (digests of
    equal length, so not even its length leaks), a failure answers 401 with the challenge browsers prompt for."""

    def __init__(self, app, auth_string: str):
        self.app = app
        self.expected = hashlib.sha256(auth_string.encode()).digest()

    def authorized(self, header: bytes) -> bool:
        scheme, _, value = header.decode("latin-1").partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            given = base64.b64decode(value.strip(), validate=True)
        except ValueError:
            return False
        return hmac.compare_digest(hashlib.sha256(given).digest(), self.expected)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            header = dict(scope["headers"]).get(b"authorization", b"")
            if not self.authorized(header):
                await send({"type": "http.response.start", "status": 401, "headers": [
                    (b"www-authenticate", f'Basic realm="{REALM}", charset="UTF-8"'.encode()),
                    (b"content-type", b"text/plain; charset=utf-8"),
                ]})
                await send({"type": "http.response.body", "body": b"authentication required"})
                return
        await self.app(scope, receive, send)


def serve(root: Path, host: str, port: int) -> None:
    """Run the server in this process (FileServerService's supervised program) until SIGTERM."""
    import uvicorn

    app = build_app(root, os.environ.pop(AUTH_ENV, None) or None)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, server_header=False,
                proxy_headers=False, lifespan="off")


# -- starting, finding and stopping it ---------------------------------------------------------------------------

def _url_host(host: str) -> str:
    """The host name links carry: the machine's name for a wildcard address, IPv6 literals in brackets."""
    if host in ("0.0.0.0", "::"):
        return socket.getfqdn()
    return f"[{host}]" if ":" in host else host


def _health_status(host: str, port: int, auth_string: str | None = None) -> int | None:
    """The status the health endpoint answers (401: behind other credentials), None if nothing answers.
    http.client, not httpx: output_link asks on every link, and an httpx client costs ~20 ms to build."""
    connection = http.client.HTTPConnection(client_host(host), port, timeout=2)
    try:
        connection.request("GET", HEALTH_PATH, headers=basic_auth_headers(auth_string))
        return connection.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


def _credentials(settings: Settings) -> str | None:
    """STACK_AUTH_STRING ('user:password', checked by Settings) or None."""
    return settings.stack.auth_string.get_secret_value() if settings.stack.auth_string else None


def _server(state: dict, started: bool) -> FileServer:
    return FileServer(state["url"], state["root"], state["host"], state["port"], state["pid"], state["auth"], started)


class FileServerService(Service[FileServer]):
    """The file server of settings.stack.output_dir on settings.stack.host, port settings.stack.file_server_port (another free
    port if it is taken), behind basic auth with STACK_AUTH_STRING.

    A running server is reused only if it serves this OUTPUT_DIR on this host and accepts these credentials (or
    none, as configured); otherwise it is replaced, so a changed STACK_AUTH_STRING never leaves the old one
    working. `ensure()` raises ExposedWithoutAuth for a non-loopback host without STACK_AUTH_STRING, before
    starting anything, and RuntimeError with the end of its log if it does not start."""

    name = "file server"
    state_file = STATE_FILE
    log_file = "file-server.log"

    def __init__(self, settings: Settings, start_timeout: float = 30.0, folder: Path | None = None):
        super().__init__(settings.stack.file_server_dir if folder is None else folder)
        self.settings, self.start_timeout = settings, start_timeout
        self.root = Path(settings.stack.output_dir).resolve()

    @classmethod
    def of_folder(cls, folder: Path) -> FileServerService:
        """The service of a folder, to find or stop its server (starting one needs the settings)."""
        return cls(Settings.model_construct(), folder=folder)

    def find(self) -> FileServer | None:
        """The folder's server if it is running and answers (behind auth or not)."""
        state = self.state()
        pid = self.current_pid(state)
        if not state or pid is None or _health_status(state["host"], state["port"]) not in (200, 401):
            return None
        return _server({**state, "pid": pid}, False)

    def reuse(self, running: FileServer) -> bool:
        credentials = _credentials(self.settings)
        wanted = (str(self.root), self.settings.stack.host, credentials is not None)
        return (running.root, running.host, running.auth) == wanted and _health_status(
            running.host, running.port, credentials
        ) == 200

    def ensure(self) -> FileServer:
        auth = _credentials(self.settings) is not None
        require_auth_off_loopback("the file server", self.settings.stack.host, auth)
        return super().ensure()

    def start(self) -> FileServer:
        host, credentials = self.settings.stack.host, _credentials(self.settings)
        self.root.mkdir(parents=True, exist_ok=True)
        port = self.settings.stack.file_server_port if port_free(self.settings.stack.file_server_port) else free_port()
        env = {k: v for k, v in os.environ.items() if k != AUTH_ENV}
        if credentials:
            env[AUTH_ENV] = credentials
        state = {"url": f"http://{_url_host(host)}:{port}", "root": str(self.root), "host": host, "port": port,
                 "auth": credentials is not None}
        pid = self.supervise(
            [sys.executable, "-m", "operations.infra.file_server", "--root", str(self.root), "--host", host,
             "--port", str(port)],
            lambda: _health_status(host, port, credentials) == 200, self.start_timeout, state, env=env,
            failure=f"the file server did not start on {host}:{port}",
        )
        return _server({**state, "pid": pid}, True)

    def address(self, running: FileServer) -> str:
        return running.url

    def note(self, running: FileServer) -> str:
        return f"serving {running.root}" + (", basic auth" if running.auth else "")

    def exports(self, running: FileServer) -> dict[str, str]:
        return {"OUTPUT_BASE_URL": running.url}


def running_file_server(file_server_dir: Path) -> FileServer | None:
    """This folder's file server if it is running and answers (behind auth or not), without starting one."""
    return FileServerService.of_folder(file_server_dir).find()


def ensure_file_server(settings: Settings, timeout: float = 30.0) -> FileServer:
    """Reuse or start the file server of these settings (FileServerService). For the stack and tests only."""
    return FileServerService(settings, timeout).ensure()


def stop_file_server(file_server_dir: Path, timeout: float = 10.0) -> bool:
    """Stop this folder's file server. True if one was running."""
    return FileServerService.of_folder(file_server_dir).stop(timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, type=Path, help="folder to serve (OUTPUT_DIR)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        parser.error(f"{args.root} is not a folder")
    require_auth_off_loopback("the file server", args.host, bool(os.environ.get(AUTH_ENV)))
    serve(args.root.resolve(), args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
