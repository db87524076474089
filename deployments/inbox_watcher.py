"""The stack's drop-folder watcher: a file completely written into a drop folder starts one run of its flow,
through a Prefect event and the deployment trigger of prefect.yaml, and moves to processed/ or failed/ under
the run's id once that run ends (docs/inbox.md).

    products      PRODUCTS_INBOX_DIR (DATA_DIR/inbox/products)        -> process-products/inbox (file_path)
    participants  TURNSTILES_INBOX_DIR (DATA_DIR/inbox/participants)  -> register-participants/inbox
                                                                         (participants_file; every turnstile)

For each file (operations/infra/inbox.py: when it is completely written, its digest, the moves), the watcher
takes it into working/<claim>/ and emits `project.inbox.file.received` (resource
`project.inbox.<kind>.<claim>`, payload `path`): the deployment's trigger starts its run with `path` as the
file parameter. It then follows the run on the server's REST API and, when the run is Completed, moves the file
to processed/<run id>/, else (Failed, Crashed, Cancelled) to failed/<run id>/, emitting
`project.inbox.file.processed` or `project.inbox.file.failed`. A copy of content in flight or processed goes to
duplicates/ with `project.inbox.file.duplicate` and a log line; a name starting with `again-` is loaded anyway.

Nothing is taken twice or lost across restarts: every step is recorded in the folder before the next one, the
event keeps its id until the server has taken it (the server ignores an event id it has seen), files waiting at
start are taken, claims in flight at start are followed, and a claim whose run never appears (the event came
before its trigger existed) is announced again with a new event id after RESEND_SECONDS. A file whose name its
flow does not accept (another extension) is left where it is, with one log line.

A service of the stack (a program of its supervisor, started by `make up` after the deploy, shown by
`make status`), state and log in DATA_DIR/inbox-watcher:

    python -m deployments.inbox_watcher --products DIR --participants DIR   # what InboxWatcherService runs
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx

from operations.infra.http import default_ssl_context
from operations.infra.inbox import FAILED, PROCESSED, SETTLE_SECONDS, Claim, DropFolder, Settling, file_digest
from operations.infra.processes import basic_auth_headers
from operations.infra.services import Service

RECEIVED = "project.inbox.file.received"  # resource project.inbox.<kind>.<claim id>; payload path, name, sha256
DUPLICATE = "project.inbox.file.duplicate"  # resource project.inbox.<kind>.<digest prefix>; payload first run
FINISHED = {PROCESSED: "project.inbox.file.processed", FAILED: "project.inbox.file.failed"}
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
NOT_STARTED = {"SCHEDULED", "PENDING"}
RESEND_SECONDS = 60.0  # a claim with no run this long after its event is announced again (new event id)
HEARTBEAT_FILE = "heartbeat"
STATE_FILE = "inbox-watcher.json"
ALIVE_SECONDS = 30.0  # a watcher whose heartbeat is older does not count as running

logger = logging.getLogger("deployments.inbox_watcher")


@dataclass(frozen=True)
class Kind:
    """A kind of dropped file: the deployment its files start, and the parameter that gets the file's path."""

    deployment: str  # flow/deployment
    parameter: str


KINDS = {
    "products": Kind("process-products/inbox", "file_path"),
    "participants": Kind("register-participants/inbox", "participants_file"),
}


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat()


