"""Flow `publish-outbox`: the relay that publishes what product runs left in the outbox, so that no message
waits for the next products file.

A products run publishes its own messages after each chunk's commit and once more at its end; what it could not
publish (Redis down, the run cancelled or killed between a commit and its publish) stays in the outbox, marked
unpublished. This flow, deployed as `publish-outbox/every-minute` (an interval schedule of 60 s, kept active
even when STACK_SCHEDULES is off: it is part of process-products' exactly-once delivery, not a routine batch),
publishes those within a minute, exactly once (operations/products/outbox.py: the guards of a message live
until its row is marked, however late that is), and says when they stay unpublished.

Stages: publish every unpublished message of the queue's stream (batch by batch, stopping between batches if
the run is cancelled); look at what is left and emit `project.outbox.stale` when the oldest unpublished message
waited more than PRODUCTS_OUTBOX_STALE_MINUTES; drop the guards of messages already marked (left by a publisher
that died between its commit and their removal); report the figures (log line, `publish-outbox-report`
artifact, return value). A publish that keeps failing (Redis down) ends the run Failed after the staleness check.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import Field
from typing_extensions import Annotated

from blocks.products_queue import ProductsQueue
from flows.forms import form_field
from flows.outcomes import ends_failed_on_user_error
from operations.infra.database import project_engine
from operations.products.outbox import Backlog, PublishCounts
from operations.settings import get_settings
from tasks.cancellation import watch_termination
from tasks.products import check_outbox_backlog, publish_pending_messages, sweep_outbox_guards
from tasks.retries import with_retries

RETRY_DELAY_SECONDS = 5  # one retry of a failed publish: the next run comes a minute later anyway
_QUEUE_BLOCK = form_field(
    "", "Queue block",
    "Name of the ProductsQueue block (the Redis stream) whose outbox is published. Empty: PRODUCTS_QUEUE_BLOCK "
    "(products-queue), created on first use.",
)
_STALE_MINUTES = form_field(
    0, "Stale after (minutes)",
    "Unpublished messages older than this emit project.outbox.stale (0 to 10,080). 0: "
    "PRODUCTS_OUTBOX_STALE_MINUTES (10).",
)


@flow(name="publish-outbox", log_prints=False)
@ends_failed_on_user_error
def publish_outbox(
    queue_block: Annotated[str, Field(max_length=120)] = _QUEUE_BLOCK,
    stale_minutes: Annotated[float, Field(ge=0, le=10_080)] = _STALE_MINUTES,
) -> dict:
    """Publish the messages the products runs left in the outbox; say when some stay unpublished too long."""
    watch_termination()
    logger, settings = get_run_logger(), get_settings()
    stale_minutes = stale_minutes or settings.products.outbox_stale_minutes
    database_url, _ = project_engine(settings)
    queue = ProductsQueue.load_or_create_default(
        queue_block or settings.products.queue_block, settings.products.queue_block, settings
    )
    publish = with_retries(publish_pending_messages, 1, [RETRY_DELAY_SECONDS])(database_url, queue, return_state=True)
    published = publish.result(raise_on_failure=False)
    error = "" if isinstance(published, PublishCounts) else f"{type(published).__name__}: {published}"
    counts = published if isinstance(published, PublishCounts) else PublishCounts()
    backlog: Backlog = check_outbox_backlog(database_url, queue, stale_minutes)
    swept = 0 if error else sweep_outbox_guards(database_url, queue)
    report = {
        "stream": queue.stream, "published": counts.published, "already_in_stream": counts.already_in_stream,
        "unpublished": backlog.unpublished, "oldest_minutes": backlog.oldest_minutes, "guards_swept": swept,
        "stale": backlog.stale(stale_minutes), "error": error,
    }
    line = _report_line(report)
    create_markdown_artifact(key="publish-outbox-report", markdown=_report_markdown(report, stale_minutes),
                             description=f"publish-outbox: {line}")
    if error:
        raise RuntimeError(f"{line}; the next run retries (is Redis reachable?)")
    logger.info("%s", line)
    return report


def _report_line(report: dict) -> str:
    line = (f"{report['stream']}: {report['published']:,} message(s) published, "
            f"{report['already_in_stream']:,} found already in the stream, {report['unpublished']:,} unpublished")
    if report["unpublished"]:
        line += f" (oldest {report['oldest_minutes']:.1f} min)"
    if report["error"]:
        line += f"; publishing failed: {report['error']}"
    return line


def _report_markdown(report: dict, stale_minutes: float) -> str:
    stale = (f"\n\n**Stale**: the oldest unpublished message waited over {stale_minutes:g} min "
             "(`project.outbox.stale` emitted)." if report["stale"] else "")
    failed = f"\n\n**Publishing failed**: {report['error']}" if report["error"] else ""
    return f"""# Outbox of `{report['stream']}`

| | messages |
|---|---|
| published now | {report['published']:,} |
| found already in the stream (a publisher died before marking them) | {report['already_in_stream']:,} |
| still unpublished | {report['unpublished']:,} |

Oldest unpublished: {report['oldest_minutes']:.1f} min. Exactly-once guards dropped for marked messages:
{report['guards_swept']:,}.{stale}{failed}
"""
