"""What the turnstiles hold, remembered in Redis, and the device user id of each participant.

Keys under prefix P:

    P:device:<device>:registered  hash  registration -> "<device user id>:<fingerprint>" of what was last
                                        confirmed written on that device (a changed name, card, group or
                                        validity has another fingerprint, so it is written again)
    P:device:<device>:identity    string  the identity (serial and device id) of the unit the hash was
                                        written to: another unit at the same address makes the hash void
    P:device:<device>:version     string  counts the writes to the hash (every confirm and drop adds one)
    P:device:<device>:settled     string  "<digest of a file's registrations and fingerprints>:<version>":
                                        at that version the hash held every participant of that file as the
                                        file says, so while the version stays the same nothing of that file
                                        is pending on the device (a run with nothing to do reads one string
                                        per device instead of comparing every participant)
    P:user-ids                    hash  registration -> device user id, the same on every device
    P:user-id-seq                 string  the last id handed out (ids start above USER_ID_BASE)
    P:participants-file:<key>     string  a participants file already read and accepted (`KnownFile`), by the
                                        digest of its bytes and how it was read (`participants.file_key`):
                                        the next run of the same file reads this instead of parsing every
                                        row again (kept KNOWN_FILE_SECONDS after its last use)

Ids handed out here start high (USER_ID_BASE) so they do not meet the small ids a device's own software gives;
a user the device already has under its registration keeps the device's id.

Reads and writes of many registrations travel as one argument and one answer each, joined by newlines, split by
a Lua script inside Redis: a client packs and parses ~40,000 separate arguments and replies per 10,000
participants otherwise, which costs more CPU than the device work itself. A registration holding a newline (a
multi-line cell) goes the per-argument way.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Callable, Iterable

import orjson
import redis

from operations.turnstiles.participants import Participant, ParticipantsFile, RowProblem

USER_ID_BASE = 100_000_000
KNOWN_FILE_SECONDS = 8 * 86_400  # a file read every night stays known; one not used for 8 days is forgotten
_BATCH = 1_000  # registrations per command, per-argument way
_JOINED_BATCH = 10_000  # registrations per script call, joined way (a call blocks Redis for a few ms)

# KEYS[1] ids hash, KEYS[2] sequence; ARGV: registrations. Returns their ids, handing out new ones atomically.
_USER_IDS = """
local ids, seq, base = KEYS[1], KEYS[2], tonumber(ARGV[1])
if redis.call('EXISTS', seq) == 0 then redis.call('SET', seq, base) end
local out = {}
for i = 2, #ARGV do
  local id = redis.call('HGET', ids, ARGV[i])
  if not id then
    id = redis.call('INCR', seq)
    redis.call('HSET', ids, ARGV[i], id)
  end
  out[#out + 1] = tonumber(id)
end
return out
"""

# KEYS[1] ids hash, KEYS[2] sequence; ARGV[1] base, ARGV[2] registrations joined by newlines. Their ids, joined.
_USER_IDS_JOINED = """
local ids, seq, base = KEYS[1], KEYS[2], tonumber(ARGV[1])
if redis.call('EXISTS', seq) == 0 then redis.call('SET', seq, base) end
local out = {}
for registration in string.gmatch(ARGV[2] .. '\\n', '(.-)\\n') do
  local id = redis.call('HGET', ids, registration)
  if not id then
    id = redis.call('INCR', seq)
    redis.call('HSET', ids, registration, id)
  end
  out[#out + 1] = id
end
return table.concat(out, '\\n')
"""

# KEYS[1] hash; ARGV[1] fields joined by newlines. Their values joined by newlines ("" for a missing one).
_HMGET_JOINED = """
local out = {}
for name in string.gmatch(ARGV[1] .. '\\n', '(.-)\\n') do
  out[#out + 1] = redis.call('HGET', KEYS[1], name) or ''
end
return table.concat(out, '\\n')
"""

# KEYS[1] hash, KEYS[2] its version; ARGV[1] registration, fingerprint, registration, fingerprint... joined by
# newlines. {how many of those registrations the hash does not hold as "<user id>:<that fingerprint>", the
# hash's version} (both read at once).
_PENDING_JOINED = """
local pending, name = 0, nil
for item in string.gmatch(ARGV[1] .. '\\n', '(.-)\\n') do
  if name == nil then name = item else
    local value, suffix = redis.call('HGET', KEYS[1], name), ':' .. item
    if not value or string.sub(value, -#suffix) ~= suffix then pending = pending + 1 end
    name = nil
  end
end
return {pending, tonumber(redis.call('GET', KEYS[2]) or '0')}
"""

# KEYS[1] hash, KEYS[2] its version; ARGV[1] field, value, field, value... joined by newlines.
_HSET_JOINED = """
local name = nil
for item in string.gmatch(ARGV[1] .. '\\n', '(.-)\\n') do
  if name == nil then name = item else redis.call('HSET', KEYS[1], name, item); name = nil end
end
redis.call('INCR', KEYS[2])
return 0
"""


@dataclass(frozen=True)
class DeviceState:
    """What the cache holds of one device for its identity check: how many participants it confirmed there, the
    identity of the unit they were confirmed on (None: not known yet), a random sample of them (registration ->
    device user id), the hash's version and its settled mark ("<digest>:<version>", None: none)."""

    count: int = 0
    identity: str | None = None
    sample: dict[str, int] = field(default_factory=dict)
    version: int = 0
    settled: str | None = None


def roster_digest(fingerprints: dict[str, str]) -> str:
    """A digest of a file's registrations and fingerprints (whatever their order in the file)."""
    pairs = sorted(fingerprints.items())
    try:
        encoded = orjson.dumps(pairs)
    except orjson.JSONEncodeError:  # a lone surrogate, which the json module passes through
        encoded = json.dumps(pairs, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(encoded, digest_size=16).hexdigest()


@dataclass(frozen=True)
class KnownFile:
    """A participants file already read and accepted: what it read to, and the `roster_digest` of its
    participants (so the settled marks are compared without working out every fingerprint)."""

    people: ParticipantsFile
    digest: str

    def encode(self) -> bytes:
        people = self.people
        return orjson.dumps({
            "fields": [_PARTICIPANT_FIELDS, _PROBLEM_FIELDS], "rows": people.rows, "digest": self.digest,
            "participants": [[getattr(p, name) for name in _PARTICIPANT_FIELDS] for p in people.participants],
            "duplicates": [[getattr(d, name) for name in _PROBLEM_FIELDS] for d in people.duplicates],
        })

    @classmethod
    def decode(cls, blob: bytes) -> KnownFile:
        """The file as `encode` wrote it; ValueError when it was written with other fields (read it again)."""
        data = orjson.loads(blob)
        if data["fields"] != [list(_PARTICIPANT_FIELDS), list(_PROBLEM_FIELDS)]:
            raise ValueError("written with other fields")
        people = ParticipantsFile(participants=[Participant(*row) for row in data["participants"]],
                                  duplicates=[RowProblem(*row) for row in data["duplicates"]], rows=data["rows"])
        return cls(people, data["digest"])


# the fields of a known file's rows, in the dataclasses' order (what `Participant(*row)` takes)
_PARTICIPANT_FIELDS = tuple(f.name for f in fields(Participant))
_PROBLEM_FIELDS = tuple(f.name for f in fields(RowProblem))


def _settled(devices: list[str], states: dict[str, DeviceState], digest: str) -> dict[str, int]:
    """The devices (with 0 pending) whose state says they were settled for the roster of `digest` at their current
    version."""
    return {device: 0 for device in devices
            if device in states and states[device].settled == f"{digest}:{states[device].version}"}


def _sample(drawn: list[bytes]) -> dict[str, int]:
    """An HRANDFIELD ... WITHVALUES answer as registration -> device user id."""
    pairs = zip(drawn[::2], drawn[1::2])
    return {registration.decode(): int(value.decode().partition(":")[0]) for registration, value in pairs}


def _joinable(registrations: list[str]) -> bool:
    return not any("\n" in registration for registration in registrations)


ConfirmPayload = list[str] | dict[str, str]  # script arguments joined by newlines, or the hash's fields and values


def prepare_confirm(entries: Iterable[tuple[str, int, str]]) -> ConfirmPayload:
    """(registration, device user id, fingerprint) entries as `RegistrationCache.confirm_prepared` sends them."""
    mapping = {registration: f"{user_id}:{fingerprint}" for registration, user_id, fingerprint in entries}
    if not _joinable(list(mapping)):
        return mapping
    items = list(mapping.items())
    return ["\n".join(f"{r}\n{v}" for r, v in items[start:start + _JOINED_BATCH])
            for start in range(0, len(items), _JOINED_BATCH)]


class RegistrationCache:
    """The cache of one prefix (config-only callers build it per process from the block's client)."""

    def __init__(self, client: redis.Redis, prefix: str = "turnstiles"):
        self.client = client
        self.prefix = prefix
        self._user_ids = client.register_script(_USER_IDS)
        self._user_ids_joined = client.register_script(_USER_IDS_JOINED)
        self._hmget_joined = client.register_script(_HMGET_JOINED)
        self._hset_joined = client.register_script(_HSET_JOINED)
        self._pending_joined = client.register_script(_PENDING_JOINED)

    def _device_key(self, device: str) -> str:
        return f"{self.prefix}:device:{device}:registered"

    def confirmed(self, device: str, registrations: list[str]) -> dict[str, tuple[int, str]]:
        """registration -> (device user id, fingerprint) of those confirmed on the device."""
        found: dict[str, tuple[int, str]] = {}
        for registration, value in zip(registrations, self._values(self._device_key(device), registrations)):
            if value:
                user_id, _, fingerprint = value.decode().partition(":")
                found[registration] = (int(user_id), fingerprint)
        return found

    def _values(self, key: str, registrations: list[str]) -> list[bytes | None]:
        """The hash's values of `registrations`, in order (None or b"" for a missing one)."""
        if not _joinable(registrations):
            with self.client.pipeline(transaction=False) as pipe:
                for start in range(0, len(registrations), _BATCH):
                    pipe.hmget(key, registrations[start:start + _BATCH])
                return [value for part in pipe.execute() for value in part]
        values: list[bytes | None] = []
        for start in range(0, len(registrations), _JOINED_BATCH):
            part = registrations[start:start + _JOINED_BATCH]
            values += self._hmget_joined(keys=[key], args=["\n".join(part)]).split(b"\n")
        return values

    def pending(self, device: str, fingerprints: dict[str, str]) -> int:
        """How many of the registrations (-> fingerprint) the device is not confirmed to hold as they are: one
        round trip, values compared as bytes (no parsing)."""
        registrations = list(fingerprints)
        values = self._values(self._device_key(device), registrations)
        return sum(1 for registration, value in zip(registrations, values)
                   if not value or not value.endswith(b":" + fingerprints[registration].encode()))

    def pendings(self, devices: list[str], fingerprints: dict[str, str] | Callable[[], dict[str, str]],
                 states: dict[str, DeviceState] | None = None, digest: str | None = None) -> dict[str, int]:
        """`pending` of each device. A device whose `states` (as `states` read them) say it was settled for
        these very registrations and fingerprints at its current version has none, without a comparison; the
        others are counted inside Redis: the registrations and fingerprints are joined once for every device and
        each device answers one number (one round trip for all), and a device found with none is marked settled
        at the version read with the count. `fingerprints` may be a function making them: with `digest` (their
        `roster_digest`, known beforehand) it is not called when every device is settled."""
        states = states or {}
        if digest is not None and len(counts := _settled(devices, states, digest)) == len(devices):
            return counts
        if callable(fingerprints):
            fingerprints = fingerprints()
        registrations = list(fingerprints)
        if not devices or not registrations or not _joinable(registrations):
            return {device: self.pending(device, fingerprints) if registrations else 0 for device in devices}
        digest = digest or roster_digest(fingerprints)
        counts = _settled(devices, states, digest)
        counted = [device for device in devices if device not in counts]
        if not counted:
            return counts
        parts = ["\n".join(f"{r}\n{fingerprints[r]}" for r in registrations[start:start + _JOINED_BATCH])
                 for start in range(0, len(registrations), _JOINED_BATCH)]
        with self.client.pipeline(transaction=False) as pipe:
            for device in counted:
                for part in parts:
                    self._pending_joined(keys=[self._device_key(device), self._version_key(device)], args=[part],
                                         client=pipe)
            answers = pipe.execute()
        settled = {}
        for i, device in enumerate(counted):
            mine = answers[i * len(parts):(i + 1) * len(parts)]
            counts[device] = sum(pending for pending, _ in mine)
            versions = {version for _, version in mine}
            if not counts[device] and len(versions) == 1:  # no write between the parts' counts
                settled[self._settled_key(device)] = f"{digest}:{versions.pop()}"
        if settled:
            self.client.mset(settled)
        return {device: counts[device] for device in devices}

    def confirm(self, device: str, entries: Iterable[tuple[str, int, str]]) -> None:
        """Remember (registration, device user id, fingerprint) as written on the device."""
        self.confirm_prepared(device, prepare_confirm(entries))

    def confirm_prepared(self, device: str, prepared: ConfirmPayload) -> None:
        """`confirm` of entries prepared by `prepare_confirm` (the same entries confirmed on several devices
        are prepared once)."""
        key = self._device_key(device)
        if isinstance(prepared, list):
            for joined in prepared:
                self._hset_joined(keys=[key, self._version_key(device)], args=[joined])
            return
        items = list(prepared.items())
        if not items:
            return
        with self.client.pipeline(transaction=False) as pipe:  # one round trip
            for start in range(0, len(items), _BATCH):
                pipe.hset(key, mapping=dict(items[start:start + _BATCH]))
            pipe.incr(self._version_key(device))
            pipe.execute()

    def _identity_key(self, device: str) -> str:
        return f"{self.prefix}:device:{device}:identity"

    def _version_key(self, device: str) -> str:
        return f"{self.prefix}:device:{device}:version"

    def _settled_key(self, device: str) -> str:
        return f"{self.prefix}:device:{device}:settled"

    def count(self, device: str) -> int:
        """How many participants the cache holds as confirmed on the device."""
        return int(self.client.hlen(self._device_key(device)))

    def counts(self, devices: list[str]) -> dict[str, int]:
        """`count` of each device, in one round trip."""
        with self.client.pipeline(transaction=False) as pipe:
            for device in devices:
                pipe.hlen(self._device_key(device))
            return dict(zip(devices, map(int, pipe.execute())))

    def sample(self, device: str, size: int) -> dict[str, int]:
        """registration -> device user id of up to `size` participants confirmed on the device, drawn at random."""
        return _sample(self.client.hrandfield(self._device_key(device), size, withvalues=True) if size > 0 else [])

    def states(self, devices: list[str], sample_size: int) -> dict[str, DeviceState]:
        """Each device's `count`, `identity`, `sample` of `sample_size`, hash version and settled mark, in one
        round trip (read before any other command of the run can keep Redis busy)."""
        with self.client.pipeline(transaction=False) as pipe:
            for device in devices:
                pipe.hlen(self._device_key(device)).get(self._identity_key(device))
                pipe.get(self._version_key(device)).get(self._settled_key(device))
                pipe.hrandfield(self._device_key(device), max(1, sample_size), withvalues=True)
            answers = pipe.execute()
        states = {}
        for i, device in enumerate(devices):
            count, identity, version, settled, drawn = answers[i * 5:(i + 1) * 5]
            states[device] = DeviceState(int(count), identity.decode() if identity is not None else None,
                                         _sample(drawn or []) if sample_size > 0 else {}, int(version or 0),
                                         settled.decode() if settled is not None else None)
        return states

    def _known_file_key(self, key: str) -> str:
        return f"{self.prefix}:participants-file:{key}"

    def known_file(self, key: str) -> KnownFile | None:
        """The file read and accepted under `key` (`participants.file_key`), kept KNOWN_FILE_SECONDS more; None
        when it is not known (or its record is unreadable: the file is then read again)."""
        blob = self.client.getex(self._known_file_key(key), ex=KNOWN_FILE_SECONDS)
        if blob is None:
            return None
        try:
            return KnownFile.decode(blob)
        except (ValueError, KeyError, TypeError):
            return None

    def remember_file(self, key: str, known: KnownFile) -> None:
        """Remember a file read and accepted under `key`, for KNOWN_FILE_SECONDS."""
        self.client.set(self._known_file_key(key), known.encode(), ex=KNOWN_FILE_SECONDS)

    def identity(self, device: str) -> str | None:
        """The identity of the unit the device's entries were confirmed on (None: not known yet)."""
        value = self.client.get(self._identity_key(device))
        return value.decode() if value is not None else None

    def remember_identity(self, device: str, identity: str) -> None:
        self.client.set(self._identity_key(device), identity)

    def forget_device(self, device: str) -> int:
        """Drop every entry confirmed on the device (its user ids stay: they are the same on every device);
        returns how many there were."""
        key = self._device_key(device)
        with self.client.pipeline() as pipe:
            pipe.hlen(key).delete(key).incr(self._version_key(device))
            count, *_ = pipe.execute()
        return int(count)

    def known_user_ids(self, registrations: list[str]) -> dict[str, int]:
        """The device user id of each registration the project handed one out to (no new id is handed out)."""
        ids: dict[str, int] = {}
        for start in range(0, len(registrations), _BATCH):
            part = registrations[start:start + _BATCH]
            ids.update((r, int(v)) for r, v in zip(part, self.client.hmget(f"{self.prefix}:user-ids", part)) if v)
        return ids

    def user_ids(self, registrations: list[str]) -> dict[str, int]:
        """The device user id of each registration, the same on every device; new ones handed out atomically."""
        ids: dict[str, int] = {}
        keys = [f"{self.prefix}:user-ids", f"{self.prefix}:user-id-seq"]
        if registrations and _joinable(registrations):
            for start in range(0, len(registrations), _JOINED_BATCH):
                part = registrations[start:start + _JOINED_BATCH]
                answer = self._user_ids_joined(keys=keys, args=[USER_ID_BASE, "\n".join(part)])
                ids.update(zip(part, map(int, answer.split(b"\n"))))
            return ids
        for start in range(0, len(registrations), _BATCH):
            part = registrations[start:start + _BATCH]
            ids.update(zip(part, self._user_ids(keys=keys, args=[USER_ID_BASE, *part])))
        return ids
