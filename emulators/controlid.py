"""An emulator of Control iD access-control devices (turnstiles, "catracas"): real HTTP servers on 127.0.0.1,
one port per device, all served by one process and one event loop (Starlette + one uvicorn server per device).

It follows the device access API the project's client is written for:

- Every call is `POST <name>.fcgi` with a JSON body. `login.fcgi` answers a session token (base64, so it often
  holds `/` and `+`: clients must URL-encode it); every other call carries `?session=<token>`. Sessions die
  after `session_ttl_seconds` of idleness, on `logout.fcgi`, or on demand (control API).
- Objects `users`, `cards`, `groups` and `user_groups` in an in-memory table set per device, with the SQLite
  behaviour of the real device: UNIQUE / NOT NULL / FOREIGN KEY errors with their SQLite texts and `"code": 1`,
  cascading deletes, at most 999 bound values in one `where`, order by id, limit/offset paging. A refused call
  writes nothing: every value is checked before anything is applied.
- A small device: it serves at most `max_concurrent_requests` calls at a time (the others wait, in order) and
  each call takes `latency_ms`, its own work done inside that time (as on a unit with its own CPU: the devices
  share one event loop here), so concurrent calls to one device serialize as on the real hardware. Stats
  record the peaks of calls in flight (waiting included) and served, so tests can prove a client's cap.
- `system_information.fcgi` answers the device's identity as the real one does (`serial`, `device_id`,
  `version`, `network.mac`, `uptime`, `time`); a device wiped with `replace` (a new unit at the same address)
  answers a new serial and device id, a plain wipe (a factory reset) keeps them.
- Faults on demand: random shares of 503s, hangs (for the client's read timeout) and writes that are applied
  and then lose their answer (the connection is closed), targeted fault rules, and devices that go down (their
  port refuses connections) and come back up on the same port.

Deliberately stricter than a real device (so a client that passes here passes there): values and `where`
values must have the column's JSON type (SQLite would coerce `"8"` to 8), and `where` may only name the
loaded object's own fields (no joins).

The control API under `/_emulator/...` is served on every device port (any device reaches all of them), needs
no session and gets no latency or faults; `EmulatorControl` wraps it. Run it in a thread (`run_in_thread`,
tests), as a detached process reused by later callers (`start_emulator_process`, demo and benchmark) or from
the shell (`python -m emulators.controlid --help`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import signal
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import httpx
import uvicorn
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from emulators.common import (
    ControlClient,
    EmulatorService,
    StoppableEmulator,
    add_config_arguments,
    bind,
    config_from_arguments,
    dumps,
    health,
)
from operations.infra.processes import free_port

try:  # a dependency of Prefect, several times faster than json on big batches
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover - orjson ships with Prefect
    _fast_loads = json.loads

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STATE_FILE = "turnstile-emulator.json"
SERVICE_NAME = "controlid-emulator"

UINT64_MAX = 2**64 - 1
INT64_MAX = 2**63 - 1
MAX_SQL_VARIABLES = 999  # SQLITE_MAX_VARIABLE_NUMBER of the devices' SQLite
WRITE_PATHS = frozenset(
    {"/create_objects.fcgi", "/create_or_modify_objects.fcgi", "/modify_objects.fcgi", "/destroy_objects.fcgi"}
)
_EMPTY_BODY_OK = frozenset({"/logout.fcgi", "/session_is_valid.fcgi", "/system_information.fcgi"})
INVALID_LOGIN_TEXT = "Invalid login or password"
INVALID_SESSION_TEXT = "Invalid session"

# Knobs POST /_emulator/configure may change; the others (devices, groups, seed) shape the devices at start.
RUNTIME_KNOBS = frozenset(
    {
        "latency_ms", "session_ttl_seconds", "max_concurrent_requests", "login", "password", "device_overrides",
        "error_rate_5xx", "timeout_rate", "timeout_hang_seconds", "drop_after_commit_rate", "max_body_bytes",
    }
)


# -- configuration -------------------------------------------------------------------------------------------
class DeviceSpec(BaseModel):
    """One device's knobs, overriding the emulator-wide ones; unset fields keep them."""

    model_config = ConfigDict(extra="forbid")

    login: str | None = None
    password: str | None = None
    latency_ms: float | None = Field(None, ge=0)
    max_concurrent_requests: int | None = Field(None, ge=1)


class EmulatorConfig(BaseModel):
    """Every knob of the emulator. Runtime knobs (RUNTIME_KNOBS) can also be changed over the control API."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(7, description="seed of the random faults")
    devices: int = Field(3, ge=1, le=256, description="number of devices (one port each)")
    latency_ms: float = Field(0, ge=0, description="time each API call takes, inside the device's concurrency cap")
    session_ttl_seconds: float = Field(600, gt=0, description="a session dies after this long without use")
    max_concurrent_requests: int = Field(1, ge=1, description="calls a device serves at once; the others wait")
    login: str = Field("admin", description="login of every device (see device_overrides)")
    password: str = Field("admin", description="password of every device (see device_overrides)")
    device_overrides: dict[int, DeviceSpec] = Field(default_factory=dict, description="per device index")
    groups: dict[int, str] = Field(
        default_factory=lambda: {1: "Default", 2: "Staff", 3: "Visitors"},
        description="the groups every device starts with (id -> name)",
    )
    error_rate_5xx: float = Field(0, ge=0, le=1, description="share of API calls answered 503 before doing anything")
    timeout_rate: float = Field(0, ge=0, le=1, description="share of API calls that hang, then answer 503")
    timeout_hang_seconds: float = Field(30, ge=0, description="how long a hanging call hangs")
    drop_after_commit_rate: float = Field(
        0, ge=0, le=1, description="share of write calls applied whose connection is then closed without an answer"
    )
    max_body_bytes: int = Field(2_000_000, ge=1, description="larger request bodies are answered 413")

    @model_validator(mode="after")
    def _consistent(self) -> EmulatorConfig:
        if self.error_rate_5xx + self.timeout_rate > 1:
            raise ValueError("error_rate_5xx + timeout_rate must not exceed 1")
        unknown = [index for index in self.device_overrides if not 0 <= index < self.devices]
        if unknown:
            raise ValueError(f"device_overrides for unknown devices {unknown}")
        if any(group_id < 1 or group_id > INT64_MAX for group_id in self.groups):
            raise ValueError("group ids must be integers >= 1")
        return self

    def device_knob(self, index: int, name: str) -> Any:
        """A knob as device `index` sees it: its override if set, else the emulator-wide value."""
        override = self.device_overrides.get(index)
        value = getattr(override, name) if override is not None else None
        return getattr(self, name) if value is None else value


class FaultRule(BaseModel):
    """After letting `skip` matching calls through, inflict `kind` on the next `times` ones.

    `status` answers `status` before doing anything; `hang` waits `timeout_hang_seconds` (or until the client
    gives up) and then answers 503; `drop_after_commit` matches write calls only: the write is applied and the
    connection closed without an answer. Rules are tried in the order they were added."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["status", "hang", "drop_after_commit"] = "status"
    path: str | None = Field(None, description="the API path, e.g. /create_objects.fcgi; None: every API call")
    device: int | None = Field(None, ge=0, description="device index; None: every device")
    skip: int = Field(0, ge=0)
    times: int = Field(1, ge=1)
    status: int = Field(503, ge=400, le=599, description="the answer of kind 'status'")
    skipped: int = 0
    fired: int = 0

    @property
    def exhausted(self) -> bool:
        return self.fired >= self.times

    def matches(self, device: int, path: str) -> bool:
        if self.exhausted or (self.device is not None and self.device != device):
            return False
        if self.path is not None and self.path != path:
            return False
        return self.kind != "drop_after_commit" or path in WRITE_PATHS


