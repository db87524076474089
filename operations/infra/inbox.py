"""Drop folders, without Prefect: when a file dropped into a folder is completely written, the digest of its
content, and where each file goes from there, recorded inside the folder so that a restarted watcher resumes
where it stopped and no file is taken twice or lost.

Layout of a drop folder FOLDER (deployments/inbox_watcher.py runs one per kind of file):

    FOLDER/<name>                        dropped, waiting to be completely written
    FOLDER/working/<claim>/<name>        taken: its run reads it here (<claim>: UTC time and digest prefix)
    FOLDER/working/<claim>/.claim.json   the claim: digest, event id, flow run id once found
    FOLDER/processed/<run id>/<name>     its run completed
    FOLDER/failed/<run id>/<name>        its run failed, crashed or was cancelled (move it back to FOLDER to retry)
    FOLDER/duplicates/<time>-<name>      the same content as a file in flight or processed: not loaded
    FOLDER/.ledger/<sha256>.json         per content: its last claim and how it ended

Completely written: the file's size and modification time are the same at two looks in a row, and its last
modification is at least `settle_seconds` old. A file renamed into the folder after it was written is taken at
the second look; one still being written is not, until its writer has been quiet that long. Names starting with
`.` or `~`, and `.part`, `.tmp`, `.crdownload` files (a copy under way) are never taken. A name starting with
`again-` is loaded even when its content was loaded before.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

SETTLE_SECONDS = 3.0
AGAIN_PREFIX = "again-"  # a name starting with it is loaded even if the same content was loaded before
IN_FLIGHT, PROCESSED, FAILED = "in flight", "processed", "failed"
SUBFOLDERS = ("working", "processed", "failed", "duplicates", ".ledger")
_UNDER_WAY = (".part", ".tmp", ".crdownload", ".partial", ".swp")
CLAIM_FILE = ".claim.json"


def file_digest(path: Path, block: int = 1 << 20) -> str:
    """The SHA-256 of a file's content (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def takeable(name: str) -> bool:
    """Whether a name can be a dropped file at all (not hidden, not an editor's lock, not a copy under way)."""
    return not name.startswith((".", "~")) and not name.lower().endswith(_UNDER_WAY)


class Settling:
    """Which files are completely written (module docstring), from looks at their size and modification time."""

    def __init__(self, settle_seconds: float = SETTLE_SECONDS):
        self.settle_seconds = settle_seconds
        self._seen: dict[Path, tuple[int, int]] = {}

    def complete(self, path: Path, now: float | None = None) -> bool:
        """Look at the file once more: True when it is completely written."""
        try:
            stat = path.stat()
        except FileNotFoundError:
            self._seen.pop(path, None)
            return False
        key = (stat.st_size, stat.st_mtime_ns)
        previous, self._seen[path] = self._seen.get(path), key
        now = time.time() if now is None else now
        return previous == key and now - stat.st_mtime >= self.settle_seconds

    def forget(self, path: Path) -> None:
        self._seen.pop(path, None)

    def keep_only(self, paths: set[Path]) -> None:
        """Forget the files no longer there."""
        for path in set(self._seen) - paths:
            del self._seen[path]


@dataclass
class Claim:
    """A file taken from a drop folder: where it is, what its content is, and the run it started."""

    folder: str  # working/<id> of the drop folder
    name: str
    sha256: str
    size: int
    event_id: str  # the id of the event that asks for its run (a new one when the event is sent afresh)
    claimed_at: float
    emitted_at: float | None = None  # when the server took the event (None: not sent yet, or not sure)
    flow_run_id: str | None = None
    again: bool = False

    @property
    def id(self) -> str:
        return Path(self.folder).name

    @property
    def path(self) -> Path:
        return Path(self.folder) / self.name

    def save(self) -> None:
        _write_json(Path(self.folder) / CLAIM_FILE, asdict(self))

    @classmethod
    def load(cls, folder: Path) -> Claim | None:
        try:
            data = json.loads((folder / CLAIM_FILE).read_text())
        except (OSError, ValueError):
            return None
        return cls(**{**data, "folder": str(folder)})


