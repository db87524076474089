"""The drop folders' own logic (operations/infra/inbox.py), without Prefect or any service: when a file is
completely written, which names are taken, claims, outcomes, duplicates and what a crash leaves behind."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from operations.infra.inbox import (
    FAILED,
    IN_FLIGHT,
    PROCESSED,
    Claim,
    DropFolder,
    Settling,
    file_digest,
    takeable,
)

PRODUCTS = r"^.+\.([xX][lL][sS][xX]|[cC][sS][vV])$"  # flows/process_products.py PRODUCTS_FILE_PATTERN


def _aged(path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


def test_a_file_is_complete_at_the_second_look_once_its_writer_has_been_quiet(tmp_path):
    settling = Settling(settle_seconds=3)
    path = tmp_path / "p.csv"
    path.write_text("a;b\n")
    now = time.time()
    assert not settling.complete(path, now)  # first look: nothing to compare with
    assert not settling.complete(path, now + 1), "written 1 s ago: its writer may go on"
    assert settling.complete(path, now + 3.5)  # quiet for 3 s, unchanged between two looks


def test_a_file_renamed_in_after_it_was_written_is_taken_at_the_second_look(tmp_path):
    settling = Settling(settle_seconds=3)
    path = tmp_path / "p.csv"
    path.write_text("a;b\n")
    _aged(path, 60)
    assert not settling.complete(path)
    assert settling.complete(path)


def test_a_file_still_growing_is_never_complete(tmp_path):
    settling = Settling(settle_seconds=0.0)
    path = tmp_path / "p.csv"
    with open(path, "w") as f:
        for i in range(5):
            f.write(f"row {i}\n")
            f.flush()
            os.utime(path, (time.time() - 60, time.time() - 60))  # even an old time: the size changed
            assert not settling.complete(path), i
    assert settling.complete(path)


def test_a_file_gone_between_looks_is_forgotten(tmp_path):
    settling = Settling(settle_seconds=0)
    path = tmp_path / "p.csv"
    path.write_text("x")
    settling.complete(path)
    path.unlink()
    assert not settling.complete(path)
    path.write_text("x")
    assert not settling.complete(path), "a new file starts over"


@pytest.mark.parametrize("name, ok", [
    ("precos.xlsx", True), ("again-precos.csv", True), (".precos.xlsx", False), ("~$precos.xlsx", False),
    ("precos.xlsx.part", False), ("precos.csv.tmp", False), ("precos.xlsx.crdownload", False),
])
def test_hidden_locked_and_partial_names_are_never_taken(name, ok):
    assert takeable(name) is ok


def test_only_the_flows_names_wait_and_others_are_refused_in_place(tmp_path):
    folder = DropFolder(tmp_path / "in", PRODUCTS)
    folder.ensure()
    for name in ("a.xlsx", "b.CSV", "c.pdf", ".d.csv", "e.csv.part"):
        (folder.root / name).write_text("x")
    assert [p.name for p in folder.waiting()] == ["a.xlsx", "b.CSV"]
    assert [p.name for p in folder.refused()] == ["c.pdf"]
    folder.accept(None)
    assert [p.name for p in folder.waiting()] == ["a.xlsx", "b.CSV", "c.pdf"]


def test_a_claim_moves_the_file_into_working_and_its_end_into_processed_or_failed(tmp_path):
    folder = DropFolder(tmp_path / "in", PRODUCTS)
    folder.ensure()
    dropped = folder.root / "precos.csv"
    dropped.write_text("dealer;sku\n")
    digest = file_digest(dropped)
    claim = folder.claim(dropped, digest)
    assert not dropped.exists() and claim.path.read_text() == "dealer;sku\n"
    assert claim.path.parent.parent == folder.root / "working"
    assert [c.id for c in folder.claims()] == [claim.id]
    assert folder.previous(digest)["outcome"] == IN_FLIGHT
    assert folder.loaded_before(digest) is not None, "in flight: a copy is a duplicate"

    claim.flow_run_id = "run-1"
    claim.save()
    assert Claim.load(claim.path.parent).flow_run_id == "run-1"
    moved = folder.finish(claim, PROCESSED, "run-1")
    assert moved == folder.root / "processed" / "run-1" / "precos.csv" and moved.exists()
    assert folder.claims() == []
    assert folder.previous(digest) | {"at": 0} == {
        "claim": claim.id, "name": "precos.csv", "outcome": PROCESSED, "flow_run_id": "run-1",
        "where": "processed/run-1", "at": 0}
    assert folder.counts() == {"waiting": 0, "in flight": 0, "processed": 1, "failed": 0, "duplicates": 0}


def test_content_whose_run_failed_may_be_loaded_again(tmp_path):
    folder, dropped = _dropped(tmp_path, "people.csv", "registration;name\n")
    claim = folder.claim(dropped, file_digest(dropped))
    folder.finish(claim, FAILED, "run-2")
    assert (folder.root / "failed" / "run-2" / "people.csv").exists()
    assert folder.loaded_before(claim.sha256) is None


def test_a_duplicate_is_set_aside_with_its_time(tmp_path):
    folder, copy = _dropped(tmp_path, "copy.csv", "x")
    target = folder.set_aside(copy)
    assert target.parent == folder.root / "duplicates" and target.name.endswith("-copy.csv")
    assert not copy.exists() and target.read_text() == "x"


def test_a_crash_between_claim_and_move_leaves_the_file_to_be_taken_again(tmp_path):
    """The claim is written before the file moves: a claim found without its file is removed at start, and its
    ledger entry no longer counts as in flight, so the file (still at the top) is taken afresh."""
    folder, dropped = _dropped(tmp_path, "precos.csv", "x")
    claim = folder.claim(dropped, file_digest(dropped))
    os.replace(claim.path, dropped)  # as if the process had died before the rename
    assert folder.loaded_before(claim.sha256) is not None
    assert folder.recover() == [claim.id]
    assert folder.claims() == [] and folder.loaded_before(claim.sha256) is None
    assert [p.name for p in folder.waiting()] == ["precos.csv"]


def test_a_crash_after_the_ledger_but_before_the_move_is_finished_by_the_next_watcher(tmp_path):
    folder, dropped = _dropped(tmp_path, "precos.csv", "x")
    claim = folder.claim(dropped, file_digest(dropped))
    ledger = folder.root / ".ledger" / f"{claim.sha256}.json"
    ledger.write_text(json.dumps({**json.loads(ledger.read_text()), "outcome": PROCESSED}))  # ledger written, no move
    [again] = folder.claims()
    assert folder.finish(again, PROCESSED, "run-3").exists()
    second = folder.root / "precos2.csv"
    second.write_text("y")
    claim2 = folder.claim(second, file_digest(second))
    folder.finish(claim2, PROCESSED, "run-3")  # the same run id twice: both kept
    assert sorted(p.name for p in (folder.root / "processed").iterdir()) == ["run-3", f"run-3-{claim2.id}"]


def test_an_unknown_outcome_is_refused(tmp_path):
    folder, dropped = _dropped(tmp_path, "precos.csv", "x")
    claim = folder.claim(dropped, file_digest(dropped))
    with pytest.raises(ValueError, match="unknown outcome"):
        folder.finish(claim, "done", "run")
    assert claim.path.exists()


def _dropped(tmp_path: Path, name: str, text: str) -> tuple[DropFolder, Path]:
    """A drop folder under `tmp_path` with one file `name` holding `text` at its top."""
    folder = DropFolder(tmp_path / "in")
    folder.ensure()
    dropped = folder.root / name
    dropped.write_text(text)
    return folder, dropped
