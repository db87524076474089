"""Publishing to a Redis stream exactly once per message key, for as long as a message may be published again.

Each message is added by one Lua script that first looks for the message's key in the stream's guard hash:
absent, it XADDs the message and records the new entry id there; present, it returns the recorded entry id and
adds nothing. Messages come as objects (`StreamMessage`) or, for large batches, as one JSON array built
elsewhere (`EncodedMessages`: the database's claim query), which the script decodes itself. A publisher that
crashed after XADD but before recording the publication elsewhere (the outbox row's mark) can therefore publish
the same message again, days later if need be: the stream still holds it once.

The guards have no expiry. A message can be published again only while its source (the outbox row) is not
marked published, so a guard is needed exactly that long and no longer: the publisher `forget`s a batch's
guards once its marks are committed, and a sweep (`guarded_keys` then `forget`) removes the guards of a
publisher that died between its commit and that `forget`. The hash therefore holds only the messages in flight
or left by a crash; a fixed TTL would instead drop the guard of a message that stayed unmarked longer than
the TTL and let a late re-publish add it twice.

Keys: the stream `S`, its guard hash `{S}:guards` (message key -> entry id) and `{S}:faults` (drills); the
hash tag `{S}` puts them in the stream's cluster slot, so the script also runs on Redis Cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import redis

# What both publish scripts do once they know the batch: `keys` (each message's key), `n` field `names` and
# `value(i, j)` (message i's j-th value). The guards are read with one HMGET and the new ones written with one
# HSET; `ids` (each message's entry id, in order) and `added` ('1' added now, '0' already in the stream) are
# left for the script's return.
_GUARDED_XADD = """
local existing = redis.call('HMGET', guards, unpack(keys))
local ids, added, new_guards, seen = {}, {}, {}, {}
local args = {stream}
if maxlen > 0 then
  args[#args + 1] = 'MAXLEN'; args[#args + 1] = '~'; args[#args + 1] = maxlen
end
args[#args + 1] = '*'
local base = #args
for i = 1, #keys do
  local id = existing[i] or seen[keys[i]]
  if id then
    ids[i] = id; added[i] = '0'
  else
    for j = 1, n do args[base + 2 * j - 1] = names[j]; args[base + 2 * j] = value(i, j) end
    id = redis.call('XADD', unpack(args))
    ids[i] = id; added[i] = '1'; seen[keys[i]] = id
    new_guards[#new_guards + 1] = keys[i]; new_guards[#new_guards + 1] = id
  end
end
if #new_guards > 0 then redis.call('HSET', guards, unpack(new_guards)) end
"""

# KEYS[1] stream, KEYS[2] guard hash; ARGV[1] approximate MAXLEN (0: none), ARGV[2] the number n of fields every
# message of the call has, ARGV[3..2+n] their names, then per message: its key and its n values. Returns the
# entry ids in order and the string of '1'/'0'.
_PUBLISH = """
local stream, guards, maxlen, n = KEYS[1], KEYS[2], tonumber(ARGV[1]), tonumber(ARGV[2])
local names, keys, first = {}, {}, 3 + n
for j = 1, n do names[j] = ARGV[2 + j] end
for pos = first, #ARGV, n + 1 do keys[#keys + 1] = ARGV[pos] end
if #keys == 0 then return {{}, ''} end
local function value(i, j) return ARGV[first + (i - 1) * (n + 1) + j] end
""" + _GUARDED_XADD + """
return {ids, table.concat(added)}
"""

# The same for messages given as one JSON array (ARGV[2]) of [key, value 1, ..., value n], the field names in
# ARGV[3..]: a batch built by the database costs no Python per message. Returns the entry ids joined by ',' and
# the string of '1'/'0'.
_PUBLISH_JSON = """
local stream, guards, maxlen = KEYS[1], KEYS[2], tonumber(ARGV[1])
local messages = cjson.decode(ARGV[2])
if #messages == 0 then return {'', ''} end
local names, n = {}, #ARGV - 2
for j = 1, n do names[j] = ARGV[2 + j] end
local keys = {}
for i = 1, #messages do keys[i] = messages[i][1] end
local function value(i, j) return messages[i][j + 1] end
""" + _GUARDED_XADD + """
return {table.concat(ids, ','), table.concat(added)}
"""


class InjectedPublishFault(RuntimeError):
    """A fault injected with `StreamPublisher.inject_faults` (drills and tests)."""


@dataclass(frozen=True, slots=True)
class StreamMessage:
    key: str                      # unique per message: its guard's name
    fields: dict[str, str]        # the stream entry's field/value pairs


@dataclass(frozen=True, slots=True)
class Published:
    key: str
    entry_id: str
    added: bool                   # False: it was already in the stream (published by an earlier attempt)


@dataclass(frozen=True, slots=True)
class EncodedMessages:
    """Messages that share their field names, encoded once as a JSON array of [key, value 1, ..., value n]
    (values as strings, in the order of `names`), e.g. built by the database in the query that claims them."""

    names: tuple[str, ...]
    json: str
    count: int

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True, slots=True)
class PublishedBatch:
    """What `publish` did with `EncodedMessages`: each message's entry id, in order, joined by ',', and a
    string of '1' (added now) or '0' (already in the stream) per message."""

    entry_ids: str
    added: str

    @property
    def added_now(self) -> int:
        return self.added.count("1")


class StreamPublisher:
    """Adds messages to one stream, exactly once per key while the key is guarded, in batches of one script
    call."""

    def __init__(self, client: redis.Redis, stream: str, *, max_length: int = 0, batch_size: int = 1000):
        self.client = client
        self.stream = stream
        self.max_length = max_length
        self.batch_size = batch_size
        self._script = client.register_script(_PUBLISH)
        self._json_script = client.register_script(_PUBLISH_JSON)

    @property
    def guards_key(self) -> str:
        return f"{{{self.stream}}}:guards"

    @property
    def _faults_key(self) -> str:
        return f"{{{self.stream}}}:faults"

    def inject_faults(self, count: int) -> None:
        """Make the next `count` publish calls (in any process) fail before adding anything."""
        self.client.set(self._faults_key, count)

    def _take_fault(self) -> bool:
        return self.client.decr(self._faults_key) >= 0 if self.client.exists(self._faults_key) else False

    def publish(self, messages: Sequence[StreamMessage] | EncodedMessages) -> list[Published] | PublishedBatch:
        """Add the messages not yet in the stream; returns each message's entry id, in order (for
        `EncodedMessages`, in one `PublishedBatch` from one script call). Their guards stay until `forget`."""
        if len(messages) and self._take_fault():
            raise InjectedPublishFault(f"injected fault publishing to {self.stream}")
        if isinstance(messages, EncodedMessages):
            ids, added = self._json_script(keys=[self.stream, self.guards_key],
                                           args=[self.max_length, messages.json, *messages.names])
            return PublishedBatch(_text(ids), _text(added))
        results: list[Published] = []
        start = 0
        while start < len(messages):  # a script call per run of messages with the same field names (batch_size at most)
            names = list(messages[start].fields)
            end = start + 1
            while end < min(len(messages), start + self.batch_size) and list(messages[end].fields) == names:
                end += 1
            batch = messages[start:end]
            argv: list[str | int] = [self.max_length, len(names), *names]
            for message in batch:
                argv.append(message.key)
                argv += message.fields.values()
            ids, added = self._script(keys=[self.stream, self.guards_key], args=argv)
            added = _text(added)
            results += [Published(m.key, _text(entry), added[i] == "1") for i, (m, entry) in enumerate(zip(batch, ids))]
            start = end
        return results

    def forget(self, keys: Iterable[str]) -> int:
        """Drop the guards of `keys`: call it only once nothing will publish them again (their source is marked
        published, or gone). Returns how many guards were dropped."""
        keys = list(keys)
        return sum(self.client.hdel(self.guards_key, *keys[i:i + 1000]) for i in range(0, len(keys), 1000))

    def guarded_keys(self, batch: int = 1000) -> Iterator[list[str]]:
        """The keys still guarded, in batches (for the sweep of guards a crashed publisher left)."""
        keys: list[str] = []
        for key, _ in self.client.hscan_iter(self.guards_key, count=batch):
            keys.append(_text(key))
            if len(keys) == batch:
                yield keys
                keys = []
        if keys:
            yield keys

    def guards(self) -> int:
        """How many message keys are guarded now."""
        return self.client.hlen(self.guards_key)

    def length(self) -> int:
        return self.client.xlen(self.stream)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