# -- errors and JSON -----------------------------------------------------------------------------------------
class _ApiError(Exception):
    """An error answer of the API; raised inside handlers, rendered by the route wrapper."""

    def __init__(self, status: int, body: dict[str, Any]):
        super().__init__(status)
        self.status, self.body = status, body


def _bad_request(message: str) -> _ApiError:
    return _ApiError(400, {"error": message})


def _db_error(message: str) -> _ApiError:
    """An error of the device's SQLite, which the device reports with `"code": 1`."""
    return _ApiError(400, {"error": message, "code": 1})


def _json(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(content), status_code=status, headers=headers, media_type="application/json")


def _loads(raw: bytes) -> Any:
    try:
        return _fast_loads(raw)
    except ValueError:  # orjson refuses integers beyond 64 bits, which must get a 400 naming their field
        pass
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise _bad_request(f"invalid JSON: {exc}") from None


def _fault_body(status: int) -> dict[str, Any]:
    if status == 503:
        return {"error": "busy"}
    try:
        return {"error": HTTPStatus(status).phrase.lower()}
    except ValueError:
        return {"error": "server error" if status >= 500 else "client error"}


def _type_name(value: Any) -> str:
    return "null" if value is None else {bool: "boolean", str: "string", list: "array", dict: "object"}.get(
        type(value), "number"
    )


# -- the device database -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Column:
    kind: Literal["id", "uint64", "time", "str"]
    not_null: bool  # must be given when a row is inserted, and can never be null
    writable: bool = True  # False: assigned by the device (cards.id)


SCHEMA: dict[str, dict[str, _Column]] = {
    "users": {
        "id": _Column("id", True),
        "registration": _Column("str", True),
        "name": _Column("str", True),
        "begin_time": _Column("time", False),
        "end_time": _Column("time", False),
    },
    "cards": {
        "id": _Column("id", True, writable=False),
        "value": _Column("uint64", True),
        "user_id": _Column("id", True),
    },
    "groups": {"id": _Column("id", True), "name": _Column("str", True)},
    "user_groups": {"user_id": _Column("id", True), "group_id": _Column("id", True)},
}
_RANGES = {"id": (1, INT64_MAX), "uint64": (0, UINT64_MAX), "time": (0, INT64_MAX)}
_PAIR_UNIQUE = "UNIQUE constraint failed: user_groups.user_id, user_groups.group_id"
_FOREIGN_KEY = "FOREIGN KEY constraint failed"

Row = dict[str, Any]
Where = dict[str, set[Any]]  # field -> accepted values (a scalar in the request is a one-value set)


def _check(obj: str, name: str, value: Any, writing: bool = True) -> Any:
    """One field of a request, validated against the schema: the value, or a 400 naming the field."""
    column = SCHEMA[obj].get(name)
    if column is None:
        raise _db_error(f"table {obj} has no column named {name}")
    if writing and not column.writable:
        raise _bad_request(f"{obj}.{name} is assigned by the device")
    if value is None:
        if column.not_null and writing:
            raise _db_error(f"NOT NULL constraint failed: {obj}.{name}")
        return None
    if column.kind == "str":
        if not isinstance(value, str):
            raise _bad_request(f"{obj}.{name} must be a string, not {_type_name(value)} {value!r}")
        return value
    low, high = _RANGES[column.kind]
    if type(value) is not int or not low <= value <= high:
        raise _bad_request(f"{obj}.{name} must be an integer from {low} to {high}, not {_type_name(value)} {value!r}")
    return value


# Per object: field -> (Python type, low, high) of every writable column, and the fields an insert must give.
_WRITABLE: dict[str, dict[str, tuple[type, int, int]]] = {
    obj: {name: (str, 0, 0) if column.kind == "str" else (int, *_RANGES[column.kind])
          for name, column in columns.items() if column.writable}
    for obj, columns in SCHEMA.items()
}
_REQUIRED: dict[str, tuple[str, ...]] = {
    obj: tuple(name for name, column in columns.items() if column.not_null and column.writable)
    for obj, columns in SCHEMA.items()
}


def _checked_row(obj: str, value: Row) -> Row:
    """A written value validated against the schema: one pass of type checks when every field is a non-null
    value of its column's type (the common case), else `_check` field by field, which raises the device's error
    for the first bad one (the nulls it lets through stay, for `_clean`)."""
    spec = _WRITABLE[obj]
    for name, field_value in value.items():
        kind = spec.get(name)
        if kind is None or type(field_value) is not kind[0] or (
                kind[0] is int and not kind[1] <= field_value <= kind[2]):
            return {name: _check(obj, name, v) for name, v in value.items()}
    return value


def _clean(row: Row) -> Row:
    """A row as stored and answered: optional fields that are null are left out (the row itself when none is)."""
    if None not in row.values():
        return row
    return {name: value for name, value in row.items() if value is not None}