class Watcher:
    """The watcher's work on the drop folders (`inboxes`: kind -> folder) against the Prefect API `api_url`."""

    def __init__(self, inboxes: dict[str, Path], api_url: str, auth_string: str | None = None,
                 settle_seconds: float = SETTLE_SECONDS, resend_seconds: float = RESEND_SECONDS):
        self.folders = {kind: DropFolder(path) for kind, path in inboxes.items()}
        self.settling = {kind: Settling(settle_seconds) for kind in inboxes}
        self.resend_seconds = resend_seconds
        self.api = httpx.Client(base_url=api_url, headers=basic_auth_headers(auth_string), timeout=10,
                                verify=default_ssl_context())
        self.deployments: dict[str, dict] = {}
        self._told: set[str] = set()  # log lines said once (a refused file, a deployment missing)

    def start(self) -> None:
        """Create the folders and drop the claims a crash left without their file."""
        for kind, folder in self.folders.items():
            folder.ensure()
            for claim in folder.recover():
                logger.warning("%s: claim %s had no file (a crash before the move): the file is taken again",
                               kind, claim)
            for claim in folder.claims():
                logger.info("%s: following %s (claim %s) from before the restart", kind, claim.name, claim.id)

    def close(self) -> None:
        self.api.close()

    def tick(self, now: float | None = None) -> None:
        """One look at every folder: take what is completely written, follow the runs under way."""
        for kind in self.folders:
            try:
                if self._deployment(kind) is None:
                    continue  # not deployed yet: files wait
                self._take(kind, time.time() if now is None else now)
                self._follow(kind, time.time() if now is None else now)
            except httpx.HTTPError as exc:
                logger.warning("%s: the Prefect server did not answer (%s); trying again", kind, exc)
            except OSError as exc:  # a folder unreadable or full: said once, tried again at every look
                self._once(f"{kind} {exc}", "%s: %s: %s; trying again at every look", kind, type(exc).__name__, exc)

    # -- the deployment of a kind ----------------------------------------------------------------------------

    def _deployment(self, kind: str) -> dict | None:
        if kind in self.deployments:
            return self.deployments[kind]
        name = KINDS[kind].deployment
        response = self.api.get(f"/deployments/name/{name}")
        if response.status_code == 404:
            self._once(f"deployment {name}", "%s: deployment %s not found (make up deploys it); files wait", kind, name)
            return None
        response.raise_for_status()
        deployment = response.json()
        schema = (deployment.get("parameter_openapi_schema") or {}).get("properties", {})
        self.folders[kind].accept(schema.get(KINDS[kind].parameter, {}).get("pattern"))
        self.deployments[kind] = deployment
        logger.info("%s: watching %s for %s", kind, self.folders[kind].root, name)
        return deployment

    # -- taking files ------------------------------------------------------------------------------------------

    def _take(self, kind: str, now: float) -> None:
        folder, settling = self.folders[kind], self.settling[kind]
        waiting = folder.waiting()
        settling.keep_only(set(waiting))
        for path in folder.refused():
            self._once(str(path), "%s: %s is no file of %s (its name): left where it is", kind, path.name,
                       KINDS[kind].deployment)
        for path in waiting:
            if not settling.complete(path, now):
                continue
            size = path.stat().st_size
            digest = file_digest(path)
            if path.stat().st_size != size:
                continue  # written to while read: not complete after all
            settling.forget(path)
            before = None if path.name.startswith("again-") else folder.loaded_before(digest)
            if before is not None:
                self._duplicate(kind, path, digest, before, now)
                continue
            claim = folder.claim(path, digest, now)
            logger.info("%s: took %s (%d bytes, sha256 %s) as claim %s", kind, claim.name, claim.size,
                        digest[:12], claim.id)
            self._announce(kind, claim, now)

    def _duplicate(self, kind: str, path: Path, digest: str, before: dict, now: float) -> None:
        target = self.folders[kind].set_aside(path, now)
        run = before.get("flow_run_id") or "not started yet"
        logger.warning("%s: %s has the content of %s (%s, run %s): not loaded again, moved to %s (drop it as "
                       "again-%s to load it anyway)", kind, path.name, before["name"], before["outcome"], run,
                       target, path.name)
        self._emit(DUPLICATE, f"project.inbox.{kind}.{digest[:12]}", path.name, {
            "path": str(target), "name": path.name, "sha256": digest, "first_name": before["name"],
            "first_outcome": before["outcome"], "first_flow_run_id": before.get("flow_run_id"),
        }, str(uuid.uuid4()), now, quiet=True)

    def _announce(self, kind: str, claim: Claim, now: float) -> None:
        """Emit the claim's event (its run's trigger); recorded once the server took it."""
        payload = {"path": str(claim.path), "name": claim.name, "sha256": claim.sha256, "bytes": claim.size,
                   "again": claim.again}
        if self._emit(RECEIVED, f"project.inbox.{kind}.{claim.id}", claim.name, payload, claim.event_id, now):
            claim.emitted_at = now
            claim.save()

    def _emit(self, event: str, resource_id: str, name: str, payload: dict, event_id: str, now: float,
              quiet: bool = False) -> bool:
        body = [{"id": event_id, "occurred": _iso(now), "event": event, "payload": payload,
                 "resource": {"prefect.resource.id": resource_id, "prefect.resource.name": name}}]
        try:
            response = self.api.post("/events", json=body)
            response.raise_for_status()
            return True
        except httpx.HTTPError as exc:
            (logger.info if quiet else logger.warning)("could not emit %s for %s (%s)", event, name, exc)
            return False

    # -- following runs ----------------------------------------------------------------------------------------

    def _follow(self, kind: str, now: float) -> None:
        folder = self.folders[kind]
        claims = folder.claims()
        if not claims:
            return
        runs = self._runs(kind, min(claim.claimed_at for claim in claims))
        for claim in claims:
            if claim.emitted_at is None:
                self._announce(kind, claim, now)  # the same event id: the server ignores it if it had it
                continue
            found = runs.get(str(claim.path), [])
            if not found:
                if now - claim.emitted_at > self.resend_seconds:
                    logger.warning("%s: no run of %s for %s %.0f s after its event: announced again", kind,
                                   KINDS[kind].deployment, claim.name, now - claim.emitted_at)
                    claim.event_id, claim.emitted_at = str(uuid.uuid4()), None
                    claim.save()
                    self._announce(kind, claim, now)
                continue
            run, extra = found[0], found[1:]
            for other in extra:
                self._cancel_extra(kind, claim, other)
            if claim.flow_run_id != run["id"]:
                claim.flow_run_id = run["id"]
                claim.save()
                logger.info("%s: %s is run %s (%s) of %s", kind, claim.name, run["name"], run["id"],
                            KINDS[kind].deployment)
            if run["state_type"] in TERMINAL:
                self._finish(kind, claim, run, now)

    def _runs(self, kind: str, since: float) -> dict[str, list[dict]]:
        """The kind's deployment's runs expected to start since a little before `since`, by file path, earliest
        first."""
        body = {
            "flow_runs": {"deployment_id": {"any_": [self.deployments[kind]["id"]]},
                          "expected_start_time": {"after_": _iso(since - 300)}},
            "sort": "EXPECTED_START_TIME_ASC", "limit": 200,
        }
        response = self.api.post("/flow_runs/filter", json=body)
        response.raise_for_status()
        by_path: dict[str, list[dict]] = {}
        for run in response.json():
            value = (run.get("parameters") or {}).get(KINDS[kind].parameter)
            if value:
                by_path.setdefault(value, []).append(run)
        return by_path

    def _cancel_extra(self, kind: str, claim: Claim, run: dict) -> None:
        """A second run of the same claim (its event announced again while the first was slow): cancelled
        while it has not started; one already running fails on the moved file, loading nothing."""
        if run["state_type"] not in NOT_STARTED:
            return
        response = self.api.post(f"/flow_runs/{run['id']}/set_state", json={"state": {
            "type": "CANCELLED", "message": f"a second run for {claim.name}: the first one loads it"}, "force": True})
        if response.status_code < 300:
            logger.warning("%s: cancelled run %s, a second one for %s", kind, run["id"], claim.name)

    def _finish(self, kind: str, claim: Claim, run: dict, now: float) -> None:
        outcome = PROCESSED if run["state_type"] == "COMPLETED" else FAILED
        moved = self.folders[kind].finish(claim, outcome, run["id"])
        logger.info("%s: run %s of %s ended %s: moved to %s", kind, run["name"], claim.name, run["state_name"], moved)
        self._emit(FINISHED[outcome], f"project.inbox.{kind}.{claim.id}", claim.name, {
            "path": str(moved), "name": claim.name, "sha256": claim.sha256, "flow_run_id": run["id"],
            "state": run["state_name"],
        }, str(uuid.uuid4()), now, quiet=True)

    def _once(self, key: str, message: str, *args) -> None:
        if key not in self._told:
            self._told.add(key)
            logger.warning(message, *args)


