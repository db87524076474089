"""The turnstiles of a devices file (.csv or .xlsx), for loading many TurnstileDevice blocks at once.

Columns: name, base_url, login, password, and optionally max_concurrent_requests, requests_per_second and
managed_groups (the group ids whose links follow the participants file on that device, separated by commas,
semicolons or spaces: `1, 2, 5`; empty: every group the participants file names).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from operations.infra.tabular import cell_text, open_records, parse_decimal, parse_whole, read_header

DEVICE_COLUMNS = {
    "name": ("name", "nome", "turnstile", "catraca"),
    "base_url": ("base_url", "url", "address", "endereco"),
    "login": ("login", "user", "usuario"),
    "password": ("password", "senha"),
    "max_concurrent_requests": ("max_concurrent_requests", "concurrency", "concorrencia"),
    "requests_per_second": ("requests_per_second", "rate", "requisicoes_por_segundo"),
    "managed_groups": ("managed_groups", "groups", "grupos_gerenciados", "grupos"),
}
BLOCK_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,119}$")  # Prefect block names: lower case, digits, dashes
GROUP_SEPARATORS = re.compile(r"[,;\s]+")
MAX_GROUP_ID = 2**63 - 1  # the device's SQLite integer
MAX_MANAGED_GROUPS = 1000  # as the block's field


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    base_url: str
    login: str
    password: SecretStr
    max_concurrent_requests: int | None
    requests_per_second: float | None
    managed_groups: tuple[int, ...] = ()


def read_devices_file(path: Path) -> list[DeviceSpec]:
    """Every device of the file; a bad row is an error naming the row and column, before any block is saved."""
    devices: dict[str, DeviceSpec] = {}
    with open_records(path) as records:
        numbered = enumerate(records, start=1)
        at, _ = read_header(numbered, DEVICE_COLUMNS, ("name", "base_url", "password"), path.name)
        for row, cells in numbered:
            value = {column: cell_text(cells[i]) if i < len(cells) else "" for column, i in at.items()}
            if not any(value.values()):
                continue
            where = f"{path.name}, row {row}"
            if not BLOCK_NAME.match(value["name"]):
                raise ValueError(f"{where}, column name: {value['name']!r} is not a block name "
                                 "(lower case letters, digits and dashes)")
            if value["name"] in devices:
                raise ValueError(f"{where}, column name: {value['name']!r} repeated")
            if not value["base_url"].startswith(("http://", "https://")):
                raise ValueError(f"{where}, column base_url: {value['base_url']!r} is not an http(s) URL")
            if not value["password"]:
                raise ValueError(f"{where}, column password: empty")
            concurrency = parse_whole(value.get("max_concurrent_requests") or None)
            rate = parse_decimal(value.get("requests_per_second") or None)
            if value.get("max_concurrent_requests") and (concurrency is None or not 1 <= concurrency <= 16):
                raise ValueError(f"{where}, column max_concurrent_requests: a whole number from 1 to 16")
            if value.get("requests_per_second") and (rate is None or not 0 < rate <= 1000):
                raise ValueError(f"{where}, column requests_per_second: a number above 0, at most 1000")
            devices[value["name"]] = DeviceSpec(
                value["name"], value["base_url"], value.get("login") or "admin", SecretStr(value["password"]),
                concurrency, float(rate) if rate is not None else None,
                _group_ids(cells[at["managed_groups"]] if "managed_groups" in at and at["managed_groups"] < len(cells)
                           else None, f"{where}, column managed_groups"),
            )
    return list(devices.values())


def _group_ids(cell: object, where: str) -> tuple[int, ...]:
    """A cell of group ids (a number, or whole numbers separated by commas, semicolons or spaces), in order and
    without repeats; () when empty."""
    if isinstance(cell, (int, float)) and not isinstance(cell, bool):
        parts: list[object] = [cell]
    else:
        text = cell_text(cell) if cell is not None else ""
        parts = [part for part in GROUP_SEPARATORS.split(text) if part]
    ids = []
    for part in parts:
        group = parse_whole(part)
        if group is None or not 1 <= group <= MAX_GROUP_ID:
            raise ValueError(f"{where}: {cell_text(part) if not isinstance(part, str) else part!r} is not a group "
                             "id (whole numbers from 1, separated by commas, semicolons or spaces)")
        ids.append(group)
    ids = list(dict.fromkeys(ids))
    if len(ids) > MAX_MANAGED_GROUPS:
        raise ValueError(f"{where}: {len(ids)} groups, at most {MAX_MANAGED_GROUPS}")
    return tuple(ids)
