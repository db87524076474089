"""The drop folders end to end on the session's deployed stack (`deployed_stack`: `make up`'s watcher, the
inbox deployments and their triggers, the worker): a file dropped into PRODUCTS_INBOX_DIR or
TURNSTILES_INBOX_DIR starts its run through the watcher's event and the deployment trigger, and moves to
processed/<run id>/; a copy of the same content is set aside; a file still being written waits; a watcher
killed and started again by its supervisor loses nothing and takes nothing twice."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from deployments import services as registry
from deployments.stack import EMULATED_TURNSTILE
from emulators import controlid as turnstile_emulator
from blocks.turnstile_device import TurnstileDevice
from operations.infra.database import get_engine
from operations.infra.inbox import Claim
from operations.products.sample import SampleStats, dealer_codes, generate_products_file
from operations.products.store import clear_products_data, upsert_dealers
from operations.turnstiles.sample import write_participants_file
from run_checks import wait_for_run

pytestmark = pytest.mark.slow

# Seconds from the drop to the worker taking the run (Pending): the watcher's look, the event, the trigger, the
# worker's poll. The flow run's own process then starts as for any run of the worker (seconds to import on a busy
# machine).
STARTS_WITHIN = 10.0


@dataclass
class Inbox:
    client: httpx.Client
    products: Path
    participants: Path
    dealers: list[str]
    work: Path  # where files are written before they are renamed into a drop folder
    settings: object


@pytest.fixture(scope="module")
def inbox(deployed_stack, database_url, tmp_path_factory):
    """The deployed stack's drop folders, its dealers and its emulated turnstiles emptied of users."""
    settings = deployed_stack.settings
    engine = get_engine(database_url)
    clear_products_data(engine, dealers=True)
    dealers = dealer_codes(3)
    upsert_dealers(engine, [(code, code) for code in dealers])
    client = httpx.Client(base_url=deployed_stack.api_url, timeout=30)
    yield Inbox(client, settings.inboxes["products"], settings.inboxes["participants"], dealers,
                tmp_path_factory.mktemp("inbox-work"), settings)
    try:  # no run of these tests left to the modules after: every claim finished and moved
        deadline = time.monotonic() + 180
        while any(list((folder / "working").iterdir()) for folder in settings.inboxes.values()):
            assert time.monotonic() < deadline, [_listing(folder) for folder in settings.inboxes.values()]
            time.sleep(0.5)
    finally:
        client.close()


def _drop(source: Path, folder: Path, name: str | None = None) -> tuple[Path, float]:
    """Rename a written file into a drop folder, as a careful uploader does; returns its path there and when."""
    target = folder / (name or source.name)
    os.replace(source, target)
    return target, time.time()


def _claim_of(folder: Path, name: str, timeout: float = 15) -> Claim:
    """The claim of `name` once the watcher has taken it and found its run (working/<claim>/)."""
    deadline = time.monotonic() + timeout
    while True:
        for claim_dir in sorted((folder / "working").iterdir()):
            claim = Claim.load(claim_dir)
            if claim and claim.name == name and claim.flow_run_id:
                return claim
        assert time.monotonic() < deadline, f"{name} not taken with a run within {timeout} s: {_listing(folder)}"
        time.sleep(0.1)


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".ledger" not in p.parts)


def _moved(folder: Path, outcome: str, run_id: str, name: str, timeout: float = 15) -> Path:
    target = folder / outcome / run_id / name
    deadline = time.monotonic() + timeout
    while not target.exists():
        assert time.monotonic() < deadline, f"{name} not in {outcome}/{run_id}: {_listing(folder)}"
        time.sleep(0.1)
    return target


def _runs_for(client: httpx.Client, deployment: str, parameter: str, path: Path) -> list[dict]:
    dep = client.get(f"/deployments/name/{deployment}").json()
    runs = client.post("/flow_runs/filter", json={"flow_runs": {"deployment_id": {"any_": [dep["id"]]}}}).json()
    return [run for run in runs if (run["parameters"] or {}).get(parameter) == str(path)]


