"""The turnstiles of a devices file (.csv or .xlsx), for loading many TurnstileDevice blocks at once."""

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
}
BLOCK_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,119}$")  # Prefect block names: lower case, digits, dashes


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    base_url: str
    login: str
    password: SecretStr
    max_concurrent_requests: int | None
    requests_per_second: float | None


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
            )
    return list(devices.values())
