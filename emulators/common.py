"""What every emulator shares: its listening sockets, its JSON encoder, its command line's field types, its
detached process, the handle of a running emulator and the base of its control client."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import types
import typing
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, ClassVar, TypeVar

import httpx
import orjson  # a dependency of Prefect: about 5x faster than json for large pages
from pydantic import BaseModel

from operations.infra.http import default_ssl_context
from operations.infra.services import Service

PROJECT_ROOT = Path(__file__).resolve().parents[1]

_Handle = TypeVar("_Handle", bound="StoppableEmulator")
_Running = TypeVar("_Running")
_Client = TypeVar("_Client", bound="ControlClient")


def dumps(content: Any) -> bytes:
    """A JSON body."""
    return orjson.dumps(content)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket, bound here (port 0: a free one, no race with another process) and inheritable."""
    # proto given explicitly: asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP, and without
    # it every small answer waits ~40 ms for a delayed ACK (Nagle)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"the emulator cannot listen on {host}:{port}: {exc}") from None
    sock.set_inheritable(True)
    return sock


def cli_type(annotation: Any) -> type | None:
    """The argparse type of a config field, or None for fields given only through --config-json."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else None
    if annotation is datetime:
        return str
    return annotation if annotation in (bool, int, float, str) else None


def add_config_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    """A `--field-name` flag for every plain field of a pydantic config model (others only in --config-json);
    flags left out are absent from the parsed arguments, so the config's defaults apply."""
    parser.add_argument("--config-json", help="an EmulatorConfig as JSON (full or partial); flags override it")
    for name, info in config_class.model_fields.items():
        kind = cli_type(info.annotation)
        if kind is None:
            continue
        flag = "--" + name.replace("_", "-")
        text = f"{info.description or name} (default {info.default})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=text)


def config_from_arguments(args: dict[str, Any], config_class: type):
    """The config of `add_config_arguments`' flags: --config-json first, the flags given over it (both popped
    from `args`). Raises ValueError (bad JSON) or pydantic's ValidationError."""
    raw = args.pop("config_json", None)
    return config_class.model_validate({**(json.loads(raw) if raw else {}), **args})


# -- detached process ----------------------------------------------------------------------------------------
def health(port: int, service: str) -> dict[str, Any] | None:
    """The health answer of the emulator `service` on 127.0.0.1:port, or None if none answers there."""
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/_emulator/health", timeout=2, verify=default_ssl_context())
        data = response.json()
    except (httpx.HTTPError, ValueError):
        return None
    return data if response.status_code == 200 and data.get("service") == service else None


class EmulatorService(Service[_Running]):
    """An emulator as a service of the stack, a program of its supervisor (started again on the same ports when
    it dies, with the data its config seeds): `python -m <module> <arguments> --config-json <config>` from the
    project root, its log `emulator.log` in its folder. Subclasses set `name`, `state_file` and `module` and
    implement `find`, `start` (through `spawn_emulator`) and `address`."""

    module: ClassVar[str]
    log_file = "emulator.log"

    def __init__(self, folder: Path, config: BaseModel, start_timeout: float = 30.0):
        super().__init__(folder)
        self.config, self.start_timeout = config, start_timeout

    def spawn_emulator(
        self, arguments: list[str], ready: Callable[[], bool], state: dict[str, Any], failure: str
    ) -> int:
        """Start the emulator's program; its pid."""
        python_path = os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")]))
        return self.supervise(
            [sys.executable, "-m", self.module, *arguments, "--config-json", self.config.model_dump_json()],
            ready, self.start_timeout, state, env={**os.environ, "PYTHONPATH": python_path}, cwd=PROJECT_ROOT,
            failure=failure,
        )


# -- running handle and control client -----------------------------------------------------------------------
class StoppableEmulator:
    """Mixin of a running emulator's handle (a dataclass with a `_stop` field): `stop()`, or leaving the
    `with` block, stops it."""

    _stop: Callable[[], None]

    def stop(self) -> None:
        """Stop the emulator, whoever started it."""
        self._stop()

    def __enter__(self: _Handle) -> _Handle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class ControlClient:
    """Base of an emulator's control API client (`/_emulator/...`): one httpx client, a context manager that
    closes it, and `_call`, which sends through `_send` (override it to choose the URL) and checks the answer."""

    def __init__(self, timeout: float, base_url: str = ""):
        self.http = httpx.Client(base_url=base_url, timeout=timeout, verify=default_ssl_context())

    def close(self) -> None:
        """Close the httpx client."""
        self.http.close()

    def __enter__(self: _Client) -> _Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _send(self, method: str, path: str, body: dict[str, Any] | None, query: dict[str, Any]) -> httpx.Response:
        """One request to the control path `path` (below `/_emulator/`) of the client's base URL."""
        return self.http.request(method, f"/_emulator/{path}", json=body, params=query)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None, **params: Any) -> Any:
        response = self._send(method, path, body, {k: v for k, v in params.items() if v is not None})
        if response.status_code >= 400:
            raise RuntimeError(f"emulator control {method} {path}: {response.status_code} {response.text}")
        return response.json()
