"""The identity and health check of a turnstile before its cache is trusted, on the emulator over HTTP and the
session's real Redis (no Prefect): what it costs, and each way a reset or replaced unit is caught."""

from __future__ import annotations

import threading
import uuid
from dataclasses import replace
from typing import Iterator

import pytest
import redis
from pydantic import SecretStr

from emulators.controlid import EmulatorConfig, RunningEmulator, run_in_thread
from operations.infra.http import RetryPolicy
from operations.turnstiles.client import ControlIdClient
from operations.turnstiles.cache import DeviceState, RegistrationCache
from operations.turnstiles.identity import (
    Logouts,
    any_cached,
    check_device,
    check_devices,
    turnstiles_with_work,
    with_checks,
)
from operations.turnstiles.participants import Participant
from operations.turnstiles.registration import RegistrationOptions, register_on_device

PEOPLE = [Participant(i + 2, f"R{i:05d}", f"Person {i}", 5000 + i, 1 + i % 3, None, None) for i in range(40)]


@pytest.fixture(scope="module")
def emulator() -> Iterator[RunningEmulator]:
    with run_in_thread(EmulatorConfig(devices=2)) as running:
        yield running


@pytest.fixture
def cache(redis_url: str, emulator: RunningEmulator) -> Iterator[RegistrationCache]:
    client = redis.Redis.from_url(redis_url)
    prefix = f"test-identity-{uuid.uuid4().hex[:6]}"
    yield RegistrationCache(client, prefix)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)
    emulator.control.wipe()


def _client(emulator: RunningEmulator, device: int = 0) -> ControlIdClient:
    return ControlIdClient(emulator.base_urls[device], "admin", SecretStr("admin"), name=f"gate-{device}")


def _fingerprints(people: list[Participant] = PEOPLE) -> dict[str, str]:
    return {p.registration: p.fingerprint() for p in people}


def _register(emulator: RunningEmulator, cache: RegistrationCache, device: int = 0) -> None:
    report = register_on_device(_client(emulator, device), f"gate-{device}", PEOPLE, cache, RegistrationOptions())
    assert report.created == len(PEOPLE) and not report.failures, report


def test_a_registered_turnstile_is_trusted_for_five_requests(emulator, cache):
    """Before the first registration nothing is cached: no device call, everyone to do. After it, the check
    learns the unit and passes: a session, its identity, the count probe and one sample read, whatever the
    participants."""
    first = check_device(_client(emulator), "gate-0", cache, _fingerprints())
    assert (first.reset, first.error, first.pending, first.requests) == ("", "", len(PEOPLE), 0)
    _register(emulator, cache)
    client = _client(emulator)
    check = check_device(client, "gate-0", cache, _fingerprints())
    assert (check.reset, check.error, check.pending, check.dropped) == ("", "", 0, 0)
    assert client.stats.requests == check.requests == 5  # login, system_information, probe, sample, logout
    assert check.identity and cache.identity("gate-0") == check.identity
    renamed = [replace(PEOPLE[0], name="Renamed"), *PEOPLE[1:]]
    assert check_device(_client(emulator), "gate-0", cache, _fingerprints(renamed)).pending == 1


def test_a_factory_reset_turnstile_is_caught_by_its_user_count(emulator, cache):
    _register(emulator, cache)
    emulator.control.wipe(0)
    check = check_device(_client(emulator), "gate-0", cache, _fingerprints())
    assert "fewer users than the 40" in check.reset, check
    assert (check.dropped, check.pending, cache.count("gate-0")) == (40, 40, 0)


def test_a_replaced_unit_is_caught_by_its_serial_and_a_dry_run_changes_nothing(emulator, cache):
    _register(emulator, cache)
    check_device(_client(emulator), "gate-0", cache, _fingerprints())  # the unit is known from an earlier run
    emulator.control.wipe(0, replace=True)
    known = cache.identity("gate-0")
    dry = check_device(_client(emulator), "gate-0", cache, _fingerprints(), dry_run=True)
    assert "another unit" in dry.reset and known in dry.reset
    assert (dry.dropped, dry.pending, cache.count("gate-0"), cache.identity("gate-0")) == (0, 40, 40, known)
    check = check_device(_client(emulator), "gate-0", cache, _fingerprints())
    assert "another unit" in check.reset and check.dropped == 40
    assert cache.identity("gate-0") == check.identity != known


