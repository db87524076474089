"""Registering every participant on one turnstile: read what the device holds, write what is missing or
changed in batches (users, then cards, then group links), and remember what was confirmed in Redis.

- Participants whose fingerprint the cache holds for this device cost no device call (unless `verify`, which
  reads the device for everyone, or `skip_cache`, which neither reads nor writes the cache).
- New users and new cards are written with `create_objects`: a value that exists is refused, never changed,
  so a user id or a card value of someone else is never overwritten. A refused batch is split in halves
  until the refused records are alone; a lone refused record is read back from the device, and if the
  device holds exactly what was sent (a retry of a write whose answer was lost), it is a success.
- Changed users are written with `create_or_modify_objects` (idempotent), a changed card by modifying the
  user's card, group links with `create_or_modify_objects` (a link that exists is left as it is). Nothing is
  ever deleted: a participant who leaves gets an `end` date.
- Batches hold at most `batch_size` objects and `max_body_bytes` of JSON (the device's buffer is ~2 MB; the
  vendor's SDK writes 250 objects a call).
- `should_stop` is asked before the device work and before every batch: once it answers True no new write
  starts, the device reports status "cancelled", and what was confirmed before stays counted.
- The figures are added to a `DeviceTally` as each batch is confirmed; the caller may hand the same tally to
  every attempt on a device (a retried task), so the report counts what all attempts wrote.
"""

from __future__ import annotations

import contextlib
import json
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ContextManager

from operations.cancellation import Cancelled, StopCheck, never, raise_if_stopped
from operations.turnstiles.cache import RegistrationCache
from operations.turnstiles.client import ControlIdClient, DeviceError, DeviceRefused
from operations.turnstiles.participants import Participant


@dataclass(frozen=True)
class RegistrationOptions:
    skip_cache: bool = False        # do not consult nor update the cache (the seed's skipCache)
    verify: bool = False            # read the device for every participant instead of trusting the cache
    dry_run: bool = False           # read the device and report the plan, write nothing
    batch_size: int = 250           # objects per write call
    max_body_bytes: int = 1_000_000  # JSON bytes per write call
    concurrency: int = 1            # write calls in flight on this device at once


@dataclass
class DeviceReport:
    """One device's outcome; `failures` are (registration, row, error) of the participants not registered."""

    device: str
    participants: int = 0
    cached: int = 0                 # skipped: the cache says the device holds them as they are
    unchanged: int = 0              # read from the device: nothing to write
    created: int = 0                # users created
    updated: int = 0                # users whose name or validity changed
    cards: int = 0                  # cards created or changed
    groups: int = 0                 # group links added
    failures: list[tuple[str, int, str]] = field(default_factory=list)
    status: str = "done"            # done | dry-run | failed | cancelled
    error: str = ""
    requests: int = 0
    retries: int = 0
    logins: int = 0
    writes: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DeviceTally:
    """What every attempt on one device did, added to as each write is confirmed: an attempt that fails after
    writing leaves its share here for the next one's report."""

    created: int = 0
    updated: int = 0
    cards: int = 0
    groups: int = 0
    requests: int = 0
    retries: int = 0
    logins: int = 0
    writes: int = 0
    seconds: float = 0.0
    attempts: int = 0
    written: set[str] = field(default_factory=set)  # registrations an attempt wrote something of
    settled: int = 0  # the most participants one attempt reported settled (the run's progress counts it once)

    def fill(self, report: DeviceReport) -> DeviceReport:
        """`report` with the figures of every attempt (a dry run's planned writes are its own: nothing was
        written)."""
        if report.status != "dry-run":
            report.created, report.updated, report.cards, report.groups = (
                self.created, self.updated, self.cards, self.groups)
        report.requests, report.retries, report.logins, report.writes = (
            self.requests, self.retries, self.logins, self.writes)
        report.seconds = self.seconds
        return report


