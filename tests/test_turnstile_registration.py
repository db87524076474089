"""Registering participants on one turnstile, against the emulator over real HTTP and the real Redis: batches,
the cache, changed data, a bad card isolated, an expired session, a lost answer retried, an unreachable device,
a dry run, the per-device request budget, a stop between batches, and figures kept across attempts."""

from __future__ import annotations

import uuid
from dataclasses import replace

import orjson
import pytest
from pydantic import SecretStr

from emulators.controlid import EmulatorConfig, run_in_thread
from operations.infra.http import HttpSettings, RequestPacer, RetryPolicy
from operations.turnstiles.cache import RegistrationCache
from operations.turnstiles.client import ControlIdClient
from operations.turnstiles.participants import read_participants
from operations.cancellation import after
from operations.turnstiles import registration
from operations.turnstiles.registration import (
    DeviceFailed,
    DeviceTally,
    RegistrationOptions,
    Roster,
    _encoded_batches,
    register_on_device,
)
from operations.turnstiles.sample import write_participants_file

QUICK_RETRY = RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05)


@pytest.fixture
def emulator():
    with run_in_thread(EmulatorConfig(devices=2, latency_ms=0)) as running:
        yield running


@pytest.fixture
def cache(redis_client):
    prefix = f"test-turnstiles-{uuid.uuid4().hex[:8]}"
    yield RegistrationCache(redis_client, prefix)
    for key in redis_client.scan_iter(f"{prefix}:*"):
        redis_client.delete(key)


def _client(emulator, device: int = 0, **kwargs) -> ControlIdClient:
    return ControlIdClient(emulator.base_urls[device], "admin", SecretStr("admin"), name=f"device-{device}",
                           http=HttpSettings(connect_timeout=1, read_timeout=2), retry=QUICK_RETRY, **kwargs)


def _participants(tmp_path, count: int = 300, **kwargs):
    path = tmp_path / f"participants-{uuid.uuid4().hex[:6]}.csv"
    write_participants_file(path, count, **kwargs)
    return read_participants(path).participants


def _on_device(emulator, device: int = 0) -> dict[str, dict]:
    users = emulator.control.users(device)
    registrations = [u["registration"] for u in users]
    assert len(registrations) == len(set(registrations)), "a registration is on the device twice"
    return {u["registration"]: u for u in users}


def test_everyone_is_registered_in_batches_and_then_the_cache_skips_them(emulator, cache, tmp_path):
    people = _participants(tmp_path)
    client = _client(emulator)
    report = register_on_device(client, "device-0", people, cache, RegistrationOptions())
    assert (report.created, report.cached, report.unchanged, report.failures) == (300, 0, 0, [])
    assert report.cards == sum(p.card is not None for p in people) and report.groups == sum(p.group is not None
                                                                                           for p in people)
    held = _on_device(emulator)
    for p in people:
        user = held[p.registration]
        assert user["name"] == p.name and user.get("begin_time", 0) == (p.begin or 0)
        assert user["cards"] == ([p.card] if p.card else [])
    assert report.writes == 2 * 3  # 300 users, cards and links in batches of 250

    again = register_on_device(_client(emulator), "device-0", people, cache, RegistrationOptions())
    assert (again.cached, again.created, again.requests) == (300, 0, 0), "cached pairs cost no device call"

    checked = register_on_device(_client(emulator), "device-0", people, cache, RegistrationOptions(skip_cache=True))
    assert (checked.cached, checked.unchanged, checked.writes) == (0, 300, 0)
    assert checked.requests > 0


def test_changed_names_are_written_again_and_only_they(emulator, cache, tmp_path):
    path = tmp_path / "people.csv"
    write_participants_file(path, 100)
    register_on_device(_client(emulator), "device-0", read_participants(path).participants, cache,
                       RegistrationOptions())
    write_participants_file(path, 100, rename_every=10)
    renamed = read_participants(path).participants
    report = register_on_device(_client(emulator), "device-0", renamed, cache, RegistrationOptions())
    assert (report.cached, report.updated, report.created) == (90, 10, 0)
    held = _on_device(emulator)
    assert all(held[p.registration]["name"] == p.name for p in renamed)


