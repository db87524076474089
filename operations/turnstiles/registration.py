"""Registering every participant on one turnstile: read what the device holds, write what is missing or
changed in batches (users, then cards, then group links), and remember what was confirmed in Redis.

- Participants whose fingerprint the cache holds for this device cost no device call (unless `verify`, which
  reads the device for everyone, or `skip_cache`, which neither reads nor writes the cache). A device the cache
  knows nothing of is first asked for any user: a new or wiped one is not read further.
- New users and new cards are written with `create_objects`: a value that exists is refused, never changed,
  so a user id or a card value of someone else is never overwritten. A refused batch is read back in one
  `load_objects`: the records the device holds exactly as sent (a retried write whose answer was lost) are
  done, those another user holds are refused naming the holder, and only the rest is sent again; what is
  still refused is split in halves until the refused records are alone.
- Changed users are written with `create_or_modify_objects` (idempotent). A changed card replaces the user's
  card: the old card is destroyed and the new one created, both in batches; so two participants swapping
  cards in one file succeed in one run. A card wanted by a participant and held by someone the project
  registered and the file no longer lists is freed (its card destroyed); held by anyone else, the
  participant's card is refused naming the holder (decided from the plan's read for users the device has,
  and when the create is refused for new ones, so a first run reads no more than it writes).
- Groups are exact for the managed groups (`RegistrationOptions.managed_groups`, by default every group the
  file names): a missing link is added (`create_or_modify_objects`), a link to another managed group is
  destroyed (the link object, never the person). Links to groups nobody manages are left alone. A group the
  device lacks is named in the participant's failure, and their user and card are written all the same.
- People are never deleted: a participant who leaves keeps their user, and their `end` date says until when.
- A participant written in full is remembered in the cache after the batch of their group link (while the next
  batch is on the device); those who needed no link, at the end of the device's work.
- Batches hold at most `batch_size` objects and `max_body_bytes` of JSON (the device's buffer is ~2 MB; the
  vendor's SDK writes 250 objects a call). A batch is encoded once per process and its JSON sent as is by every
  device that sends the same records (`Roster.batches`: a first run's new users, cards and links are the same
  on every device), so ten devices cost the interpreter one encoding, not ten.
- `should_stop` is asked before the device work and before every batch: once it answers True no new write
  starts, the device reports status "cancelled", and what was confirmed before stays counted.
- The figures are added to a `DeviceTally` as each batch is confirmed; the caller may hand the same tally to
  every attempt on a device (a retried task), so the report counts what all attempts wrote and requested.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ContextManager, Iterable, Sequence

import orjson

from operations.cancellation import Cancelled, StopCheck, never, raise_if_stopped
from operations.turnstiles.cache import RegistrationCache, prepare_confirm, roster_digest
from operations.turnstiles.client import MAX_IN_LIST, ControlIdClient, DeviceError, DeviceRefused
from operations.turnstiles.participants import Participant


@dataclass(frozen=True)
class RegistrationOptions:
    skip_cache: bool = False        # do not consult nor update the cache (the seed's skipCache)
    verify: bool = False            # read the device for every participant instead of trusting the cache
    dry_run: bool = False           # read the device and report the plan, write nothing
    batch_size: int = 250           # objects per write call
    max_body_bytes: int = 1_000_000  # JSON bytes per write call
    concurrency: int = 1            # write calls in flight on this device at once
    managed_groups: tuple[int, ...] | None = None  # groups whose links follow the file; None: those it names


@dataclass
class DeviceReport:
    """One device's outcome; `failures` are (registration, row, error) of the participants not registered
    in full (the error says which part failed and why)."""

    device: str
    participants: int = 0
    cached: int = 0                 # skipped: the cache says the device holds them as they are
    unchanged: int = 0              # read from the device: nothing to write
    created: int = 0                # users created
    updated: int = 0                # users whose name or validity changed
    cards: int = 0                  # cards created or changed
    cards_freed: int = 0            # cards taken from people the file no longer lists
    groups: int = 0                 # group links added
    groups_removed: int = 0         # links to managed groups the file does not grant, destroyed
    failures: list[tuple[str, int, str]] = field(default_factory=list)
    status: str = "done"            # done | cached | dry-run | failed | cancelled
    error: str = ""
    requests: int = 0
    retries: int = 0
    logins: int = 0
    writes: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_TALLY_LOCK = threading.Lock()
WRITTEN_FIGURES = ("created", "updated", "cards", "cards_freed", "groups", "groups_removed")


@dataclass
class DeviceTally:
    """What every attempt on one device did, added to as each write is confirmed: an attempt that fails after
    writing leaves its share here for the next one's report."""

    created: int = 0
    updated: int = 0
    cards: int = 0
    cards_freed: int = 0
    groups: int = 0
    groups_removed: int = 0
    requests: int = 0
    retries: int = 0
    logins: int = 0
    writes: int = 0
    seconds: float = 0.0
    attempts: int = 0
    written: set[str] = field(default_factory=set)  # registrations an attempt wrote something of
    settled: int = 0  # the most participants one attempt reported settled (the run's progress counts it once)

    def add(self, figure: str | None, count: int, registrations: list[str] = ()) -> None:
        """`count` more of `figure` (None: no figure of its own), written for `registrations`."""
        with _TALLY_LOCK:  # batches of one device may be confirmed from several threads
            if figure is not None:
                setattr(self, figure, getattr(self, figure) + count)
            self.written.update(registrations)

    def fill(self, report: DeviceReport) -> DeviceReport:
        """`report` with the figures of every attempt (a dry run's planned writes are its own: nothing was
        written)."""
        if report.status != "dry-run":
            for name in WRITTEN_FIGURES:
                setattr(report, name, getattr(self, name))
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