def watch_forever(watcher: Watcher, heartbeat: Path, stop: threading.Event, poll_seconds: float = 0.5) -> None:
    """Look at the folders at every change watchfiles reports, and at least every `poll_seconds` (runs under
    way, files settling), touching `heartbeat` each time, until `stop` is set."""
    from watchfiles import watch

    roots = [folder.root for folder in watcher.folders.values()]
    watcher.tick()
    heartbeat.touch()
    for _changes in watch(*roots, recursive=False, yield_on_timeout=True, rust_timeout=int(poll_seconds * 1000),
                          debounce=200, step=50, stop_event=stop, raise_interrupt=False):
        watcher.tick()
        heartbeat.touch()


# -- the service ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunningWatcher:
    pid: int
    inboxes: dict[str, str]
    api_url: str


class InboxWatcherService(Service[RunningWatcher]):
    """The watcher of the drop folders `inboxes` (kind -> folder), state and log in `folder`
    (DATA_DIR/inbox-watcher), for the Prefect API of this process's PREFECT_API_URL when it starts."""

    name = "inbox watcher"
    state_file = STATE_FILE
    log_file = "inbox-watcher.log"

    def __init__(self, folder: Path, inboxes: dict[str, Path], start_timeout: float = 30.0):
        super().__init__(folder)
        self.inboxes = {kind: Path(path).resolve() for kind, path in inboxes.items()}
        self.start_timeout = start_timeout

    @property
    def heartbeat(self) -> Path:
        return self.folder / HEARTBEAT_FILE

    def _alive(self, since: float = 0.0) -> bool:
        try:
            beat = self.heartbeat.stat().st_mtime
        except FileNotFoundError:
            return False
        return beat >= since and time.time() - beat < ALIVE_SECONDS

    def find(self) -> RunningWatcher | None:
        state = self.state()
        pid = self.current_pid(state)
        if not state or pid is None or not self._alive():
            return None
        return RunningWatcher(pid, state["inboxes"], state["api_url"])

    def reuse(self, running: RunningWatcher) -> bool:
        wanted = {kind: str(path) for kind, path in self.inboxes.items()}
        return running.inboxes == wanted and running.api_url == os.environ.get("PREFECT_API_URL", "")

    def start(self) -> RunningWatcher:
        api_url = os.environ.get("PREFECT_API_URL")
        if not api_url:
            raise ValueError("the inbox watcher starts only for a Prefect API URL (PREFECT_API_URL)")
        for path in self.inboxes.values():
            DropFolder(path).ensure()
        self.heartbeat.unlink(missing_ok=True)
        started = time.time() - 1
        inboxes = {kind: str(path) for kind, path in self.inboxes.items()}
        command = [sys.executable, "-m", "deployments.inbox_watcher", "--state", str(self.folder)]
        for kind, path in inboxes.items():
            command += [f"--{kind}", path]
        pid = self.supervise(command, lambda: self._alive(started), self.start_timeout,
                             {"inboxes": inboxes, "api_url": api_url}, poll=0.2,
                             failure="the inbox watcher did not start")
        return RunningWatcher(pid, inboxes, api_url)

    def address(self, running: RunningWatcher) -> str:
        return ", ".join(f"{kind} {path}" for kind, path in running.inboxes.items())

    def note(self, running: RunningWatcher) -> str:
        return "; ".join(f"{kind}: {describe_counts(DropFolder(Path(path)).counts())}"
                         for kind, path in running.inboxes.items())


def describe_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{number} {what}" for what, number in counts.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", type=Path, required=True, help="the service's folder (its heartbeat file)")
    for kind in KINDS:
        parser.add_argument(f"--{kind}", type=Path, help=f"the drop folder of {kind} files")
    parser.add_argument("--settle-seconds", type=float, default=SETTLE_SECONDS,
                        help="how long a file's writer must have been quiet before it is taken")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    api_url = os.environ.get("PREFECT_API_URL")
    if not api_url:
        parser.error("PREFECT_API_URL is not set")
    inboxes = {kind: getattr(args, kind) for kind in KINDS if getattr(args, kind)}
    watcher = Watcher(inboxes, api_url, os.environ.get("PREFECT_API_AUTH_STRING"), args.settle_seconds)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    watcher.start()
    try:
        watch_forever(watcher, args.state / HEARTBEAT_FILE, stop)
    finally:
        watcher.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
