"""Tasks of the turnstile registration: one per device, holding the device's slots of its global concurrency
limit for the whole of its work, so the load on a turnstile stays bounded across every flow run.

The task stops between batches once its run is cancelled (`run_stop_check`), counts what all its attempts wrote
(`attempt_tally`), and tells someone (the `project.turnstile.unreachable` event) when a device stays
unreachable past its retries.

Before them, the flow's own body checks every turnstile's identity and health (`check_turnstiles`, not a task: a
reset or replaced unit voids its cache entries, and the `project.turnstile.reset-detected` event tells someone)
and says which turnstiles have work."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from redis.exceptions import RedisError

from blocks.turnstile_device import TurnstileCache, TurnstileDevice
from operations.events import TURNSTILE_RESET_DETECTED, TURNSTILE_UNREACHABLE
from operations.infra.http import RequestPacer
from operations.turnstiles.identity import Logouts, check_devices
from operations.turnstiles.registration import (
    DeviceFailed,
    DeviceTally,
    RegistrationOptions,
    Roster,
    register_on_device,
)
from tasks.attempts import attempt_tally, release_tally
from tasks.cancellation import run_stop_check
from tasks.events import emit
from tasks.retries import is_transient, retrying_step, retrying_task
from tasks.slots import held_slot

PROGRESS_EVERY_SECONDS = 2.0  # log lines and progress updates at a readable pace


def device_limit_name(device: str) -> str:
    """The Prefect global concurrency limit of a device (created from its block by the flow)."""
    return f"turnstile:{device}"


Participants = Roster  # the run's participants as one opaque task parameter, shared by its device tasks


@dataclass(frozen=True)
class RunProgress:
    """Where a device task adds what it settled: a Redis counter shared by the run's tasks, and the run's
    progress artifact (updated from the counter, so every task shows the whole run)."""

    artifact_id: UUID | None
    counter_key: str
    total: int


class _Reporter:
    """Adds to the run's progress what this device settled; a retried attempt adds only what goes beyond the
    most an earlier attempt settled (`tally.settled`), so the run's progress never counts a pair twice."""

    def __init__(self, device: str, participants: int, progress: RunProgress, cache_block: TurnstileCache,
                 tally: DeviceTally):
        self.device, self.participants, self.progress, self.tally = device, participants, progress, tally
        self.redis = cache_block.get_client()
        self.settled, self.last = 0, 0.0

    def __call__(self, delta: int) -> None:
        """`delta` more settled: added to the run's counter at most once per PROGRESS_EVERY_SECONDS (and when
        every participant is settled); `flush()` adds the rest."""
        self.settled += delta
        if time.monotonic() - self.last >= PROGRESS_EVERY_SECONDS or self.settled >= self.participants:
            self.flush()

    def flush(self) -> None:
        """Add to the run's counter what this device settled beyond what was added; log it and show it."""
        new = self.settled - self.tally.settled
        if new <= 0:
            return
        self.tally.settled = self.settled
        run_settled = self.redis.incrby(self.progress.counter_key, new)
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_SECONDS or self.settled >= self.participants:
            self.last = now
            get_run_logger().info(
                "%s: %d/%d (%.1f%%)", self.device, self.settled, self.participants,
                100.0 * self.settled / max(1, self.participants),
            )
            # one artifact update per PROGRESS_EVERY_SECONDS for the whole run, by whichever device comes first
            if self.progress.artifact_id is not None and self.redis.set(
                    f"{self.progress.counter_key}:shown", 1, nx=True, px=int(PROGRESS_EVERY_SECONDS * 1000)):
                update_progress_artifact(self.progress.artifact_id, 100.0 * run_settled / max(1, self.progress.total))


