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

On a mismatch the turnstile's entries are dropped (not in a dry run), so every participant is read and written
again; the identity is remembered once known. A turnstile with nothing cached costs no check (nothing is
trusted; its identity is learnt by the next run's check). A check the device does not answer leaves the cache in place and
says why: the turnstile's own work then meets the same device and reports it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

from operations.turnstiles.cache import RegistrationCache
from operations.turnstiles.client import ControlIdClient, DeviceError, DeviceRefused
from operations.turnstiles.participants import Participant
from operations.turnstiles.registration import DeviceReport, RegistrationOptions, Roster

SAMPLE_SIZE = 8  # cached participants read back per turnstile and run (one request: ids in one `where` list)


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


def reset_reason(client: ControlIdClient, device: str, cache: RegistrationCache, identity: str,
                 sample_size: int = SAMPLE_SIZE) -> str:
    """Why the device's cache entries cannot be trusted, or "" when the checks pass."""
    remembered = cache.identity(device)
    if identity and remembered and identity != remembered:
        return f"{device} is another unit (serial / device id {identity}; the cache was written to {remembered})"
    cached = cache.count(device)
    if not cached:
        return ""
    probe = client.call("/load_objects.fcgi", {"object": "users", "limit": 1, "offset": cached - 1})
    if not probe.get("users"):
        return f"{device} holds fewer users than the {cached:,} the cache confirmed there (reset or emptied)"
    sample = cache.sample(device, sample_size)
    if not sample:
        return ""
    found = client.call("/load_objects.fcgi", {"object": "users", "where": {"users": {"id": sorted(sample.values())}}})
    held = {user["id"]: user.get("registration") for user in found.get("users", [])}
    missing = sorted(registration for registration, user_id in sample.items() if held.get(user_id) != registration)
    if missing:
        return (f"{device} lacks {len(missing)} of {len(sample)} cached participants read back "
                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    return ""


def check_device(client: ControlIdClient, device: str, cache: RegistrationCache, fingerprints: dict[str, str],
                 dry_run: bool = False, pending: Callable[[], int] | None = None) -> DeviceCheck:
    """Check one turnstile (identity, count, sample), drop its cache entries on a mismatch (not in a dry run)
    and count the participants it needs. `fingerprints`: registration -> fingerprint of the file's
    participants; `pending`: that count as read beside the device calls (by default read after them). Never
    raises for the device: an unanswered check is `error`, and the cache is left alone."""
    check = DeviceCheck(device, participants=len(fingerprints), pending=len(fingerprints))
    if not cache.count(device):  # nothing cached to trust: no check needed, every participant is to do
        return check
    try:
        try:
            check.identity = device_identity(client)
            check.reset = reset_reason(client, device, cache, check.identity)
        finally:
            client.logout()
    except DeviceError as exc:
        check.error = str(exc)
    if check.reset and not dry_run:
        check.dropped = cache.forget_device(device)
    if check.identity and not dry_run and not check.error:
        cache.remember_identity(device, check.identity)
    if not check.reset:
        check.pending = pending() if pending is not None else cache.pending(device, fingerprints)
    check.requests = client.stats.requests
    return check


def check_devices(clients: dict[str, Callable[[], ControlIdClient]], cache: RegistrationCache,
                  participants: list[Participant] | Roster, dry_run: bool = False) -> dict[str, DeviceCheck]:
    """`check_device` on every turnstile at once (one thread each, the checks are a few reads); `clients`:
    turnstile name -> a function building its client; `participants`: a list or the run's `Roster` (whose
    fingerprints the device work reuses)."""
    fingerprints = (participants if isinstance(participants, Roster) else Roster(participants)).fingerprints()
    if not clients:
        return {}
    def check(name: str, make: Callable[[], ControlIdClient], pending: Callable[[], int]) -> DeviceCheck:
        try:
            client = make()
        except ValueError as exc:  # a block that cannot make a client (no password): its own task says so
            return DeviceCheck(name, len(fingerprints), len(fingerprints), error=str(exc))
        return check_device(client, name, cache, fingerprints, dry_run, pending)

    cached = cache.counts(list(clients))  # one round trip for every turnstile

    # what a trusted cache leaves to do on each turnstile: counted inside Redis for all of them at once, while
    # the devices answer the checks
    with ThreadPoolExecutor(1, thread_name_prefix="turnstile-pending") as counting, \
            ThreadPoolExecutor(min(16, len(clients)), thread_name_prefix="turnstile-check") as pool:
        counts = counting.submit(cache.pendings, [name for name in clients if cached[name]], fingerprints)
        futures = {name: pool.submit(check, name, make, lambda name=name: counts.result()[name])
                   for name, make in clients.items()}
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