@dataclass
class _Store:
    """One device's tables. Users, cards and groups are keyed by id, user_groups by (user_id, group_id); cards
    also by value. Every write validates all its values first and then applies them (all or nothing)."""

    users: dict[int, Row] = field(default_factory=dict)
    cards: dict[int, Row] = field(default_factory=dict)
    card_by_value: dict[int, int] = field(default_factory=dict)
    groups: dict[int, Row] = field(default_factory=dict)
    user_groups: dict[tuple[int, int], Row] = field(default_factory=dict)
    next_card_id: int = 1
    next_pair_rowid: int = 1
    generation: int = 0  # which unit answers at this address: a replacement gets the next one

    def table(self, obj: str) -> dict[Any, Row]:
        return getattr(self, obj)

    def wipe(self) -> dict[str, int]:
        counts = {"users": len(self.users), "cards": len(self.cards), "user_groups": len(self.user_groups)}
        self.users.clear()
        self.cards.clear()
        self.card_by_value.clear()
        self.user_groups.clear()
        self.next_card_id = 1
        return counts

    # -- reads ---------------------------------------------------------------------------------------------
    def select(self, obj: str, where: Where) -> list[Row]:
        """The rows matching every condition, in key order (id; (user_id, group_id) for user_groups)."""
        table = self.table(obj)
        if "id" in where and obj != "user_groups":
            candidates: Any = (table[key] for key in where["id"] if key in table)
        elif "value" in where and obj == "cards":
            candidates = (self.cards[self.card_by_value[v]] for v in where["value"] if v in self.card_by_value)
        else:
            candidates = table.values()
        if len(where) == 1:  # the common case, about 3x faster than the general one on big tables
            ((name, allowed),) = where.items()
            rows = [row for row in candidates if row.get(name) in allowed]
        else:
            rows = [row for row in candidates if all(row.get(name) in allowed for name, allowed in where.items())]
        if obj == "user_groups":
            rows.sort(key=lambda row: (row["user_id"], row["group_id"]))
        else:
            rows.sort(key=lambda row: row["id"])
        return rows

    def page(self, obj: str, offset: int, limit: int | None) -> list[Row]:
        """Every row from `offset` on (at most `limit`) in key order: the keys are sorted, not the rows, and
        only the page's rows are read (a count probe of a 10,000-user device is as cheap as its index)."""
        table = self.table(obj)
        keys = sorted(table)
        return [table[key] for key in (keys[offset:] if limit is None else keys[offset : offset + limit])]

    def truth_users(self) -> list[dict[str, Any]]:
        cards: dict[int, list[int]] = {}
        for card in self.cards.values():
            cards.setdefault(card["user_id"], []).append(card["value"])
        groups: dict[int, list[int]] = {}
        for user_id, group_id in self.user_groups:
            groups.setdefault(user_id, []).append(group_id)
        return [
            {**self.users[uid], "cards": sorted(cards.get(uid, [])), "groups": sorted(groups.get(uid, []))}
            for uid in sorted(self.users)
        ]

    # -- writes --------------------------------------------------------------------------------------------
    def _foreign_keys(self, obj: str, row: Row) -> None:
        if obj in ("cards", "user_groups") and row["user_id"] not in self.users:
            raise _db_error(_FOREIGN_KEY)
        if obj == "user_groups" and row["group_id"] not in self.groups:
            raise _db_error(_FOREIGN_KEY)

    def create(self, obj: str, values: list[Row]) -> list[int]:
        """INSERT every value; the ids of the new rows, in order."""
        rows = []
        seen: set[Any] = set()
        required = _REQUIRED[obj]
        for value in values:
            row = _checked_row(obj, value)
            for name in required:
                if row.get(name) is None:
                    raise _db_error(f"NOT NULL constraint failed: {obj}.{name}")
            if obj == "cards":
                if row["value"] in self.card_by_value or row["value"] in seen:
                    raise _db_error("UNIQUE constraint failed: cards.value")
                seen.add(row["value"])
            elif obj == "user_groups":
                pair = (row["user_id"], row["group_id"])
                if pair in self.user_groups or pair in seen:
                    raise _db_error(_PAIR_UNIQUE)
                seen.add(pair)
            else:
                if row["id"] in self.table(obj) or row["id"] in seen:
                    raise _db_error(f"UNIQUE constraint failed: {obj}.id")
                seen.add(row["id"])
            self._foreign_keys(obj, row)
            rows.append(_clean(row))
        ids = []
        for row in rows:  # everything checked: apply
            if obj == "cards":
                row = {"id": self.next_card_id, **row}
                self.next_card_id += 1
                self.cards[row["id"]] = row
                self.card_by_value[row["value"]] = row["id"]
                ids.append(row["id"])
            elif obj == "user_groups":
                self.user_groups[(row["user_id"], row["group_id"])] = row
                ids.append(self.next_pair_rowid)
                self.next_pair_rowid += 1
            else:
                self.table(obj)[row["id"]] = row
                ids.append(row["id"])
        return ids

    def create_or_modify(self, obj: str, values: list[Row]) -> int:
        """Upsert every value: users and groups keyed by id, cards by value (an existing card is updated, e.g.
        moved to another user), user_groups by the pair (present: nothing to do). The count of values that
        inserted or changed a row."""
        key_fields = {"users": ("id",), "groups": ("id",), "cards": ("value",), "user_groups": ("user_id", "group_id")}
        keys = key_fields[obj]
        staged: dict[Any, Row] = {}
        changes = 0
        required = _REQUIRED[obj]
        for value in values:
            fields = _checked_row(obj, value)
            for name in keys:
                if fields.get(name) is None:
                    raise _db_error(f"NOT NULL constraint failed: {obj}.{name}")
            key = tuple(fields[name] for name in keys) if len(keys) > 1 else fields[keys[0]]
            current = staged.get(key, self._current(obj, key))
            if current is None:
                for name in required:
                    if fields.get(name) is None:
                        raise _db_error(f"NOT NULL constraint failed: {obj}.{name}")
                row = _clean(fields)
            else:
                row = _clean({**current, **fields})
            self._foreign_keys(obj, row)
            if row != current:
                changes += 1
            staged[key] = row
        for key, row in staged.items():  # everything checked: apply
            if obj == "cards":
                if "id" not in row:
                    row = {"id": self.next_card_id, **row}
                    self.next_card_id += 1
                    self.card_by_value[key] = row["id"]
                self.cards[row["id"]] = row
            else:
                self.table(obj)[key] = row
        return changes

    def _current(self, obj: str, key: Any) -> Row | None:
        if obj == "cards":
            card_id = self.card_by_value.get(key)
            return None if card_id is None else self.cards[card_id]
        return self.table(obj).get(key)

    def modify(self, obj: str, values: Row, where: Where) -> int:
        """UPDATE the rows matching `where` with `values`; the count of matched rows (as SQLite counts)."""
        changes = {name: _check(obj, name, v) for name, v in values.items()}
        if obj in ("users", "groups") and "id" in changes:
            raise _bad_request(f"{obj}.id cannot be modified (the emulator does not cascade id changes)")
        matched = self.select(obj, where)
        updated = [_clean({**row, **changes}) for row in matched]
        for row in updated:
            self._foreign_keys(obj, row)
        if obj == "cards" and "value" in changes:
            owner = self.card_by_value.get(changes["value"])
            if len(updated) > 1 or (owner is not None and owner not in {row["id"] for row in matched}):
                raise _db_error("UNIQUE constraint failed: cards.value")
        if obj == "user_groups":
            old = {(row["user_id"], row["group_id"]) for row in matched}
            new = [(row["user_id"], row["group_id"]) for row in updated]
            if len(set(new)) < len(new) or any(pair in self.user_groups and pair not in old for pair in new):
                raise _db_error(_PAIR_UNIQUE)
        for before, after in zip(matched, updated):  # everything checked: apply
            if obj == "cards":
                del self.card_by_value[before["value"]]
                self.card_by_value[after["value"]] = after["id"]
                self.cards[after["id"]] = after
            elif obj == "user_groups":
                del self.user_groups[(before["user_id"], before["group_id"])]
            else:
                self.table(obj)[after["id"]] = after
        if obj == "user_groups":
            self.user_groups.update(((row["user_id"], row["group_id"]), row) for row in updated)
        return len(matched)

    def destroy(self, obj: str, where: Where) -> int:
        """DELETE the rows matching `where`, cascading to cards and user_groups; the count of `obj` rows."""
        matched = self.select(obj, where)
        if obj == "users":
            gone = {row["id"] for row in matched}
            for user_id in gone:
                del self.users[user_id]
            for card in [c for c in self.cards.values() if c["user_id"] in gone]:
                del self.cards[card["id"]], self.card_by_value[card["value"]]
            for pair in [p for p in self.user_groups if p[0] in gone]:
                del self.user_groups[pair]
        elif obj == "groups":
            gone = {row["id"] for row in matched}
            for group_id in gone:
                del self.groups[group_id]
            for pair in [p for p in self.user_groups if p[1] in gone]:
                del self.user_groups[pair]
        elif obj == "cards":
            for card in matched:
                del self.cards[card["id"]], self.card_by_value[card["value"]]
        else:
            for row in matched:
                del self.user_groups[(row["user_id"], row["group_id"])]
        return len(matched)