class DeviceFailed(Exception):
    """The device could not be worked through (unreachable, login refused): `report` holds what was done."""

    def __init__(self, message: str, report: DeviceReport, transient: bool):
        super().__init__(message)
        self.report, self.transient = report, transient

    def __reduce__(self):
        return (DeviceFailed, (str(self), self.report, self.transient))


@dataclass
class _Target:
    """A participant and what the device must get."""

    participant: Participant
    user_id: int
    new_user: bool = False
    user_changed: bool = False
    card_create: bool = False
    card_modify_id: int | None = None   # the device card of this user to give the new value
    group_link: bool = False
    failed: str = ""

    @property
    def needs_write(self) -> bool:
        return self.new_user or self.user_changed or self.card_create or self.card_modify_id is not None \
            or self.group_link


def user_values(p: Participant, user_id: int) -> dict[str, Any]:
    """The device's user object for a participant (always the same fields, as one call requires)."""
    return {"id": user_id, "registration": p.registration, "name": p.name,
            "begin_time": p.begin or 0, "end_time": p.end or 0}


def register_on_device(
    client: ControlIdClient,
    device: str,
    participants: list[Participant],
    cache: RegistrationCache,
    options: RegistrationOptions,
    progress: Callable[[int], None] | None = None,
    device_slot: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
    should_stop: StopCheck = never,
    tally: DeviceTally | None = None,
) -> DeviceReport:
    """Bring one device in line with the participants; raises DeviceFailed when the device cannot be worked.
    `device_slot` is held around the device work only (not around the cache check): the caller's share of
    the device's load across runs, so a run whose participants are all cached never waits for it. Once
    `should_stop()`, no new write starts and the report's status is "cancelled". `tally`: the figures of the
    earlier attempts on this device, added to."""
    started = time.perf_counter()
    tally = tally if tally is not None else DeviceTally()
    tally.attempts += 1
    report = DeviceReport(device, participants=len(participants))
    try:
        todo = participants
        if not (options.skip_cache or options.verify):
            confirmed = cache.confirmed(device, [p.registration for p in participants])
            todo = [p for p in participants if confirmed.get(p.registration, (0, ""))[1] != p.fingerprint()]
            report.cached = len(participants) - len(todo)
            if progress and report.cached:
                progress(report.cached)
        if todo:
            raise_if_stopped(should_stop, f"the work on {device}")
            with device_slot():
                targets = _device_work(client, cache, todo, options, report, progress, should_stop, tally)
                client.logout()
            if not options.skip_cache and not options.dry_run:
                cache.confirm(device, [(t.participant.registration, t.user_id, t.participant.fingerprint())
                                       for t in targets if not t.failed])
    except Cancelled as exc:
        report.status, report.error = "cancelled", str(exc)
        client.logout()
    except DeviceError as exc:
        report.status, report.error = "failed", str(exc)
        raise DeviceFailed(f"{device}: {exc}", _finish(report, client, started, tally), exc.transient) from None
    return _finish(report, client, started, tally)


def _device_work(
    client: ControlIdClient, cache: RegistrationCache, todo: list[Participant], options: RegistrationOptions,
    report: DeviceReport, progress: Callable[[int], None] | None, should_stop: StopCheck, tally: DeviceTally,
) -> list[_Target]:
    """Read the device, then write what it lacks (or only report it, on a dry run)."""
    targets = _plan(client, cache, todo)
    report.unchanged = sum(1 for t in targets if not t.needs_write and t.participant.registration not in tally.written)
    if options.dry_run:
        report.status = "dry-run"
        _count_writes(report, targets)
        if progress:
            progress(len(targets))
        return targets
    if progress and report.unchanged:
        progress(report.unchanged)
    _write(client, [t for t in targets if t.needs_write], options, report, progress, should_stop, tally)
    report.failures += [(t.participant.registration, t.participant.row_number, t.failed) for t in targets if t.failed]
    return targets


def _finish(report: DeviceReport, client: ControlIdClient, started: float, tally: DeviceTally) -> DeviceReport:
    stats = client.stats
    tally.requests += stats.requests
    tally.retries += stats.retries
    tally.logins += stats.logins
    tally.writes += stats.writes
    tally.seconds += time.perf_counter() - started
    return tally.fill(report)


