"""Global concurrency limits created by runs that start together (the session's PostgreSQL-backed server), and
the slot of a holder killed with SIGKILL given back within seconds to a run that waits for it."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import httpx
from prefect.client.orchestration import get_client

from flows.concurrency import upsert_concurrency_limit
from operations.settings import PROJECT_ROOT
from tasks import slots
from tasks.registration import device_limit_name
from tasks.slots import held_slot


def _race(names: list[str], slots: int) -> list[BaseException]:
    """4 clients upserting each name at the same moment (Prefect's own upsert fails this with 409s here)."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def one() -> None:
        with get_client(sync_client=True) as client:
            for name in names:
                try:
                    barrier.wait(timeout=30)
                    upsert_concurrency_limit(client, name, slots)
                except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                    errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return errors


def test_runs_creating_the_same_limit_at_once_all_succeed_and_leave_one_limit():
    names = [f"race-{uuid.uuid4().hex[:8]}" for _ in range(15)]
    assert _race(names, 3) == []
    with get_client(sync_client=True) as client:
        for name in names:
            assert client.read_global_concurrency_limit_by_name(name).limit == 3
            client.delete_global_concurrency_limit_by_name(name)


_HOLD_THEN_SLEEP = """
import sys, time
from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from tasks import slots
from tasks.slots import held_slot

@flow(name="slot-holder")
def hold(limit: str) -> None:
    with held_slot(limit, get_run_logger(), what="test slot"), get_client(sync_client=True) as client:
        while not slots._records(client, limit):  # its record is written beside the block's work
            time.sleep(0.05)
        print("holding", flush=True)
        time.sleep(600)

hold(sys.argv[1])
"""


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_a_killed_holders_turnstile_slot_is_free_within_30_s_and_the_wait_says_who_held_it(monkeypatch):
    """A process that holds the slot of a turnstile is killed with SIGKILL: the next run that waits for the slot
    names the holder (its flow run), frees the slot once the holder's heartbeat has stopped, and takes it."""
    monkeypatch.setattr(slots, "WAIT_LOG_SECONDS", 5.0)  # several lines within the wait
    limit = device_limit_name(f"test-gate-{uuid.uuid4().hex[:6]}")
    with get_client(sync_client=True) as client:
        upsert_concurrency_limit(client, limit, 1)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_THEN_SLEEP, limit], cwd=PROJECT_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == b"holding", "the holder did not take the slot"
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    killed = time.monotonic()
    log, lines = logging.getLogger(f"test.slots.{limit}"), _Lines()
    log.setLevel(logging.INFO)
    log.addHandler(lines)
    with held_slot(limit, log, what="slot of the test gate", context=" (its turnstile limit)") as waited:
        free_after = time.monotonic() - killed
        with get_client(sync_client=True) as client:
            assert client.read_global_concurrency_limit_by_name(limit).active_slots == 1  # this one only
    print(f"slot of a killed holder free after {free_after:.1f} s")
    assert free_after <= 30, free_after
    waiting = [line for line in lines.lines if line.startswith("waiting for a slot of the test gate")]
    assert waiting and "1 of 1 taken (its turnstile limit); held by flow run '" in waiting[0], lines.lines
    assert [line for line in lines.lines if "no heartbeat for" in line and "its process is gone" in line]
    assert lines.lines[-1].startswith("slot of the test gate taken after waiting"), lines.lines
    assert waited >= slots.STALE_AFTER_SECONDS - 1
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(limit).active_slots == 0
        assert not [r for r in slots._records(client, limit)], "the records of both holders are gone"
        client.delete_global_concurrency_limit_by_name(limit)


class _RenewalRacingTheRelease:
    """A Prefect client whose lease renewal answers 410 Gone, as the server does once the lease is released;
    `release_first`: the holder stops (and releases) while the renewal is in flight."""

    def __init__(self, heartbeat_box: list, release_first: bool):
        self.box, self.release_first = heartbeat_box, release_first
        self.renewals, self.deleted = 0, []

    def create_variable(self, variable):
        pass

    def renew_concurrency_lease(self, lease_id, seconds):
        self.renewals += 1
        if self.release_first:
            self.box[0].stopped.set()
        request = httpx.Request("POST", f"http://server/v2/concurrency_limits/leases/{lease_id}/renew")
        raise httpx.HTTPStatusError("Client error '410 Gone'", request=request,
                                    response=httpx.Response(410, request=request, json={"detail": "Lease not found"}))

    def delete_variable_by_name(self, name):
        self.deleted.append(name)


def test_a_renewal_refused_because_the_holder_released_its_slot_is_no_warning(monkeypatch):
    """The lease released while a renewal is in flight (every task's end, now and then) logs no warning; the
    same refusal while the slot is held is a warning. Either way the record is deleted at the end."""
    monkeypatch.setattr(slots, "HEARTBEAT_SECONDS", 0.01)
    for release_first, warned in ((True, []), (False, ["could not renew the slot of 'turnstile:gate'"])):
        log, lines = logging.getLogger(f"test.slots.renewal.{release_first}"), _Lines()
        log.setLevel(logging.DEBUG)
        log.addHandler(lines)
        box: list = []
        client = _RenewalRacingTheRelease(box, release_first)
        lease = uuid.uuid4()
        heartbeat = slots._Heartbeat(client, lease, {"limit": "turnstile:gate", "beat": 0}, log)
        box.append(heartbeat)
        heartbeat.start()
        while not client.renewals:
            time.sleep(0.005)
        heartbeat.stopped.set()
        heartbeat.join(5)
        warnings = [line.split(" (")[0] for line in lines.lines if "could not" in line]
        assert sorted(set(warnings)) == warned, lines.lines
        assert client.deleted == [f"{slots.RECORD_PREFIX}{lease}"]