# -- request bodies ------------------------------------------------------------------------------------------
def _object_name(body: dict[str, Any]) -> str:
    obj = body.get("object")
    if not isinstance(obj, str):
        raise _bad_request("object is required (users, cards, groups or user_groups)")
    if obj not in SCHEMA:
        raise _db_error(f"no such table: {obj}")
    return obj


def _values_list(body: dict[str, Any]) -> list[Row]:
    values = body.get("values")
    if not isinstance(values, list) or not all(isinstance(value, dict) for value in values):
        raise _bad_request("values must be a list of objects")
    first = values[0].keys() if values else None
    if any(value.keys() != first for value in values):
        raise _bad_request("all values of one call must have the same fields")
    return values


def _where(obj: str, body: dict[str, Any]) -> Where:
    """`where` of a request: {obj: {field: value or [values]}}, checked and counted like SQLite variables."""
    raw = body.get("where")
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise _bad_request("where must map an object name to {field: value or [values]}")
    others = sorted(set(raw) - {obj})
    if others:
        raise _bad_request(f"the emulator supports where on the {obj} object only, not on {others}")
    conditions: Where = {}
    variables = 0
    for name, wanted in raw.get(obj, {}).items():
        listed = wanted if isinstance(wanted, list) else [wanted]
        variables += len(listed)
        conditions[name] = {_check(obj, name, value, writing=False) for value in listed}
    if variables > MAX_SQL_VARIABLES:
        raise _db_error("too many SQL variables")
    return conditions


def _paging(body: dict[str, Any]) -> tuple[int | None, int]:
    limit, offset = body.get("limit"), body.get("offset", 0)
    for name, value in (("limit", limit), ("offset", offset)):
        if value is not None and (type(value) is not int or value < 0):
            raise _bad_request(f"{name} must be an integer >= 0")
    return limit, offset or 0


# -- stats, the concurrency gate and the devices -------------------------------------------------------------
@dataclass
class _Stats:
    routes: dict[str, dict[str, int]] = field(default_factory=dict)
    total: int = 0
    peak_in_flight: int = 0
    peak_served: int = 0
    logins: int = 0
    write_calls: int = 0
    objects_written: int = 0
    faults_injected: int = 0
    dropped: int = 0

    def record(self, route: str, outcome: str) -> None:
        self.total += 1
        by_outcome = self.routes.setdefault(route, {})
        by_outcome[outcome] = by_outcome.get(outcome, 0) + 1


class _Gate:
    """A first-come first-served semaphore whose limit can change while calls wait (an asyncio.Semaphore's
    cannot): the device's cap on calls served at once."""

    def __init__(self, limit: int):
        self.limit = limit
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed a slot just before the cancel: give it back
                self.release()
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self.active -= 1
        self._wake()

    def set_limit(self, limit: int) -> None:
        self.limit = limit
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.active < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.active += 1
                waiter.set_result(None)


class _DeviceServer(uvicorn.Server):
    """A uvicorn server that leaves signals alone: several share one event loop, whose owner handles them."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class _Device:
    index: int
    store: _Store
    gate: _Gate
    fault_rng: random.Random
    port: int = 0
    sessions: dict[str, float] = field(default_factory=dict)  # token -> time.monotonic() of its last use
    stats: _Stats = field(default_factory=_Stats)
    in_flight: int = 0
    down: bool = False
    started: float = field(default_factory=time.monotonic)  # the unit's boot, for its uptime
    server: _DeviceServer | None = None
    task: asyncio.Task[None] | None = None
    stopping: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stats_dict(self) -> dict[str, Any]:
        stats = self.stats
        by_status: dict[str, int] = {}
        for counts in stats.routes.values():
            for outcome, count in counts.items():
                by_status[outcome] = by_status.get(outcome, 0) + count
        return {
            "device": self.index,
            "total": stats.total,
            "routes": stats.routes,
            "by_status": by_status,
            "in_flight": self.in_flight,
            "peak_in_flight": stats.peak_in_flight,
            "served": self.gate.active,
            "peak_served": stats.peak_served,
            "logins": stats.logins,
            "sessions": len(self.sessions),
            "write_calls": stats.write_calls,
            "objects_written": stats.objects_written,
            "faults_injected": stats.faults_injected,
            "dropped": stats.dropped,
        }


def _uvicorn_server(app: Starlette) -> _DeviceServer:
    # keep-alive longer than clients' (httpx: 5 s), so a pooled connection is never closed under a request
    return _DeviceServer(
        uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off", server_header=False,
            timeout_graceful_shutdown=3, timeout_keep_alive=65, backlog=2048,
            proxy_headers=False,  # local clients only: no X-Forwarded-* middleware on every request
        )
    )


class _AbortedResponse(Response):
    """Starts an answer and stops: the server closes the connection (the fallback of a drop, see `_drop`)."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"1")]})


