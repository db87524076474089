"""Someone is told, and no run stays Running with its process gone: the automations `make up` applies
(deployments/automations.py) on the session's real Prefect server, the stack's notification receiver, and the
zombie automation crashing a silent flow run. End to end through the server's triggers and actions services."""

from __future__ import annotations

import re
import time
import uuid
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from deployments.automations import (
    FAILED_RUNS, PREFIX, ZOMBIES, _definition, _normalised, apply_automations, project_automations,
    zombie_automation,
)
from deployments.notification_receiver import NotificationReceiverService, read_notifications, render_page
from operations import events
from operations.infra.processes import free_port
from operations.settings import AlertsSettings


def _wait(check, timeout: float, what: str, poll: float = 0.25):
    """check()'s first truthy value within `timeout` seconds, else a failure saying `what` was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(poll)


def _instant(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


# -- pure ----------------------------------------------------------------------------------------------------------

def test_a_zombie_window_shorter_than_two_heartbeats_is_refused():
    assert AlertsSettings().zombie_after_seconds == 90 and AlertsSettings().heartbeat_seconds == 30
    with pytest.raises(ValueError, match="at least twice FLOW_HEARTBEAT_SECONDS"):
        AlertsSettings(FLOW_HEARTBEAT_SECONDS=60, ZOMBIE_AFTER_SECONDS=90)
    with pytest.raises(ValueError):
        AlertsSettings(FLOW_HEARTBEAT_SECONDS=10)  # Prefect's own minimum is 30


def test_the_definitions_compare_whatever_the_set_order_and_ids():
    first, second = zombie_automation(timedelta(seconds=90)), zombie_automation(timedelta(seconds=90))
    second.trigger.expect = set(reversed(sorted(second.trigger.expect)))
    as_read = {**_definition(second), "id": "an id", "trigger": {**_definition(second)["trigger"], "id": "x"}}
    assert _definition(first) == _definition(second) == _normalised(as_read)
    assert _definition(first) != _definition(zombie_automation(timedelta(seconds=91)))


def test_the_page_escapes_what_it_shows_and_links_urls(tmp_path):
    page = render_page([{"subject": "<b>run</b>", "body": "see http://x/runs/flow-run/1 now", "received": "t"}],
                       tmp_path / "n.jsonl")
    assert "&lt;b&gt;run&lt;/b&gt;" in page and "<b>run" not in page
    assert '<a href="http://x/runs/flow-run/1">http://x/runs/flow-run/1</a> now' in page


# -- the receiver service ----------------------------------------------------------------------------------------

def test_the_receiver_keeps_each_notification_in_its_file_and_shows_them(tmp_path):
    service = NotificationReceiverService(tmp_path / "notifications", port=free_port())
    receiver = service.ensure()
    try:
        assert receiver.started and service.ensure().pid == receiver.pid  # reused
        assert httpx.post(receiver.notify_url, json={"subject": "alpha", "body": "a"}).status_code == 204
        assert httpx.post(receiver.notify_url, content=b"plain text").status_code == 204
        stored = read_notifications(service.file)
        assert [(n["subject"], n["body"]) for n in stored] == [("alpha", "a"), ("", "plain text")]
        assert httpx.get(f"{receiver.url}/notifications.json").json() == stored
        page = httpx.get(receiver.url + "/").text
        assert page.index("plain text") < page.index("alpha")  # newest first
        line = service.status().line()
        assert f"running, pid {receiver.pid}, {receiver.url}/, restarts 0 (notifications in {service.file})" in line
    finally:
        assert service.stop()
    assert not service.status().running


# -- against the server ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stack_notifications(deployed_stack):
    """The deployed stack's receiver (`make up` started it and pointed the automations' block at it)."""
    service = NotificationReceiverService(deployed_stack.settings.stack.data_dir / "notifications")
    receiver = service.find()
    assert receiver is not None, deployed_stack.up_output
    assert f"Notifications: {receiver.url}/ and {service.file}" in deployed_stack.up_output
    return service


def _notification(service: NotificationReceiverService, text: str) -> dict | None:
    return next((n for n in read_notifications(service.file) if text in n["subject"] + n["body"]), None)


def test_notify_block_names_the_operators_block_instead_of_the_receiver(prefect_api_url, tmp_path):
    """NOTIFY_BLOCK: the automations send through that saved block, and the stack starts no receiver."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    from deployments import services as registry
    from deployments.automations import notification_block_id, notifications_at
    from operations.settings import Settings

    name = f"ops-{uuid.uuid4().hex[:8]}"
    saved = CustomWebhookNotificationBlock(name="ops", url="https://alerts.example.com/hook").save(name)
    settings = Settings.from_env({"NOTIFY_BLOCK": f"custom-webhook/{name}", "DATA_DIR": str(tmp_path)})
    assert notification_block_id(settings) == saved
    assert notifications_at(settings) == f"block custom-webhook/{name} (NOTIFY_BLOCK)"
    [receiver] = registry.only(registry.stack_services(settings), "notification receiver")
    assert receiver.replaced_by == "NOTIFY_BLOCK is set"
    with pytest.raises(ValueError, match="NOTIFY_BLOCK names no saved block"):
        notification_block_id(Settings.from_env({"NOTIFY_BLOCK": "slack-webhook/nobody", "DATA_DIR": str(tmp_path)}))
    with pytest.raises(ValueError, match="must be '<block-type-slug>/<block-name>'"):
        notification_block_id(Settings.from_env({"NOTIFY_BLOCK": name, "DATA_DIR": str(tmp_path)}))


