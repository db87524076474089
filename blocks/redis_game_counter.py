"""`RedisGameCounter`: a config-only Prefect block for the run-shared first-number counter in Redis.

Register the type with `prefect block register -m blocks.redis_game_counter`; save an instance by name and
load it anywhere (flow, Dask worker) with `RedisGameCounter.load("games-counter")`.
"""

from __future__ import annotations

import threading
from urllib.parse import unquote, urlsplit, urlunsplit
from typing import ClassVar

import redis
from pydantic import Field, SecretStr, field_validator
from prefect.blocks.core import Block

from operations.lottery.counter import FirstNumberCounter

_clients: dict[tuple, redis.Redis] = {}
_clients_lock = threading.Lock()


class RedisGameCounter(Block):
    """Connection to the Redis that holds game-generation runs' first-number counters and claimed games.

    The block is configuration only: clients are built on demand in each process (and cached there), so
    the block pickles safely to Dask workers and never carries a live connection.
    """

    _block_type_name: ClassVar[str] = "Redis Game Counter"
    _block_type_slug: ClassVar[str] = "redis-game-counter"
    _description: ClassVar[str] = (
        "Redis connection and key prefix of the shared first-number counter used by the generate-games flow."
    )
    _documentation_url: ClassVar[str] = "https://github.com/redis/redis-py"
    _code_example: ClassVar[str] = """
```python
from blocks.redis_game_counter import RedisGameCounter

counter_block = RedisGameCounter.load("BLOCK_NAME")
print(counter_block.counter("my-run").snapshot())
```
"""

    url: str = Field(
        default="redis://127.0.0.1:6379/0",
        description="Redis URL without the password, e.g. redis://redis.internal:6379/0.",
    )
    password: SecretStr | None = Field(default=None, description="Redis password, if the server requires one.")
    key_prefix: str = Field(
        default="games",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Prefix of every key this counter writes; runs are namespaced below it by run key.",
    )
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
                client = redis.Redis.from_url(
                    self.url,
                    password=password,
                    socket_timeout=self.socket_timeout,
                    socket_connect_timeout=self.socket_timeout,
                    health_check_interval=30,
                )
                _clients[key] = client
        return client

    def counter(self, run_key: str) -> FirstNumberCounter:
        """The counter of one run."""
        return FirstNumberCounter(self.get_client(), self.key_prefix, run_key)

    def ping(self) -> None:
        """Fail fast (redis.ConnectionError) when the server is unreachable."""
        self.get_client().ping()

    @classmethod
    def from_url(cls, url: str, password: str | None = None, **fields) -> RedisGameCounter:
        """Build from a URL that may carry a password (redis://:secret@host:6379/0): it moves to `password`."""
        parsed = urlsplit(url)
        if parsed.password:
            password = password or unquote(parsed.password)
            host = parsed.hostname or ""
            netloc = f"{host}:{parsed.port}" if parsed.port else host
            url = urlunsplit((parsed.scheme, netloc, parsed.path, parsed.query, parsed.fragment))
        return cls(url=url, password=SecretStr(password) if password else None, **fields)