def test_a_card_another_user_holds_fails_alone_and_the_rest_of_its_batch_is_registered(emulator, cache, tmp_path):
    people = _participants(tmp_path, 40)
    victim = people[7]
    squatter = _client(emulator)
    squatter.write("users", [{"id": 5, "registration": "SQUATTER", "name": "Someone else"}])
    squatter.write("cards", [{"value": victim.card, "user_id": 5}], create_only=True)

    report = register_on_device(_client(emulator), "device-0", people, cache, RegistrationOptions())
    assert [(registration, row) for registration, row, _ in report.failures] == [
        (victim.registration, victim.row_number)]
    assert report.failures[0][2] == f"cards: card {victim.card} is held by 'SQUATTER' (user id 5) on device-0"
    held = _on_device(emulator)
    assert len(held) == 41 and all(held[p.registration]["cards"] for p in people if p is not victim)
    assert held[victim.registration]["groups"] == [victim.group], "a refused card does not stop the group link"
    assert held["SQUATTER"]["cards"] == [victim.card], "a holder the project never registered keeps the card"
    assert victim.registration not in cache.confirmed("device-0", [victim.registration])


def test_an_expired_session_is_renewed_once_and_the_run_goes_on(emulator, cache, tmp_path):
    client = _client(emulator)
    client.login()
    emulator.control.expire_sessions()
    report = register_on_device(client, "device-0", _participants(tmp_path, 20), cache, RegistrationOptions())
    assert report.created == 20 and report.logins == 2 and not report.failures


def test_a_write_whose_answer_was_lost_is_retried_without_failing_or_duplicating(emulator, cache, tmp_path):
    emulator.control.add_fault(path="/create_objects.fcgi", kind="drop_after_commit", times=2)
    people = _participants(tmp_path, 60)
    report = register_on_device(_client(emulator), "device-0", people, cache, RegistrationOptions())
    assert report.failures == [] and report.created == 60 and report.retries >= 2
    held = _on_device(emulator)
    assert len(held) == 60 and all(len(held[p.registration]["cards"]) == 1 for p in people if p.card)


def test_5xx_answers_are_retried(emulator, cache, tmp_path):
    emulator.control.configure(error_rate_5xx=0.3)
    report = register_on_device(_client(emulator), "device-0", _participants(tmp_path, 50), cache,
                                RegistrationOptions(batch_size=10))
    assert report.failures == [] and report.created == 50 and report.retries > 0


def test_an_unreachable_turnstile_fails_after_its_retries(emulator, cache, tmp_path):
    emulator.control.set_down(1)
    with pytest.raises(DeviceFailed) as failed:
        register_on_device(_client(emulator, 1), "device-1", _participants(tmp_path, 5), cache, RegistrationOptions())
    assert failed.value.transient and failed.value.report.status == "failed"
    assert "admin" not in str(failed.value)


def test_a_dry_run_reports_the_plan_and_writes_nothing(emulator, cache, tmp_path):
    people = _participants(tmp_path, 30)
    register_on_device(_client(emulator), "device-0", people[:10], cache, RegistrationOptions())
    emulator.control.reset_stats()
    plan = register_on_device(_client(emulator), "device-0", people, cache, RegistrationOptions(dry_run=True))
    assert (plan.status, plan.cached, plan.created, plan.writes) == ("dry-run", 10, 20, 0)
    assert len(_on_device(emulator)) == 10


def test_requests_in_flight_never_exceed_the_device_budget(emulator, cache, tmp_path):
    emulator.control.configure(latency_ms=5, max_concurrent_requests=4)
    pacer = RequestPacer(per_second=1000, in_flight=2)
    client = _client(emulator, limiter=pacer.slot)
    report = register_on_device(client, "device-0", _participants(tmp_path, 400), cache,
                                RegistrationOptions(batch_size=20, concurrency=6))
    assert report.created == 400
    stats = emulator.control.stats(0)
    assert 1 <= stats["peak_in_flight"] <= 2, stats


