"""`ProductsQueue`: the config-only Prefect block of the Redis stream that `process-products` publishes one
message to per staged product change (the old system's queue).

Register the type with `prefect block register -m blocks.products_queue`; `make up` saves `products-queue`
(the project's Redis: REDIS_URL, or the embedded one the stack runs). Consumers read the stream with a consumer
group (`XREADGROUP`), each message carrying `message_key`, `type`, `outbox_id` and the JSON `payload`.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from blocks.redis_connection import RedisConnection
from operations.infra.redis_stream import StreamPublisher


class ProductsQueue(RedisConnection):
    """The Redis stream of product changes: where it is, its name and how long it grows. The exactly-once
    guards of its messages live beside it until their outbox rows are marked (operations/infra/redis_stream.py)."""

    _block_type_name: ClassVar[str] = "Products Queue"
    _block_type_slug: ClassVar[str] = "products-queue"
    _description: ClassVar[str] = (
        "Redis stream that process-products publishes one message to per staged product change, exactly once."
    )
    _code_example: ClassVar[str] = """
```python
from blocks.products_queue import ProductsQueue

queue = ProductsQueue.load("BLOCK_NAME")
print(queue.publisher().length(), "messages in", queue.stream)
```
"""

    stream: str = Field(
        default="products.staged",
        min_length=1,
        max_length=120,
        pattern=r"^[A-Za-z0-9_.:-]+$",
        description="Name of the Redis stream (key) the messages are added to.",
    )
    max_length: int = Field(
        default=1_000_000,
        ge=0,
        le=1_000_000_000,
        description="Approximate longest stream (XADD MAXLEN ~); older entries are trimmed. 0: never trimmed.",
    )

    def publisher(self) -> StreamPublisher:
        """A publisher over this process's client for the stream."""
        return StreamPublisher(self.get_client(), self.stream, max_length=self.max_length)