def _write_json(path: Path, data: dict) -> None:
    """Write atomically: a crash leaves the old file or the new one, never half of one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(data, sort_keys=True))
    os.replace(temporary, path)


def _stamp(now: float) -> str:
    return datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


class DropFolder:
    """One drop folder (module docstring): the files waiting in it, its claims, and their moves."""

    def __init__(self, root: Path, pattern: str | None = None):
        self.root = Path(root)
        self.pattern = re.compile(pattern) if pattern else None  # the names its flow accepts

    def ensure(self) -> None:
        """Create the folder and its subfolders."""
        for sub in SUBFOLDERS:
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def sub(self, name: str) -> Path:
        return self.root / name

    def waiting(self) -> list[Path]:
        """The files at the top of the folder that may be taken (their flow's names; none hidden or under way)."""
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        return sorted(Path(e.path) for e in entries
                      if e.is_file(follow_symlinks=False) and takeable(e.name) and self.accepts(e.name))

    def refused(self) -> list[Path]:
        """Files at the top that are no file of its flow (another extension): left where they are."""
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        return sorted(Path(e.path) for e in entries
                      if e.is_file(follow_symlinks=False) and takeable(e.name) and not self.accepts(e.name))

    def accept(self, pattern: str | None) -> None:
        """Take only names matching `pattern` (its flow parameter's, a regex Python and JavaScript read alike)."""
        self.pattern = re.compile(pattern) if pattern else None

    def accepts(self, name: str) -> bool:
        return self.pattern is None or bool(self.pattern.match(name))

    # -- the ledger: per content, its last claim and outcome ----------------------------------------------------

    def _ledger(self, sha256: str) -> Path:
        return self.root / ".ledger" / f"{sha256}.json"

    def previous(self, sha256: str) -> dict | None:
        """What became of this content last time: {"claim", "outcome", "flow_run_id", "name", ...}, or None."""
        try:
            return json.loads(self._ledger(sha256).read_text())
        except (OSError, ValueError):
            return None

    def loaded_before(self, sha256: str) -> dict | None:
        """The ledger entry when this content is in flight or was processed (a copy is then a duplicate); None
        when it is new or its last run failed (it may be loaded again)."""
        entry = self.previous(sha256)
        if entry is None or entry["outcome"] == FAILED:
            return None
        if entry["outcome"] == IN_FLIGHT and not (self.root / "working" / entry["claim"]).is_dir():
            return None  # a claim that never got its file (a crash in between): nothing is in flight
        return entry

    def _record(self, claim: Claim, outcome: str, where: str) -> None:
        _write_json(self._ledger(claim.sha256), {
            "claim": claim.id, "name": claim.name, "outcome": outcome, "flow_run_id": claim.flow_run_id,
            "where": where, "at": time.time(),
        })

    # -- moves ---------------------------------------------------------------------------------------------------

    def claim(self, path: Path, sha256: str, now: float | None = None) -> Claim:
        """Take a completely written file: its claim written first, then the file renamed into working/<claim>/
        (a crash in between leaves the file where it was and a claim without it, which `recover` removes)."""
        now = time.time() if now is None else now
        folder = self.root / "working" / f"{_stamp(now)}-{sha256[:12]}"
        folder.mkdir(parents=True)
        claim = Claim(str(folder), path.name, sha256, path.stat().st_size, str(uuid.uuid4()), now,
                      again=path.name.startswith(AGAIN_PREFIX))
        claim.save()
        self._record(claim, IN_FLIGHT, str(folder.relative_to(self.root)))
        os.replace(path, claim.path)
        return claim

    def set_aside(self, path: Path, now: float | None = None) -> Path:
        """Move a duplicate to duplicates/<time>-<name>; returns where it went."""
        target = self.root / "duplicates" / f"{_stamp(time.time() if now is None else now)}-{path.name}"
        os.replace(path, target)
        return target

    def claims(self) -> list[Claim]:
        """The claims in flight, oldest first."""
        working = self.root / "working"
        if not working.is_dir():
            return []
        found = [Claim.load(folder) for folder in sorted(working.iterdir()) if folder.is_dir()]
        return [claim for claim in found if claim is not None]

    def recover(self) -> list[str]:
        """Remove claims whose file never arrived (a crash between the claim and the move: the file is still at
        the top and is taken afresh). Returns their ids."""
        removed = []
        working = self.root / "working"
        for folder in sorted(working.iterdir()) if working.is_dir() else []:
            claim = Claim.load(folder) if folder.is_dir() else None
            if folder.is_dir() and (claim is None or not claim.path.exists()):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder.name)
        return removed

    def finish(self, claim: Claim, outcome: str, run_id: str) -> Path:
        """Move a claim's folder to processed/<run id> or failed/<run id> (`outcome`), its ledger entry first (a
        crash in between leaves the claim in working/, finished again by the next watcher). Returns the file's
        new path."""
        if outcome not in (PROCESSED, FAILED):
            raise ValueError(f"unknown outcome {outcome!r}")
        target = self.root / outcome / run_id
        if target.exists():  # the same run finished twice (a crash after the move): keep both
            target = target.with_name(f"{run_id}-{claim.id}")
        self._record(claim, outcome, str(target.relative_to(self.root)))
        os.replace(claim.folder, target)
        return target / claim.name

    def counts(self) -> dict[str, int]:
        """Files waiting, in flight, processed, failed and set aside as duplicates (for `make status`)."""
        def entries(sub: str) -> int:
            folder = self.root / sub
            return sum(1 for _ in folder.iterdir()) if folder.is_dir() else 0

        return {"waiting": len(self.waiting()), "in flight": entries("working"), "processed": entries("processed"),
                "failed": entries("failed"), "duplicates": entries("duplicates")}
