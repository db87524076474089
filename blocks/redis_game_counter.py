"""`RedisGameCounter`: a config-only Prefect block for the run-shared first-number counter in Redis.

Register the type with `prefect block register -m blocks.redis_game_counter`; save an instance by name and
load it anywhere (flow, Dask worker) with `RedisGameCounter.load("games-counter")`.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from blocks.redis_connection import RedisConnection
from operations.lottery.counter import FirstNumberCounter


class RedisGameCounter(RedisConnection):
    """Connection to the Redis that holds game-generation runs' first-number counters and claimed games.

    The block is configuration only (RedisConnection's URL, password and timeouts, plus the key prefix): clients
    are built on demand in each process, so the block pickles safely to Dask workers.
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

    key_prefix: str = Field(
        default="games",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Prefix of every key this counter writes; runs are namespaced below it by run key.",
    )

    def counter(self, run_key: str) -> FirstNumberCounter:
        """The counter of one run."""
        return FirstNumberCounter(self.get_client(), self.key_prefix, run_key)