def _count_writes(report: DeviceReport, targets: list[_Target]) -> None:
    """A dry run's plan: users to create and update, cards and group links to write."""
    done = [t for t in targets if not t.failed]
    report.created = sum(t.new_user for t in done)
    report.updated = sum(t.user_changed for t in done)
    report.cards = sum(t.card_create or t.card_modify_id is not None for t in done)
    report.groups = sum(t.group_link for t in done)


def _plan(client: ControlIdClient, cache: RegistrationCache, todo: list[Participant]) -> list[_Target]:
    """What each participant needs, from one read of the device (users by registration, their cards and
    group links, in lists of at most 999 values)."""
    on_device = {u["registration"]: u for u in client.load("users", "registration", [p.registration for p in todo])}
    known_ids = [u["id"] for u in on_device.values()]
    cards: dict[int, list[dict[str, Any]]] = {}
    for card in client.load("cards", "user_id", known_ids) if known_ids else []:
        cards.setdefault(card["user_id"], []).append(card)
    groups: dict[int, set[int]] = {}
    for link in client.load("user_groups", "user_id", known_ids) if known_ids else []:
        groups.setdefault(link["user_id"], set()).add(link["group_id"])
    new_ids = cache.user_ids([p.registration for p in todo if p.registration not in on_device])
    targets = []
    for p in todo:
        user = on_device.get(p.registration)
        if user is None:
            targets.append(_Target(p, new_ids[p.registration], new_user=True, card_create=p.card is not None,
                                   group_link=p.group is not None))
            continue
        wanted, user_id = user_values(p, user["id"]), user["id"]
        changed = any(user.get(key, 0) != wanted[key] for key in ("name", "begin_time", "end_time"))
        held = cards.get(user_id, [])
        target = _Target(p, user_id, user_changed=changed,
                         group_link=p.group is not None and p.group not in groups.get(user_id, set()))
        if p.card is not None and all(card["value"] != p.card for card in held):
            if held:
                target.card_modify_id = held[0]["id"]
            else:
                target.card_create = True
        targets.append(target)
    return targets


