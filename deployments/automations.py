"""The project's Prefect automations, kept here as code and applied by `make up` (idempotent, by name): who is told
what, and which runs are dead.

- **A deployment's flow run ends Failed or Crashed**: a notification with the run's name, its state message and
  its link in the UI.
- **The project's own events** (operations/events.py): a seller account parked `needs_reauthorization`, a
  turnstile unreachable past its retries, a turnstile reset or replaced, outbox messages unpublished for too
  long, a service restarted: a notification each.
- **Zombie flow runs**: a Running flow run whose heartbeats (`prefect.flow-run.heartbeat`, every
  FLOW_HEARTBEAT_SECONDS from the worker's runs, subflows included) stop for ZOMBIE_AFTER_SECONDS is marked
  Crashed, as Prefect's "How to detect and respond to zombie flows" describes: its process is gone.

Notifications go through a notification block: NOTIFY_BLOCK ('<block-type-slug>/<block-name>', any of Prefect's
own, e.g. e-mail, Slack or a webhook: docs/notifications.md), else a Custom Webhook block `make up` saves for the
stack's notification receiver (deployments/notification_receiver.py).

    python -m deployments.automations   # apply them to the server of PREFECT_API_URL (or the stack's)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta
from typing import Any
from uuid import UUID

from operations import events
from operations.infra.services import not_configured
from operations.settings import Settings, get_settings

PREFIX = "operations: "  # every automation of the project is named so (the UI lists them together)
FAILED_RUNS = PREFIX + "deployment run failed or crashed"
ZOMBIES = PREFIX + "crash zombie flow runs"
LOCAL_BLOCK = "operations-local-receiver"  # the Custom Webhook block of the stack's notification receiver
ZOMBIE_MESSAGE = "Marked Crashed: no heartbeat for {seconds} s (its process is gone)."

# the terminal states after which a flow run sends no more heartbeats (Prefect's docs' list)
_FINAL_EVENTS = {"prefect.flow-run.Completed", "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
                 "prefect.flow-run.Crashed"}
# A line naming the flow run an event concerns (related to it), with its link; nothing when there is none.
_RUN_LINE = ("{{% if flow_run %}}\nFlow run: {{{{ flow_run.name }}}} {ui}/runs/flow-run/{{{{ flow_run.id }}}}"
             "{{% endif %}}")

# The project's events: automation name, subject and body (Jinja over Prefect's template context: `event`,
# `flow_run` when the event is related to one).
EVENT_NOTIFICATIONS: dict[str, tuple[str, str, str]] = {
    events.ACCOUNT_PARKED: (
        "seller account parked",
        "Seller account {{ event.resource.name or event.resource.id }} needs reauthorization",
        "The marketplace refused the account's credentials: it is parked (needs_reauthorization) and scheduled "
        "syncs skip it until the seller authorizes the app again.\nAccount: {{ event.resource.id }}",
    ),
    events.TURNSTILE_UNREACHABLE: (
        "turnstile unreachable",
        "Turnstile {{ event.resource.id | replace('project.turnstile.', '') }} unreachable",
        "The turnstile stayed unreachable past its retries; its registrations were not written.\n"
        "Turnstile block: {{ event.resource.id | replace('project.turnstile.', '') }}",
    ),
    events.TURNSTILE_RESET_DETECTED: (
        "turnstile reset or replaced",
        "Turnstile {{ event.resource.id | replace('project.turnstile.', '') }} reset or replaced",
        "{{ event.payload.reason }}.\n{% if event.payload.dry_run %}A dry run: nothing was changed; the next run "
        "registers every participant on it again.{% else %}Its cache entries were dropped ({{ event.payload.dropped }}) "
        "and every participant is registered on it again in this run.{% endif %}\n"
        "Turnstile block: {{ event.resource.id | replace('project.turnstile.', '') }}",
    ),
    events.OUTBOX_STALE: (
        "outbox messages unpublished",
        "Outbox {{ event.resource.id | replace('project.outbox.', '') }}: {{ event.payload.unpublished }} "
        "messages unpublished",
        "{{ event.payload.unpublished }} messages of the outbox "
        "{{ event.resource.id | replace('project.outbox.', '') }} are unpublished, the oldest for "
        "{{ event.payload.oldest_minutes }} minutes.",
    ),
    events.SERVICE_RESTARTED: (
        "service restarted",
        "Service {{ event.resource.id | replace('project.service.', '') }} restarted",
        "The stack's service {{ event.resource.id | replace('project.service.', '') }} died and was restarted "
        "({{ event.payload.restarts }} restarts so far).",
    ),
}


def ui_base_url(api_url: str | None = None) -> str:
    """The UI's address for links: PREFECT_UI_URL, else the API's address (`api_url`, else PREFECT_API_URL)
    without `/api`, as the local server serves both."""
    ui = os.environ.get("PREFECT_UI_URL")
    if ui:
        return ui.rstrip("/")
    api = api_url or os.environ.get("PREFECT_API_URL")
    if not api:
        raise not_configured("PREFECT_API_URL", "a Prefect server", get_settings().stack.data_dir)
    return api.rstrip("/").removesuffix("/api")


def failed_runs_automation(block_id: UUID, ui: str):
    """A deployment's flow run (not a subflow) ends Failed or Crashed: its name, state, message and link."""
    from prefect.automations import Automation, EventTrigger, Posture, SendNotification

    return Automation(
        name=FAILED_RUNS,
        description="A notification when a flow run of a deployment ends Failed or Crashed.",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "deployment"},
            posture=Posture.Reactive, threshold=1, within=timedelta(0),
        ),
        actions=[SendNotification(
            block_document_id=block_id,
            subject="Flow run {{ flow_run.name }} {{ flow_run.state.name }}",
            body=("Flow run {{ flow_run.name }} of {{ flow.name }}/{{ deployment.name }} ended "
                  "{{ flow_run.state.name }}.\nMessage: {{ flow_run.state.message }}\n"
                  f"Link: {ui}/runs/flow-run/{{{{ flow_run.id }}}}"),
        )],
    )


