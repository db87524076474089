"""The run's shared first-number counter in Redis: atomic, batched claims of candidate games.

Every worker of a run claims its candidates through one Lua script, so each sees every other worker's
claims at once. Keys of run R under prefix P:

    P:R:meta     hash   fingerprint, quantity, chunk_quotas, created and active_at (epoch seconds: the run's
                        start and its last flow-run start or chunk commit, which date an unfinished run)
    P:R:caps     hash   region index -> cap
    P:R:regions  hash   region index -> games claimed
    P:R:counter  hash   first number -> games claimed (the seed's snapshot format)
    P:R:seen     set    masks (8 bytes, little-endian) of claimed games (no repeats in the whole run)
    P:R:chunk:I:claims  list  mask + first number byte + region byte, claimed by chunk I's current attempt
    P:R:chunk:I:owner   string  token of chunk I's current attempt
    P:R:done     hash   chunk index -> JSON of its committed result
    P:R:faults   hash   chunk index -> failures to inject after claims (chaos drills and tests)
    P:R:outputs  string JSON record of a completed run's outputs (spreadsheets with rows, snapshot, completed_at)

A chunk attempt first *begins* (releasing whatever an earlier attempt of the same chunk claimed and taking
ownership), then *claims* batches, then *commits*. A retried or re-run chunk therefore never counts its
games twice nor leaves claims of games it threw away, and a committed chunk is never generated again.

Once the run's snapshot and spreadsheets are written, `finish_run` keeps only what a re-run or an audit needs
(meta, caps, regions, counter and the outputs record: a few KB) and drops the rest (seen, done, claims, owners,
faults: ~60 MB per million games) in one script, so a crash leaves either the resumable run or the finished one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import redis

from operations.errors import UserError

_BEGIN = """
local prefix, chunk, token = KEYS[1], ARGV[1], ARGV[2]
if redis.call('EXISTS', prefix .. ':outputs') == 1 then return {2, '', 0} end
local done = redis.call('HGET', prefix .. ':done', chunk)
if done then return {1, done, 0} end
local claims_key = prefix .. ':chunk:' .. chunk .. ':claims'
local entries = redis.call('LRANGE', claims_key, 0, -1)
for _, e in ipairs(entries) do
  redis.call('SREM', prefix .. ':seen', string.sub(e, 1, 8))
  redis.call('HINCRBY', prefix .. ':counter', string.byte(e, 9), -1)
  redis.call('HINCRBY', prefix .. ':regions', string.byte(e, 10), -1)
