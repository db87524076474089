"""The names of the project's own Prefect events, which automations (deployments/automations.py) turn into
notifications. Plain strings: the domains name them, the task and deployment layers emit them."""

from __future__ import annotations

ACCOUNT_PARKED = "project.marketplace.account.parked"  # resource project.marketplace.account.<seller id>
TURNSTILE_UNREACHABLE = "project.turnstile.unreachable"  # resource project.turnstile.<block name>
# resource project.turnstile.<block name>; payload reason, identity, dropped (cache entries), base_url, dry_run
TURNSTILE_RESET_DETECTED = "project.turnstile.reset-detected"
OUTBOX_STALE = "project.outbox.stale"  # resource project.outbox.<stream>; payload unpublished, oldest_minutes
SERVICE_RESTARTED = "project.service.restarted"  # resource project.service.<service name>; payload restarts
# resource project.marketplace.notifications; payload stored. Not a notification to a person: the trigger of
# deployment marketplace-notifications/on-event (prefect.yaml) starts the consumer on it.
NOTIFICATIONS_RECEIVED = "project.marketplace.notifications.received"

RESOURCE_PREFIX = {
    ACCOUNT_PARKED: "project.marketplace.account.",
    TURNSTILE_UNREACHABLE: "project.turnstile.",
    TURNSTILE_RESET_DETECTED: "project.turnstile.",
    OUTBOX_STALE: "project.outbox.",
    SERVICE_RESTARTED: "project.service.",
}
