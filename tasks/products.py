"""Tasks of the product-file flow: thin wrappers that add retries, names and tags to domain code."""

from __future__ import annotations

from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from blocks.products_queue import ProductsQueue
from operations.infra.database import get_engine
from operations.products.chunks import ChunkFile, read_chunk
from operations.products.outbox import PublishCounts, publish_outbox
from operations.products.store import store_chunk
from operations.products.summary import ChunkReport
from tasks.retries import retrying_task

CHUNK_ENGINE = "products"  # the chunk tasks' engine: a pool of its own, sized by the flow


# The chunk's writes are upserts keyed by natural keys and its messages are published exactly once, so a
# retried or recomputed chunk (Dask after a lost worker) changes nothing twice: no cache needed.
# Retries: PRODUCTS_TASK_RETRIES, set by the flow (tasks.retries.with_retries); bad input (ValueError) never.
@retrying_task(
    name="load-products-chunk",
    task_run_name="rows-{chunk.first_row}-{chunk.last_row}",
    retries=3,
    delays=[2, 10, 30],
    permanent=(ValueError,),  # ChunkFailed says; an OSError only when it may heal (tasks/retries.py)
    cache_policy=NO_CACHE,
    tags=["products", "database"],
)
def load_products_chunk(
    chunk: ChunkFile, database_url: str, pool_size: int, run_key: str, queue: ProductsQueue
) -> ChunkReport:
    """Write one chunk file's rows in one transaction, then publish the messages it staged. A failed publish
    does not fail the chunk: its messages stay in the outbox for the flow's final publish."""
    engine = get_engine(database_url, pool_size=pool_size, purpose=CHUNK_ENGINE)
    outcome = store_chunk(engine, read_chunk(chunk.path), run_key, queue.stream)
    published, error = PublishCounts(), ""
    try:
        published = publish_outbox(engine, queue.publisher(), outcome.outbox_ids)
    except Exception as exc:  # noqa: BLE001 - Redis down or a drill: the final publish takes them
        error = f"{type(exc).__name__}: {exc}"
        get_run_logger().warning("chunk %d: %d message(s) left to the final publish: %s", chunk.index,
                          len(outcome.outbox_ids), error)
    return ChunkReport(
        index=chunk.index, first_row=chunk.first_row, last_row=chunk.last_row, rows=outcome.rows,
        created=outcome.created, updated=outcome.updated, unchanged=outcome.unchanged,
        published=published.published + published.already_in_stream,
        publish_deferred=len(outcome.outbox_ids) - published.published - published.already_in_stream,
        failures=outcome.failures, publish_error=error,
    )


# Publishing is exactly-once (the outbox marks what the stream holds): a retry publishes nothing twice.
@retrying_task(
    name="publish-pending-messages",
    retries=3,
    delays=[2, 10, 30],
    cache_policy=NO_CACHE,
    tags=["products", "redis"],
)
def publish_pending_messages(database_url: str, queue: ProductsQueue) -> PublishCounts:
    """Publish every message of the stream still in the outbox: this run's deferred ones and any an earlier
    run left after a crash between its commit and its publish."""
    return publish_outbox(get_engine(database_url), queue.publisher())

