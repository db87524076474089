"""Flow `marketplace-notifications`: the consumer of the marketplace's notifications. It syncs just what they
name (that order, those items) for the accounts they concern, seconds after the marketplace sent them.

Started by Prefect's own means: the receiver (deployments/marketplace_receiver.py) emits
`project.marketplace.notifications.received` when it stores new ones, and the trigger of deployment
`marketplace-notifications/on-event` (prefect.yaml) starts a run on it; deployment `catch-up` runs every few
minutes with `missed_feeds`, reading what the marketplace could not deliver and whatever an event missed.

Stages: read the missed feeds (catch-up only); then rounds until nothing new arrived for `idle_seconds`: wait
until the oldest pending notification is MARKETPLACE_NOTIFICATIONS_WINDOW_SECONDS old, take the pending ones of
each account whose own oldest is that old (a burst is coalesced per account; the others wait for their window),
grouped per account (unknown sellers logged, counted and set aside), and apply each
account's on the task runner, one task per account; a round with a failed account ends the run (its
notifications stay pending for the next run, up to MARKETPLACE_NOTIFICATIONS_MAX_TRIES). Then delete the applied
notifications older than MARKETPLACE_NOTIFICATIONS_RETENTION_DAYS, and a summary.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Failed
from prefect.utilities.annotations import unmapped
from pydantic import Field
from typing_extensions import Annotated

from flows.forms import form_field
from flows.outcomes import ends_failed_on_user_error
from flows.sync_marketplace import BlockName, checked_app, sync_options
from flows.task_runners import io_task_runner
from operations.infra.database import project_engine
from operations.marketplace.notifications import ConsumerTotals
from operations.marketplace.report import AccountsFailed
from operations.settings import get_settings
from tasks.marketplace_notifications import (
    NotificationRun,
    apply_account_notifications,
    prune_notifications,
    read_missed_feeds,
    take_notifications,
)

IdleSeconds = Annotated[float, Field(ge=-1, le=3600)]
IDLE_SECONDS = form_field(
    -1, "Idle seconds", "The run ends after this long without a new notification. -1: "
    "MARKETPLACE_NOTIFICATIONS_IDLE_SECONDS; 0: once nothing is pending.",
)
MISSED_FEEDS = form_field(False, "Read missed feeds", "First read the notifications the marketplace could not "
                          "deliver (GET /missed_feeds) and store them.")
APP_BLOCK = form_field("", "App block", "Name of the MarketplaceApp block. Empty: MARKETPLACE_APP_BLOCK.")


def _outcome(future) -> dict | BaseException:
    try:
        return future.result(raise_on_failure=True)
    except Exception as exc:  # noqa: BLE001 - reported per account
        return exc


@flow(name="marketplace-notifications", log_prints=False)
@ends_failed_on_user_error
def marketplace_notifications(idle_seconds: IdleSeconds = IDLE_SECONDS, missed_feeds: bool = MISSED_FEEDS,
                              app_block: BlockName = APP_BLOCK) -> dict:
    """Apply the marketplace's pending notifications: fetch and store what they name."""
    started, settings = time.perf_counter(), get_settings()
    notify = settings.marketplace_notifications
    database_url, _ = project_engine(settings)
    app = checked_app(app_block or settings.marketplace.app_block)
    run = NotificationRun(database_url, sync_options(settings), notify.max_tries)
    totals = ConsumerTotals()
    if missed_feeds:
        missed = read_missed_feeds(app, run)
        totals.missed_read, totals.missed_stored = missed["read"], missed["stored"]
    idle = notify.idle_seconds if idle_seconds < 0 else idle_seconds
    with io_task_runner(settings, settings.marketplace.concurrency, settings.marketplace.task_runner) as runner:
        while (taken := take_notifications(database_url, notify.window_seconds, idle)) is not None:
            futures = runner.map(apply_account_notifications,
                                 {"touched": taken.accounts, "app": unmapped(app), "run": unmapped(run)})
            totals.add_round(taken.notifications, taken.unknown_sellers, taken.unknown_notifications,
                             taken.inactive_notifications, [_outcome(f) for f in futures],
                             [t.seller_id for t in taken.accounts])
            get_run_logger().info("round %d: %d notification(s), %d account(s)", totals.rounds, taken.notifications,
                                  len(taken.accounts))
            if totals.failed:
                break  # their notifications stay pending: the next run tries them again
    totals.pruned = prune_notifications(run, notify.retention_days)
    create_markdown_artifact(key="marketplace-notifications", markdown=totals.markdown(time.perf_counter() - started),
                             description="What this run of the notifications consumer applied")
    if totals.failed:
        message = f"{len(totals.failed)} account(s) failed: {'; '.join(totals.failed)[:500]}"
        return Failed(message=message, data=AccountsFailed(message))  # a Failed state's data is its exception
    return totals.to_json()