end
redis.call('DEL', claims_key)
redis.call('SET', prefix .. ':chunk:' .. chunk .. ':owner', token)
return {0, '', #entries}
"""

# ARGV: chunk, token, limit, masks (8 bytes each, little-endian), first numbers (1 byte each), regions
# (1 byte each). Returns {status, flags}: one character per candidate: A accepted, R repeat, F region full,
# '.' not looked at (the chunk's limit was reached). Claims are stored as 10-byte strings mask|first|region.
_CLAIM = """
local prefix, chunk, token, limit = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local masks, firsts, regions = ARGV[4], ARGV[5], ARGV[6]
if redis.call('GET', prefix .. ':chunk:' .. chunk .. ':owner') ~= token then
  return {0, 'superseded'}
end
local caps = redis.call('HGETALL', prefix .. ':caps')
local cap, count = {}, {}
for i = 1, #caps, 2 do cap[tonumber(caps[i])] = tonumber(caps[i + 1]) end
local counts = redis.call('HGETALL', prefix .. ':regions')
for i = 1, #counts, 2 do count[tonumber(counts[i])] = tonumber(counts[i + 1]) end
local seen = prefix .. ':seen'
local flags, accepted, by_first, by_region = {}, {}, {}, {}
local n = #firsts
for i = 1, n do
  if #accepted >= limit then
    flags[#flags + 1] = string.rep('.', n - i + 1)
    break
  end
  local region = string.byte(regions, i)
  local c = count[region] or 0
  local mask = string.sub(masks, 8 * i - 7, 8 * i)
  if c >= (cap[region] or 0) then
    flags[#flags + 1] = 'F'
  elseif redis.call('SADD', seen, mask) == 0 then
    flags[#flags + 1] = 'R'
  else
    local first = string.byte(firsts, i)
    count[region] = c + 1
    by_first[first] = (by_first[first] or 0) + 1
    by_region[region] = (by_region[region] or 0) + 1
    accepted[#accepted + 1] = mask .. string.sub(firsts, i, i) .. string.sub(regions, i, i)
    flags[#flags + 1] = 'A'
  end
end
for f, d in pairs(by_first) do redis.call('HINCRBY', prefix .. ':counter', f, d) end
for r, d in pairs(by_region) do redis.call('HINCRBY', prefix .. ':regions', r, d) end
local claims_key = prefix .. ':chunk:' .. chunk .. ':claims'
for i = 1, #accepted, 4000 do
  redis.call('RPUSH', claims_key, unpack(accepted, i, math.min(i + 3999, #accepted)))
end
local out = {}
for r, c in pairs(count) do out[#out + 1] = r .. '=' .. c end
return {1, table.concat(flags), table.concat(out, ',')}
"""

_COMMIT = """
local prefix, chunk, token, payload, now = KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local owner_key = prefix .. ':chunk:' .. chunk .. ':owner'
if redis.call('GET', owner_key) ~= token then return 0 end
redis.call('HSET', prefix .. ':done', chunk, payload)
redis.call('HSET', prefix .. ':meta', 'active_at', now)
redis.call('DEL', owner_key, prefix .. ':chunk:' .. chunk .. ':claims')
return 1
"""

# ARGV: the outputs record (JSON), the number of chunks. UNLINK frees the big seen set off Redis's main thread.
_FINISH = """
local prefix, outputs, chunks = KEYS[1], ARGV[1], tonumber(ARGV[2])
redis.call('SET', prefix .. ':outputs', outputs)
local drop = {prefix .. ':seen', prefix .. ':done', prefix .. ':faults'}
for i = 0, chunks - 1 do
  drop[#drop + 1] = prefix .. ':chunk:' .. i .. ':claims'
  drop[#drop + 1] = prefix .. ':chunk:' .. i .. ':owner'
end
return redis.call('UNLINK', unpack(drop))
"""

_TAKE_FAULT = """
local key, chunk = KEYS[1], ARGV[1]
local left = tonumber(redis.call('HGET', key, chunk) or '0')
if left > 0 then redis.call('HINCRBY', key, chunk, -1) return 1 end
return 0
"""


class SupersededAttempt(RuntimeError):
    """Another attempt of the same chunk has begun since this one; this one must stop."""


class RunKeyConflict(UserError, ValueError):
    """The run key was already used by a run with other parameters."""


class RunFinished(RuntimeError):
    """The run has completed and released its claims: none of its chunks may be generated again."""

    transient = False  # tasks' retry rule (tasks/retries.py): never retried


@dataclass(frozen=True)
class ChunkStart:
    committed: dict | None  # the committed result when the chunk is already done
    released: int  # claims of an earlier attempt given back
    region_counts: list[int]


@dataclass(frozen=True)
class ClaimResult:
    accepted: np.ndarray  # bool per candidate
    repeats: int
    region_full: int
    region_counts: list[int]


class FirstNumberCounter:
    """Claims of one run's games in Redis; build it from a redis-py client (no state besides keys)."""

    def __init__(self, client: redis.Redis, key_prefix: str, run_key: str):
        if not run_key or any(c in run_key for c in " {}"):
            raise ValueError(f"run_key {run_key!r} must be non-empty without spaces or braces")
        self.client = client
        self.prefix = f"{key_prefix}:{run_key}"
        self._begin = client.register_script(_BEGIN)
        self._claim = client.register_script(_CLAIM)
        self._commit = client.register_script(_COMMIT)
        self._finish = client.register_script(_FINISH)
        self._take_fault = client.register_script(_TAKE_FAULT)

    def _key(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    def initialise(self, fingerprint: str, quantity: int, caps: list[int]) -> bool:
        """Create the run (or confirm a resumed one has the same parameters). True if it already existed."""
        meta = self._key("meta")
        created = self.client.hsetnx(meta, "fingerprint", fingerprint)
        existing = self.client.hget(meta, "fingerprint").decode()
        if existing != fingerprint:
            raise RunKeyConflict(
                f"run key {self.prefix!r} was used by a run with other parameters; choose another run_key "
                "or resume with the same parameters"
            )
        now = int(time.time())
        self.client.hset(meta, "active_at", now)
        if created:
            pipe = self.client.pipeline(transaction=True)
            pipe.hset(meta, mapping={"quantity": quantity, "created": now})
            pipe.hset(self._key("caps"), mapping={str(i): c for i, c in enumerate(caps)})
            pipe.hset(self._key("regions"), mapping={str(i): 0 for i in range(len(caps))})
            pipe.execute()
        return not created

    def pin_chunk_quotas(self, quotas: tuple[int, ...] | list[int]) -> tuple[int, ...]:
        """The run's chunking: the first attempt's quotas are kept, so a resume on a cluster of another size
        (or with other chunk settings) still means the same games by the same chunk index."""
        meta = self._key("meta")
        self.client.hsetnx(meta, "chunk_quotas", json.dumps(list(quotas)))
        return tuple(json.loads(self.client.hget(meta, "chunk_quotas")))

    def region_counts(self, regions: int) -> list[int]:
        raw = self.client.hgetall(self._key("regions"))
        return [int(raw.get(str(i).encode(), 0)) for i in range(regions)]

    def begin_chunk(self, chunk: int, token: str, regions: int) -> ChunkStart:
        """Release an earlier attempt's claims and own the chunk, or return its committed result."""
        done, payload, released = self._begin(keys=[self.prefix], args=[chunk, token])
        if done == 2:
            raise RunFinished(f"{self.prefix} has completed; its chunks are not generated again")
        committed = json.loads(payload) if done == 1 else None
        return ChunkStart(committed=committed, released=int(released), region_counts=self.region_counts(regions))

    def claim(
        self, chunk: int, token: str, limit: int, masks: np.ndarray, firsts: np.ndarray, regions: np.ndarray,
        n_regions: int,
    ) -> ClaimResult:
        """Atomically claim up to `limit` of the candidates, in order; repeats and full regions are refused."""
        status, flags, *rest = self._claim(
            keys=[self.prefix],
            args=[
                chunk,
                token,
                limit,
                masks.astype("<u8").tobytes(),
                firsts.astype(np.uint8).tobytes(),
                regions.astype(np.uint8).tobytes(),
            ],
        )
        if status == 0:
            raise SupersededAttempt(f"chunk {chunk} of {self.prefix} was taken over by a newer attempt")
        codes = np.frombuffer(flags, dtype=np.uint8)
        counts = [0] * n_regions
        for pair in rest[0].decode().split(",") if rest and rest[0] else ():
            region, value = pair.split("=")
            if int(region) < n_regions:
                counts[int(region)] = int(value)
        return ClaimResult(
            accepted=codes == ord("A"),
            repeats=int(np.count_nonzero(codes == ord("R"))),
            region_full=int(np.count_nonzero(codes == ord("F"))),
            region_counts=counts,
        )

    def commit_chunk(self, chunk: int, token: str, result: dict) -> None:
        if not self._commit(keys=[self.prefix], args=[chunk, token, json.dumps(result), int(time.time())]):
            raise SupersededAttempt(f"chunk {chunk} of {self.prefix} was taken over before it committed")

    def committed_chunks(self) -> dict[int, dict]:
        return {int(k): json.loads(v) for k, v in self.client.hgetall(self._key("done")).items()}

    def inject_faults(self, chunk: int, failures: int = 1) -> None:
        """Make the next `failures` attempts of a chunk fail right after their claims (chaos drills)."""
        self.client.hset(self._key("faults"), str(chunk), failures)

    def clear_faults(self) -> None:
        """Forget the faults still to inject (a drill that is over)."""
        self.client.delete(self._key("faults"))

    def take_fault(self, chunk: int) -> bool:
        return bool(self._take_fault(keys=[self._key("faults")], args=[chunk]))

    def snapshot(self) -> dict:
        """The counter in the seed's format: {"counter": {"1": 877, ...}, "total_generated": 10000}."""
        raw = self.client.hgetall(self._key("counter"))
        counter = {k.decode(): int(v) for k, v in raw.items() if int(v)}
        ordered = dict(sorted(counter.items(), key=lambda kv: int(kv[0])))
        return {"counter": ordered, "total_generated": sum(ordered.values())}

    def finish_run(self, outputs: dict, chunks: int) -> int:
        """Record the completed run's outputs and drop what only generation needed, atomically (one script: a
        crash leaves the run either resumable or finished) and idempotently. Returns the keys dropped."""
        return int(self._finish(keys=[self.prefix], args=[json.dumps(outputs), chunks]))

    def outputs(self) -> dict | None:
        """The completed run's outputs record, or None while the run is unfinished."""
        raw = self.client.get(self._key("outputs"))
        return json.loads(raw) if raw is not None else None

    def run_keys(self) -> list[str]:
        """Every Redis key of the run."""
        return [k.decode() for k in self.client.scan_iter(match=f"{self.prefix}:*", count=1000)]

    def memory_usage(self) -> int:
        """Bytes Redis uses for the run's keys (MEMORY USAGE summed over them)."""
        return sum(int(self.client.memory_usage(k) or 0) for k in self.run_keys())

    def seen_count(self) -> int:
        return int(self.client.scard(self._key("seen")))

    def delete_run(self) -> int:
        """Remove every key of the run."""
        keys = self.run_keys()
        return int(self.client.unlink(*keys)) if keys else 0