def test_once_asked_to_stop_no_new_batch_starts_and_what_was_written_is_reported(emulator, cache, tmp_path):
    people = _participants(tmp_path, 100)
    # asked before the device work, then before each batch: stops before the 4th users batch
    report = register_on_device(_client(emulator), "device-0", people, cache, RegistrationOptions(batch_size=10),
                                should_stop=after(4))
    assert (report.status, report.error) == ("cancelled", "cancelled before the next users batch on device-0")
    assert report.created == len(_on_device(emulator)) == 30 and report.cards == 0
    assert emulator.control.stats(0)["write_calls"] == 3
    assert cache.confirmed("device-0", [p.registration for p in people]) == {}, "nothing confirmed half-way"


def test_a_tally_handed_to_every_attempt_counts_what_all_of_them_wrote(emulator, cache, tmp_path):
    people = _participants(tmp_path, 100)
    emulator.control.add_fault(path="/create_objects.fcgi", device=0, status=503, skip=3, times=4)
    tally = DeviceTally()
    with pytest.raises(DeviceFailed) as failed:  # the 4th users batch: 503 past the client's 4 attempts (a batch
        # already started alongside it is written and counted)
        register_on_device(_client(emulator), "device-0", people, cache, RegistrationOptions(batch_size=10),
                           tally=tally)
    first = failed.value.report.created
    assert failed.value.transient and 0 < first == len(_on_device(emulator)) < 100
    report = register_on_device(_client(emulator), "device-0", people, cache, RegistrationOptions(batch_size=10),
                                tally=tally)
    assert (report.created, report.unchanged, report.status, tally.attempts) == (100, 0, "done", 2)
    assert report.cards == sum(p.card is not None for p in people)
    assert report.writes == emulator.control.stats(0)["write_calls"], "every attempt's requests are counted"


def _moved(people, every: int, **changes):
    """`people` with every `every`-th participant changed."""
    return [replace(p, **changes) if i % every == 0 else p for i, p in enumerate(people)]


def test_groups_follow_the_file_for_the_managed_groups_and_hand_made_links_stay(emulator, cache, tmp_path):
    people = _participants(tmp_path, 60, groups=(1,))
    register_on_device(_client(emulator), "device-0", people, cache, RegistrationOptions())
    operator = _client(emulator)  # a link made by hand to a group the file never names
    operator.write("user_groups", [{"user_id": _on_device(emulator)[people[0].registration]["id"], "group_id": 3}])
    moved = _moved(people, 3, group=2)  # 20 move from group 1 to group 2

    plan = register_on_device(_client(emulator), "device-0", moved, cache, RegistrationOptions(dry_run=True))
    assert (plan.status, plan.groups, plan.groups_removed, plan.writes) == ("dry-run", 20, 20, 0)
    plan = register_on_device(_client(emulator), "device-0", moved, cache,
                              RegistrationOptions(dry_run=True, managed_groups=(2, 3)))
    assert (plan.groups, plan.groups_removed) == (20, 1), "group 1 unmanaged: only the link to 3 goes"

    emulator.control.reset_stats()
    report = register_on_device(_client(emulator), "device-0", moved, cache, RegistrationOptions())
    assert (report.cached, report.groups, report.groups_removed, report.failures) == (40, 20, 20, [])
    held = _on_device(emulator)
    assert {p.registration: held[p.registration]["groups"] for p in moved} == {
        p.registration: ([p.group, 3] if p is moved[0] else [p.group]) for p in moved}
    assert len(held) == 60, "no person is destroyed"
    assert emulator.control.stats(0)["write_calls"] == 2, "one removal per group and one batch of links"


def test_a_missing_group_is_named_and_the_user_and_card_count_as_written(emulator, cache, tmp_path):
    people = _moved(_participants(tmp_path, 30), 10, group=99)
    report = register_on_device(_client(emulator), "device-0", people, cache, RegistrationOptions())
    assert (report.created, report.cards) == (30, 30)
    assert sorted(report.failures) == sorted(
        (p.registration, p.row_number, "groups: group 99 does not exist on device-0") for p in people if p.group == 99)
    held = _on_device(emulator)
    assert all(held[p.registration]["cards"] == [p.card] for p in people)
    assert set(cache.confirmed("device-0", [p.registration for p in people])) == {
        p.registration for p in people if p.group != 99}, "a participant written in part is tried again"