def test_a_reset_unit_refilled_with_other_users_is_caught_by_the_sample(emulator, cache):
    """As many users as the cache confirmed, but not the cached ones (other ids): the count passes, the sample
    read back does not."""
    _register(emulator, cache)
    emulator.control.wipe(0)
    client = _client(emulator)
    client.write("users", [{"id": i + 1, "registration": f"X{i}", "name": f"Other {i}"} for i in range(45)])
    check = check_device(client, "gate-0", cache, _fingerprints())
    assert "lacks 8 of 8 cached participants" in check.reset, check
    assert check.dropped == 40


def test_an_unreachable_turnstile_is_read_in_full_and_keeps_its_cache(emulator, cache):
    """A check the device does not answer says why, drops nothing, and sends the turnstile to its own work in
    full (verify); a turnstile whose participants are all confirmed needs no work and reports "cached"."""
    _register(emulator, cache, 0)
    _register(emulator, cache, 1)
    emulator.control.set_down(1)
    try:
        clients = {f"gate-{d}": (lambda d=d: ControlIdClient(emulator.base_urls[d], "admin", SecretStr("admin"),
                                                             name=f"gate-{d}", retry=RetryPolicy(attempts=1)))
                   for d in (0, 1)}
        checks = {name: c.to_json() for name, c in check_devices(clients, cache, PEOPLE).items()}
    finally:
        emulator.control.set_down(1, False)
    assert checks["gate-1"]["error"] and not checks["gate-1"]["reset"] and cache.count("gate-1") == 40
    work = turnstiles_with_work(["gate-0", "gate-1"], checks, RegistrationOptions())
    assert list(work) == ["gate-1"] and work["gate-1"].verify
    reports = with_checks(["gate-0", "gate-1"], {}, checks)
    assert [(r["device"], r["status"], r["cached"]) for r in reports][0] == ("gate-0", "cached", 40)
    assert reports[0]["requests"] == 5


def test_any_cached_says_whether_a_check_is_needed_at_all(emulator, cache):
    """A run whose cache holds nothing of any turnstile trusts nothing: the flow then starts no check task."""
    assert not any_cached(cache, ["gate-0", "gate-1"])
    _register(emulator, cache, device=1)
    assert cache.counts(["gate-0", "gate-1"]) == {"gate-0": 0, "gate-1": len(PEOPLE)}
    assert any_cached(cache, ["gate-0", "gate-1"]) and not any_cached(cache, ["gate-0"])


def test_the_pending_counts_inside_redis_equal_the_per_device_count(cache):
    """`pendings` (one round trip, counted by a script) answers what `pending` answers for each device: a
    participant missing, one confirmed with another fingerprint (the suffix must match whole, not a tail of it),
    one with another user id but the same fingerprint (still held); registrations holding a newline take the
    per-argument way with the same answers."""
    fingerprints = _fingerprints()
    cache.confirm("gate-0", [(p.registration, 100 + i, fingerprints[p.registration]) for i, p in enumerate(PEOPLE)])
    cache.confirm("gate-1", [(p.registration, 200 + i, fingerprints[p.registration]) for i, p in enumerate(PEOPLE[5:])])
    changed = fingerprints[PEOPLE[7].registration]
    cache.confirm("gate-1", [(PEOPLE[7].registration, 1, ("1" if changed[0] == "0" else "0") + changed[1:]),
                             (PEOPLE[8].registration, 1, fingerprints[PEOPLE[8].registration][4:])])
    expected = {"gate-0": 0, "gate-1": 5 + 2, "gate-2": len(PEOPLE)}
    assert {d: cache.pending(d, fingerprints) for d in expected} == expected
    assert cache.pendings(list(expected), fingerprints) == expected
    odd = {**fingerprints, "two\nlines": "0123456789abcdef"}
    assert cache.pendings(list(expected), odd) == {d: n + 1 for d, n in expected.items()}
    assert cache.pendings([], fingerprints) == {} and cache.pendings(["gate-0"], {}) == {"gate-0": 0}


