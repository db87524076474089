"""Whether the cache may be trusted for a turnstile: the unit's identity and a few cheap health checks, made
before any participant is skipped as cached, and how many participants each turnstile still needs.

A turnstile that was reset (its users gone) or replaced (another unit at the same address) would otherwise keep
its cache entries, and a normal run would skip people the device no longer holds. Each check costs a session and
three reads, whatever the number of participants:

1. `system_information.fcgi`: the unit's serial and device id, against those the cache's entries were confirmed
   on (a replaced unit answers others);
2. the user at position (cached count - 1) in id order (`load_objects` with `limit` 1): none means the device
   holds fewer users than the cache remembers confirming (a reset, or users deleted on the device);
3. a random sample of the cached participants read back by user id (`SAMPLE_SIZE`): each must be there under
   its registration (a reset unit refilled by hand, or users renumbered).

What the cache holds of every turnstile (count, identity, sample, settled mark) is read in one round trip before
the devices are asked; the participants each turnstile still needs are counted beside the device calls (none,
without comparing every participant, when the turnstile is marked settled for the file: `RegistrationCache`).
A turnstile left with no work logs out without the run waiting (`Logouts`; the run waits before it ends); one
with work logs out before the check returns, so its own task never meets the check's logout on the device.

On a mismatch the turnstile's entries are dropped (not in a dry run), so every participant is read and written
again; the identity is remembered once known. A turnstile with nothing cached costs no check (nothing is
trusted; its identity is learnt by the next run's check). A check the device does not answer leaves the cache in place and
says why: the turnstile's own work then meets the same device and reports it.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

from operations.turnstiles.cache import DeviceState, RegistrationCache
from operations.turnstiles.client import ControlIdClient, DeviceError, DeviceRefused
from operations.turnstiles.participants import Participant
from operations.turnstiles.registration import DeviceReport, RegistrationOptions, Roster

SAMPLE_SIZE = 8  # cached participants read back per turnstile and run (one request: ids in one `where` list)
LOGOUT_WAIT_SECONDS = 5.0  # how long the end of a run waits for the logouts sent in the background


@dataclass
class DeviceCheck:
    """What the check of one turnstile found. `reset`: why its cache entries were not trusted ("" when they
    were); `pending`: participants it needs (not confirmed in the cache as they are in the file); `error`: the
    check could not be made."""

    device: str
    participants: int = 0
    pending: int = 0
    identity: str = ""
    reset: str = ""
    dropped: int = 0
    error: str = ""
    requests: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def device_identity(client: ControlIdClient) -> str:
    """'<serial> / <device id>' as the unit answers them ("" when it does not expose them)."""
    try:
        info = client.call("/system_information.fcgi", {})
    except DeviceRefused:  # a firmware without the call: the other checks still hold
        return ""
    serial, device_id = info.get("serial"), info.get("device_id")
    return f"{serial} / {device_id}" if serial or device_id else ""


def reset_reason(client: ControlIdClient, device: str, state: DeviceState, identity: str) -> str:
    """Why the device's cache entries cannot be trusted, or "" when the checks pass; `state`: what the cache
    holds of the device (its count, the unit's identity, a random sample)."""
    if identity and state.identity and identity != state.identity:
        return f"{device} is another unit (serial / device id {identity}; the cache was written to {state.identity})"
    cached = state.count
    if not cached:
        return ""
    probe = client.call("/load_objects.fcgi", {"object": "users", "limit": 1, "offset": cached - 1})
    if not probe.get("users"):
        return f"{device} holds fewer users than the {cached:,} the cache confirmed there (reset or emptied)"
    sample = state.sample
    if not sample:
        return ""
    found = client.call("/load_objects.fcgi", {"object": "users", "where": {"users": {"id": sorted(sample.values())}}})
    held = {user["id"]: user.get("registration") for user in found.get("users", [])}
    missing = sorted(registration for registration, user_id in sample.items() if held.get(user_id) != registration)
    if missing:
        return (f"{device} lacks {len(missing)} of {len(sample)} cached participants read back "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    return ""


class Logouts:
    """Sessions ended without the run waiting on them: the logout of a checked turnstile that has no more work in
    the run (no other request of the run follows on that device), sent while the run goes on. `wait()` (or the
    end of a `with Logouts() as logouts:` block) before the run ends. Opaque to Prefect (no dataclass)."""

    def __init__(self, wait_seconds: float = LOGOUT_WAIT_SECONDS):
        self.wait_seconds = wait_seconds
        self._sent: list[threading.Thread] = []
        self._lock = threading.Lock()

    def end(self, client: ControlIdClient) -> None:
        """Send `client`'s logout in the background (best effort, as `ControlIdClient.logout`)."""
        thread = threading.Thread(target=client.logout, name=f"logout-{client.name}", daemon=True)
        with self._lock:
            self._sent.append(thread)
        thread.start()

    def wait(self) -> None:
        """Wait for the logouts sent (at most `wait_seconds` in all: a device that stops answering keeps its
        session until the device's own expiry)."""
        deadline = time.monotonic() + self.wait_seconds
        with self._lock:
            sent, self._sent = self._sent, []
        for thread in sent:
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> Logouts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wait()


def check_device(client: ControlIdClient, device: str, cache: RegistrationCache, fingerprints: dict[str, str],
                 dry_run: bool = False, pending: Callable[[], int] | None = None,
                 state: DeviceState | None = None, logouts: Logouts | None = None) -> DeviceCheck:
    """Check one turnstile (identity, count, sample), drop its cache entries on a mismatch (not in a dry run)
    and count the participants it needs. `fingerprints`: registration -> fingerprint of the file's
    participants; `pending`: that count as read beside the device calls (by default read after them); `state`:
    what the cache holds of the device (read here by default); `logouts`: where a turnstile left with no work
    ends its session without the caller waiting (by default the logout is waited for). Never raises for the
    device: an unanswered check is `error`, and the cache is left alone."""
    return _check(client, device, cache, state or cache.states([device], SAMPLE_SIZE)[device], len(fingerprints),
                  pending or (lambda: cache.pending(device, fingerprints)), dry_run, logouts)


def _check(client: ControlIdClient, device: str, cache: RegistrationCache, state: DeviceState, participants: int,
           pending: Callable[[], int], dry_run: bool, logouts: Logouts | None) -> DeviceCheck:
    """`check_device` with the cache's state of the device read and the participants counted."""
    check = DeviceCheck(device, participants=participants, pending=participants)
    if not state.count:  # nothing cached to trust: no check needed, every participant is to do
        return check
    try:
        check.identity = device_identity(client)
        check.reset = reset_reason(client, device, state, check.identity)
    except DeviceError as exc:
        check.error = str(exc)
    except BaseException:
        client.logout()
        raise
    try:
        if not check.reset:
            check.pending = pending()
    finally:
        # a turnstile left with work logs out before its own task logs in (one request at a time on a device)
        if logouts is not None and not (check.reset or check.error or check.pending):
            check.requests = client.stats.requests + 1  # the logout, sent without waiting on it
            logouts.end(client)
        else:
            client.logout()
            check.requests = client.stats.requests
    if check.reset and not dry_run:
        check.dropped = cache.forget_device(device)
    if check.identity and check.identity != state.identity and not dry_run and not check.error:
        cache.remember_identity(device, check.identity)
    return check


def check_devices(clients: dict[str, Callable[[], ControlIdClient]], cache: RegistrationCache,
                  participants: list[Participant] | Roster, dry_run: bool = False,
                  logouts: Logouts | None = None) -> dict[str, DeviceCheck]:
    """`check_device` on every turnstile at once (one thread each, the checks are a few reads); `clients`:
    turnstile name -> a function building its client; `participants`: a list or the run's `Roster` (whose
    fingerprints the device work reuses); `logouts`: as `check_device`'s.

    What the cache holds of every turnstile is read first, in one round trip; then the devices are asked while
    the participants' fingerprints are worked out and every trusted turnstile's pending count is counted inside
    Redis (one script call each, one round trip for all)."""
    roster = participants if isinstance(participants, Roster) else Roster(participants)
    if not clients:
        return {}
    states = cache.states(list(clients), SAMPLE_SIZE)

    def check(name: str, make: Callable[[], ControlIdClient], pending: Callable[[], int]) -> DeviceCheck:
        try:
            client = make()
        except ValueError as exc:  # a block that cannot make a client (no password): its own task says so
            return DeviceCheck(name, len(roster), len(roster), error=str(exc))
        return _check(client, name, cache, states[name], len(roster), pending, dry_run, logouts)

    def count(trusted: list[str]) -> None:
        try:
            counts.set_result(cache.pendings(trusted, roster.fingerprints, states, roster.digest()))
        except BaseException as exc:  # the checks waiting on it raise it
            counts.set_exception(exc)

    counts: Future[dict[str, int]] = Future()
    with ThreadPoolExecutor(1, thread_name_prefix="turnstile-pending") as counting, \
            ThreadPoolExecutor(min(16, len(clients)), thread_name_prefix="turnstile-check") as pool:
        futures = {name: pool.submit(check, name, make, lambda name=name: counts.result()[name])
                   for name, make in clients.items()}  # the devices first: the counting is not on their path
        counting.submit(count, [name for name in clients if states[name].count])
        return {name: future.result() for name, future in futures.items()}


def any_cached(cache: RegistrationCache, names: list[str]) -> bool:
    """Whether the cache holds any participant of any of these turnstiles (if not, no check is needed: every
    participant is to do everywhere). One round trip."""
    return any(cache.counts(names).values())


def turnstiles_with_work(names: list[str], checks: dict[str, dict], options: RegistrationOptions
                         ) -> dict[str, RegistrationOptions]:
    """The turnstiles that need their own work, each with its options: every one when there are no checks (the
    cache is not consulted); else those with participants pending, reset or not checked, the last two read in
    full (`verify`) rather than trusting the cache."""
    if not checks:
        return {name: options for name in names}
    return {name: replace(options, verify=True) if checks[name]["reset"] or checks[name]["error"] else options
            for name in names if checks[name]["pending"] or checks[name]["reset"] or checks[name]["error"]}


def with_checks(names: list[str], reports: dict[str, dict], checks: dict[str, dict]) -> list[dict]:
    """Every turnstile's report in `names` order: those worked on with their check added (its requests and
    login, `reset`: why its cache was not trusted), the others "cached" (every participant confirmed)."""
    out = []
    for name in names:
        check = checks.get(name)
        report = reports.get(name)
        if report is None:
            report = DeviceReport(name, participants=check["participants"], cached=check["participants"],
                                  status="cached").to_json()
        if check is not None:
            report = {**report, "requests": report["requests"] + check["requests"],
                      "logins": report["logins"] + (1 if check["requests"] else 0), "reset": check["reset"]}
        out.append({"reset": "", **report})
    return out