@pytest.mark.slow
def test_applied_twice_the_automations_stay_one_each(deployed_stack, stack_notifications):
    """`make up` made them; applying them again changes nothing and adds none."""
    from prefect.client.orchestration import get_client

    settings = deployed_stack.settings
    again = apply_automations(settings, deployed_stack.api_url)
    wanted = [a.name for a in project_automations(settings, uuid.uuid4(), "http://ui")]
    assert again == {name: "unchanged" for name in wanted}
    with get_client(sync_client=True) as client:
        names = [a.name for a in client.read_automations() if a.name.startswith(PREFIX)]
    assert sorted(names) == sorted(wanted), names  # one of each (the zombie test's own is gone)
    assert len(wanted) == 7


@pytest.mark.slow
def test_a_failing_deployment_run_is_told_with_its_name_message_and_link(deployed_stack, stack_notifications,
                                                                          tmp_path):
    from prefect.client.orchestration import get_client

    missing = tmp_path / "no-such-products.csv"
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("process-products/on-demand")
        run = client.create_flow_run_from_deployment(deployment.id, parameters={"file_path": str(missing)})
        finished = _wait(lambda: (r := client.read_flow_run(run.id)).state.is_final() and r, 120,
                         "end of the failing run")
    assert finished.state.type.value == "FAILED", finished.state
    ui = re.search(r"Prefect UI:\s+(\S+)", deployed_stack.up_output).group(1)  # the address `make up` printed
    link = f"{ui}/runs/flow-run/{run.id}"
    told = _wait(lambda: _notification(stack_notifications, link), 60, f"notification of {run.name}")
    assert told["subject"] == f"Flow run {run.name} Failed"
    assert f"Flow run {run.name} of process-products/on-demand ended Failed." in told["body"]
    assert str(missing.name) in told["body"]  # the state message says which file is missing
    assert httpx.get(link, headers={"Accept": "text/html"}, timeout=10).status_code == 200  # a browser opens it
    delay = (_instant(told["received"]) - finished.state.timestamp).total_seconds()
    print(f"\nfailed run end -> notification at the receiver: {delay:.1f} s")
    assert FAILED_RUNS.startswith(PREFIX)