@dataclass(slots=True)
class _Target:
    """A participant and what the device must get. `failed`: the user could not be written (nothing else of
    theirs is); `problems`: the other parts that could not be (cards, groups), each with why. The sequences
    are replaced, never changed in place (the empty defaults are shared: ten devices plan 10,000 targets each)."""

    participant: Participant
    user_id: int
    new_user: bool = False
    user_changed: bool = False
    card_create: bool = False
    card_drop: Sequence[int] = ()      # ids of this user's cards the new card replaces
    group_link: bool = False
    groups_remove: Sequence[int] = ()  # managed groups the file does not grant
    failed: str = ""
    problems: Sequence[str] = ()
    confirmed: bool = False            # remembered in the cache as written (after its group link's batch)

    def refuse(self, why: str) -> None:
        """Note a part that could not be written (a card, a group link) and why."""
        self.problems = [*self.problems, why]

    @property
    def needs_write(self) -> bool:
        return (self.new_user or self.user_changed or self.card_create or self.group_link
                or bool(self.groups_remove))

    @property
    def error(self) -> str:
        if self.failed or not self.problems:
            return self.failed
        return "; ".join(self.problems)


@dataclass
class _Plan:
    targets: list[_Target]
    freed: list[tuple[int, str]] = field(default_factory=list)  # (card id, registration) of cards to free
    fresh: bool = False  # every target is a new user (the device holds none of them)


