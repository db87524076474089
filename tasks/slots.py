"""Slots of Prefect global concurrency limits that a dead holder gives back within seconds, and a wait that says
what it waits for and who holds it.

A slot is a Prefect lease (`/v2/concurrency_limits/increment-with-lease`). The server grants leases of 60 s at
least and its repossessor frees expired ones every PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS, so a holder
killed with SIGKILL would keep its slot up to a minute and more. So each holder also keeps a record of itself,
the Prefect variable `slot-holder-<lease id>` (who: flow run name and id, task run; since when; a heartbeat),
written by a thread of its own as the holder's work starts (not in its way), and refreshes both every
HEARTBEAT_SECONDS. A run that finds the limit full reads the records of its holders;
one whose heartbeat has not moved for STALE_AFTER_SECONDS of the waiter's own clock belongs to a process that is
gone: the waiter releases that lease (the server frees its slots at once) and takes the slot. A killed holder's
slot is free within STALE_AFTER_SECONDS plus one poll of a waiting run; without a waiter, the lease runs out.

A holder that cannot reach the API for longer than STALE_AFTER_SECONDS while a waiter can may lose its slot to
that waiter (its work goes on: a slot bounds load, it is not a lock of data). The waiter logs at once and every
WAIT_LOG_SECONDS what it waits for and who holds it; the holders are listed on the server's Variables page.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Iterator
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import VariableCreate, VariableUpdate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.runtime import flow_run, task_run

from operations.cancellation import StopCheck, never, raise_if_stopped

LEASE_SECONDS = 60  # the server's shortest lease: the fallback when no run waits for the slot
HEARTBEAT_SECONDS = 5.0  # the lease renewed and the holder's record refreshed this often
STALE_AFTER_SECONDS = 15.0  # a record unchanged this long (three heartbeats missed): its holder is gone
POLL_SECONDS = 2.0  # a waiting run asks again this often
WAIT_LOG_SECONDS = 30.0  # and says what it waits for this often
RECORD_PREFIX = "slot-holder-"
RECORD_TAG = "slot-holder"

Logger = logging.Logger | logging.LoggerAdapter
logger = logging.getLogger(__name__)


class SlotLimitMissing(RuntimeError):
    """The global concurrency limit does not exist (the flow creates it before taking a slot)."""


def _holder() -> tuple[str, ConcurrencyLeaseHolder | None, str]:
    """(who holds the slot in words, the lease's holder for Prefect, the flow run id) of the calling run."""
    run_id, task_name = flow_run.get_id(), task_run.get_name()
    if run_id is None:
        return "a process outside any flow run", None, ""
    who = f"flow run '{flow_run.get_name()}' ({run_id})" + (f", task run '{task_name}'" if task_name else "")
    task_id = task_run.get_id()
    holder = ConcurrencyLeaseHolder(type="task_run", id=task_id) if task_id else ConcurrencyLeaseHolder(
        type="flow_run", id=run_id)
    return who, holder, str(run_id)


def _try_acquire(client: SyncPrefectClient, limit: str, occupy: int,
                 holder: ConcurrencyLeaseHolder | None) -> UUID | None:
    """The lease of `occupy` slots of `limit`, or None when they are taken."""
    try:
        response = client.increment_concurrency_slots_with_lease(
            [limit], occupy, "concurrency", LEASE_SECONDS, holder=holder)
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == 423:
            return None
        raise
    answer = response.json()
    if not answer.get("limits"):
        raise SlotLimitMissing(f"the global concurrency limit '{limit}' does not exist")
    return UUID(answer["lease_id"])


def _records(client: SyncPrefectClient, limit: str) -> list[tuple[UUID, dict[str, Any]]]:
    """(lease id, record) of every holder record of `limit`."""
    response = client.request("POST", "/variables/filter", json={
        "variables": {"name": {"like_": f"{RECORD_PREFIX}%"}, "tags": {"all_": [RECORD_TAG]}}, "limit": 200})
    found = []
    for variable in response.json():
        value = variable.get("value")
        if isinstance(value, dict) and value.get("limit") == limit:
            found.append((UUID(variable["name"][len(RECORD_PREFIX):]), value))
    return found


class _Watch:
    """What a waiting run has seen of the holders' heartbeats, on its own clock."""

    def __init__(self):
        self.seen: dict[UUID, tuple[int, float]] = {}  # lease -> (heartbeat, when it was first seen)

    def stale(self, records: list[tuple[UUID, dict[str, Any]]]) -> list[tuple[UUID, dict[str, Any], float]]:
        now, stale, current = time.monotonic(), [], set()
        for lease_id, record in records:
            current.add(lease_id)
            beat = int(record.get("beat", 0))
            previous = self.seen.get(lease_id)
            if previous is None or previous[0] != beat:
                self.seen[lease_id] = (beat, now)
            elif now - previous[1] >= STALE_AFTER_SECONDS:
                stale.append((lease_id, record, now - previous[1]))
        for gone in set(self.seen) - current:
            del self.seen[gone]
        return stale


def _release(client: SyncPrefectClient, lease_id: UUID) -> None:
    """Release a lease (a no-op for one already gone) and delete its record."""
    client.release_concurrency_slots_with_lease(lease_id)
    try:
        client.delete_variable_by_name(f"{RECORD_PREFIX}{lease_id}")
    except ObjectNotFound:
        pass


def _age(since: str) -> str:
    try:
        started = datetime.fromisoformat(since)
    except (TypeError, ValueError):
        return ""
    return f" for {(datetime.now(timezone.utc) - started).total_seconds():.0f} s"


def holders_text(records: list[tuple[UUID, dict[str, Any]]], active: int) -> str:
    """Who holds the slots, in words: each record's holder and for how long, and the slots held without one."""
    parts = [f"{record.get('holder', 'an unnamed holder')}{_age(record.get('since', ''))}" for _, record in records]
    unrecorded = active - sum(int(record.get("slots", 1)) for _, record in records)
    if unrecorded > 0:
        parts.append(f"{unrecorded} slot(s) taken without a holder record (another client of the limit)")
    return "; ".join(parts) or "no holder left a record"


def _wait(client: SyncPrefectClient, limit: str, occupy: int, holder: ConcurrencyLeaseHolder | None, log: Logger,
          what: str, context: str, should_stop: StopCheck) -> tuple[UUID, float]:
    """Take the slots, waiting as long as it takes; returns (lease, seconds waited)."""
    started, watch, next_line, refused = time.monotonic(), _Watch(), 0.0, False
    while True:
        lease_id = _try_acquire(client, limit, occupy, holder)
        waited = time.monotonic() - started
        if lease_id is not None:
            if refused:  # a free slot is taken without a word
                log.info("%s taken after waiting %.1f s", what, waited)
            return lease_id, waited
        refused = True
        raise_if_stopped(should_stop, f"taking a {what}")
        records = _records(client, limit)
        stale = watch.stale(records)
        for lease, record, silent in stale:
            _release(client, lease)
            log.warning("released the slot of %s on '%s': no heartbeat for %.0f s, its process is gone",
                        record.get("holder", "an unnamed holder"), limit, silent)
        if stale:
            continue  # freed: ask again at once
        if time.monotonic() >= next_line:
            state = client.read_global_concurrency_limit_by_name(limit)
            log.info("waiting for a %s: %d of %d taken%s; held by %s; %.0f s so far", what, state.active_slots,
                     state.limit, context, holders_text(records, state.active_slots), waited)
            next_line = time.monotonic() + WAIT_LOG_SECONDS
        time.sleep(POLL_SECONDS)


class _Heartbeat(threading.Thread):
    """Writes the holder's record, then renews the lease and refreshes the record every HEARTBEAT_SECONDS until
    stopped, then deletes the record; through the holder's client (httpx clients are thread-safe)."""

    def __init__(self, client: SyncPrefectClient, lease_id: UUID, record: dict[str, Any], log: Logger):
        super().__init__(name=f"slot-heartbeat-{lease_id}", daemon=True)
        self.client, self.lease_id, self.record, self.log = client, lease_id, record, log
        self.stopped = threading.Event()
        self.name_ = f"{RECORD_PREFIX}{lease_id}"

    def write_record(self) -> None:
        try:
            self.client.update_variable(VariableUpdate(name=self.name_, value=self.record, tags=[RECORD_TAG]))
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 404:
                raise
            self.client.create_variable(VariableCreate(name=self.name_, value=self.record, tags=[RECORD_TAG]))

    def create_record(self) -> None:
        """The first write of the record (its lease is new: one call, not an update refused first)."""
        try:
            self.client.create_variable(VariableCreate(name=self.name_, value=self.record, tags=[RECORD_TAG]))
        except ObjectAlreadyExists:
            self.write_record()

    def run(self) -> None:
        """The record, then a beat every HEARTBEAT_SECONDS until stopped, then the record deleted (while the
        holder releases the lease). A beat that fails once the holder has stopped is no matter (the lease is
        being released): only one failing while the slot is held is a warning."""
        if self.stopped.is_set():  # a block over before its record was written: no record to write nor delete
            return
        try:
            self.create_record()
        except Exception as exc:  # noqa: BLE001 - the next beat writes it
            if not self.stopped.is_set():
                self.log.warning("could not write the holder record of the slot of '%s' (%s): %s",
                                 self.record["limit"], self.lease_id, exc)
        while not self.stopped.wait(HEARTBEAT_SECONDS):
            self.record["beat"] += 1
            try:
                self.client.renew_concurrency_lease(self.lease_id, LEASE_SECONDS)
                self.write_record()
            except Exception as exc:  # noqa: BLE001 - the next beat tries again
                if self.stopped.is_set():  # the holder stopped during the beat: its release raced the renewal
                    self.log.debug("slot of '%s' (%s) released during a renewal: %s", self.record["limit"],
                                   self.lease_id, exc)
                else:
                    self.log.warning("could not renew the slot of '%s' (%s): %s", self.record["limit"],
                                     self.lease_id, exc)
        try:
            self.client.delete_variable_by_name(self.name_)
        except Exception as exc:  # noqa: BLE001 - a record left behind names a lease already released
            self.log.debug("could not delete the record of the slot %s: %s", self.lease_id, exc)


@contextmanager
def held_slot(limit: str, log: Logger, *, what: str, occupy: int = 1, context: str = "",
              should_stop: StopCheck = never) -> Iterator[float]:
    """Hold `occupy` slots of the global concurrency limit `limit` for the block; yields the seconds waited.

    A run that has to wait logs at once and every WAIT_LOG_SECONDS "waiting for a <what>: <n> of <limit> taken
    <context>; held by <who>", then "<what> taken after waiting <s> s", and frees the slots of holders that stopped beating; it stops waiting with
    `Cancelled` once `should_stop()`. The slots are released on the way out, whatever the exit."""
    who, holder, run_id = _holder()
    with get_client(sync_client=True) as client:
        lease_id, waited = _wait(client, limit, occupy, holder, log, what, context, should_stop)
        record = {"limit": limit, "slots": occupy, "holder": who, "flow_run_id": run_id,
                  "since": datetime.now(timezone.utc).isoformat(), "beat": 0}
        heartbeat = _Heartbeat(client, lease_id, record, log)
        try:
            heartbeat.start()  # writes the record while the block starts its work
            yield waited
        finally:
            heartbeat.stopped.set()
            if heartbeat.is_alive():  # it deletes the record while the lease is released here
                client.release_concurrency_slots_with_lease(lease_id)
                heartbeat.join(timeout=HEARTBEAT_SECONDS)
            else:
                _release(client, lease_id)