@pytest.mark.slow
def test_each_project_event_is_told_naming_what_and_the_run_it_concerns(deployed_stack, stack_notifications):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    @flow(name="reporting-flow")
    def reporting_flow():
        pass

    with get_client(sync_client=True) as client:
        run = client.create_flow_run(reporting_flow)
    tag = uuid.uuid4().hex[:8]
    related = [{"prefect.resource.id": f"prefect.flow-run.{run.id}", "prefect.resource.role": "flow-run"}]
    emit_event(events.TURNSTILE_UNREACHABLE, resource={"prefect.resource.id": f"project.turnstile.gate-{tag}"},
               related=related)
    emit_event(events.ACCOUNT_PARKED, resource={"prefect.resource.id": f"project.marketplace.account.{tag}",
                                                "prefect.resource.name": f"shop-{tag}"})
    emit_event(events.OUTBOX_STALE, resource={"prefect.resource.id": f"project.outbox.stream-{tag}"},
               payload={"unpublished": 2000, "oldest_minutes": 12})
    emit_event(events.SERVICE_RESTARTED, resource={"prefect.resource.id": f"project.service.redis-{tag}"},
               payload={"restarts": 3})
    EventsWorker.drain_all(timeout=10)
    subjects = {
        f"Turnstile gate-{tag} unreachable": f"Flow run: {run.name} ",
        f"Seller account shop-{tag} needs reauthorization": f"Account: project.marketplace.account.{tag}",
        f"Outbox stream-{tag}: 2000 messages unpublished": "the oldest for 12 minutes",
        f"Service redis-{tag} restarted": "(3 restarts so far)",
    }
    told = _wait(lambda: (found := {n["subject"]: n["body"] for n in read_notifications(stack_notifications.file)
                                    if tag in n["subject"]}) and len(found) == 4 and found, 60, "4 notifications")
    assert sorted(told) == sorted(subjects)
    for subject, text in subjects.items():
        assert text in told[subject], told[subject]
    assert told[f"Turnstile gate-{tag} unreachable"].endswith(f"/runs/flow-run/{run.id}")
    assert "Flow run:" not in told[f"Service redis-{tag} restarted"]  # related to no run


@pytest.mark.slow
def test_a_running_flow_run_whose_heartbeats_stop_is_marked_crashed(prefect_api_url):
    """A flow run set Running, a few heartbeats, then silence: the repository's zombie automation (its window
    shortened, and its match narrowed to this run so that no other run of the session is judged by it) marks it
    Crashed once the window has passed; not before."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.events import emit_event
    from prefect.events.schemas.automations import AutomationCore
    from prefect.events.worker import EventsWorker
    from prefect.states import Running

    @flow(name="silent-flow")
    def silent_flow():
        pass

    window = timedelta(seconds=10)  # Prefect's shortest for a proactive trigger
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(silent_flow)
        client.set_flow_run_state(run.id, Running(), force=True)
        automation = zombie_automation(window, flow_runs=f"prefect.flow-run.{run.id}", name=f"{ZOMBIES} {run.id}")
        automation_id = client.create_automation(AutomationCore(**automation.model_dump(exclude={"id"})))
        try:
            time.sleep(1)  # the triggers service loads the new automation
            for _ in range(2):  # beats, then the process "dies"
                emit_event("prefect.flow-run.heartbeat", resource={"prefect.resource.id": f"prefect.flow-run.{run.id}"})
                EventsWorker.drain_all(timeout=10)
                last_beat = datetime.now(timezone.utc)
                time.sleep(1)
            assert client.read_flow_run(run.id).state.type.value == "RUNNING"  # beats within the window
            crashed = _wait(lambda: (r := client.read_flow_run(run.id)).state.type.value == "CRASHED" and r, 30,
                            "Crashed state")
        finally:
            client.delete_automation(automation_id)
    assert crashed.state.message == "Marked Crashed: no heartbeat for 10 s (its process is gone)."
    silence = (crashed.state.timestamp - last_beat).total_seconds()
    print(f"\nlast heartbeat -> Crashed with a {window.total_seconds():.0f} s window: {silence:.1f} s")
    assert window.total_seconds() <= silence < window.total_seconds() + 15
