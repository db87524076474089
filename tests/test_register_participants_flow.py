"""The `register-participants` flow on the session's real Prefect server, emulated turnstiles over HTTP and the
real Redis: the report's figures, the cache on a second run, no device password in any log or artifact, a
dry run's work reported as planned, a reset and a replaced turnstile restored by the next normal run, a
malformed or missing file and an unknown turnstile refused before any device call in one log line, an
unreachable turnstile on Dask (task runs of the flow run itself), and two flow runs at once never putting more
requests on a turnstile than its limit."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
from pydantic import SecretStr

from blocks.turnstile_device import TurnstileCache, TurnstileDevice
from emulators.controlid import DeviceSpec, EmulatorConfig, run_in_thread
from operations.settings import PROJECT_ROOT, get_settings
from operations.turnstiles.participants import file_key, read_participants
from operations.turnstiles.registration import Roster
from operations.turnstiles.report import read_registration_failures
from operations.turnstiles.sample import write_participants_file
from flow_run_checks import assert_failed_in_one_line, task_runs_of_flow_run
from run_checks import fetch_link, run_artifacts, run_texts

pytestmark = pytest.mark.slow
PASSWORDS = ["gate-pw-9f3K2x", "gate-pw-7Hq1Zt", "gate-pw-4Lm8Wv"]


@pytest.fixture
def gates(settings, redis_url):
    """Three emulated turnstiles (each with its own password) saved as TurnstileDevice blocks, and a cache
    block of this test's own; yields (emulator, block names, cache block name)."""
    config = EmulatorConfig(devices=3, latency_ms=2, device_overrides={
        i: DeviceSpec(password=password) for i, password in enumerate(PASSWORDS)})
    tag = uuid.uuid4().hex[:6]
    with run_in_thread(config) as emulator:
        names = []
        for i, (url, password) in enumerate(zip(emulator.base_urls, PASSWORDS)):
            name = f"test-gate-{tag}-{i}"
            TurnstileDevice(base_url=url, password=SecretStr(password), max_attempts=2, backoff_base_seconds=0.05,
                            connect_timeout_seconds=1, read_timeout_seconds=5).save(name, overwrite=True)
            names.append(name)
        cache = f"test-cache-{tag}"
        TurnstileCache.from_url(redis_url, key_prefix=f"test-turnstiles-{tag}").save(cache, overwrite=True)
        yield emulator, names, cache


def _run(**parameters):
    from flows.register_participants import register_participants

    state = asyncio.run(register_participants(**parameters, return_state=True))
    return state, (state.result() if state.is_completed() else None)