def event_automation(event: str, block_id: UUID, ui: str):
    """One of the project's events (EVENT_NOTIFICATIONS) occurs: a notification saying what and where."""
    from prefect.automations import Automation, EventTrigger, Posture, SendNotification

    name, subject, body = EVENT_NOTIFICATIONS[event]
    return Automation(
        name=PREFIX + name,
        description=f"A notification on each {event} event.",
        trigger=EventTrigger(
            expect={event}, match={"prefect.resource.id": events.RESOURCE_PREFIX[event] + "*"},
            posture=Posture.Reactive, threshold=1, within=timedelta(0),
        ),
        actions=[SendNotification(block_document_id=block_id, subject=subject,
                                  body=body + _RUN_LINE.format(ui=ui))],
    )


def zombie_automation(window: timedelta, flow_runs: str = "prefect.flow-run.*", name: str = ZOMBIES):
    """A Running flow run (of `flow_runs`, a resource id pattern) with no heartbeat nor final state for `window`
    after a heartbeat is marked Crashed, each run on its own."""
    from prefect.automations import Automation, ChangeFlowRunState, EventTrigger, Posture
    from prefect.client.schemas.objects import StateType

    return Automation(
        name=name,
        description="Marks Crashed a flow run whose heartbeats stopped (its process is gone).",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *_FINAL_EVENTS},
            match={"prefect.resource.id": flow_runs},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive, threshold=1, within=window,
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=ZOMBIE_MESSAGE.format(seconds=int(window.total_seconds())))],
    )


def project_automations(settings: Settings, block_id: UUID, ui: str) -> list:
    """Every automation of the project (module docstring), notifications through block `block_id`."""
    return [
        failed_runs_automation(block_id, ui),
        *[event_automation(event, block_id, ui) for event in EVENT_NOTIFICATIONS],
        zombie_automation(timedelta(seconds=settings.alerts.zombie_after_seconds)),
    ]


