"""`TurnstileDevice`: the config-only Prefect block of one access-control device (a Control iD turnstile), and
`TurnstileCache`: the Redis of what the devices hold.

Operators add and edit devices in the UI (Blocks -> Turnstile Device) or load many from a file
(`python -m deployments.turnstile_devices load FILE`); `register-participants` works on every saved device by default.
The password is a `SecretStr`: never in a log line, an artifact, a parameter or an exception message.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, ContextManager

from pydantic import Field, SecretStr
from typing_extensions import Annotated

from blocks.http_endpoint import HttpEndpoint, attempts_field, backoff_base_field
from blocks.redis_connection import RedisConnection
from operations.turnstiles.cache import RegistrationCache
from operations.turnstiles.client import ControlIdClient, RequestStats


class TurnstileDevice(HttpEndpoint):
    """One turnstile: where its API is, how to log in, and how much load it takes."""

    _block_type_name: ClassVar[str] = "Turnstile Device"
    _block_type_slug: ClassVar[str] = "turnstile-device"
    _description: ClassVar[str] = (
        "A Control iD access-control device (turnstile): address, login, password and the load it takes "
        "(requests at once and per second, across every flow run)."
    )
    _documentation_url: ClassVar[str] = "https://www.controlid.com.br/docs/access-api-en/"
    _code_example: ClassVar[str] = """
```python
from blocks.turnstile_device import TurnstileDevice

device = TurnstileDevice.load("BLOCK_NAME")
client = device.client()  # a ControlIdClient over this process's shared httpx.Client
```
"""

    base_url: str = Field(
        default="http://192.168.0.10", description="The device's address, e.g. http://192.168.1.10 (no path)."
    )
    login: str = Field(default="admin", min_length=1, max_length=100, description="The device's API login.")
    password: SecretStr = Field(default=SecretStr(""), description="The device's API password.")
    max_concurrent_requests: int = Field(
        default=1, ge=1, le=16,
        description="Requests in flight on this device at once, across every flow run (a global concurrency limit).",
    )
    requests_per_second: float = Field(
        default=20.0, gt=0, le=1000, description="Requests per second to this device, across every flow run."
    )
    managed_groups: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list, max_length=1000,
        description="Group ids whose links follow the participants file on this device (a link to one of them "
                    "the file does not grant is removed); links to other groups are left alone. Empty: every "
                    "group the file names.",
    )
    # connect_timeout_seconds, read_timeout_seconds, backoff_max_seconds: HttpEndpoint's; a device's own defaults:
    max_attempts: int = attempts_field(4, "Attempts per request for refused connections, timeouts and 5xx.")
    backoff_base_seconds: float = backoff_base_field(0.5)

    def connection_limit(self) -> int:
        return self.max_concurrent_requests

    def client(
        self, name: str = "", limiter: Callable[[], ContextManager[Any]] | None = None,
        stats: RequestStats | None = None,
    ) -> ControlIdClient:
        """A client over this process's shared HTTP pool for the device (cheap; counters of its own)."""
        if not self.password.get_secret_value():
            raise ValueError(f"the TurnstileDevice block {name or self.base_url} has no password: fill it in")
        kwargs = {"limiter": limiter} if limiter is not None else {}
        return ControlIdClient(self.base_url, self.login, self.password, name=name, http=self.http_settings(),
                               retry=self.retry_policy(), stats=stats, **kwargs)


class TurnstileCache(RedisConnection):
    """The Redis holding what each turnstile was confirmed to hold, and the participants' device user ids."""

    _block_type_name: ClassVar[str] = "Turnstile Cache"
    _block_type_slug: ClassVar[str] = "turnstile-cache"
    _description: ClassVar[str] = (
        "Redis of the register-participants flow: what each turnstile holds (so unchanged pairs cost no device "
        "call) and each participant's device user id."
    )

    key_prefix: str = Field(
        default="turnstiles", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Prefix of every key the cache writes.",
    )

    def cache(self) -> RegistrationCache:
        return RegistrationCache(self.get_client(), self.key_prefix)