def test_everyone_is_registered_on_every_turnstile_with_a_report_and_the_second_run_is_all_cached(gates, tmp_path):
    emulator, names, cache = gates
    source = tmp_path / "participants.xlsx"
    people = write_participants_file(source, 120)
    state, result = _run(participants_file=str(source), turnstiles=names, cache_block=cache)
    assert state.is_completed(), state.message
    assert (result["participants"], result["turnstiles"], result["operations"]) == (120, 3, 360)
    assert (result["successes"], result["cached"], result["errors"]) == (360, 0, 0)
    for device in range(3):
        held = {u["registration"]: u for u in emulator.control.users(device)}
        assert set(held) == {p.registration for p in people}

    artifacts = {a.key: a for a in run_artifacts(state.state_details.flow_run_id)}
    assert {"registration-report", "registration-turnstiles", "registration-progress"} <= set(artifacts)
    assert "registration-failures" not in artifacts and result["failures_file"] == "", "no link to 0 failures"
    report = artifacts["registration-report"].data
    assert "| Total operations | 360 |" in report and "| Successes | 360 |" in report and "| Errors | 0 |" in report
    assert "Failed records: none." in report
    table = artifacts["registration-turnstiles"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert sorted(row["turnstile"] for row in table) == sorted(names)
    assert all(row["created"] == 120 and row["failed"] == 0 for row in table)
    assert artifacts["registration-progress"].data == 100.0
    texts = run_texts(state.state_details.flow_run_id)
    assert not [t for t in texts if any(password in t for password in PASSWORDS)], "a device password leaked"

    emulator.control.reset_stats()
    state, again = _run(participants_file=str(source), turnstiles=names, cache_block=cache)
    assert state.is_completed(), state.message
    assert (again["cached"], again["successes"]) == (360, 360)
    for device in range(3):  # the identity check only: a session, serial, user count and a sample read back
        stats = emulator.control.stats(device)
        assert stats["total"] <= 5 and stats["write_calls"] == 0, stats
    assert [r["status"] for r in again["reports"]] == ["cached"] * 3
    runs, subflows = task_runs_of_flow_run(state.state_details.flow_run_id)
    assert runs == [] and subflows == [], "one flow run: the checks are its own stage, no device task"


def test_a_malformed_file_is_refused_naming_row_and_column_before_any_device_call(gates, tmp_path):
    emulator, names, cache = gates
    bad = tmp_path / "participants.csv"
    bad.write_text("registration,name,card\nR1,Ana,100\nR2,Bruno,12a\n", encoding="utf-8")
    state, _ = _run(participants_file=str(bad), turnstiles=names, cache_block=cache)
    assert_failed_in_one_line(state, "row 3, card", "not a whole number")
    assert "row 3, card" in str(state.result(raise_on_failure=False))
    state, _ = _run(participants_file=str(tmp_path / "absent.csv"), turnstiles=names, cache_block=cache)
    assert_failed_in_one_line(state, "absent.csv", "does not exist")
    good = tmp_path / "good.csv"
    good.write_text("registration,name\nR1,Ana\n", encoding="utf-8")
    state, _ = _run(participants_file=str(good), turnstiles=[names[0], "no-such-gate"], cache_block=cache)
    assert_failed_in_one_line(state, "no TurnstileDevice block named no-such-gate")
    assert sum(emulator.control.stats(d)["total"] for d in range(3)) == 0


def test_a_file_already_read_is_taken_from_redis_and_an_edited_one_is_checked_again(gates, tmp_path):
    emulator, names, cache = gates
    source = tmp_path / "participants.csv"
    write_participants_file(source, 300)
    state, first = _run(participants_file=str(source), turnstiles=names[:1], cache_block=cache)
    assert state.is_completed(), state.message
    remembered = TurnstileCache.load(cache).cache().known_file(file_key(source, get_settings().turnstiles.timezone))
    assert remembered is not None and remembered.people == read_participants(source)
    assert remembered.digest == Roster(remembered.people.participants).digest()
    state, again = _run(participants_file=str(source), turnstiles=names[:1], cache_block=cache)
    assert state.is_completed() and (again["participants"], again["cached"]) == (300, 300)

    emulator.control.reset_stats()
    lines = source.read_text(encoding="utf-8").splitlines()
    lines[7] = "R000007,Renamed,12a,,,"  # row 8: a bad card in a file otherwise the same
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    state, _ = _run(participants_file=str(source), turnstiles=names[:1], cache_block=cache)
    assert_failed_in_one_line(state, "row 8, card", "not a whole number")
    assert emulator.control.stats(0)["total"] == 0, "refused before any device call"


def test_a_dry_run_reports_its_work_as_planned_and_writes_nothing(gates, tmp_path):
    emulator, names, cache = gates
    source = tmp_path / "participants.csv"
    write_participants_file(source, 20)
    state, result = _run(participants_file=str(source), turnstiles=names[:2], cache_block=cache, dry_run=True)
    assert state.is_completed(), state.message
    assert (result["planned"], result["errors"]) == (40, 0) and "successes" not in result
    artifacts = {a.key: a for a in run_artifacts(state.state_details.flow_run_id)}
    report = artifacts["registration-report"].data
    assert "(dry run)" in report and "| Planned | 40 |" in report and "Successes" not in report
    table = artifacts["registration-turnstiles"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert [(row["status"], row["to create"]) for row in table] == [("dry-run", 20)] * 2
    assert all(not emulator.control.users(device) for device in range(2))


def test_on_dask_an_unreachable_turnstile_fails_alone_and_the_failures_are_reported(
    gates, tmp_path, on_session_cluster, monkeypatch
):
    emulator, names, cache = gates
    monkeypatch.setenv("TURNSTILES_TASK_RUNNER", "dask")
    monkeypatch.setenv("TURNSTILE_TASK_RETRIES", "0")
    get_settings.cache_clear()
    source = tmp_path / "participants.csv"
    write_participants_file(source, 30)
    with source.open("a", encoding="utf-8") as handle:  # a registration repeated: a failure of that row
        handle.write("R000001,Repeated Row,,,,\n")
    emulator.control.set_down(2)
    state, _ = _run(participants_file=str(source), turnstiles=names, cache_block=cache)
    assert state.is_failed()
    assert "31 record(s) failed and 1 turnstile(s)" in str(state.result(raise_on_failure=False))
    flow_run_id = state.state_details.flow_run_id
    runs, subflows = task_runs_of_flow_run(flow_run_id)
    assert sorted(r.name for r in runs) == sorted(f"turnstile-{name}" for name in names)
    assert {r.flow_run_id for r in runs} == {flow_run_id} and subflows == [], "the Dask tasks are the run's own"
    for device in (0, 1):
        assert len(emulator.control.users(device)) == 30
    [link] = [a for a in run_artifacts(state.state_details.flow_run_id) if a.key == "registration-failures"]
    failures = read_registration_failures(fetch_link(link.data, tmp_path / "downloads"))  # over HTTP, as clicked
    assert len(failures) == 31
    assert sum(1 for f in failures if f[1] == names[2]) == 30
    assert [f[2] for f in failures if f[1] == "(file)"] == ["32"]


_RUN_ONE = """
import asyncio, sys
from flows.register_participants import register_participants
state = asyncio.run(register_participants(
    participants_file=sys.argv[1], turnstiles=sys.argv[2].split(","), cache_block=sys.argv[3], skip_cache=True,
    batch_size=10, concurrency_per_device=4, return_state=True))
sys.exit(0 if state.is_completed() else 1)
"""


def test_two_flow_runs_at_once_never_exceed_a_turnstiles_limit(gates, tmp_path):
    emulator, names, cache = gates
    emulator.control.configure(latency_ms=10, max_concurrent_requests=4)  # the device could take 4 at once
    source = tmp_path / "participants.csv"
    write_participants_file(source, 100)
    runs = [subprocess.Popen([sys.executable, "-c", _RUN_ONE, str(source), ",".join(names), cache],
                             cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for _ in range(2)]
    outputs = [run.communicate(timeout=300)[0].decode(errors="replace") for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    for device in range(3):
        stats = emulator.control.stats(device)
        # the blocks say 1 request at a time: the two runs' tasks took turns on each device
        assert stats["peak_in_flight"] == 1, stats
        assert len(emulator.control.users(device)) == 100


class _WriteWatch:
    """Cancels the flow run named `run_name` once the turnstiles got `after` write calls, then notes when each
    later write call arrived: (seconds from the cancel to the last write, writes after the cancel)."""

    def __init__(self, emulator, run_name: str, after: int):
        self.emulator, self.run_name, self.after = emulator, run_name, after
        self.cancelled_at: float | None = None
        self.last_write_at: float | None = None
        self.writes_at_cancel = self.writes_after = 0
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _writes(self) -> int:
        return sum(self.emulator.control.stats(d)["write_calls"] for d in range(3))

    def _cancel(self) -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
        from prefect.states import Cancelling

        with get_client(sync_client=True) as client:
            [run] = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[self.run_name])))
            client.set_flow_run_state(run.id, Cancelling(), force=True)

    def _watch(self) -> None:
        while self._writes() < self.after and not self.finished.is_set():
            time.sleep(0.05)
        self.writes_at_cancel = self._writes()
        self._cancel()
        self.cancelled_at = self.last_write_at = time.monotonic()
        seen = self._writes()
        while not self.finished.wait(0.1):
            writes = self._writes()
            if writes != seen:
                seen, self.last_write_at = writes, time.monotonic()
        self.writes_after = seen - self.writes_at_cancel

    def stop(self) -> tuple[float, int]:
        time.sleep(1.0)  # a write arriving late would still be seen
        self.finished.set()
        self.thread.join(30)
        assert self.cancelled_at is not None, "the run ended before it was cancelled"
        return self.last_write_at - self.cancelled_at, self.writes_after


@pytest.mark.parametrize("runner", ["threads", "dask"])
def test_a_cancelled_registration_stops_writing_within_seconds_and_reports_what_it_wrote(
    gates, tmp_path, monkeypatch, request, runner
):
    """The flow run is set CANCELLING through the API while its device tasks write (100 ms a request): no write
    reaches a turnstile seconds later, the run ends Cancelled, and its report counts exactly the users the
    turnstiles got before the cancel."""
    emulator, names, cache = gates
    if runner == "dask":
        request.getfixturevalue("on_session_cluster")
        monkeypatch.setenv("TURNSTILES_TASK_RUNNER", "dask")
        get_settings.cache_clear()
    emulator.control.configure(latency_ms=100)
    source = tmp_path / "participants.csv"
    write_participants_file(source, 600)
    from flows.register_participants import register_participants

    run_name = f"cancel-{runner}-{uuid.uuid4().hex[:6]}"
    watch = _WriteWatch(emulator, run_name, after=6)
    state = asyncio.run(register_participants.with_options(flow_run_name=run_name)(
        participants_file=str(source), turnstiles=names, cache_block=cache, batch_size=10, return_state=True))
    last_write, writes_after = watch.stop()
    print(f"{runner}: last device write {last_write:.2f} s after the cancel ({writes_after} write call(s) after it)")
    assert state.is_cancelled(), state
    assert last_write <= 5, last_write  # the stop check polls every second; a batch in flight takes 0.1 s
    on_devices = sum(len(emulator.control.users(d)) for d in range(3))
    assert 0 < on_devices < 3 * 600, "cancelled mid-way"
    assert state.message.startswith("cancelled: 3 turnstile(s) stopped; written before the cancel: ")
    assert f"{on_devices:,} user(s) created" in state.message, (on_devices, state.message)
    report = {a.key: a for a in run_artifacts(state.state_details.flow_run_id)}["registration-report"].data
    assert "(cancelled)" in report and f"| Written before the cancel | {on_devices:,} user(s) created" in report


def test_a_turnstiles_figures_count_every_attempt_of_its_task(gates, tmp_path, monkeypatch):
    """The first attempt writes 4 batches of users, then the turnstile answers 503 past the client's retries;
    the task's retry writes the rest. The table and the report count what both attempts wrote."""
    import flows.register_participants as module
    from tasks.registration import register_on_turnstile

    emulator, names, cache = gates
    monkeypatch.setattr(module, "register_on_turnstile", register_on_turnstile.with_options(retry_delay_seconds=[0]))
    # the block's client tries twice: the 5th users batch fails both times, and the attempt with it
    emulator.control.add_fault(path="/create_objects.fcgi", device=0, status=503, skip=4, times=2)
    source = tmp_path / "participants.csv"
    people = write_participants_file(source, 100)
    state, result = _run(participants_file=str(source), turnstiles=names[:1], cache_block=cache, batch_size=10)
    assert state.is_completed(), state.message
    assert len(emulator.control.users(0)) == 100
    [report] = result["reports"]
    assert (report["created"], report["unchanged"], report["cached"]) == (100, 0, 0), report
    assert report["cards"] == sum(p.card is not None for p in people)
    assert report["groups"] == sum(p.group is not None for p in people)
    [task_run] = task_runs_of_flow_run(state.state_details.flow_run_id)[0]
    assert task_run.run_count == 2, "the first attempt failed"
    table = {a.key: a for a in run_artifacts(state.state_details.flow_run_id)}["registration-turnstiles"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert [(row["created"], row["unchanged"], row["failed"]) for row in table] == [(100, 0, 0)]
    device = emulator.control.stats(0)
    assert (report["requests"], report["writes"]) == (device["total"], device["write_calls"]), "both attempts"
    assert report["retries"] == 1 and report["logins"] == device["logins"] == 2  # one retry per request: 2 tries


def test_a_turnstile_unreachable_past_its_retries_emits_an_event(gates, tmp_path, monkeypatch):
    """`project.turnstile.unreachable` about the turnstile's block, related to the run, read back from the
    server's events; the reachable turnstile emits none."""
    emulator, names, cache = gates
    monkeypatch.setenv("TURNSTILE_TASK_RETRIES", "0")
    get_settings.cache_clear()
    emulator.control.set_down(1)
    source = tmp_path / "participants.csv"
    write_participants_file(source, 5)
    state, _ = _run(participants_file=str(source), turnstiles=names[:2], cache_block=cache)
    assert state.is_failed()
    events = _events("project.turnstile.unreachable", state.state_details.flow_run_id, 1)
    assert [e["resource"]["prefect.resource.id"] for e in events] == [f"project.turnstile.{names[1]}"], events
    assert events[0]["payload"]["error"].startswith(f"{names[1]}: "), events[0]
    assert events[0]["payload"]["base_url"] == emulator.base_urls[1]


def _events(name: str, flow_run_id, count: int) -> list[dict]:
    """The project events `name` related to the flow run, read back from the server (waiting up to 30 s for
    `count` of them)."""
    from prefect.client.orchestration import get_client

    body = {"filter": {"event": {"name": [name]}, "any_resource": {"id_prefix": ["project.turnstile.test-gate-"]},
                       "occurred": {"since": "2000-01-01T00:00:00Z"}}, "limit": 50}
    deadline, events = time.monotonic() + 30, []
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            found = client.request("POST", "/events/filter", json=body).json()["events"]
            events = [e for e in found if any(r.get("prefect.resource.id") == f"prefect.flow-run.{flow_run_id}"
                                              for r in e.get("related", []))]
            if len(events) >= count:
                break
            time.sleep(0.5)
    return events


def test_a_reset_and_a_replaced_turnstile_are_noticed_and_restored_by_the_next_normal_run(gates, tmp_path):
    """Between two normal runs one turnstile is factory reset and another replaced by a new unit: the next
    run's identity check drops their cache entries, registers every participant on them again (users, cards,
    groups as on the untouched one), says so in the report, and emits `project.turnstile.reset-detected` for
    each; the run after it trusts the cache again. Four flow runs (~4 s each, the one test of the whole path):
    register, a cached run that learns the units, the restoring run, a cached run."""
    emulator, names, cache = gates
    source = tmp_path / "participants.csv"
    write_participants_file(source, 60)
    for _ in range(2):
        state, _ = _run(participants_file=str(source), turnstiles=names, cache_block=cache)
        assert state.is_completed(), state.message
    expected = emulator.control.users(0)
    emulator.control.wipe(1)
    emulator.control.wipe(2, replace=True)

    emulator.control.reset_stats()
    state, result = _run(participants_file=str(source), turnstiles=names, cache_block=cache)
    assert state.is_completed(), state.message
    for device in (1, 2):
        assert emulator.control.users(device) == expected, f"device {device} restored"
    reports = result["reports"]
    assert [(r["status"], r["created"]) for r in reports] == [("cached", 0), ("done", 60), ("done", 60)]
    assert "fewer users" in reports[1]["reset"] and "another unit" in reports[2]["reset"], reports
    assert emulator.control.stats(0)["write_calls"] == 0 and emulator.control.stats(0)["total"] <= 5
    report = {a.key: a for a in run_artifacts(state.state_details.flow_run_id)}["registration-report"].data
    assert f"2 turnstile(s) reset or replaced, registered again in full: {names[1]}, {names[2]}." in report
    events = _events("project.turnstile.reset-detected", state.state_details.flow_run_id, 2)
    assert sorted(e["resource"]["prefect.resource.id"] for e in events) == [
        f"project.turnstile.{names[1]}", f"project.turnstile.{names[2]}"], events
    assert all(e["payload"]["dropped"] == 60 for e in events)

    state, again = _run(participants_file=str(source), turnstiles=names, cache_block=cache)
    assert [(r["status"], r["reset"]) for r in again["reports"]] == [("cached", "")] * 3, "trusted again"


_RUN_NAMED = """
import asyncio, sys
from flows.register_participants import register_participants
asyncio.run(register_participants.with_options(flow_run_name=sys.argv[4])(
    participants_file=sys.argv[1], turnstiles=sys.argv[2].split(","), cache_block=sys.argv[3], batch_size=10))
"""


def test_a_sigterm_to_the_flow_process_stops_the_writes_and_the_run_still_reports(gates, tmp_path):
    """What the worker does on a cancel: SIGTERM to the flow's process. The device tasks stop at their next
    batch, the run publishes what was written and ends Cancelled, and the process exits on its own."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    emulator, names, cache = gates
    emulator.control.configure(latency_ms=100)
    source = tmp_path / "participants.csv"
    write_participants_file(source, 600)
    run_name = f"sigterm-{uuid.uuid4().hex[:6]}"
    process = subprocess.Popen([sys.executable, "-c", _RUN_NAMED, str(source), ",".join(names), cache, run_name],
                               cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    writes = lambda: sum(emulator.control.stats(d)["write_calls"] for d in range(3))  # noqa: E731
    deadline = time.monotonic() + 120
    while writes() < 6:
        assert process.poll() is None and time.monotonic() < deadline, "no write in time"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    signalled, seen, last_write = time.monotonic(), writes(), time.monotonic()
    while process.poll() is None:
        assert time.monotonic() - signalled < 30, "the process outlived the worker's 30 s before SIGKILL"
        if writes() != seen:
            seen, last_write = writes(), time.monotonic()
        time.sleep(0.05)
    print(f"SIGTERM: last device write {last_write - signalled:.2f} s after it, exit after "
          f"{time.monotonic() - signalled:.1f} s")
    assert last_write - signalled <= 5 and writes() == seen
    with get_client(sync_client=True) as client:
        [run] = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_name])))
    assert run.state.is_cancelled() and "3 turnstile(s) stopped" in run.state.message, run.state
    on_devices = sum(len(emulator.control.users(d)) for d in range(3))
    assert f"{on_devices:,} user(s) created" in run.state.message, (on_devices, run.state.message)
    report = {a.key: a for a in run_artifacts(run.id)}["registration-report"].data
    assert f"| Written before the cancel | {on_devices:,} user(s) created" in report