# -- the notification block ---------------------------------------------------------------------------------------

def notification_block_id(settings: Settings) -> UUID:
    """The block the notifications go through: NOTIFY_BLOCK ('<block-type-slug>/<block-name>', which must exist),
    else the Custom Webhook block of the stack's running notification receiver, saved (or updated) here."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    if settings.alerts.notify_block:
        slug, _, name = settings.alerts.notify_block.partition("/")
        if not name:
            raise ValueError(f"NOTIFY_BLOCK must be '<block-type-slug>/<block-name>', not {slug!r}")
        with get_client(sync_client=True) as client:
            try:
                return client.read_block_document_by_name(name, slug).id
            except ObjectNotFound:
                raise ValueError(f"NOTIFY_BLOCK names no saved block: {settings.alerts.notify_block!r} (create it "
                                 "in the UI or in code first: docs/notifications.md)") from None
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    from deployments.notification_receiver import NotificationReceiverService

    receiver = NotificationReceiverService(settings.stack.data_dir / "notifications").find()
    if receiver is None:
        raise not_configured("NOTIFY_BLOCK", "a notification receiver", settings.stack.data_dir)
    block = CustomWebhookNotificationBlock(
        name="operations local receiver", url=receiver.notify_url,
        json_data={"subject": "{{subject}}", "body": "{{body}}"},
    )
    return block.save(LOCAL_BLOCK, overwrite=True)


def notifications_at(settings: Settings) -> str:
    """Where the notifications go, in words (`make up` prints it)."""
    if settings.alerts.notify_block:
        return f"block {settings.alerts.notify_block} (NOTIFY_BLOCK)"
    from deployments.notification_receiver import NotificationReceiverService

    receiver = NotificationReceiverService(settings.stack.data_dir / "notifications").find()
    return f"{receiver.url}/ and {receiver.file}" if receiver else "no receiver running (make up)"


# -- applying them ------------------------------------------------------------------------------------------------

def _definition(automation) -> Any:
    """What an automation does, comparable across reads: no ids, sets in a fixed order."""
    data = automation.model_dump(mode="json", exclude={"id", "owner_resource", "created", "updated"})
    return _normalised(data)


def _normalised(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _normalised(v) for k, v in value.items() if k != "id"}
    if isinstance(value, list):
        return sorted((_normalised(v) for v in value), key=lambda v: json.dumps(v, sort_keys=True))
    return value


def ensure_automations(automations: list) -> dict[str, str]:
    """Create each automation missing by name, update one that differs (duplicates of a name removed), leave an
    equal one alone (a proactive trigger keeps what it is waiting for). Returns name -> created/updated/unchanged."""
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore

    done = {}
    with get_client(sync_client=True) as client:
        for automation in automations:
            wanted = AutomationCore(**automation.model_dump(exclude={"id"}))
            found = client.read_automations_by_name(automation.name)
            for extra in found[1:]:
                client.delete_automation(extra.id)
            if not found:
                client.create_automation(wanted)
                done[automation.name] = "created"
            elif _definition(found[0]) != _definition(wanted):
                client.update_automation(found[0].id, wanted)
                done[automation.name] = "updated"
            else:
                done[automation.name] = "unchanged"
    return done


def apply_automations(settings: Settings | None = None, api_url: str | None = None) -> dict[str, str]:
    """The project's automations on the server of PREFECT_API_URL, notifications through NOTIFY_BLOCK or the
    stack's receiver (what `make up` calls after deploying)."""
    settings = settings or get_settings()
    return ensure_automations(project_automations(settings, notification_block_id(settings), ui_base_url(api_url)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    from deployments.stack import local_api_url

    if local_api_url() is None:
        print("no Prefect server: set PREFECT_API_URL or start the stack with `make up`", file=sys.stderr)
        return 1
    for name, outcome in apply_automations().items():
        print(f"{name}: {outcome}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
