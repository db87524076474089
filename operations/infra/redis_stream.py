"""Publishing to a Redis stream exactly once per message key.

Each message is added by one Lua script that first looks for the message's guard key: absent, it XADDs the
message and stores the new entry id under the guard (with a TTL); present, it returns the stored entry id and
adds nothing. A publisher that crashed after XADD but before recording it elsewhere (the outbox row) can
therefore publish the same message again safely: the stream still holds it once. Guards live
`guard_ttl_seconds` (7 days by default), longer than any redelivery window of the outbox.

Keys: the stream `S`, and one guard `{S}:published:<message key>` per message; the hash tag `{S}` puts the
guards in the stream's cluster slot, so the script also runs on Redis Cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import redis

# KEYS[1] stream, KEYS[2..n+1] guards; ARGV[1] guard TTL seconds, ARGV[2] approximate MAXLEN (0: none),
# then per message: the number of field/value pairs, then the pairs. Returns {entry id, added (1/0)} per message.
_PUBLISH = """
local stream, ttl, maxlen = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
local out, pos = {}, 3
for i = 2, #KEYS do
  local pairs_count = tonumber(ARGV[pos])
  local existing = redis.call('GET', KEYS[i])
  if existing then
    out[#out + 1] = {existing, 0}
  else
    local args = {stream}
    if maxlen > 0 then
      args[#args + 1] = 'MAXLEN'; args[#args + 1] = '~'; args[#args + 1] = maxlen
    end
    args[#args + 1] = '*'
    for j = pos + 1, pos + 2 * pairs_count do args[#args + 1] = ARGV[j] end
    local id = redis.call('XADD', unpack(args))
    redis.call('SET', KEYS[i], id, 'EX', ttl)
    out[#out + 1] = {id, 1}
  end
  pos = pos + 1 + 2 * pairs_count
end
return out
"""


class InjectedPublishFault(RuntimeError):
    """A fault injected with `StreamPublisher.inject_faults` (drills and tests)."""


@dataclass(frozen=True, slots=True)
class StreamMessage:
    key: str                      # unique per message: the guard's name
    fields: dict[str, str]        # the stream entry's field/value pairs


@dataclass(frozen=True, slots=True)
class Published:
    key: str
    entry_id: str
    added: bool                   # False: it was already in the stream (published by an earlier attempt)


class StreamPublisher:
    """Adds messages to one stream, exactly once per key, in batches of one script call."""

    def __init__(self, client: redis.Redis, stream: str, *, max_length: int = 0, guard_ttl_seconds: int = 7 * 86_400,
                 batch_size: int = 500):
        self.client = client
        self.stream = stream
        self.max_length = max_length
        self.guard_ttl_seconds = guard_ttl_seconds
        self.batch_size = batch_size
        self._script = client.register_script(_PUBLISH)

    def guard_key(self, message_key: str) -> str:
        return f"{{{self.stream}}}:published:{message_key}"

    @property
    def _faults_key(self) -> str:
        return f"{{{self.stream}}}:faults"

    def inject_faults(self, count: int) -> None:
        """Make the next `count` publish calls (in any process) fail before adding anything."""
        self.client.set(self._faults_key, count)

    def _take_fault(self) -> bool:
        return self.client.decr(self._faults_key) >= 0 if self.client.exists(self._faults_key) else False

    def publish(self, messages: Sequence[StreamMessage]) -> list[Published]:
        """Add the messages not yet in the stream; returns each message's entry id, in order."""
        if messages and self._take_fault():
            raise InjectedPublishFault(f"injected fault publishing to {self.stream}")
        results: list[Published] = []
        for start in range(0, len(messages), self.batch_size):
            batch = messages[start:start + self.batch_size]
            argv: list[str | int] = [self.guard_ttl_seconds, self.max_length]
            for message in batch:
                argv.append(len(message.fields))
                for name, value in message.fields.items():
                    argv += [name, value]
            answer = self._script(keys=[self.stream, *(self.guard_key(m.key) for m in batch)], args=argv)
            results += [Published(m.key, _text(entry), bool(added)) for m, (entry, added) in zip(batch, answer)]
        return results

    def length(self) -> int:
        return self.client.xlen(self.stream)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