def _taken_by_worker(client: httpx.Client, run_id: str) -> float:
    """When the worker took the run (its first Pending state), in seconds since the epoch."""
    states = client.get("/flow_run_states/", params={"flow_run_id": run_id}).json()
    pending = min(state["timestamp"] for state in states if state["type"] == "PENDING")
    return datetime.fromisoformat(pending.replace("Z", "+00:00")).timestamp()


def _artifact(client: httpx.Client, run_id: str, key: str) -> str:
    found = client.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}}).json()
    [artifact] = [a for a in found if a["key"] == key]
    return artifact["data"]


def _products(inbox: Inbox, name: str, rows: int, seed: int) -> tuple[Path, SampleStats]:
    path = inbox.work / name
    return path, generate_products_file(path, rows, inbox.dealers, bad_fraction=0.1, seed=seed)


def _check_products_run(inbox: Inbox, run: dict, sample: SampleStats) -> None:
    assert run["state_type"] == "COMPLETED", run["state"]
    summary = _artifact(inbox.client, run["id"], "products-summary")
    assert f"Successes: {sample.good_rows:,}, Failures: {sample.rows - sample.good_rows:,}" in summary, summary


def test_dropped_products_and_participants_files_start_their_runs_and_move_to_processed(inbox):
    """Both files renamed into their folders at once: each run is started (the worker took it) within 10 s of its
    drop and completes with the file's figures (every row of the products file; every participant on each of the
    stack's turnstiles), then its file is in processed/<run id>/ and nothing is left in working/. About 40 s on a
    busy machine: two runs, whose processes start as any run of the worker does."""
    products, sample = _products(inbox, "precos-dealers.csv", 300, seed=11)
    people = inbox.work / "participantes.csv"
    write_participants_file(people, 20, seed=5)
    devices = [TurnstileDevice.load(EMULATED_TURNSTILE.format(i)).base_url
               for i in range(1, inbox.settings.turnstiles.emulator_devices + 1)]
    gates = turnstile_emulator.EmulatorControl(devices)
    for device in range(len(devices)):
        gates.wipe(device)

    _, products_at = _drop(products, inbox.products)
    _, people_at = _drop(people, inbox.participants)
    products_claim = _claim_of(inbox.products, "precos-dealers.csv")
    people_claim = _claim_of(inbox.participants, "participantes.csv")
    products_run = wait_for_run(inbox.client, products_claim.flow_run_id)
    people_run = wait_for_run(inbox.client, people_claim.flow_run_id)

    for run, dropped in ((products_run, products_at), (people_run, people_at)):
        taken = _taken_by_worker(inbox.client, run["id"]) - dropped
        assert taken < STARTS_WITHIN, f"{run['name']} was taken by the worker {taken:.1f} s after the drop"
    _check_products_run(inbox, products_run, sample)
    assert products_run["parameters"]["file_path"] == str(products_claim.path)
    assert people_run["state_type"] == "COMPLETED", people_run["state"]
    report = _artifact(inbox.client, people_run["id"], "registration-report")
    assert "| Errors | 0 |" in report and f"| Total operations | {20 * len(devices)} |" in report, report
    assert all(len(gates.users(device)) == 20 for device in range(len(devices)))
    gates.close()

    assert _moved(inbox.products, "processed", products_run["id"], "precos-dealers.csv").exists()
    assert _moved(inbox.participants, "processed", people_run["id"], "participantes.csv").exists()
    assert not list((inbox.products / "working").iterdir()) and not list((inbox.participants / "working").iterdir())