def _write(
    client: ControlIdClient, targets: list[_Target], options: RegistrationOptions, report: DeviceReport,
    progress: Callable[[int], None] | None, should_stop: StopCheck, tally: DeviceTally,
) -> None:
    """Users, then cards, then group links, each in batches (`options.concurrency` calls at once); a
    participant whose user failed gets nothing more. Each confirmed write is added to `tally` at once. Once a
    batch fails (the device unreachable) or `should_stop()` (Cancelled), no further batch starts: those in
    flight finish and are counted, then the error is raised."""
    def alive(predicate: Callable[[_Target], bool]) -> list[_Target]:
        return [t for t in targets if not t.failed and predicate(t)]

    def resolve_user(t: _Target, exc: DeviceRefused) -> str | None:
        found = client.load("users", "id", [t.user_id])
        if found and found[0].get("registration") == t.participant.registration:
            return None  # the device holds it: an earlier attempt's write whose answer was lost
        taken = f" (user id {t.user_id} is {found[0].get('registration')!r} there)" if found else ""
        return f"{exc.error}{taken}"

    def resolve_card(t: _Target, exc: DeviceRefused) -> str | None:
        found = client.load("cards", "value", [t.participant.card])
        if found and found[0].get("user_id") == t.user_id:
            return None
        owner = f" (card {t.participant.card} belongs to user {found[0].get('user_id')})" if found else ""
        return f"{exc.error}{owner}"

    def batch_written(batch: list[tuple[_Target, dict]], refused: list[tuple[_Target, str]], object_name: str,
                      figure: str) -> None:
        refused_ids = {id(target) for target, _ in refused}
        for target, error in refused:
            target.failed = f"{object_name}: {error}"
        for target, _ in batch:
            if id(target) not in refused_ids:
                setattr(tally, figure, getattr(tally, figure) + 1)
                tally.written.add(target.participant.registration)
        if progress and object_name == "users":
            progress(len(batch))

    def one_batch(batch: list[tuple[_Target, dict]], object_name: str, create_only: bool, resolve):
        raise_if_stopped(should_stop, f"the next {object_name} batch on {report.device}")
        return _write_isolating(client, object_name, batch, create_only, resolve)

    steps = [
        ("users", alive(lambda t: t.new_user), lambda t: user_values(t.participant, t.user_id), True, resolve_user,
         "created"),
        ("users", alive(lambda t: t.user_changed), lambda t: user_values(t.participant, t.user_id), False, None,
         "updated"),
        ("cards", None, lambda t: {"value": t.participant.card, "user_id": t.user_id}, True, resolve_card, "cards"),
        ("user_groups", None, lambda t: {"user_id": t.user_id, "group_id": t.participant.group}, False, None,
         "groups"),
    ]
    with ThreadPoolExecutor(max(1, options.concurrency), thread_name_prefix=f"device-{report.device}") as pool:
        for object_name, chosen, values, create_only, resolve, figure in steps:
            if chosen is None:  # cards and links only for participants whose user is on the device by now
                chosen = alive(lambda t: t.card_create) if object_name == "cards" else alive(lambda t: t.group_link)
            batches = _batches([(t, values(t)) for t in chosen], options.batch_size, options.max_body_bytes)
            futures = [pool.submit(one_batch, batch, object_name, create_only, resolve) for batch in batches]
            stopped: Exception | None = None
            for batch, future in zip(batches, futures):
                try:
                    batch_written(batch, future.result(), object_name, figure)
                except CancelledError:  # not started: a batch before it failed or was stopped
                    pass
                except Exception as exc:  # noqa: BLE001 - raised once the batches in flight are counted
                    if stopped is None:
                        stopped = exc
                        for later in futures:
                            later.cancel()
            if stopped is not None:
                raise stopped
        for t in alive(lambda t: t.card_modify_id is not None):
            raise_if_stopped(should_stop, f"the next card change on {report.device}")
            try:
                client.call("/modify_objects.fcgi", {"object": "cards", "values": {"value": t.participant.card},
                                                     "where": {"cards": {"id": t.card_modify_id}}})
            except DeviceRefused as exc:
                t.failed = f"cards: {exc.error}"
            else:
                tally.cards += 1
                tally.written.add(t.participant.registration)
    if progress:  # the participants without a user write are settled now
        progress(sum(not (t.new_user or t.user_changed) for t in targets))


def _batches(records: list[tuple[_Target, dict]], max_count: int, max_bytes: int) -> list[list[tuple[_Target, dict]]]:
    """Consecutive batches of at most `max_count` records and `max_bytes` of JSON each."""
    batches, current, size = [], [], 2
    for record in records:
        length = len(json.dumps(record[1], separators=(",", ":"))) + 1
        if current and (len(current) >= max_count or size + length > max_bytes):
            batches.append(current)
            current, size = [], 2
        current.append(record)
        size += length
    if current:
        batches.append(current)
    return batches


def _write_isolating(
    client: ControlIdClient, object_name: str, batch: list[tuple[_Target, dict]], create_only: bool,
    resolve: Callable[[_Target, DeviceRefused], str | None] | None,
) -> list[tuple[_Target, str]]:
    """Write a batch; if the device refuses it, halve it until each refused record is alone, and return
    those records with the device's error (or none, when `resolve` finds the device holds the record)."""
    try:
        client.write(object_name, [values for _, values in batch], create_only=create_only)
        return []
    except DeviceRefused as exc:
        if len(batch) == 1:
            error = resolve(batch[0][0], exc) if resolve else exc.error
            return [] if error is None else [(batch[0][0], error)]
    middle = len(batch) // 2
    return (_write_isolating(client, object_name, batch[:middle], create_only, resolve)
            + _write_isolating(client, object_name, batch[middle:], create_only, resolve))