async def _wait_disconnect(request: Request) -> None:
    """Return once the client has closed the connection (the body must have been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.01)


# -- the emulator --------------------------------------------------------------------------------------------
Handler = Callable[[_Device, Request, dict[str, Any]], dict[str, Any]]


class TurnstileEmulator:
    """The devices' state, handlers and servers. One instance per process; used only from its event loop."""

    def __init__(self, config: EmulatorConfig):
        self.config = config.model_copy(deep=True)
        self.devices: list[_Device] = []
        for index in range(config.devices):
            store = _Store(groups={gid: {"id": gid, "name": name} for gid, name in sorted(config.groups.items())})
            gate = _Gate(config.device_knob(index, "max_concurrent_requests"))
            self.devices.append(_Device(index, store, gate, random.Random(f"{config.seed}:faults:{index}")))
        self.apps = [create_app(self, index) for index in range(config.devices)]
        self.rules: list[FaultRule] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None

    # -- serving -------------------------------------------------------------------------------------------
    async def serve(
        self, sockets: Sequence[socket.socket], on_started: Callable[[], None] | None = None, signals: bool = False
    ) -> None:
        """Serve device i on sockets[i] until `request_stop()` (or SIGTERM/SIGINT when `signals`)."""
        if len(sockets) != len(self.devices):
            raise ValueError(f"{len(self.devices)} devices need as many sockets, not {len(sockets)}")
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        if signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.add_signal_handler(sig, self._stop_event.set)
        try:
            for device, sock in zip(self.devices, sockets):
                device.port = sock.getsockname()[1]
            await asyncio.gather(*(self._start_server(d, s) for d, s in zip(self.devices, sockets)))
            if on_started is not None:
                on_started()
            await self._stop_event.wait()
        finally:
            await asyncio.gather(*(self._stop_server(d) for d in self.devices), return_exceptions=True)

    def request_stop(self) -> None:
        """Make `serve` return; callable from any thread."""
        if self._loop is not None and self._stop_event is not None:
            self._loop.call_soon_threadsafe(self._stop_event.set)

    async def _start_server(self, device: _Device, sock: socket.socket) -> None:
        server = _uvicorn_server(self.apps[device.index])
        task = asyncio.create_task(server.serve(sockets=[sock]), name=f"turnstile-{device.index}")
        while not server.started:
            if task.done():
                sock.close()
                task.result()  # its exception, if any
                raise RuntimeError(f"device {device.index} did not start on 127.0.0.1:{device.port}")
            await asyncio.sleep(0.005)
        device.server, device.task = server, task

    @staticmethod
    def _close_listeners(device: _Device) -> None:
        """Stop accepting connections now: the port refuses them from here on."""
        for listener in getattr(device.server, "servers", []):
            listener.close()

    async def _stop_server(self, device: _Device, abort: bool = False, keep: Any = None) -> None:
        """Stop the device's server; `abort` also closes its open connections (but `keep`) at once."""
        if device.stopping is not None and device.stopping is not asyncio.current_task():
            await asyncio.shield(device.stopping)
        server, task = device.server, device.task
        if server is None or task is None:
            return
        self._close_listeners(device)
        if abort:
            for connection in list(server.server_state.connections):
                if connection is not keep:
                    connection.transport.close()
        server.should_exit = True
        try:
            await task
        finally:
            device.server = device.task = None

    def _connection(self, device: _Device, request: Request) -> Any:
        """The uvicorn protocol instance (one TCP connection) carrying `request`, or None."""
        client = request.scope.get("client")
        server = device.server
        if server is None or not client:
            return None
        for connection in list(server.server_state.connections):
            if getattr(connection, "client", None) == tuple(client):
                return connection
        return None

    async def _drop(self, device: _Device, request: Request) -> Response:
        """Close the request's connection without an answer: the client sees the server disconnect.

        uvicorn does not hand its transport to the app, so the connection is found among the server's by the
        client address. Failing that, an answer is started and abandoned, which also makes uvicorn close it."""
        connection = self._connection(device, request)
        if connection is None:
            return _AbortedResponse()
        connection.transport.close()
        for _ in range(2):  # let connection_lost run: the answer returned next is then discarded quietly
            await asyncio.sleep(0)
        return Response(status_code=204)

    async def set_down(self, index: Any, down: bool, request: Request, via: int) -> dict[str, Any] | Response:
        """Take a device's port down (connections refused, open ones closed, calls in progress dropped) or
        bring it back up on the same port. Its data and sessions survive (a network outage, not a reboot).

        Asked through the device itself, the answer closes its connection (`Connection: close`), and the
        server stops in the background once that answer is out."""
        device = self._device(index)
        if device.down and via == device.index:
            raise _ApiError(409, {"error": f"device {device.index} is down: ask through another device"})
        if down and not device.down:
            if all(other.down for other in self.devices if other is not device):
                raise _ApiError(409, {"error": "the last device that is up cannot go down: the control API needs it"})
            device.down = True
            self._close_listeners(device)
            keep = self._connection(device, request) if via == device.index else None
            device.stopping = asyncio.create_task(self._stop_server(device, abort=True, keep=keep))
            if via == device.index:
                return _json(self.device_summary(device), headers={"Connection": "close"})
            await asyncio.shield(device.stopping)
        elif not down and device.down:
            if device.stopping is not None:
                await asyncio.shield(device.stopping)
                device.stopping = None
            try:
                await self._start_server(device, bind("127.0.0.1", device.port))
            except RuntimeError as exc:
                raise _ApiError(500, {"error": str(exc)}) from None
            device.down = False
        return self.device_summary(device)

    # -- the API -------------------------------------------------------------------------------------------
    def api_route(self, index: int, path: str, handler: Handler) -> Route:
        """A route of device `index`: body limit, faults, the concurrency gate, latency, session and stats."""
        device = self.devices[index]

        async def endpoint(request: Request) -> Response:
            device.in_flight += 1
            device.stats.peak_in_flight = max(device.stats.peak_in_flight, device.in_flight)
            outcome = "500"
            try:
                response, outcome = await self._call(device, path, handler, request)
                return response
            finally:
                device.in_flight -= 1
                device.stats.record(path, outcome)

        return Route(path, endpoint, methods=["POST"])

    async def _call(self, device: _Device, path: str, handler: Handler, request: Request) -> tuple[Response, str]:
        """The answer of one API call and its outcome for the stats (a status, "dropped" or "hang")."""
        stats = device.stats
        if device.down:  # a call that slipped in while the server stops
            return await self._drop(device, request), "dropped"
        try:
            raw = await self._read_body(request)
        except _ApiError as exc:
            return _json(exc.body, exc.status), str(exc.status)
        fault = self._fault(device, path)
        if fault is not None and fault != "drop_after_commit":
            stats.faults_injected += 1
            if fault == "hang":
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(_wait_disconnect(request), self.config.timeout_hang_seconds)
                return _json(_fault_body(503), 503), "hang"
            return _json(_fault_body(int(fault)), int(fault)), fault
        await device.gate.acquire()
        try:
            stats.peak_served = max(stats.peak_served, device.gate.active)
            loop = asyncio.get_running_loop()
            ends = loop.time() + self.config.device_knob(device.index, "latency_ms") / 1000
            try:
                if path not in ("/login.fcgi", "/session_is_valid.fcgi"):
                    self._authenticate(device, request)
                body = self._parse_body(request, raw, empty_ok=path in _EMPTY_BODY_OK)
                if path in WRITE_PATHS:
                    stats.write_calls += 1
                answer = handler(device, request, body)
                if path in WRITE_PATHS:
                    stats.objects_written += answer["changes"] if "changes" in answer else len(answer["ids"])
                response, outcome = _json(answer), "200"
            except _ApiError as exc:
                response, outcome = _json(exc.body, exc.status), str(exc.status)
            if ends > loop.time():  # the call takes the latency in all, its own work included
                await asyncio.sleep(ends - loop.time())
            if device.down:  # set down during the call: the answer is lost (a write is applied)
                return await self._drop(device, request), "dropped"
            if fault == "drop_after_commit":
                stats.faults_injected += 1
                stats.dropped += 1
                return await self._drop(device, request), "dropped"
            return response, outcome
        finally:
            device.gate.release()

    async def _read_body(self, request: Request) -> bytes:
        """The whole body, or a 413 above max_body_bytes (read to its end all the same: answering while the
        client still sends would show it a broken pipe instead of the 413)."""
        limit = self.config.max_body_bytes
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
        if size > limit:
            raise _ApiError(413, {"error": "request too large"})
        return b"".join(chunks)

    @staticmethod
    def _parse_body(request: Request, raw: bytes, empty_ok: bool) -> dict[str, Any]:
        if not raw.strip():
            if empty_ok:
                return {}
            raise _bad_request("a JSON object body is required")
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise _bad_request(f"Content-Type must be application/json, not {content_type or 'missing'!r}")
        body = _loads(raw)
        if not isinstance(body, dict):
            raise _bad_request("the body must be a JSON object")
        return body

    def _fault(self, device: _Device, path: str) -> str | None:
        """The fault this call gets: a status code (as text), "hang", "drop_after_commit" or None. Targeted
        rules first (the first matching one is consumed), then the random shares."""
        for rule in self.rules:
            if rule.matches(device.index, path):
                if rule.skipped < rule.skip:
                    rule.skipped += 1
                    return None  # consumed by this rule: the call goes through
                rule.fired += 1
                return str(rule.status) if rule.kind == "status" else rule.kind
        config = self.config
        if config.error_rate_5xx or config.timeout_rate:
            roll = device.fault_rng.random()
            if roll < config.error_rate_5xx:
                return "503"
            if roll < config.error_rate_5xx + config.timeout_rate:
                return "hang"
        if config.drop_after_commit_rate and path in WRITE_PATHS:
            if device.fault_rng.random() < config.drop_after_commit_rate:
                return "drop_after_commit"
        return None

    def _session_valid(self, device: _Device, token: str | None) -> bool:
        """Whether the token is a live session of the device; a live one is touched (the TTL counts idleness)."""
        last_use = device.sessions.get(token) if token else None
        if last_use is None:
            return False
        now = time.monotonic()
        if now - last_use > self.config.session_ttl_seconds:
            del device.sessions[token]
            return False
        device.sessions[token] = now
        return True

    def _authenticate(self, device: _Device, request: Request) -> str:
        token = request.query_params.get("session")
        if not self._session_valid(device, token):
            raise _ApiError(401, {"error": INVALID_SESSION_TEXT})
        return token

    # -- handlers ------------------------------------------------------------------------------------------
    def login(self, device: _Device, request: Request, body: dict[str, Any]) -> dict[str, Any]:
        for name in ("login", "password"):
            if not isinstance(body.get(name), str):
                raise _bad_request(f"{name} is required (a string)")
        knob = self.config.device_knob
        if body["login"] != knob(device.index, "login") or body["password"] != knob(device.index, "password"):
            raise _ApiError(401, {"error": INVALID_LOGIN_TEXT})
        if len(device.sessions) > 10_000:  # a long benchmark: forget the expired ones
            deadline = time.monotonic() - self.config.session_ttl_seconds
            device.sessions = {t: used for t, used in device.sessions.items() if used >= deadline}
        token = base64.b64encode(os.urandom(18)).decode()  # often holds '/' and '+', as the device's do
        device.sessions[token] = time.monotonic()
        device.stats.logins += 1
        return {"session": token}

    def logout(self, device: _Device, request: Request, body: dict[str, Any]) -> dict[str, Any]:
        device.sessions.pop(request.query_params.get("session", ""), None)
        return {}

    def session_is_valid(self, device: _Device, request: Request, body: dict[str, Any]) -> dict[str, Any]:
        return {"session_is_valid": self._session_valid(device, request.query_params.get("session"))}

    def system_information(self, device: _Device, request: Request, body: dict[str, Any]) -> dict[str, Any]:
        """The unit's identity and state, as the access API's `system_information.fcgi` answers it."""
        serial, device_id, mac = self.identity(device)
        up = int(time.monotonic() - device.started)
        return {
            "uptime": {"days": up // 86400, "hours": up // 3600 % 24, "minutes": up // 60 % 60, "seconds": up % 60},
            "time": int(time.time()), "serial": serial, "device_id": device_id, "version": "5.10.2",
            "online": False, "ip": "127.0.0.1",
            "network": {"ip": "127.0.0.1", "netmask": "255.0.0.0", "gateway": "127.0.0.1", "mac": mac,
                        "dhcp": False, "web_server_port": device.port, "ssl_enabled": False},
            "memory": {"ram": {"free": 120_000_000, "total": 250_000_000},
                       "disk": {"free": 2_000_000_000, "total": 3_800_000_000}},
        }

    def identity(self, device: _Device) -> tuple[str, int, str]:
        """(serial, device id, MAC) of the unit at a device's address: fixed by the seed, the device index and
        how many times the unit was replaced."""
        rng = random.Random(f"{self.config.seed}:unit:{device.index}:{device.store.generation}")
        number = rng.randrange(16**6)
        mac = ":".join(f"{rng.randrange(256):02X}" for _ in range(3))
        return f"0M{device.index % 100:02d}00/{number:06X}", rng.randrange(10**15, 10**17), f"FC:52:CE:{mac}"

    def create_objects(self, device: _Device, request: Request, body: dict[str, Any]) -> dict[str, Any]:
        obj = _object_name(body)
        return {"ids": device.store.create(obj, _values_list(body))}

    def create_or_modify_objects(self, device: _Device, request: Request, body: dict[str, Any]) -> dict[str, Any]:
        obj = _object_name(body)
        return {"changes": device.store.create_or_modify(obj, _values_list(body))}

    def load_objects(self, device: _Device, request: Request, body: dict[str, Any]) -> dict[str, Any]:
        obj = _object_name(body)
        where = _where(obj, body)
        limit, offset = _paging(body)
        if where:
            rows = device.store.select(obj, where)
            rows = rows[offset:] if limit is None else rows[offset : offset + limit]
        else:  # the same key order as `select`, without reading every row
            rows = device.store.page(obj, offset, limit)
        return {obj: [dict(row) for row in rows]}

    def modify_objects(self, device: _Device, request: Request, body: dict[str, Any]) -> dict[str, Any]:
        obj = _object_name(body)
        values = body.get("values")
        if not isinstance(values, dict) or not values:
            raise _bad_request("values must be an object with the fields to change")
        return {"changes": device.store.modify(obj, values, _where(obj, body))}

    def destroy_objects(self, device: _Device, request: Request, body: dict[str, Any]) -> dict[str, Any]:
        obj = _object_name(body)
        return {"changes": device.store.destroy(obj, _where(obj, body))}

    # -- control API ---------------------------------------------------------------------------------------
    def _device(self, value: Any) -> _Device:
        try:
            index = int(value)
        except (TypeError, ValueError):
            raise _ApiError(400, {"error": f"device must be a device index, not {value!r}"}) from None
        if not 0 <= index < len(self.devices):
            raise _ApiError(404, {"error": f"unknown device {index}"})
        return self.devices[index]

    def _devices_of(self, value: Any) -> list[_Device]:
        return list(self.devices) if value in (None, "") else [self._device(value)]

    def device_summary(self, device: _Device) -> dict[str, Any]:
        return {"index": device.index, "base_url": device.base_url, "port": device.port, "down": device.down}

    def control_routes(self, index: int) -> list[Route]:
        """The control API as served by device `index` (every device serves it, for all devices)."""

        def route(path: str, handler: Callable[..., Any], method: str = "POST") -> Route:
            async def endpoint(request: Request) -> Response:
                try:
                    body: dict[str, Any] = {}
                    if method == "POST":
                        raw = await request.body()
                        body = json.loads(raw) if raw.strip() else {}
                        if not isinstance(body, dict):
                            raise _ApiError(400, {"error": "the body must be a JSON object"})
                    device = request.query_params.get("device", body.pop("device", None))
                    answer = handler(body, device, request)
                    if asyncio.iscoroutine(answer):
                        answer = await answer
                    return answer if isinstance(answer, Response) else _json(answer)
                except _ApiError as exc:
                    return _json(exc.body, exc.status)
                except (ValueError, TypeError, ValidationError) as exc:  # bad JSON, fields or values
                    return _json({"error": str(exc)}, 400)

            return Route(f"/_emulator/{path}", endpoint, methods=[method])

        return [
            route("health", lambda b, d, r: self.health(index), "GET"),
            route("config", lambda b, d, r: self.config.model_dump(mode="json"), "GET"),
            route("configure", lambda b, d, r: self.configure(b)),
            route("devices", lambda b, d, r: [self.device_summary(x) for x in self.devices], "GET"),
            route("users", lambda b, d, r: self._device(d).store.truth_users(), "GET"),
            route("stats", lambda b, d, r: self.stats(d), "GET"),
            route("reset_stats", lambda b, d, r: self.reset_stats(d)),
            route("expire_sessions", lambda b, d, r: self.expire_sessions(d)),
            route("faults", lambda b, d, r: [rule.model_dump() for rule in self.rules], "GET"),
            route("add_fault", lambda b, d, r: self.add_fault({**b, "device": d})),
            route("clear_faults", lambda b, d, r: self.clear_faults()),
            route("set_down", lambda b, d, r: self.set_down(d, b.get("down", True) is True, r, index)),
            route("wipe", lambda b, d, r: self.wipe(d, b.get("replace", False) is True)),
        ]

    def health(self, index: int) -> dict[str, Any]:
        return {
            "service": SERVICE_NAME,
            "device": index,
            "devices": len(self.devices),
            "ports": [device.port for device in self.devices],
            "pid": os.getpid(),
        }

    def configure(self, changes: dict[str, Any]) -> dict[str, Any]:
        fixed = sorted(set(changes) - RUNTIME_KNOBS)
        if fixed:
            raise _ApiError(400, {"error": f"not runtime knobs: {fixed}; runtime knobs: {sorted(RUNTIME_KNOBS)}"})
        self.config = EmulatorConfig.model_validate({**self.config.model_dump(), **changes})
        for device in self.devices:
            device.gate.set_limit(self.config.device_knob(device.index, "max_concurrent_requests"))
        return self.config.model_dump(mode="json")

    def stats(self, device: Any = None) -> dict[str, Any]:
        if device not in (None, ""):
            return self._device(device).stats_dict()
        return {"devices": [d.stats_dict() for d in self.devices]}

    def reset_stats(self, device: Any = None) -> dict[str, Any]:
        for target in self._devices_of(device):
            target.stats = _Stats(peak_in_flight=target.in_flight, peak_served=target.gate.active)
        return self.stats(device)

    def expire_sessions(self, device: Any = None) -> dict[str, Any]:
        expired = 0
        for target in self._devices_of(device):
            expired += len(target.sessions)
            target.sessions.clear()
        return {"expired": expired}

    def add_fault(self, body: dict[str, Any]) -> dict[str, Any]:
        rule = FaultRule.model_validate({k: v for k, v in body.items() if k not in ("skipped", "fired")})
        if rule.device is not None:
            self._device(rule.device)
        self.rules.append(rule)
        return {"index": len(self.rules) - 1, **rule.model_dump()}

    def clear_faults(self) -> dict[str, Any]:
        count = len(self.rules)
        self.rules.clear()
        return {"cleared": count}

    def wipe(self, device: Any = None, replace: bool = False) -> dict[str, Any]:
        """Delete every user, card and group link (groups stay), on one device or all; sessions stay. `replace`:
        a new unit at the same address (a new serial and device id; it boots now, without sessions)."""
        wiped = []
        for target in self._devices_of(device):
            counts = target.store.wipe()
            if replace:
                target.store.generation += 1
                target.sessions.clear()
                target.started = time.monotonic()
            serial, device_id, _ = self.identity(target)
            wiped.append({"device": target.index, **counts, "serial": serial, "device_id": device_id})
        return {"devices": wiped}


def _json_errors(request: Request, exc: Exception) -> Response:
    """Routing errors (404, 405) in the device's format: {"error": ...}."""
    assert isinstance(exc, HTTPException)
    return _json({"error": exc.detail}, exc.status_code, dict(exc.headers or {}))


# -- the app and ways to run it ------------------------------------------------------------------------------
def create_app(emulator: TurnstileEmulator, device: int) -> Starlette:
    """Device `device` of the emulator as an ASGI app (`app.state.emulator`, `app.state.device`)."""
    api = emulator.api_route
    routes = [
        api(device, "/login.fcgi", emulator.login),
        api(device, "/logout.fcgi", emulator.logout),
        api(device, "/session_is_valid.fcgi", emulator.session_is_valid),
        api(device, "/system_information.fcgi", emulator.system_information),
        api(device, "/create_objects.fcgi", emulator.create_objects),
        api(device, "/create_or_modify_objects.fcgi", emulator.create_or_modify_objects),
        api(device, "/load_objects.fcgi", emulator.load_objects),
        api(device, "/modify_objects.fcgi", emulator.modify_objects),
        api(device, "/destroy_objects.fcgi", emulator.destroy_objects),
        *emulator.control_routes(device),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _json_errors})
    app.state.emulator, app.state.device = emulator, device
    return app


