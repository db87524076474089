"""Turnstile scenarios for `make bench`: requests per device, and whether every device ends exactly as the file says.

PARTICIPANTS participants on DEVICES emulated turnstiles (the emulator in its own process), through the domain's
own path (the identity checks, then `register_on_device` on each turnstile with work, as the flow's tasks do,
without Prefect). Each scenario starts from a first full registration, then changes one thing and runs again;
the figures are the second run's, counted by the emulator:
- group moves: MOVES participants moved from group 1 to group 2 (the old link must go);
- a wiped device: turnstile 0 factory reset between the runs (the check must notice and restore it);
- a card swap: two participants swap their cards;
- a lost 250-object answer: 250 new participants, and turnstile 0 commits the first `create_objects` but its
  answer is lost (the batch is read back in one call).
"""

from __future__ import annotations

import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path


def bench_turnstile_scenarios(participants: int, devices: int, moves: int = 44) -> dict:
    from deployments.stack import start_local_stack
    from emulators import controlid as emulator_module
    from operations.settings import get_settings
    from operations.turnstiles.sample import write_participants_file

    import redis

    client = redis.Redis.from_url(start_local_stack(get_settings()).redis_url)  # the stack first, as every line
    state_dir = Path(tempfile.mkdtemp(prefix="turnstile-scenarios-"))
    emulator = emulator_module.start_emulator_process(
        emulator_module.EmulatorConfig(devices=devices, max_concurrent_requests=1), state_dir)
    try:
        people = write_participants_file(state_dir / "participants.csv", participants, groups=(1, 2))
        ones = [i for i, p in enumerate(people) if p.group == 1][:moves]
        moved = [replace(p, group=2) if i in set(ones) else p for i, p in enumerate(people)]
        swapped = list(people)
        swapped[0], swapped[1] = replace(people[0], card=people[1].card), replace(people[1], card=people[0].card)
        extra = write_participants_file(state_dir / "more.csv", participants + 250, groups=(1, 2))[participants:]
        extra = [replace(p, registration=f"N{p.registration}", card=p.card + 10_000_000) for p in extra]

        def wipe_0() -> None:
            emulator.control.wipe(0)

        def lose_an_answer() -> None:
            emulator.control.add_fault(kind="drop_after_commit", path="/create_objects.fcgi", device=0)

        scenarios = [
            (f"group moves ({len(ones)} participants, group 1 -> 2)", moved, None),
            ("a wiped device (turnstile 0 factory reset)", people, wipe_0),
            ("a card swap (two participants)", swapped, None),
            ("a lost 250-object answer (turnstile 0)", people + extra, lose_an_answer),
        ]
        figures = {"participants": participants, "devices": devices, "scenarios": []}
        for name, second, between in scenarios:
            emulator.control.wipe()
            emulator.control.clear_faults()
            cache = _Cache(client)
            _run(emulator, cache.cache, people)
            if between:
                between()
            emulator.control.reset_stats()
            reports = _run(emulator, cache.cache, second)
            requests = [emulator.control.stats(d)["total"] for d in range(devices)]
            figures["scenarios"].append({"name": name, "requests": requests, "exact": _exact(emulator, second),
                                         "failures": sum(len(r.failures) for r in reports)})
            cache.forget()
        return figures
    finally:
        emulator_module.stop_emulator_process(state_dir)


class _Cache:
    def __init__(self, client):
        from operations.turnstiles.cache import RegistrationCache

        self.client, self.prefix = client, f"scenario-{uuid.uuid4().hex[:8]}"
        self.cache = RegistrationCache(client, self.prefix)

    def forget(self) -> None:
        for key in self.client.scan_iter(f"{self.prefix}:*", count=1_000):
            self.client.delete(key)


def _run(emulator, cache, people) -> list:
    """The flow's path without Prefect: check every turnstile, then register on those with work."""
    from pydantic import SecretStr

    from operations.turnstiles.client import ControlIdClient
    from operations.turnstiles.identity import check_devices, turnstiles_with_work
    from operations.turnstiles.registration import RegistrationOptions, Roster, register_on_device

    names = [f"gate-{i}" for i in range(len(emulator.base_urls))]

    def client(i: int) -> ControlIdClient:
        return ControlIdClient(emulator.base_urls[i], emulator.config.login, SecretStr(emulator.config.password),
                               name=names[i])

    roster = Roster(people)
    checks = {name: c.to_json() for name, c in check_devices(
        {name: (lambda i=i: client(i)) for i, name in enumerate(names)}, cache, roster).items()}
    work = turnstiles_with_work(names, checks, RegistrationOptions())
    with ThreadPoolExecutor(len(names)) as pool:
        return list(pool.map(lambda name: register_on_device(client(names.index(name)), name, roster, cache,
                                                             work[name]), work))


def _exact(emulator, people) -> bool:
    """Whether every turnstile holds every participant with their card alone and their group alone (of 1, 2)."""
    for device in range(len(emulator.base_urls)):
        held = {u["registration"]: u for u in emulator.control.users(device)}
        for p in people:
            user = held.get(p.registration)
            if user is None or user["cards"] != [p.card] or sorted(set(user["groups"]) & {1, 2}) != [p.group]:
                return False
    return True


def print_turnstile_scenarios(figures: dict) -> None:
    print(f"turnstile scenarios, {figures['participants']:,} participants x {figures['devices']} turnstiles "
          f"(the second run of each, requests per turnstile as the emulator counted them):")
    for s in figures["scenarios"]:
        print(f"  {s['name']:52} requests per turnstile {s['requests']}; "
              f"{'exact' if s['exact'] else 'NOT exact'}, {s['failures']} failure(s)")
