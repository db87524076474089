"""`RedisConnection`: the config-only Prefect block of a Redis server (URL, password, timeouts), and the base of
the project's Redis blocks (`RedisGameCounter`, `ProductsQueue`).

Configuration only: each process builds its redis-py client on demand and caches it, so the blocks pickle
safely to Dask workers and never carry a live connection.
"""

from __future__ import annotations

import threading
from typing import ClassVar
from urllib.parse import unquote, urlsplit, urlunsplit

import redis
from prefect.blocks.core import Block
from pydantic import Field, SecretStr, field_validator

from operations.settings import Settings

_clients: dict[tuple, redis.Redis] = {}
_clients_lock = threading.Lock()


class RedisConnection(Block):
    """A Redis server: where it is, its password and how long a call may take."""

    _block_type_name: ClassVar[str] = "Redis Connection"
    _block_type_slug: ClassVar[str] = "redis-connection"
    _description: ClassVar[str] = "Redis URL, password and timeouts; the base of the project's Redis blocks."
    _documentation_url: ClassVar[str] = "https://github.com/redis/redis-py"
    _code_example: ClassVar[str] = """
```python
from blocks.redis_connection import RedisConnection

RedisConnection.load("BLOCK_NAME").get_client().ping()
```
"""

    url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Redis URL without the password, e.g. redis://redis.internal:6379/0.",
    )
    password: SecretStr | None = Field(default=None, description="Redis password, if the server requires one.")
    socket_timeout: float = Field(
        default=10.0, gt=0, le=300, description="Seconds a Redis call may take before it fails (and is retried)."
    )

    @field_validator("url")
    @classmethod
    def _plain_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("url must start with redis://, rediss:// or unix://")
        if "@" in value.split("//", 1)[-1].split("/", 1)[0]:
            raise ValueError("put the password in the 'password' field, not in the URL")
        return value

    def get_client(self) -> redis.Redis:
        """A redis-py client for this process (cached per URL/password), with this block's timeouts."""
        password = self.password.get_secret_value() if self.password else None
        key = (self.url, password, self.socket_timeout)
        with _clients_lock:
            client = _clients.get(key)
            if client is None:
                from operations.infra.embedded_redis import ExplainedConnection  # errors name the Redis

                plain_tcp = {"connection_class": ExplainedConnection} if self.url.startswith("redis://") else {}
                client = redis.Redis.from_url(
                    self.url,
                    password=password,
                    socket_timeout=self.socket_timeout,
                    socket_connect_timeout=self.socket_timeout,
                    health_check_interval=30,
                    **plain_tcp,
                )
                _clients[key] = client
        return client

    def ping(self) -> None:
        """Fail fast (redis.ConnectionError) when the server is unreachable."""
        self.get_client().ping()

    @classmethod
    def from_url(cls, url: str, password: str | None = None, **fields):
        """Build from a URL that may carry a password (redis://:secret@host:6379/0): it moves to `password`."""
        parsed = urlsplit(url)
        if parsed.password:
            password = password or unquote(parsed.password)
            host = parsed.hostname or ""
            netloc = f"{host}:{parsed.port}" if parsed.port else host
            url = urlunsplit((parsed.scheme, netloc, parsed.path, parsed.query, parsed.fragment))
        return cls(url=url, password=SecretStr(password) if password else None, **fields)

    @classmethod
    def load_or_create_default(cls, name: str, default_name: str, settings: Settings):
        """The saved block `name`. The default one (`default_name`) is created on first use for the project's
        Redis: REDIS_URL, else the embedded Redis the local stack runs (looked up, never started: without either,
        NotConfigured names REDIS_URL); any other missing name is an error saying so. Blocking even under an
        `async def` flow (`_sync=True`), where Prefect would otherwise hand back a coroutine."""
        try:
            return cls.load(name, _sync=True)
        except ValueError:
            if name != default_name:
                raise ValueError(
                    f"no {cls.__name__} block named {name!r}: save one (make up does) or use {default_name!r}"
                ) from None
        from operations.infra.embedded_redis import resolve_redis_url

        password = settings.redis.password.get_secret_value() if settings.redis.password else None
        block = cls.from_url(resolve_redis_url(settings), password)
        block.save(name, overwrite=True, _sync=True)
        return block