def test_card_swaps_resolve_in_one_run_and_a_card_of_someone_no_longer_listed_is_freed(emulator, cache, tmp_path):
    people = _participants(tmp_path, 40)
    register_on_device(_client(emulator), "device-0", people, cache, RegistrationOptions())
    swapped = list(people[:-1])  # the last participant leaves the file; the first takes their card
    for a, b in [(1, 2), (3, 4), (5, 6)]:
        swapped[a], swapped[b] = replace(people[a], card=people[b].card), replace(people[b], card=people[a].card)
    swapped[0] = replace(people[0], card=people[-1].card)
    swapped[7] = replace(people[7], card=people[8].card)  # held by someone the file still lists, keeping it
    emulator.control.reset_stats()
    report = register_on_device(_client(emulator), "device-0", swapped, cache, RegistrationOptions())
    assert report.failures == [(people[7].registration, people[7].row_number,
                                f"cards: card {people[8].card} is held by '{people[8].registration}' (user id "
                                f"{_on_device(emulator)[people[8].registration]['id']}) on device-0")]
    assert (report.cards, report.cards_freed) == (7, 1)
    held = _on_device(emulator)
    assert all(held[p.registration]["cards"] == [p.card] for p in swapped if p is not swapped[7])
    assert held[people[7].registration]["cards"] == [people[7].card], "a refused card keeps the old one"
    assert held[people[-1].registration]["cards"] == [] and held[people[-1].registration]["name"] == people[-1].name
    assert emulator.control.stats(0)["write_calls"] == 2, "card changes in one removal and one batch"


def test_a_lost_answer_of_250_objects_costs_a_few_requests(emulator, cache, tmp_path):
    people = _participants(tmp_path, 250)
    emulator.control.add_fault(path="/create_objects.fcgi", device=0, kind="drop_after_commit", times=1)
    report = register_on_device(_client(emulator), "device-0", people, cache, RegistrationOptions())
    assert (report.created, report.failures) == (250, [])
    # login, the users read, the lost write, its retry refused, one read back, cards, links, logout (halving the
    # batch down to single records, each read back, takes ~755)
    assert report.requests <= 10, report.requests
    assert len(_on_device(emulator)) == 250


def test_an_attempt_ending_on_an_unexpected_error_still_counts_its_requests(emulator, cache, tmp_path):
    people = _participants(tmp_path, 20)

    class Broken(RuntimeError):
        pass

    def broken_progress(_: int) -> None:
        raise Broken()

    tally = DeviceTally()
    with pytest.raises(Broken):
        register_on_device(_client(emulator), "device-0", people, cache, RegistrationOptions(), tally=tally,
                           progress=broken_progress)
    first = tally.requests
    assert first > 0 and tally.created == 20
    report = register_on_device(_client(emulator), "device-0", people, cache, RegistrationOptions(), tally=tally)
    assert report.created == 20 and report.requests == emulator.control.stats(0)["total"] > first


def test_a_turnstile_whose_participants_are_all_cached_reports_so(emulator, cache, tmp_path):
    people = _participants(tmp_path, 10)
    register_on_device(_client(emulator), "device-0", people, cache, RegistrationOptions())
    again = register_on_device(_client(emulator), "device-0", people, cache, RegistrationOptions())
    assert (again.status, again.cached, again.requests) == ("cached", 10, 0)


def test_a_new_participant_gets_the_card_of_someone_who_left_and_a_planned_run_shows_it(emulator, cache, tmp_path):
    people = _participants(tmp_path, 20)
    register_on_device(_client(emulator), "device-0", people, cache, RegistrationOptions())
    newcomer = replace(people[-1], registration="NEW1", name="Newcomer", row_number=99)
    now = [*people[:-1], newcomer]  # the last participant leaves; a newcomer gets their card
    plan = register_on_device(_client(emulator), "device-0", now, cache, RegistrationOptions(dry_run=True))
    assert (plan.created, plan.cards, plan.cards_freed, plan.failures) == (1, 1, 1, [])
    report = register_on_device(_client(emulator), "device-0", now, cache, RegistrationOptions())
    assert (report.created, report.cards, report.cards_freed, report.failures) == (1, 1, 1, [])
    held = _on_device(emulator)
    assert held["NEW1"]["cards"] == [newcomer.card] and held[people[-1].registration]["cards"] == []