# Re-running a device is harmless by design (it reads the device and writes only what differs; creates never
# overwrite), so a retried or recomputed task changes nothing twice: no cache needed.
@retrying_task(
    name="register-on-turnstile",
    task_run_name="turnstile-{device_name}",
    retries=2,
    delays=[5, 20],  # DeviceFailed says; a refused login never heals
    cache_policy=NO_CACHE,
    tags=["turnstiles", "http"],
)
def register_on_turnstile(
    device_name: str,
    device: TurnstileDevice,
    participants: Participants,
    cache_block: TurnstileCache,
    options: RegistrationOptions,
    progress: RunProgress,
) -> dict:
    """Register the participants on one device, within the device's limits (its slots of the global
    concurrency limit for the whole of the device work; requests paced to its share of the device's requests
    per second). Participants the cache holds cost neither a device call nor a slot. A cancelled run's task
    returns what it wrote before the cancel (status "cancelled")."""
    slots = max(1, min(options.concurrency, device.max_concurrent_requests))
    pacer = RequestPacer(device.requests_per_second * slots / device.max_concurrent_requests, slots)
    client = device.client(device_name, limiter=pacer.slot)
    should_stop, logger = run_stop_check(), get_run_logger()
    limit, tally = device_limit_name(device_name), attempt_tally(DeviceTally)
    reporter = _Reporter(device_name, len(participants), progress, cache_block, tally)
    try:
        report = register_on_device(
            client, device_name, participants, cache_block.cache(),
            replace(options, concurrency=slots, managed_groups=tuple(device.managed_groups) or options.managed_groups),
            progress=reporter,
            device_slot=lambda: held_slot(limit, logger, what=f"slot of turnstile {device_name}", occupy=slots,
                                          context=f" (global concurrency limit '{limit}', the block's max "
                                                  "concurrent requests)", should_stop=should_stop),
            should_stop=should_stop, tally=tally,
        )
    except DeviceFailed as failed:
        if failed.transient and _last_attempt():
            emit(TURNSTILE_UNREACHABLE, device_name, payload={"error": str(failed), "base_url": device.base_url})
        if not failed.transient or _last_attempt():
            release_tally()
        raise
    except Exception as exc:  # unexpected: the task's retry (if any) counts this attempt's share
        if not is_transient(exc) or _last_attempt():
            release_tally()
        raise
    finally:
        with contextlib.suppress(RedisError):  # the progress only: the task's own outcome stands
            reporter.flush()
    release_tally()
    if report.status == "cancelled":
        logger.warning("%s: %s; written before: %d user(s) created, %d updated, %d card(s), %d group link(s)",
                       device_name, report.error, report.created, report.updated, report.cards, report.groups)
    return report.to_json()


def check_turnstiles(
    devices: dict[str, TurnstileDevice], participants: Participants, cache_block: TurnstileCache, dry_run: bool,
    logouts: Logouts | None = None,
) -> dict[str, dict]:
    """Each turnstile's identity and health check (all at once) and how many participants it needs; a reset or
    replaced turnstile is logged, told (event `project.turnstile.reset-detected`) and its cache entries dropped
    (not in a dry run). `logouts`: where the sessions of turnstiles left with no work end, the run not waiting.

    A stage of the flow's own body, not a task run: a run with nothing to write is one flow run (a task run adds
    its own start and end on the API and, in a new process, a look-up of its tags' concurrency limits). A device
    that does not answer is the check's answer for that device (`error`: its own task reads it in full); a
    failure past the devices (Redis) is tried once more after ~2 s, by the tasks' retry rule: run again, a check
    finds the same (or, a reset turnstile's entries being gone, nothing more to drop)."""
    return retrying_step(lambda: _check_turnstiles(devices, participants, cache_block, dry_run, logouts),
                         retries=1, delays=[2], what="the turnstiles' checks", logger=get_run_logger())


def _check_turnstiles(devices: dict[str, TurnstileDevice], participants: Participants, cache_block: TurnstileCache,
                      dry_run: bool, logouts: Logouts | None) -> dict[str, dict]:
    logger = get_run_logger()
    checks = check_devices({name: (lambda d=device, n=name: d.client(n)) for name, device in devices.items()},
                           cache_block.cache(), participants, dry_run=dry_run, logouts=logouts)
    for name, check in checks.items():
        if check.reset:
            logger.warning("%s: reset or replaced, its cache is not trusted: %s; %s", name, check.reset,
                           "a dry run plans every participant" if dry_run
                           else f"{check.dropped:,} cache entries dropped, every participant is registered again")
            emit(TURNSTILE_RESET_DETECTED, name, payload={"reason": check.reset, "identity": check.identity,
                                                          "dropped": check.dropped, "base_url": devices[name].base_url,
                                                          "dry_run": dry_run})
        elif check.error:
            logger.warning("%s: could not be checked (%s): the turnstile is read in full", name, check.error)
    return {name: check.to_json() for name, check in checks.items()}


def _last_attempt() -> bool:
    """Whether the calling task run is on its last attempt (no retry follows a failure)."""
    context = TaskRunContext.get()
    return context is None or context.task_run.run_count > context.task.retries