class Roster:
    """A run's participants and what every device of the run shares, computed once per process and reused by each
    device worked on in it: every participant's fingerprint, the registrations and groups of the file, the
    device user ids (the same on every device: the first device that needs some asks Redis, the others reuse the
    answer), and the encoded batches of the same records. One opaque object: Prefect walks
    lists, dataclasses and models given to a task looking for futures (~0.8 s per task for 10,000 participants),
    not a plain object; pickled, it carries the participants only."""

    __slots__ = ("items", "_digest", "_fingerprints", "_fingerprints_lock", "_user_ids", "_user_ids_lock",
                 "_records", "_prefetched", "_batches", "_batches_lock", "_listed")

    def __init__(self, items: list[Participant], digest: str | None = None):
        self.items = items
        self._digest = digest  # roster_digest of the fingerprints, when known beforehand (a file already read)
        self._fingerprints: dict[str, str] | None = None
        self._fingerprints_lock = threading.Lock()
        self._user_ids: dict[str, dict[str, int]] = {}  # cache prefix -> registration -> device user id
        self._user_ids_lock = threading.Lock()
        self._records: dict[str, tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any] | None]] = {}
        self._prefetched: set[str] = set()
        self._batches: dict[tuple, _Once] = {}  # (record, sizes, registrations, user ids) -> encoded batches
        self._batches_lock = threading.Lock()
        self._listed: tuple[frozenset[str], frozenset[int]] | None = None

    def __getstate__(self) -> list[Participant]:
        return self.items

    def __setstate__(self, items: list[Participant]) -> None:
        self.__init__(items)

    def __len__(self) -> int:
        return len(self.items)

    def fingerprints(self) -> dict[str, str]:
        """registration -> fingerprint of every participant."""
        with self._fingerprints_lock:
            if self._fingerprints is None:
                self._fingerprints = {p.registration: p.fingerprint() for p in self.items}
            return self._fingerprints

    def digest(self) -> str:
        """`roster_digest` of every fingerprint (known beforehand for a file already read, else worked out once)."""
        if self._digest is None:
            self._digest = roster_digest(self.fingerprints())
        return self._digest

    def listed(self) -> tuple[frozenset[str], frozenset[int]]:
        """(every registration, every group) the file names."""
        with self._fingerprints_lock:
            if self._listed is None:
                self._listed = (frozenset(p.registration for p in self.items),
                                frozenset(p.group for p in self.items if p.group is not None))
            return self._listed

    def user_ids(self, cache: RegistrationCache, registrations: Iterable[str]) -> dict[str, int]:
        """`cache.user_ids(registrations)`, each registration asked of Redis once per process (the answer holds
        at least those asked: read only)."""
        registrations = list(registrations)
        with self._user_ids_lock:
            known = self._user_ids.setdefault(cache.prefix, {})
            missing = [registration for registration in registrations if registration not in known]
            if missing:
                known.update(cache.user_ids(missing))
            return known

    def prefetch_user_ids(self, cache: RegistrationCache) -> None:
        """`user_ids` of every participant, asked in a thread of its own (once per process and cache): a device
        that then asks for them waits for the answer instead of asking again."""
        with self._user_ids_lock:
            if cache.prefix in self._prefetched:
                return
            self._prefetched.add(cache.prefix)

        def fetch() -> None:
            with contextlib.suppress(Exception):  # a failure here is met again by the device's own request
                self.user_ids(cache, [p.registration for p in self.items])

        threading.Thread(target=fetch, name="user-ids", daemon=True).start()

    def records(self, participant: Participant, user_id: int
                ) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any] | None]:
        """The participant's user, card and group link objects for `user_id` (card and link None when the file
        gives none), made once per process for the id the devices share and reused by each device (read only:
        they are encoded, never changed); a device's own id for a user it already had gets objects of its own."""
        made = self._records.get(participant.registration)
        if made is not None and made[0]["id"] == user_id:
            return made
        made = (user_values(participant, user_id),
                None if participant.card is None else {"value": participant.card, "user_id": user_id},
                None if participant.group is None else {"user_id": user_id, "group_id": participant.group})
        self._records.setdefault(participant.registration, made)  # kept for the first id asked
        return made

    def batches(self, record: int, targets: list[_Target], max_count: int, max_bytes: int
                ) -> tuple[tuple[str, ...], list[tuple[int, int, bytes, _Once]]]:
        """The `record` objects (index in `records`) of `targets` in consecutive batches of at most `max_count`
        objects and `max_bytes` of JSON: (the targets' registrations, [(start, end, JSON of targets[start:end]'s
        objects, a place for what else the devices sending that batch share)]). Made once per process for the
        same registrations and user ids and reused by each device that sends them (the new users, cards and
        links of a first run are the same on every device): encoded once, measured by that encoding, never
        encoded again."""
        registrations = tuple([t.participant.registration for t in targets])
        user_ids = tuple([t.user_id for t in targets])
        key = (record, max_count, max_bytes, registrations, user_ids)
        with self._batches_lock:
            once = self._batches.get(key)
            if once is None:
                once = self._batches[key] = _Once()
        return registrations, once.get(lambda: [(*batch, _Once()) for batch in _encoded_batches(
            [self.records(t.participant, t.user_id)[record] for t in targets], max_count, max_bytes)])


class _Once:
    """A value made by the first caller of `get` while the others wait for it (a failed make is tried again)."""

    __slots__ = ("_lock", "_value", "_made")

    def __init__(self):
        self._lock, self._value, self._made = threading.Lock(), None, False

    def get(self, make: Callable[[], Any]) -> Any:
        with self._lock:
            if not self._made:
                self._value, self._made = make(), True
            return self._value


def user_values(p: Participant, user_id: int) -> dict[str, Any]:
    """The device's user object for a participant (always the same fields, as one call requires)."""
    return {"id": user_id, "registration": p.registration, "name": p.name,
            "begin_time": p.begin or 0, "end_time": p.end or 0}


def managed_groups(roster: Roster, options: RegistrationOptions) -> set[int]:
    """The groups whose links follow the file: the option's, else every group the file names."""
    if options.managed_groups is not None:
        return set(options.managed_groups)
    return set(roster.listed()[1])