@dataclass
class RunningEmulator(StoppableEmulator):
    """A live emulator. `stop()` (or leaving the `with` block) stops it, whoever started it."""

    base_urls: list[str]  # one per device, in index order
    ports: list[int]
    pid: int
    started: bool  # False when an already-running process was reused
    config: EmulatorConfig  # its config when this handle was made (a reused process: its current one)
    _stop: Callable[[], None] = field(repr=False)

    @property
    def control(self) -> EmulatorControl:
        return EmulatorControl(self.base_urls)


def _bind_all(ports: Sequence[int]) -> list[socket.socket]:
    sockets: list[socket.socket] = []
    try:
        for port in ports:
            sockets.append(bind("127.0.0.1", port))
    except RuntimeError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _ports_for(config: EmulatorConfig, ports: Sequence[int] | None) -> list[int]:
    ports = list(ports) if ports is not None else [0] * config.devices
    if len(ports) != config.devices:
        raise ValueError(f"{config.devices} devices need {config.devices} ports, not {len(ports)}")
    return ports


def run_in_thread(
    config: EmulatorConfig | None = None, ports: Sequence[int] | None = None, start_timeout: float = 10.0
) -> RunningEmulator:
    """Serve the devices from a daemon thread of this process on 127.0.0.1 (ports default to free ones)."""
    config = config or EmulatorConfig()
    sockets = _bind_all(_ports_for(config, ports))  # bound here, so port 0 cannot race with another process
    emulator = TurnstileEmulator(config)
    started = threading.Event()
    thread = threading.Thread(
        target=lambda: asyncio.run(emulator.serve(sockets, started.set)), name="turnstile-emulator", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not started.wait(0.01):
        if not thread.is_alive() or time.monotonic() > deadline:
            emulator.request_stop()
            for sock in sockets:
                sock.close()
            raise RuntimeError("the turnstile emulator did not start")

    def stop() -> None:
        emulator.request_stop()
        thread.join(timeout=10)

    bound = [device.port for device in emulator.devices]
    return RunningEmulator([f"http://127.0.0.1:{p}" for p in bound], bound, os.getpid(), True, emulator.config, stop)


def _health(port: int) -> dict[str, Any] | None:
    return health(port, SERVICE_NAME)


def _free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


class TurnstileEmulatorService(EmulatorService[RunningEmulator]):
    """The emulated devices as a detached service (the stack's, the demo's, the benchmark's), one port each on
    127.0.0.1 (`ports`, free ones by default). A reused process keeps its devices (`RunningEmulator.config`
    tells how many); stop it first to change them, or use the control API for the runtime knobs."""

    name = "turnstile emulator"
    state_file = STATE_FILE
    module = "emulators.controlid"

    def __init__(
        self, folder: Path, config: EmulatorConfig | None = None, ports: Sequence[int] | None = None,
        start_timeout: float = 30.0,
    ):
        super().__init__(folder, config or EmulatorConfig(), start_timeout)
        self.ports = ports

    def _handle(self, ports: list[int], pid: int, started: bool) -> RunningEmulator:
        base_urls = [f"http://127.0.0.1:{port}" for port in ports]
        with EmulatorControl(base_urls) as control:
            config = EmulatorConfig.model_validate(control.config())
        return RunningEmulator(base_urls, ports, pid, started, config, self.stop)

    def find(self) -> RunningEmulator | None:
        """The folder's process if it is running and answers (on any device)."""
        state = self.state()
        pid = self.current_pid(state)
        if not state or pid is None or not any(_health(p) is not None for p in state["ports"]):
            return None
        return self._handle(state["ports"], pid, False)

    def start(self) -> RunningEmulator:
        ports = _ports_for(self.config, self.ports)
        if 0 in ports:
            ports = _free_ports(self.config.devices)
        pid = self.spawn_emulator(
            ["--ports", ",".join(map(str, ports))], lambda: all(_health(port) is not None for port in ports),
            {"ports": ports}, f"the turnstile emulator did not start on 127.0.0.1 ports {ports}",
        )
        return self._handle(ports, pid, True)

    def address(self, running: RunningEmulator) -> str:
        return ", ".join(running.base_urls)


def running_emulator_process(state_dir: Path) -> RunningEmulator | None:
    """This folder's emulator process if it is running and answers (on any device), without starting one."""
    return TurnstileEmulatorService(state_dir).find()


def start_emulator_process(
    config: EmulatorConfig | None,
    state_dir: Path,
    ports: Sequence[int] | None = None,
    start_timeout: float = 30.0,
) -> RunningEmulator:
    """Reuse this folder's running emulator process, or start a detached one that outlives the caller."""
    return TurnstileEmulatorService(state_dir, config, ports, start_timeout).ensure()


def stop_emulator_process(state_dir: Path, timeout: float = 10.0) -> bool:
    """Stop this folder's emulator process. True if one was running."""
    return TurnstileEmulatorService(state_dir).stop(timeout)


# -- control client ------------------------------------------------------------------------------------------
class EmulatorControl(ControlClient):
    """The control API (`/_emulator/...`) over httpx, for tests, the demo and the benchmark.

    Any device's base URL reaches the control API of all devices; given several, a call moves on to the next
    when one refuses the connection (its device is down)."""

    def __init__(self, base_url: str | Sequence[str], timeout: float = 30.0):
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise ValueError("at least one base URL is needed")
        self.base_urls = [url.rstrip("/") for url in urls]
        super().__init__(timeout)

    def _send(self, method: str, path: str, body: dict[str, Any] | None, query: dict[str, Any]) -> httpx.Response:
        """One request to the first base URL that accepts the connection (then tried first next time)."""
        for attempt, base_url in enumerate(self.base_urls):
            try:
                response = self.http.request(method, f"{base_url}/_emulator/{path}", json=body, params=query)
                break
            except httpx.ConnectError:
                if attempt == len(self.base_urls) - 1:
                    raise
        if self.base_urls[0] != base_url:  # start with a device that answers next time
            self.base_urls.remove(base_url)
            self.base_urls.insert(0, base_url)
        return response

    def health(self) -> dict[str, Any]:
        return self._call("GET", "health")

    def config(self) -> dict[str, Any]:
        return self._call("GET", "config")

    def configure(self, **knobs: Any) -> dict[str, Any]:
        """Change runtime knobs (RUNTIME_KNOBS); answers the whole config."""
        return self._call("POST", "configure", knobs)

    def devices(self) -> list[dict[str, Any]]:
        """[{"index", "base_url", "port", "down"}] in index order."""
        return self._call("GET", "devices")

    def users(self, device: int) -> list[dict[str, Any]]:
        """The device's users by id, each with `cards` (their values) and `groups` (group ids), sorted."""
        return self._call("GET", "users", device=device)

    def stats(self, device: int | None = None) -> dict[str, Any]:
        """One device's stats, or {"devices": [...]} for all."""
        return self._call("GET", "stats", device=device)

    def reset_stats(self, device: int | None = None) -> dict[str, Any]:
        return self._call("POST", "reset_stats", device=device)

    def expire_sessions(self, device: int | None = None) -> int:
        return self._call("POST", "expire_sessions", device=device)["expired"]

    def add_fault(
        self,
        kind: Literal["status", "hang", "drop_after_commit"] = "status",
        path: str | None = None,
        device: int | None = None,
        status: int = 503,
        times: int = 1,
        skip: int = 0,
    ) -> dict[str, Any]:
        rule = {"kind": kind, "path": path, "status": status, "times": times, "skip": skip}
        return self._call("POST", "add_fault", rule, device=device)

    def faults(self) -> list[dict[str, Any]]:
        return self._call("GET", "faults")

    def clear_faults(self) -> int:
        return self._call("POST", "clear_faults")["cleared"]

    def set_down(self, device: int, down: bool = True) -> dict[str, Any]:
        """Take a device's port down (connections refused) or bring it back up; answers its summary."""
        return self._call("POST", "set_down", {"device": device, "down": down})

    def wipe(self, device: int | None = None, replace: bool = False) -> dict[str, Any]:
        """Delete the users, cards and group links of one device (None: all), as a factory reset does;
        `replace`: a new unit at the same address (a new serial and device id, no session)."""
        return self._call("POST", "wipe", {"replace": replace} if replace else None, device=device)


# -- command line --------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m emulators.controlid",
        description="Serve emulated Control iD turnstiles (one port per device) on 127.0.0.1 until SIGTERM or Ctrl-C.",
    )
    parser.add_argument("--port", type=int, default=8801, help="port of device 0, the next ones follow (0: free ports)")
    parser.add_argument("--ports", help="comma-separated port of every device (instead of --port)")
    add_config_arguments(parser, EmulatorConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    first_port, listed = args.pop("port"), args.pop("ports", None)
    try:
        config = config_from_arguments(args, EmulatorConfig)
        if listed:
            ports = _ports_for(config, [int(part) for part in listed.split(",")])
        else:
            ports = [first_port + i if first_port else 0 for i in range(config.devices)]
        sockets = _bind_all(ports)
    except (ValueError, ValidationError, RuntimeError) as exc:
        print(f"invalid configuration: {exc}", file=sys.stderr)
        return 2
    emulator = TurnstileEmulator(config)

    def started() -> None:
        for device in emulator.devices:
            print(f"controlid emulator: device {device.index} on {device.base_url}", flush=True)
        print(
            f"login={config.login} password={config.password} latency_ms={config.latency_ms} "
            f"max_concurrent_requests={config.max_concurrent_requests} (pid {os.getpid()})",
            flush=True,
        )

    asyncio.run(emulator.serve(sockets, started, signals=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