def test_a_copy_of_loaded_content_is_set_aside_unless_named_again(inbox):
    """The same bytes as a file in flight, under another name, go to duplicates/ and start no run; named
    `again-...`, they are loaded. About 35 s: two runs side by side."""
    products, sample = _products(inbox, "lista.csv", 120, seed=21)
    copy = inbox.work / "copia.csv"
    shutil.copyfile(products, copy)
    again = inbox.work / "again-lista.csv"
    shutil.copyfile(products, again)
    _drop(products, inbox.products)
    first = _claim_of(inbox.products, "lista.csv")

    dropped, _ = _drop(copy, inbox.products)
    deadline = time.monotonic() + 15
    while not [p for p in (inbox.products / "duplicates").iterdir() if p.name.endswith("-copia.csv")]:
        assert time.monotonic() < deadline, _listing(inbox.products)
        time.sleep(0.1)
    assert not dropped.exists()
    assert _runs_for(inbox.client, "process-products/inbox", "file_path", dropped) == []

    _drop(again, inbox.products)
    reloaded = _claim_of(inbox.products, "again-lista.csv")
    assert reloaded.flow_run_id != first.flow_run_id and reloaded.sha256 == first.sha256
    for claim in (first, reloaded):
        _check_products_run(inbox, wait_for_run(inbox.client, claim.flow_run_id), sample)
        _moved(inbox.products, "processed", claim.flow_run_id, claim.name)


def test_a_file_still_being_written_is_not_taken_before_it_is_complete(inbox):
    """Written into the drop folder in five pieces 1.2 s apart (longer than the watcher's 3 s of quiet in
    total, never that long between pieces): it stays at the top until complete, and is taken whole (its run
    ends before the module does: `inbox`). About 8 s: the slow writer."""
    products, _ = _products(inbox, "lento.csv", 400, seed=31)
    content = products.read_bytes()
    target = inbox.products / "lento.csv"
    pieces = [content[i * len(content) // 5:(i + 1) * len(content) // 5] for i in range(5)]
    with open(target, "wb") as out:
        for piece in pieces:
            out.write(piece)
            out.flush()
            time.sleep(1.2)
            assert target.exists(), f"taken half-written: {_listing(inbox.products)}"
    claim = _claim_of(inbox.products, "lento.csv")
    assert (claim.size, claim.sha256) == (len(content), hashlib.sha256(content).hexdigest())
    assert claim.path.read_bytes() == content


def test_a_restarted_watcher_takes_a_waiting_file_once_and_finishes_a_claim_in_flight(inbox):
    """The watcher is killed (SIGKILL) once it has taken a file, and another file is dropped while it is down:
    its supervisor starts it again, it follows the first file's run and takes the second; each file has exactly
    one run and ends in processed/. About 40 s: the restart, then two runs side by side."""
    settings = inbox.settings
    [watcher] = registry.only(registry.stack_services(settings), "inbox watcher")
    running = watcher.service.find()
    assert running is not None, "the stack's watcher is not running"
    first, first_sample = _products(inbox, "antes.csv", 150, seed=41)
    second, second_sample = _products(inbox, "durante.csv", 150, seed=42)

    _drop(first, inbox.products)
    first_claim = _claim_of(inbox.products, "antes.csv")
    os.kill(running.pid, 9)
    waiting, _ = _drop(second, inbox.products)
    deadline = time.monotonic() + 60
    while (again := watcher.service.find()) is None or again.pid == running.pid:
        assert time.monotonic() < deadline, "the watcher was not started again by its supervisor"
        time.sleep(0.2)

    second_claim = _claim_of(inbox.products, "durante.csv", timeout=30)
    for claim, sample in ((first_claim, first_sample), (second_claim, second_sample)):
        run = wait_for_run(inbox.client, claim.flow_run_id)
        _check_products_run(inbox, run, sample)
        _moved(inbox.products, "processed", run["id"], claim.name)
        assert [r["id"] for r in _runs_for(inbox.client, "process-products/inbox", "file_path", claim.path)] == [
            run["id"]], f"{claim.name} started more than one run"
    assert not waiting.exists()
    assert watcher.service.restarts() >= 1
