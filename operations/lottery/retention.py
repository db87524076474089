"""What generation runs leave behind, and how long: finishing a run, serving a completed one, expiring old ones.

A completed run keeps in Redis only its meta, caps, regions, counter and outputs record (a few KB: enough to
refuse a re-run with other parameters, to audit its counter, and to serve a re-run from its files) and, unless
KEEP_CHUNK_FILES, only its spreadsheets and counter snapshot on disk. The scheduled `cleanup-runs` flow then
removes runs older than RUN_RETENTION_DAYS: a completed run is dated by its completion, an unfinished one
(failed, cancelled, abandoned) by its last activity (meta `active_at`: its last flow-run start or chunk
commit), a folder with no Redis keys (its Redis was replaced or flushed) by its newest file. Afterwards Redis
rewrites its append-only file when that file has outgrown the data (`aof_rewrite_needed`).

No Prefect import here: the flow and tasks wrap these functions.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import redis

from operations.errors import UserError
from operations.lottery.counter import FirstNumberCounter

DAY_SECONDS = 86_400
# An append-only file is rewritten when it is larger than this many times the data it describes (Redis's own
# rewrite trigger compares the file with its size after the last rewrite, so a file that kept deleted runs
# never shrinks) and at least AOF_REWRITE_MIN_BYTES (Redis's auto-aof-rewrite-min-size default: below it a
# rewrite saves nothing worth a fork).
AOF_GROWTH_FACTOR = 2.0
AOF_REWRITE_MIN_BYTES = 64 * 2**20

# KEYS: the run's keys. ARGV: its meta key, the `active_at` seen when it was listed ('' if none). Refuses
# (-1) when a flow run has started on the run key since it was listed, so a resumed run is never cut short.
_REMOVE = """
local meta, expected = ARGV[1], ARGV[2]
if (redis.call('HGET', meta, 'active_at') or '') ~= expected then return -1 end
local removed = 0
for i = 1, #KEYS, 1000 do
  removed = removed + redis.call('UNLINK', unpack(KEYS, i, math.min(i + 999, #KEYS)))
end
return removed
"""


class OutputsGone(UserError, RuntimeError):
    """A completed run's files were removed: its games cannot be served nor made again under its run key."""

    transient = False  # tasks' retry rule (tasks/retries.py): never retried


@dataclass(frozen=True)
class RunOutputs:
    """The record a completed run keeps in Redis: what a re-run serves and an audit reads."""

    spreadsheets: list[dict]  # {"path", "rows", "sheets"} per workbook
    snapshot: str
    games: int
    completed_at: float  # epoch seconds
    seconds: float

    def to_json(self) -> dict:
        return asdict(self)


def finish_run(
    counter: FirstNumberCounter, run_dir: Path, outputs: RunOutputs, chunks: int, keep_chunk_files: bool
) -> int:
    """Record the completed run and drop what only its generation needed; returns chunk-file bytes removed.

    Redis first: until its one script runs, a crash leaves the run resumable (every chunk committed, its file
    on disk); after it, the run is served from its outputs and the chunk files are dead weight."""
    counter.finish_run(outputs.to_json(), chunks)
    return 0 if keep_chunk_files else remove_chunk_files(run_dir)


def remove_chunk_files(run_dir: Path) -> int:
    chunks = Path(run_dir) / "chunks"
    size = folder_bytes(chunks)
    shutil.rmtree(chunks, ignore_errors=True)
    return size


def completed_outputs(counter: FirstNumberCounter) -> RunOutputs | None:
    """The outputs of a completed run whose files are all still there; None for an unfinished run.

    Raises OutputsGone, naming the missing files, when the run completed but some of its files are gone."""
    record = counter.outputs()
    if record is None:
        return None
    outputs = RunOutputs(**record)
    missing = [p for p in [*(w["path"] for w in outputs.spreadsheets), outputs.snapshot] if not Path(p).exists()]
    if missing:
        completed = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(outputs.completed_at))
        raise OutputsGone(
            f"run {counter.prefix.rsplit(':', 1)[-1]} completed at {completed}, but {len(missing)} of its files "
            f"are gone ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); its claims were released, "
            "so its games cannot be made again under this key: start a new run with another run_key"
        )
    return outputs


def folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def _newest_mtime(folder: Path) -> float:
    newest = folder.stat().st_mtime
    for root, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            try:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
            except OSError:
                continue
    return newest


def _is_run_folder(folder: Path) -> bool:
    """A generation run's folder (other flows keep their own folders under OUTPUT_DIR)."""
    return folder.is_dir() and ((folder / "chunks").is_dir() or (folder / f"counter-{folder.name}.json").is_file())


@dataclass(frozen=True)
class StoredRun:
    run_key: str
    status: str  # "completed", "unfinished" or "folder only"
    dated: float  # epoch seconds its age counts from
    keys: tuple[str, ...] = ()
    redis_bytes: int = 0
    active_at: str = ""  # meta's active_at when listed: removal is refused if it changed since
    folder: str | None = None
    folder_bytes: int = 0

    def age_days(self, now: float) -> float:
        return (now - self.dated) / DAY_SECONDS


@dataclass
class CleanupReport:
    removed: list[StoredRun] = field(default_factory=list)
    kept: int = 0
    skipped: list[str] = field(default_factory=list)  # run keys restarted since they were listed

    @property
    def folder_bytes(self) -> int:
        return sum(r.folder_bytes for r in self.removed)

    @property
    def keys(self) -> int:
        return sum(len(r.keys) for r in self.removed)

    @property
    def redis_bytes(self) -> int:
        return sum(r.redis_bytes for r in self.removed)


def _run_keys_in_redis(client: redis.Redis, key_prefix: str) -> dict[str, list[str]]:
    start = len(key_prefix) + 1
    by_run: dict[str, list[str]] = {}
    for key in client.scan_iter(match=f"{key_prefix}:*", count=1000):
        name = key.decode()
        by_run.setdefault(name[start:].split(":", 1)[0], []).append(name)
    return by_run


def list_runs(
    client: redis.Redis, key_prefix: str, output_dir: Path, now: float, date_undated: bool
) -> list[StoredRun]:
    """Every generation run with keys under `key_prefix` or a run folder under `output_dir`, dated; sizes are
    measured later, for the runs that expire only (`_measured`): the daily listing costs no walk of kept runs.

    An unfinished run with no `active_at` (keys written before runs were dated) is dated `now`; with
    `date_undated` that date is stored, so it expires RUN_RETENTION_DAYS after the first cleanup saw it."""
    output_dir = Path(output_dir)
    runs = []
    in_redis = _run_keys_in_redis(client, key_prefix)
    for run_key, keys in sorted(in_redis.items()):
        prefix = f"{key_prefix}:{run_key}"
        raw_outputs = client.get(f"{prefix}:outputs")
        active_at = client.hget(f"{prefix}:meta", "active_at")
        if raw_outputs is not None:
            status, dated = "completed", float(json.loads(raw_outputs)["completed_at"])
        elif active_at is not None:
            status, dated = "unfinished", float(active_at)
        else:
            status, dated = "unfinished", now
            if date_undated and client.hsetnx(f"{prefix}:meta", "active_at", int(now)):
                keys = sorted({*keys, f"{prefix}:meta"})
                active_at = str(int(now)).encode()
        folder = output_dir / run_key
        has_folder = folder.is_dir() and folder.parent.resolve() == output_dir.resolve()
        runs.append(StoredRun(
            run_key, status, dated, tuple(keys), active_at=active_at.decode() if active_at else "",
            folder=str(folder) if has_folder else None,
        ))
    if output_dir.is_dir():
        for folder in sorted(output_dir.iterdir()):
            if folder.name not in in_redis and _is_run_folder(folder):
                runs.append(StoredRun(folder.name, "folder only", _newest_mtime(folder), folder=str(folder)))
    return runs


def _measured(client: redis.Redis, run: StoredRun) -> StoredRun:
    """The run with its Redis memory (MEMORY USAGE of its keys, pipelined) and its folder's bytes."""
    with client.pipeline(transaction=False) as pipe:
        for key in run.keys:
            pipe.memory_usage(key)
        redis_bytes = sum(int(b or 0) for b in pipe.execute())
    return replace(run, redis_bytes=redis_bytes, folder_bytes=folder_bytes(Path(run.folder)) if run.folder else 0)


def remove_run(client: redis.Redis, key_prefix: str, run: StoredRun) -> bool:
    """Remove the run's keys (unless a flow run started on it since it was listed) and then its folder.
    False when it was skipped."""
    if run.keys:
        script = client.register_script(_REMOVE)
        if script(keys=list(run.keys), args=[f"{key_prefix}:{run.run_key}:meta", run.active_at]) == -1:
            return False
    if run.folder:
        shutil.rmtree(run.folder, ignore_errors=True)
    return True


def cleanup_expired_runs(
    client: redis.Redis, key_prefix: str, output_dir: Path, retention_days: float, dry_run: bool,
    now: float | None = None,
) -> CleanupReport:
    """Remove (or in a dry run only list) the runs older than `retention_days`."""
    now = time.time() if now is None else now
    report = CleanupReport()
    for run in list_runs(client, key_prefix, output_dir, now, date_undated=not dry_run):
        if run.age_days(now) <= retention_days:
            report.kept += 1
            continue
        run = _measured(client, run)  # before removal: what it frees
        if dry_run or remove_run(client, key_prefix, run):
            report.removed.append(run)
        else:
            report.skipped.append(run.run_key)
    return report


@dataclass(frozen=True)
class AofCheck:
    enabled: bool
    current_bytes: int
    dataset_bytes: int
    rewrite: bool  # the rule says rewrite (started unless dry run)
    reason: str


def aof_rewrite_needed(
    info: dict, dataset_bytes: int, growth: float = AOF_GROWTH_FACTOR, min_bytes: int = AOF_REWRITE_MIN_BYTES
) -> tuple[bool, str]:
    """The rule: rewrite when the append-only file is at least `min_bytes` and more than `growth` x the
    dataset in memory. A rewrite writes the dataset in RDB form, smaller than it is in memory, so a file
    twice the dataset is at least half replays of data since deleted or overwritten."""
    if not info.get("aof_enabled"):
        return False, "append-only file disabled"
    if info.get("aof_rewrite_in_progress") or info.get("aof_rewrite_scheduled"):
        return False, "a rewrite is already under way"
    current = int(info.get("aof_current_size", 0))
    if current < min_bytes:
        return False, f"file {current:,} bytes, under the {min_bytes:,}-byte floor"
    if current <= growth * dataset_bytes:
        return False, f"file {current:,} bytes, within {growth:g} x the dataset ({dataset_bytes:,} bytes)"
    return True, f"file {current:,} bytes, over {growth:g} x the dataset ({dataset_bytes:,} bytes)"


def compact_aof(client: redis.Redis, dry_run: bool, min_bytes: int = AOF_REWRITE_MIN_BYTES) -> AofCheck:
    """BGREWRITEAOF when `aof_rewrite_needed` says so (not in a dry run); Redis rewrites in a forked child."""
    info = client.info("persistence")
    dataset = int(client.info("memory").get("used_memory_dataset", 0))
    rewrite, reason = aof_rewrite_needed(info, dataset, min_bytes=min_bytes)
    if rewrite and not dry_run:
        client.bgrewriteaof()
    return AofCheck(bool(info.get("aof_enabled")), int(info.get("aof_current_size", 0)), dataset, rewrite, reason)
