"""`HttpEndpoint`: the config-only base of the blocks that describe an outside HTTP API (`MarketplaceApp`,
`TurnstileDevice`): the checks of its base URL, its timeouts and retry budget, and the `HttpSettings` and
`RetryPolicy` a client of it is built with.

An interface (`ABC`): Prefect neither registers nor saves it; each subclass keeps its own block type, slug and
field names, so blocks saved before still load. A subclass names its URL field (`url_field`) and says how many
connections its pool opens (`connection_limit`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from prefect.blocks.core import Block
from pydantic import Field, ValidationInfo, field_validator

from operations.infra.http import HttpSettings, RetryPolicy


def attempts_field(default: int, description: str) -> Any:
    """The `max_attempts` field of an endpoint with its own default."""
    return Field(default=default, ge=1, le=20, description=description)


def backoff_base_field(default: float) -> Any:
    """The `backoff_base_seconds` field of an endpoint with its own default."""
    return Field(default=default, ge=0, le=60, description="First backoff ceiling; doubles per attempt (full jitter).")


class HttpEndpoint(Block, ABC):
    """Where an HTTP API is, how long to wait for it and how often to retry it."""

    url_field: ClassVar[str] = "base_url"

    connect_timeout_seconds: float = Field(default=5.0, gt=0, le=120, description="TCP/TLS connect timeout.")
    read_timeout_seconds: float = Field(
        default=30.0, gt=0, le=600, description="Seconds to wait for the answer to one request."
    )
    max_attempts: int = attempts_field(
        5, "Attempts per request for 429, 5xx and network faults (backoff with jitter)."
    )
    backoff_base_seconds: float = backoff_base_field(0.25)
    backoff_max_seconds: float = Field(default=10.0, ge=0, le=600, description="Largest backoff between attempts.")

    @field_validator("*")
    @classmethod
    def _http_url(cls, value: Any, info: ValidationInfo) -> Any:
        if info.field_name != cls.url_field:
            return value
        if not isinstance(value, str) or not value.startswith(("http://", "https://")):
            raise ValueError(f"{cls.url_field} must start with http:// or https://")
        return value.rstrip("/")

    @abstractmethod
    def connection_limit(self) -> int:
        """Connections of this process's pool to the endpoint."""

    def endpoint_url(self) -> str:
        return getattr(self, self.url_field)

    def http_settings(self) -> HttpSettings:
        limit = self.connection_limit()
        return HttpSettings(
            connect_timeout=self.connect_timeout_seconds, read_timeout=self.read_timeout_seconds,
            max_connections=limit, max_keepalive_connections=limit,
        )

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            attempts=self.max_attempts, base_delay=self.backoff_base_seconds, max_delay=self.backoff_max_seconds
        )

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The block's form: its own fields (address, credentials, limits) first, the shared HTTP ones after."""
        schema = super().model_json_schema(*args, **kwargs)
        shared = set(HttpEndpoint.model_fields)
        names = [n for n in cls.model_fields if n not in shared] + [n for n in cls.model_fields if n in shared]
        properties = schema.get("properties", {})
        ordered = {name: properties[name] for name in names if name in properties}
        ordered.update({k: v for k, v in properties.items() if k not in ordered})
        for position, prop in enumerate(ordered.values()):
            prop["position"] = position
        schema["properties"] = ordered
        return schema
