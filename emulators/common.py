"""What every emulator shares: its listening sockets, its JSON encoder and its command line's field types."""

from __future__ import annotations

import argparse
import socket
import types
import typing
from datetime import datetime
from typing import Any

import orjson  # a dependency of Prefect: about 5x faster than json for large pages


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