def register_on_device(
    client: ControlIdClient,
    device: str,
    participants: list[Participant] | Roster,
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
    earlier attempts on this device, added to (an attempt ending on any error still adds its requests).
    `participants`: a list, or the run's `Roster` (shared by the devices worked on in this process)."""
    started = time.perf_counter()
    roster = participants if isinstance(participants, Roster) else Roster(participants)
    participants, fingerprints = roster.items, roster.fingerprints()
    tally = tally if tally is not None else DeviceTally()
    tally.attempts += 1
    report = DeviceReport(device, participants=len(participants))
    try:
        todo = participants
        unknown = not options.skip_cache and not cache.count(device)  # a new or wiped device: nothing to read
        if unknown:
            roster.prefetch_user_ids(cache)  # every participant needs one there: asked while the slot is taken
        if not (options.skip_cache or options.verify or unknown):
            confirmed = cache.confirmed(device, [p.registration for p in participants])
            todo = [p for p in participants if confirmed.get(p.registration, (0, ""))[1] != fingerprints[p.registration]]
            report.cached = len(participants) - len(todo)
            if progress and report.cached:
                progress(report.cached)
        if not todo:
            report.status = "cached"
        else:
            raise_if_stopped(should_stop, f"the work on {device}")
            scope = _Scope(device, roster.listed()[0], managed_groups(roster, options))
            with device_slot():
                targets = _device_work(client, cache, roster, todo, scope, options, report, progress, should_stop,
                                       tally)
                confirmed_now = [] if options.skip_cache or options.dry_run else [
                    (t.participant.registration, t.user_id, fingerprints[t.participant.registration])
                    for t in targets if not t.error and not t.confirmed]
                settle = not (options.skip_cache or options.dry_run or any(t.error for t in targets))
                with ThreadPoolExecutor(1, thread_name_prefix=f"confirm-{device}") as background:
                    # beside the logout: the cache, and (all written) the mark that lets the next run's check of
                    # this file skip comparing every participant
                    confirming = background.submit(_confirm, cache, device, confirmed_now, fingerprints, settle)
                    client.logout()
                confirming.result()
    except Cancelled as exc:
        report.status, report.error = "cancelled", str(exc)
        client.logout()
    except DeviceError as exc:
        report.status, report.error = "failed", str(exc)
        raise DeviceFailed(f"{device}: {exc}", _finish(report, client, started, tally), exc.transient) from None
    except BaseException:
        _finish(report, client, started, tally)  # the next attempt's report counts this one's requests
        raise
    return _finish(report, client, started, tally)


def _confirm(cache: RegistrationCache, device: str, entries: list[tuple[str, int, str]],
             fingerprints: dict[str, str], settle: bool) -> None:
    """Remember `entries` as written on the device; `settle`: then count the file's participants pending there
    (a device left with none is marked settled for the file)."""
    cache.confirm(device, entries)
    if settle:
        cache.pendings([device], fingerprints)


@dataclass(frozen=True)
class _Scope:
    device: str
    listed: frozenset[str]  # every registration of the file
    managed: set[int]   # groups whose links follow the file


def _device_work(
    client: ControlIdClient, cache: RegistrationCache, roster: Roster, todo: list[Participant], scope: _Scope,
    options: RegistrationOptions, report: DeviceReport, progress: Callable[[int], None] | None,
    should_stop: StopCheck, tally: DeviceTally,
) -> list[_Target]:
    """Read the device, then write what it lacks (or only report it, on a dry run)."""
    plan = _plan(client, cache, roster, todo, scope, options.dry_run)
    targets = plan.targets
    report.unchanged = 0 if plan.fresh else sum(  # a fresh device's targets all need a write
        1 for t in targets if not t.needs_write and not t.problems and t.participant.registration not in tally.written)
    if options.dry_run:
        report.status = "dry-run"
        _count_writes(report, plan)
        report.failures += [(t.participant.registration, t.participant.row_number, t.error)
                            for t in targets if t.error]
        if progress:
            progress(len(targets))
        return targets
    if progress and report.unchanged:
        progress(report.unchanged)
    _write(client, cache, roster, scope, plan, options, progress, should_stop, tally)
    report.failures += [(t.participant.registration, t.participant.row_number, t.error) for t in targets if t.error]
    return targets


def _finish(report: DeviceReport, client: ControlIdClient, started: float, tally: DeviceTally) -> DeviceReport:
    stats = client.stats
    tally.requests += stats.requests
    tally.retries += stats.retries
    tally.logins += stats.logins
    tally.writes += stats.writes
    tally.seconds += time.perf_counter() - started
    return tally.fill(report)


def _count_writes(report: DeviceReport, plan: _Plan) -> None:
    """A dry run's plan: users to create and update, cards to write and free, group links to add and remove."""
    done = [t for t in plan.targets if not t.failed]
    report.created = sum(t.new_user for t in done)
    report.updated = sum(t.user_changed for t in done)
    report.cards = sum(t.card_create for t in done)
    report.cards_freed = len(plan.freed)
    report.groups = sum(t.group_link for t in done)
    report.groups_removed = sum(len(t.groups_remove) for t in done)


def _plan(client: ControlIdClient, cache: RegistrationCache, roster: Roster, todo: list[Participant], scope: _Scope,
          dry_run: bool) -> _Plan:
    """What each participant needs, from one read of the device (users by registration, their cards and
    group links, in lists of at most 999 values; then the holders of the wanted cards and the wanted groups)."""
    on_device = _users_by_registration(client, cache, scope.device, [p.registration for p in todo])
    known_ids = [u["id"] for u in on_device.values()]
    cards: dict[int, list[dict[str, Any]]] = {}
    for card in client.load("cards", "user_id", known_ids) if known_ids else []:
        cards.setdefault(card["user_id"], []).append(card)
    groups: dict[int, set[int]] = {}
    for link in client.load("user_groups", "user_id", known_ids) if known_ids else []:
        groups.setdefault(link["user_id"], set()).add(link["group_id"])
    if not on_device:  # a new or wiped device: every participant is new there
        new_ids = roster.user_ids(cache, [p.registration for p in todo])
        targets = [_Target(p, new_ids[p.registration], True, False, p.card is not None, (), p.group is not None)
                   for p in todo]
    else:
        targets = _targets(cache, roster, todo, scope, on_device, cards, groups)
    if dry_run:  # a run learns of a missing group when its link is refused (no read when none is)
        _check_groups(client, targets, scope.device)
    return _Plan(targets, _settle_cards(client, cache, targets, scope, everyone=dry_run), fresh=not on_device)


def _targets(cache: RegistrationCache, roster: Roster, todo: list[Participant], scope: _Scope,
             on_device: dict[str, dict[str, Any]], cards: dict[int, list[dict[str, Any]]],
             groups: dict[int, set[int]]) -> list[_Target]:
    """What each participant needs on a device that holds some of them (`on_device`, by registration, with their
    `cards` and `groups` by user id)."""
    new_ids = roster.user_ids(cache, [p.registration for p in todo if p.registration not in on_device])
    targets = []
    for p in todo:
        user = on_device.get(p.registration)
        if user is None:
            targets.append(_Target(p, new_ids[p.registration], new_user=True, card_create=p.card is not None,
                                   group_link=p.group is not None))
            continue
        wanted, user_id = user_values(p, user["id"]), user["id"]
        changed = any(user.get(key, 0) != wanted[key] for key in ("name", "begin_time", "end_time"))
        held, linked = cards.get(user_id, []), groups.get(user_id, set())
        target = _Target(p, user_id, user_changed=changed, group_link=p.group is not None and p.group not in linked,
                         groups_remove=sorted((linked & scope.managed) - {p.group}))
        if p.card is not None and all(card["value"] != p.card for card in held):
            target.card_create, target.card_drop = True, [card["id"] for card in held]
        targets.append(target)
    return targets


def _users_by_registration(client: ControlIdClient, cache: RegistrationCache, device: str,
                           registrations: list[str]) -> dict[str, dict[str, Any]]:
    """The device's users of `registrations`, by registration. When the cache holds nothing of the device (a
    first run, or a unit found reset) and reading them takes several requests, one request for any user first:
    a device that holds none (new or wiped) is not read further."""
    if len(registrations) > MAX_IN_LIST and not cache.count(device):
        if not client.call("/load_objects.fcgi", {"object": "users", "limit": 1}).get("users"):
            return {}
    return {u["registration"]: u for u in client.load("users", "registration", registrations)}


def _check_groups(client: ControlIdClient, targets: list[_Target], device: str) -> None:
    """Links to groups the device lacks are not attempted: the participant's failure names the group."""
    wanted = {t.participant.group for t in targets if t.group_link}
    existing = {g["id"] for g in client.load("groups", "id", sorted(wanted))} if wanted else set()
    for t in targets:
        if t.group_link and t.participant.group not in existing:
            t.group_link = False
            t.refuse(f"groups: group {t.participant.group} does not exist on {device}")


@dataclass
class _Holders:
    """Who holds some card values on a device: the cards, the registrations of their holders outside the
    targets, and which holders left (registered by the project, absent from the file)."""

    cards: dict[int, dict[str, Any]]
    owners: dict[int, str]
    departed: set[int]

    def named(self, user_id: int, registration: str | None = None) -> str:
        who = registration or self.owners.get(user_id)
        return f"{who!r} (user id {user_id})" if who else f"user id {user_id}"


def _card_holders(client: ControlIdClient, cache: RegistrationCache, values: list[int], known: set[int],
                  scope: _Scope) -> _Holders:
    """The holders of `values` on the device (two reads; a third when a holder is not among `known` users)."""
    cards = {c["value"]: c for c in client.load("cards", "value", values)}
    outside = sorted({c["user_id"] for c in cards.values() if c["user_id"] not in known})
    owners = {u["id"]: u["registration"] for u in client.load("users", "id", outside)} if outside else {}
    unlisted = [registration for registration in owners.values() if registration not in scope.listed]
    ours = cache.known_user_ids(unlisted) if unlisted else {}
    return _Holders(cards, owners, {uid for uid, registration in owners.items() if ours.get(registration) == uid})


def _settle_cards(client: ControlIdClient, cache: RegistrationCache, targets: list[_Target],
                  scope: _Scope, everyone: bool) -> list[tuple[int, str]]:
    """Decide each wanted card of a user the device has (`everyone`: of new users too; theirs are otherwise
    settled when their create is refused) from who holds it: nobody, a participant giving it up in this run
    (a swap), or someone the project registered and the file no longer lists (freed: returned as (card id,
    their registration)). Held by anyone else, the participant's card is refused naming the holder."""
    creating = [t for t in targets if t.card_create and (everyone or not t.new_user)]
    if not creating:
        return []
    by_user = {t.user_id: t for t in targets}
    found = _card_holders(client, cache, [t.participant.card for t in creating], set(by_user), scope)
    holders, owners, departed = found.cards, found.owners, found.departed

    def blocker(t: _Target) -> str | None:
        held = holders.get(t.participant.card)
        if held is None or held["user_id"] == t.user_id or held["user_id"] in departed:
            return None
        holder = by_user.get(held["user_id"])
        if holder is not None and holder.card_create and held["id"] in holder.card_drop:
            return None  # its holder gets another card in this run
        named = found.named(held["user_id"], holder.participant.registration if holder else None)
        return f"cards: card {t.participant.card} is held by {named} on {scope.device}"

    blocked = True
    while blocked:  # a refused card keeps its holder's old card, which may block another: until none changes
        blocked = False
        for t in creating:
            if t.card_create and (why := blocker(t)) is not None:
                t.card_create, t.card_drop, blocked = False, (), True
                t.refuse(why)
    freed = {}
    for t in creating:
        held = holders.get(t.participant.card)
        if t.card_create and held is not None and held["user_id"] in departed:
            freed[held["id"]] = owners[held["user_id"]]
    return sorted(freed.items())


def _write(
    client: ControlIdClient, cache: RegistrationCache, roster: Roster, scope: _Scope, plan: _Plan,
    options: RegistrationOptions, progress: Callable[[int], None] | None, should_stop: StopCheck, tally: DeviceTally,
) -> None:
    """Users, then cards (the replaced and freed ones destroyed first), then group links (the removed ones
    destroyed first), each in batches (`options.concurrency` calls at once); a participant whose user failed
    gets nothing more, one whose card failed still gets their group link. Each confirmed write is added to
    `tally` at once. Once a batch fails (the device unreachable) or `should_stop()` (Cancelled), no further
    batch starts: those in flight finish and are counted, then the error is raised. The next kind's batches
    are built while the current kind's are on the device."""
    _Writer(client, cache, roster, scope, plan, options, progress, should_stop, tally).run()


@dataclass(frozen=True)
class _Step:
    """One kind of write: the targets that need it, the object each sends (its index in `Roster.records`),
    whether existing values are refused (`create_only`), how a refused batch is read back, the figure it adds to."""

    object_name: str
    wanted: Callable[[_Target], bool]
    record: int
    create_only: bool
    check: str | None  # name of the _Writer method reading a refused batch back
    figure: str


_STEPS = (
    _Step("users", lambda t: t.new_user, 0, True, "check_users", "created"),
    _Step("users", lambda t: t.user_changed, 0, False, None, "updated"),
    _Step("cards", lambda t: t.card_create, 1, True, "check_cards", "cards"),
    _Step("user_groups", lambda t: t.group_link, 2, False, "check_links", "groups"),
)

Record = tuple[_Target, dict]


@dataclass(slots=True)
class _Batch:
    """One write call's targets, their registrations, and the JSON of their objects (shared by every device
    sending the same; None: encoded from the objects when sent)."""

    targets: list[_Target]
    registrations: Sequence[str]
    values: bytes | None
    shared: _Once | None = None  # the cache entries of the batch, prepared once for the devices sending it


class _Writer:
    """The writes of one device's plan (`_write`), and the reads that settle a refused batch."""

    def __init__(self, client: ControlIdClient, cache: RegistrationCache, roster: Roster, scope: _Scope,
                 plan: _Plan, options: RegistrationOptions, progress: Callable[[int], None] | None,
                 should_stop: StopCheck, tally: DeviceTally):
        self.client, self.cache, self.roster, self.scope, self.plan = client, cache, roster, scope, plan
        self.options, self.progress, self.should_stop, self.tally = options, progress, should_stop, tally
        self.device = scope.device
        self.targets = plan.targets if plan.fresh else [t for t in plan.targets if t.needs_write]
        self.users_failed = False  # once a user write is refused, prepared batches are filtered again

    def run(self) -> None:
        with ThreadPoolExecutor(max(1, self.options.concurrency), thread_name_prefix=f"device-{self.device}") as pool:
            prepared = {0: self.batches(_STEPS[0])}
            for index, step in enumerate(_STEPS):
                self.clear_way(step.object_name)
                batches = prepared.pop(index)
                if self.users_failed:  # built before those users were refused
                    batches = [batch if len(kept) == len(batch.targets)
                               else _Batch(kept, [t.participant.registration for t in kept], None)
                               for batch in batches if (kept := [t for t in batch.targets if not t.failed])]
                futures = [pool.submit(self.one_batch, batch, step) for batch in batches]
                for later in range(index + 1, len(_STEPS)):  # built while the first batches are on the device
                    if later not in prepared:
                        prepared[later] = self.batches(_STEPS[later])
                self.settle(step, batches, futures)
        if self.progress:  # the participants without a user write are settled now
            self.progress(sum(not (t.new_user or t.user_changed) for t in self.targets))

    def alive(self, predicate: Callable[[_Target], bool]) -> list[_Target]:
        return [t for t in self.targets if not t.failed and predicate(t)]

    def batches(self, step: _Step) -> list[_Batch]:
        targets = self.alive(step.wanted)
        registrations, encoded = self.roster.batches(step.record, targets, self.options.batch_size,
                                                     self.options.max_body_bytes)
        return [_Batch(targets[start:end], registrations[start:end], values, shared)
                for start, end, values, shared in encoded]

    def clear_way(self, object_name: str) -> None:
        """Before the cards, the cards given up and freed (a swap needs both values free); before the links,
        the links to managed groups the file does not grant."""
        if object_name == "cards":
            dropping = [(card_id, t.participant.registration) for t in self.alive(lambda t: t.card_create)
                        for card_id in t.card_drop] + self.plan.freed
            self.destroy("cards", {}, [card_id for card_id, _ in dropping], None,
                         [registration for _, registration in dropping])
            self.tally.add("cards_freed", len(self.plan.freed))
        if object_name == "user_groups":
            for group in sorted({g for t in self.alive(lambda t: bool(t.groups_remove)) for g in t.groups_remove}):
                losing = self.alive(lambda t: group in t.groups_remove)
                self.destroy("user_groups", {"group_id": group}, [t.user_id for t in losing], "groups_removed",
                             [t.participant.registration for t in losing])

    def settle(self, step: _Step, batches: list[_Batch], futures: list) -> None:
        """Count each batch as its answer comes; after a failed one, cancel those not started and raise."""
        stopped: Exception | None = None
        for batch, future in zip(batches, futures):
            try:
                self.written(batch, future.result(), step)
            except CancelledError:  # not started: a batch before it failed or was stopped
                pass
            except Exception as exc:  # noqa: BLE001 - raised once the batches in flight are counted
                if stopped is None:
                    stopped = exc
                    for later in futures:
                        later.cancel()
        if stopped is not None:
            raise stopped

    def one_batch(self, batch: _Batch, step: _Step) -> list[tuple[_Target, str]]:
        raise_if_stopped(self.should_stop, f"the next {step.object_name} batch on {self.device}")
        check = getattr(self, step.check) if step.check else None
        refused = None
        if batch.values is not None:  # the shared encoding: the objects are looked at only if it is refused
            try:
                self.client.write_json(step.object_name, batch.values, len(batch.targets),
                                       create_only=step.create_only)
                return []
            except DeviceRefused as exc:
                refused = exc.error
        records = self.roster.records
        return _write_isolating(self.client, step.object_name,
                                [(t, records(t.participant, t.user_id)[step.record]) for t in batch.targets],
                                step.create_only, check, refused=refused)

    def written(self, batch: _Batch, refused: list[tuple[_Target, str]], step: _Step) -> None:
        object_name = step.object_name
        refused_ids = {id(target) for target, _ in refused}
        for target, error in refused:
            if object_name == "users":
                target.failed = f"users: {error}"
                self.users_failed = True
            else:
                target.refuse(f"{'groups' if object_name == 'user_groups' else object_name}: {error}")
        self.tally.add(step.figure, len(batch.targets) - len(refused_ids),
                       [t.participant.registration for t in batch.targets if id(t) not in refused_ids]
                       if refused_ids else batch.registrations)
        if self.progress and object_name == "users":
            self.progress(len(batch.targets))
        if object_name == "user_groups" and not self.options.skip_cache:
            self.confirm(batch)

    def confirm(self, batch: _Batch) -> None:
        """Remember in the cache the participants of `batch` written in full by the last kind of write (while the
        next batch is on the device: the run's end then confirms only the participants that needed no group
        link). A shared batch written in full is prepared once for every device."""
        done = [t for t in batch.targets if not t.error]
        fingerprints = self.roster.fingerprints()

        def prepared():
            return prepare_confirm([(t.participant.registration, t.user_id, fingerprints[t.participant.registration])
                                    for t in done])

        self.cache.confirm_prepared(self.device, batch.shared.get(prepared)
                                    if batch.shared is not None and len(done) == len(batch.targets) else prepared())
        for t in done:
            t.confirmed = True

    def destroy(self, object_name: str, where: dict[str, Any], values: list[int], figure: str | None,
                registrations: list[str]) -> None:
        """Destroy the `object_name` rows matching `where` and each part of `values` (lists of at most 998)."""
        field_name = "id" if object_name == "cards" else "user_id"
        for start in range(0, len(values), MAX_IN_LIST - 1):
            part = values[start:start + MAX_IN_LIST - 1]
            raise_if_stopped(self.should_stop, f"the next {object_name} removal on {self.device}")
            self.client.call("/destroy_objects.fcgi",
                             {"object": object_name, "where": {object_name: {**where, field_name: part}}})
            self.client.stats.count(writes=1)
            self.tally.add(figure, len(part), registrations[start:start + MAX_IN_LIST - 1])

    # -- reading a refused batch back: id(target) -> None (held as sent), why it is refused, or "" (send again)
    def check_users(self, batch: list[_Target]) -> dict[int, str | None]:
        found = {u["id"]: u for u in self.client.load("users", "id", [t.user_id for t in batch])}
        outcome: dict[int, str | None] = {}
        for t in batch:
            if t.user_id in found:  # ours: an earlier write whose answer was lost; else someone else's id
                registration = found[t.user_id].get("registration")
                outcome[id(t)] = (None if registration == t.participant.registration
                                  else f"user id {t.user_id} is {registration!r} on {self.device}")
        return outcome

    def check_cards(self, batch: list[_Target]) -> dict[int, str | None]:
        """Cards held as sent are done; those of people who left are freed (sent again), others refused."""
        found = _card_holders(self.client, self.cache, [t.participant.card for t in batch],
                              {t.user_id for t in batch}, self.scope)
        by_user = {t.user_id: t for t in self.plan.targets}
        outcome: dict[int, str | None] = {}
        freed = []
        for t in batch:
            card = found.cards.get(t.participant.card)
            if card is None:
                continue
            if card["user_id"] in found.departed:
                freed.append((card["id"], found.owners[card["user_id"]]))
                outcome[id(t)] = ""  # sent again once freed
                continue
            holder = by_user.get(card["user_id"])
            outcome[id(t)] = None if card["user_id"] == t.user_id else (
                f"card {t.participant.card} is held by "
                f"{found.named(card['user_id'], holder.participant.registration if holder else None)} on {self.device}")
        if freed:
            self.destroy("cards", {}, [card_id for card_id, _ in freed], "cards_freed", [r for _, r in freed])
        return outcome

    def check_links(self, batch: list[_Target]) -> dict[int, str | None]:
        existing = {g["id"] for g in self.client.load("groups", "id", sorted({t.participant.group for t in batch}))}
        return {id(t): f"group {t.participant.group} does not exist on {self.device}"
                for t in batch if t.participant.group not in existing}


def _encoded_batches(values: list[dict[str, Any]], max_count: int, max_bytes: int) -> list[tuple[int, int, bytes]]:
    """(start, end, JSON of values[start:end]) of consecutive batches of at most `max_count` objects and
    `max_bytes` of JSON each (a batch of `max_count` is encoded whole, once; only one over `max_bytes` is
    measured object by object)."""
    batches = []
    for start in range(0, len(values), max_count):
        part = values[start:start + max_count]
        encoded = orjson.dumps(part)
        if len(encoded) <= max_bytes:
            batches.append((start, start + len(part), encoded))
            continue
        first, size = start, 2
        for index, value in enumerate(part, start):
            length = len(orjson.dumps(value)) + 1
            if index > first and size + length > max_bytes:
                batches.append((first, index, orjson.dumps(values[first:index])))
                first, size = index, 2
            size += length
        batches.append((first, start + len(part), orjson.dumps(values[first:start + len(part)])))
    return batches


Check = Callable[[list[_Target]], dict[int, "str | None"]]


def _write_isolating(
    client: ControlIdClient, object_name: str, batch: list[tuple[_Target, dict]], create_only: bool,
    check: Check | None, read_back: bool = True, refused: str | None = None,
) -> list[tuple[_Target, str]]:
    """Write a batch; if the device refuses it, read the batch back in one call (`check`: id(target) -> None
    when the device holds the record as sent, the reason it is refused, or "" to send it again): the held
    ones are done, the refused ones returned, and only the rest is sent again. What is still refused is
    halved until each refused record is alone; those records are returned with the device's error.
    `refused`: the device's error when the batch was already sent and refused (it is not sent again first)."""
    if refused is not None:
        error = refused
    else:
        try:
            client.write(object_name, [values for _, values in batch], create_only=create_only)
            return []
        except DeviceRefused as exc:
            error = exc.error
    if check is not None and (read_back or len(batch) == 1):
        found = check([target for target, _ in batch])
        if found:
            refused = [(target, why) for target, _ in batch if (why := found.get(id(target), ""))]
            rest = [record for record in batch if found.get(id(record[0]), "") == ""]
            return refused + (_write_isolating(client, object_name, rest, create_only, check, read_back=False)
                              if rest else [])
    if len(batch) == 1:
        return [(batch[0][0], error)]
    middle = len(batch) // 2
    return (_write_isolating(client, object_name, batch[:middle], create_only, check, read_back=False)
            + _write_isolating(client, object_name, batch[middle:], create_only, check, read_back=False))