def test_a_settled_turnstile_is_known_without_counting_until_its_cache_is_written(cache):
    """A count that finds nothing pending marks the turnstile settled for that file at the hash's version: the
    next `pendings` given the states answers 0 from the mark alone (a change made behind the cache's back, which
    no write of the project makes, is not seen), and any confirm or drop moves the version on, so the mark stops
    counting and the participants are compared again. Another file (here one participant renamed) is compared."""
    fingerprints = _fingerprints()
    cache.confirm("gate-0", [(p.registration, 100 + i, fingerprints[p.registration]) for i, p in enumerate(PEOPLE)])
    assert cache.pendings(["gate-0"], fingerprints, cache.states(["gate-0"], 0)) == {"gate-0": 0}
    states = cache.states(["gate-0"], 0)
    assert states["gate-0"].settled and states["gate-0"].settled.endswith(f":{states['gate-0'].version}")
    cache.client.hdel(cache._device_key("gate-0"), PEOPLE[0].registration)  # behind the cache's back
    assert cache.pendings(["gate-0"], fingerprints, states) == {"gate-0": 0}, "the mark answers alone"
    assert cache.pendings(["gate-0"], fingerprints) == {"gate-0": 1}, "without the states: counted"
    renamed = _fingerprints([replace(PEOPLE[1], name="Renamed"), *PEOPLE[2:]])
    assert cache.pendings(["gate-0"], renamed, states) == {"gate-0": 1}, "another file is compared"
    cache.confirm("gate-0", [(PEOPLE[0].registration, 100, fingerprints[PEOPLE[0].registration])])
    assert cache.pendings(["gate-0"], fingerprints, states) == {"gate-0": 0}
    cache.confirm("gate-0", [(PEOPLE[5].registration, 105, "0" * 16)])  # a write: the old mark no longer holds
    assert cache.pendings(["gate-0"], fingerprints, cache.states(["gate-0"], 0)) == {"gate-0": 1}
    cache.forget_device("gate-0")
    assert cache.states(["gate-0"], 8)["gate-0"] == DeviceState(0, None, {}, states["gate-0"].version + 3,
                                                                states["gate-0"].settled)


def test_a_turnstile_with_no_work_logs_out_while_the_run_goes_on(emulator, cache):
    """With `Logouts`, the check of a turnstile left with no work returns before its logout is sent (the logout
    counted among its requests) and `wait` sees it done; a turnstile with work logs out before its check returns,
    so its own task's login never meets the check's logout on the device."""
    _register(emulator, cache, 0)
    _register(emulator, cache, 1)
    user_id = cache.user_ids([PEOPLE[0].registration])[PEOPLE[0].registration]
    cache.confirm("gate-1", [(PEOPLE[0].registration, user_id, "0" * 16)])  # gate-1: one participant to write
    emulator.control.reset_stats()
    release = threading.Event()

    class HeldLogout(ControlIdClient):
        def logout(self) -> None:
            release.wait(10)
            super().logout()

    def held(device: int) -> ControlIdClient:
        return HeldLogout(emulator.base_urls[device], "admin", SecretStr("admin"), name=f"gate-{device}")

    with Logouts() as logouts:
        checks = check_devices({"gate-0": lambda: held(0)}, cache, PEOPLE, logouts=logouts)
        assert "/logout.fcgi" not in emulator.control.stats(0)["routes"], "gate-0's check returned before its logout"
        release.set()
        checks.update(check_devices({"gate-1": lambda: held(1)}, cache, PEOPLE, logouts=logouts))
        assert emulator.control.stats(1)["routes"]["/logout.fcgi"] == {"200": 1}
    assert emulator.control.stats(0)["routes"]["/logout.fcgi"] == {"200": 1}
    assert (checks["gate-0"].pending, checks["gate-1"].pending) == (0, 1)
    assert checks["gate-0"].requests == checks["gate-1"].requests == 5
    assert [emulator.control.stats(d)["total"] for d in (0, 1)] == [5, 5]