def test_an_empty_device_costs_one_read_and_a_held_one_is_read_in_full(emulator, cache, tmp_path):
    """More participants than one read takes (999): on a device the cache knows nothing of, one request asks
    for any user; an empty device is then not read further, one that holds users is read as usual."""
    people = _participants(tmp_path, 1_200)
    first = register_on_device(_client(emulator), "device-0", people, cache, RegistrationOptions())
    reads = emulator.control.stats(0)["routes"]["/load_objects.fcgi"]
    assert (first.created, first.failures, reads) == (1_200, [], {"200": 1})
    assert first.requests == 1 + 1 + 3 * 5 + 1  # login, the probe, 5 batches of users, cards and links, logout

    emulator.control.reset_stats()
    again = register_on_device(_client(emulator), "device-0", people, cache, RegistrationOptions(verify=True))
    reads = emulator.control.stats(0)["routes"]["/load_objects.fcgi"]
    assert (again.unchanged, again.writes, reads) == (1_200, 0, {"200": 2 + 2 + 2})  # users, cards, links by 999


def test_devices_sharing_a_roster_encode_their_batches_once_and_a_refusal_stays_on_its_device(
        emulator, cache, tmp_path, monkeypatch):
    """Two empty devices given one Roster: their batches of new users, cards and links are encoded once for
    both; a card another user holds on the second device refuses that device's shared batch, which is read back
    and resent there alone, while the first device holds everyone."""
    encoded = []

    def counted(values, max_count, max_bytes):
        encoded.append(len(values))
        return _encoded_batches(values, max_count, max_bytes)

    monkeypatch.setattr(registration, "_encoded_batches", counted)
    people = _participants(tmp_path, 300)
    roster, victim = Roster(people), people[7]
    squatter = _client(emulator, 1)
    squatter.write("users", [{"id": 5, "registration": "SQUATTER", "name": "Someone else"}])
    squatter.write("cards", [{"value": victim.card, "user_id": 5}], create_only=True)
    first = register_on_device(_client(emulator, 0), "device-0", roster, cache, RegistrationOptions())
    second = register_on_device(_client(emulator, 1), "device-1", roster, cache, RegistrationOptions())
    assert (first.created, first.failures, first.writes) == (300, [], 6)
    assert (second.created, [r for r, _, _ in second.failures]) == (300, [victim.registration])
    assert second.failures[0][2].startswith(f"cards: card {victim.card} is held by 'SQUATTER'")
    assert sorted(n for n in encoded if n) == sorted([300, sum(p.card is not None for p in people),
                                                      sum(p.group is not None for p in people)]), encoded
    for device in (0, 1):
        held = _on_device(emulator, device)
        assert all(held[p.registration]["cards"] == ([p.card] if p.card else []) for p in people if p is not victim)
        assert all(held[p.registration]["groups"] == [p.group] for p in people if p.group is not None)
    assert held["SQUATTER"]["cards"] == [victim.card]


def test_batches_are_encoded_once_within_the_count_and_the_bytes_and_keep_the_order():
    """The pure batching: at most `max_count` objects and `max_bytes` of JSON a batch, each batch's JSON the
    objects in order (one object larger than the limit goes alone)."""
    values = [{"id": i, "name": "x" * (i % 7) * 10} for i in range(23)] + [{"id": 99, "name": "y" * 500}]
    for max_count, max_bytes in ((5, 10_000), (250, 200), (4, 150), (1, 1)):
        batches = _encoded_batches(values, max_count, max_bytes)
        assert [start for start, _, _ in batches] == [0] + [end for _, end, _ in batches[:-1]]
        assert batches[-1][1] == len(values)
        for start, end, encoded in batches:
            assert orjson.loads(encoded) == values[start:end]
            assert end - start <= max_count
            assert len(encoded) <= max_bytes or end - start == 1
