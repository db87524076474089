"""Tasks of the product-file flows: thin wrappers that add retries, names, tags, the run's stop check and the
figures of every attempt to domain code."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import redis
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.states import Cancelled as CancelledState
from sqlalchemy.exc import DBAPIError

from blocks.products_queue import ProductsQueue
from operations.cancellation import Cancelled
from operations.events import OUTBOX_STALE
from operations.infra.database import get_engine
from operations.infra.redis_stream import InjectedPublishFault
from operations.products.chunks import ChunkFile, read_chunk
from operations.products.outbox import Backlog, PublishCounts, outbox_backlog, publish_outbox, sweep_guards
from operations.products.store import ChunkOutcome, store_chunk
from operations.products.summary import ChunkReport
from tasks.attempts import attempt_tally, release_tally
from tasks.cancellation import run_stop_check
from tasks.events import emit
from tasks.retries import retrying_task

CHUNK_ENGINE = "products"  # the chunk tasks' engine: a pool of its own, sized by the flow
# The chunk and publish tasks carry no tags: a tagged task run first asks the Prefect server for its tags'
# concurrency slots (a round trip before each chunk starts, and the lease's release after it); the database's
# load is bounded by the flow's task slots and each chunk process's pool (docs/benchmarks.md, "Products file").
# Faults of the stream or of the outbox's mark that leave a chunk's committed messages for a later publish.
PUBLISH_FAULTS = (redis.RedisError, InjectedPublishFault, OSError, DBAPIError)


@dataclass
class _ChunkTally:
    """What every attempt of one chunk task did: its committed transaction and the messages it published."""

    outcome: ChunkOutcome | None = None
    published: PublishCounts = field(default_factory=PublishCounts)
    store_seconds: float = 0.0
    publish_seconds: float = 0.0


# The chunk's writes are upserts keyed by natural keys and its messages are published exactly once, so a
# retried or recomputed chunk (Dask after a lost worker) changes nothing twice: no cache needed. A retry after
# the chunk's commit (same process) takes the committed outcome from the attempts' tally and only publishes.
# Retries: PRODUCTS_TASK_RETRIES, set by the flow (tasks.retries.with_retries); bad input (ValueError) never.
@retrying_task(
    name="load-products-chunk",
    task_run_name="rows-{chunk.first_row}-{chunk.last_row}",
    retries=3,
    delays=[2, 10, 30],
    permanent=(ValueError,),  # ChunkFailed says; an OSError only when it may heal (tasks/retries.py)
    cache_policy=NO_CACHE,
)
def load_products_chunk(
    chunk: ChunkFile, database_url: str, pool_size: int, run_key: str, queue: ProductsQueue
) -> ChunkReport:
    """Write one chunk file's rows in one transaction, then publish the messages it staged. A failed or
    cancelled publish does not fail the chunk: its messages stay in the outbox for a later publish. A run being
    cancelled starts no chunk: the task ends Cancelled before writing anything."""
    should_stop, tally = run_stop_check(), attempt_tally(_ChunkTally)
    engine = get_engine(database_url, pool_size=pool_size, purpose=CHUNK_ENGINE)
    if tally.outcome is None:
        if should_stop():
            release_tally()
            return CancelledState(message=f"the run was cancelled before rows {chunk.first_row}-{chunk.last_row}")
        started = time.perf_counter()
        tally.outcome = store_chunk(engine, read_chunk(chunk.path), run_key, queue.stream)
        tally.store_seconds += time.perf_counter() - started
    outcome, error, started = tally.outcome, "", time.perf_counter()
    try:
        publish_outbox(engine, queue.publisher(), outcome.outbox_ids, should_stop=should_stop, counts=tally.published)
    except (Cancelled, *PUBLISH_FAULTS) as exc:  # Redis down, a drill or a cancel: a later publish takes them
        error = str(exc) if isinstance(exc, Cancelled) else f"{type(exc).__name__}: {exc}"
        get_run_logger().warning("chunk %d: %d message(s) left in the outbox: %s", chunk.index,
                                 outcome.messages - tally.published.total, error)
    finally:
        tally.publish_seconds += time.perf_counter() - started
    release_tally()
    return ChunkReport(
        index=chunk.index, first_row=chunk.first_row, last_row=chunk.last_row, rows=outcome.rows,
        created=outcome.created, updated=outcome.updated, unchanged=outcome.unchanged,
        published=tally.published.total, publish_deferred=outcome.messages - tally.published.total,
        failures=outcome.failures, publish_error=error, store_seconds=round(tally.store_seconds, 3),
        publish_seconds=round(tally.publish_seconds, 3),
    )


# Publishing is exactly-once (the outbox marks what the stream holds): a retry publishes nothing twice, and the
# attempts' tally keeps the batches an earlier attempt committed in the figures.
@retrying_task(
    name="publish-pending-messages",
    retries=3,
    delays=[2, 10, 30],
    cache_policy=NO_CACHE,
)
def publish_pending_messages(database_url: str, queue: ProductsQueue) -> PublishCounts:
    """Publish every message of the stream still in the outbox (this run's deferred ones, any an earlier run
    left), batch by batch until the run is cancelled."""
    counts = attempt_tally(PublishCounts)
    try:
        publish_outbox(get_engine(database_url), queue.publisher(), should_stop=run_stop_check(), counts=counts)
    except Cancelled as exc:  # the batches published so far are the task's figures; the flow sees the cancel
        get_run_logger().warning("%s after %d message(s)", exc, counts.total)
    release_tally()
    return counts


# Dropping a guard whose outbox row is marked is harmless at any time (a marked row is never published again).
@retrying_task(name="sweep-outbox-guards", retries=2, delays=[2, 10], cache_policy=NO_CACHE, tags=["products", "redis"])
def sweep_outbox_guards(database_url: str, queue: ProductsQueue) -> int:
    """Drop the exactly-once guards of messages already marked published (left by a publisher that died)."""
    return sweep_guards(get_engine(database_url), queue.publisher())


# Read only, and the event is a notification: a retry re-reads and may notify once more, nothing else.
@retrying_task(name="check-outbox-backlog", retries=2, delays=[2, 10], cache_policy=NO_CACHE, tags=["products"])
def check_outbox_backlog(database_url: str, queue: ProductsQueue, stale_minutes: float) -> Backlog:
    """The stream's unpublished messages; emits `project.outbox.stale` when the oldest waited over
    `stale_minutes`."""
    backlog = outbox_backlog(get_engine(database_url), queue.stream)
    if backlog.stale(stale_minutes):
        get_run_logger().warning(
            "%d message(s) of %s unpublished, the oldest for %.1f min (over %g): is Redis reachable?",
            backlog.unpublished, queue.stream, backlog.oldest_minutes, stale_minutes,
        )
        emit(OUTBOX_STALE, queue.stream,
             payload={"unpublished": backlog.unpublished, "oldest_minutes": backlog.oldest_minutes})
    return backlog
