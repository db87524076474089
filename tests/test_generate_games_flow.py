"""The generate-games flow end to end against a real Prefect server, a real redis-server and, for the larger
runs, a real Dask LocalCluster of process workers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect_dask import DaskTaskRunner

from blocks.redis_game_counter import RedisGameCounter
from flows.concurrency import GAMES_LIMIT
from flows.generate_games import generate_games
from operations.lottery.engine import games_to_masks
from operations.settings import get_settings
from run_checks import check_generated_run, fetch_link, run_and_subflow_ids, run_artifacts, run_texts

pytestmark = pytest.mark.slow


@pytest.fixture
def dask_settings(settings, monkeypatch):
    """Settings that send even small runs to Dask in small chunks: a 2-worker LocalCluster of the run's own, or
    the session's cluster with `on_session_cluster`."""
    monkeypatch.setenv("IN_PROCESS_MAX_QUANTITY", "0")
    monkeypatch.setenv("MIN_GAMES_PER_CHUNK", "1000")
    monkeypatch.setenv("MAX_GAMES_PER_CHUNK", "5000")
    monkeypatch.setenv("MAX_ROWS_PER_FILE", "6000")
    monkeypatch.setenv("ROWS_PER_SHEET", "4000")
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


def _check_run(result: dict, quantity: int, k: int = 6) -> np.ndarray:
    return check_generated_run(result["spreadsheets"], result["counter_snapshot"], quantity, k)


def test_small_run_in_process_with_artifacts(settings, tmp_path):
    state = generate_games(quantity=3_000, run_key=f"small-{uuid.uuid4().hex[:6]}", return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    games = _check_run(result, 3_000)
    assert len(result["spreadsheets"]) == 1
    artifacts = run_artifacts(state.state_details.flow_run_id)
    by_type: dict[str, list] = {}
    for artifact in artifacts:
        by_type.setdefault(artifact.type, []).append(artifact)
    links = [a.data for a in by_type["markdown"] if a.key and a.key.startswith("games-spreadsheet")] or [
        a.data for a in artifacts if a.key and a.key.startswith("games-spreadsheet")
    ]
    assert links, f"no link artifact among {[a.key for a in artifacts]}"
    for link in links:  # served over HTTP: the bytes are the file's
        assert fetch_link(link, tmp_path / "downloads").read_bytes() == Path(result["spreadsheets"][0]).read_bytes()
    table = next(a for a in artifacts if a.key == "games-first-number-distribution")
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert sum(r["generated"] for r in rows) == 3_000
    [progress] = [a for a in artifacts if a.type == "progress"]
    assert progress.data == 100.0 and progress.flow_run_id == state.state_details.flow_run_id
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # the chunks and writers ran in this flow run: no subflow
        run_id = state.state_details.flow_run_id
        assert run_and_subflow_ids(client, run_id) == [run_id]
    summary = next(a for a in artifacts if a.key == "games-run-summary")
    assert "3,000 games" in summary.data
    assert len(games) == 3_000


def test_dask_run_with_a_retried_chunk_respects_caps_and_never_repeats(dask_settings, on_session_cluster):
    run_key = f"dask-{uuid.uuid4().hex[:6]}"
    block = RedisGameCounter.from_url(os.environ["REDIS_URL"], key_prefix="flowtest")
    block.save("flowtest-counter", overwrite=True)
    block.counter(run_key).inject_faults(2, failures=1)  # chunk 2 fails once, after its claims
    quantity = 20_000
    state = generate_games(quantity=quantity, run_key=run_key, counter_block="flowtest-counter", return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    _check_run(result, quantity)
    assert len(result["spreadsheets"]) == 4  # 20,000 rows at most 6,000 per file, written in parallel
    for path in result["spreadsheets"]:
        from openpyxl import load_workbook

        wb = load_workbook(path, read_only=True)
        game_sheets = wb.worksheets[1:]
        assert game_sheets and all(sum(1 for _ in ws.iter_rows()) - 1 <= 4_000 for ws in game_sheets)
    counter = block.counter(run_key)
    caps = [int(v) for _, v in sorted(counter.client.hgetall(f"{counter.prefix}:caps").items())]
    counts = counter.region_counts(len(caps))
    assert all(c <= cap for c, cap in zip(counts, caps))
    assert counter.outputs()["games"] == quantity and counter.seen_count() == 0  # claims dropped once done
    counter.delete_run()


def test_resume_after_a_failed_run_generates_only_the_missing_chunks(dask_settings, on_session_cluster, monkeypatch):
    """The re-run generates only the missing chunks, with the first run's chunking even though the chunk
    settings changed in between (as when resuming on a cluster of another size)."""
    run_key = f"resume-{uuid.uuid4().hex[:6]}"
    block = RedisGameCounter.from_url(os.environ["REDIS_URL"], key_prefix="flowtest")
    block.save("flowtest-counter", overwrite=True)
    counter = block.counter(run_key)
    monkeypatch.setenv("GAMES_TASK_RETRIES", "1")  # one retry (after ~1 s) shows a retried chunk still fails
    get_settings.cache_clear()
    counter.inject_faults(3, failures=10)  # more than the task's retries: the first run fails
    quantity = 20_000
    first = generate_games(quantity=quantity, run_key=run_key, counter_block="flowtest-counter", return_state=True)
    assert first.is_failed()
    done_before = set(counter.committed_chunks())
    assert 3 not in done_before and done_before
    counter.inject_faults(3, failures=0)
    monkeypatch.setenv("MAX_GAMES_PER_CHUNK", "3000")
    get_settings.cache_clear()
    second = generate_games(quantity=quantity, run_key=run_key, counter_block="flowtest-counter", return_state=True)
    assert second.is_completed(), second.message
    result = second.result()
    assert result["chunks"] == 4 and result["chunks_generated"] == 4 - len(done_before)
    _check_run(result, quantity)
    assert counter.outputs()["games"] == quantity and counter.seen_count() == 0  # claims dropped once done
    counter.delete_run()


def test_infeasible_parameters_fail_before_any_chunk(settings, redis_client):
    run_key = f"infeasible-{uuid.uuid4().hex[:6]}"
    state = generate_games(
        quantity=5_000, rules={"sum_min": 21, "sum_max": 30}, run_key=run_key, return_state=True
    )
    assert state.is_failed()
    assert "sum 21..30" in state.message
    assert not list(redis_client.scan_iter(match=f"*{run_key}*"))
    assert not (settings.stack.output_dir / run_key).exists()
    _assert_one_clear_line(state, "sum 21..30")


def _assert_one_clear_line(state, message: str) -> None:
    """An expected user error: the run's log holds its message, and no traceback."""
    texts = run_texts(state.state_details.flow_run_id)
    assert any(message in t for t in texts), texts
    assert not [t for t in texts if "Traceback" in t], texts


def test_user_errors_end_the_run_with_one_clear_line(settings, tmp_path):
    missing = tmp_path / "no-draws.xlsx"
    state = generate_games(quantity=1_000, past_draws_file=str(missing), run_key=f"nodraws-{uuid.uuid4().hex[:6]}",
                           return_state=True)
    assert state.is_failed() and f"past draws file {missing} does not exist" in state.message
    _assert_one_clear_line(state, "does not exist")
    state = generate_games(quantity=5, numbers_per_game=20, highest_number=20, return_state=True)
    assert state.is_failed() and "only 1 distinct game exists" in state.message
    _assert_one_clear_line(state, "only 1 distinct game exists")


def test_a_run_without_a_link_base_fails_before_any_work_naming_the_setting(settings, monkeypatch, tmp_path):
    """Neither OUTPUT_BASE_URL nor a file server of this OUTPUT_DIR: the links could not be made, so the run
    stops at its start, in one line, instead of after generating and writing everything."""
    monkeypatch.delenv("OUTPUT_BASE_URL")
    monkeypatch.setenv("OUTPUT_DIR", str(tmp_path / "served-by-nobody"))
    get_settings.cache_clear()
    run_key = f"nolinks-{uuid.uuid4().hex[:6]}"
    state = generate_games(quantity=1_000, run_key=run_key, return_state=True)
    assert state.is_failed() and "OUTPUT_BASE_URL is not set" in state.message, state.message
    _assert_one_clear_line(state, "OUTPUT_BASE_URL is not set")
    assert not (tmp_path / "served-by-nobody" / run_key).exists()  # nothing generated or written
    get_settings.cache_clear()


def test_block_saved_loaded_and_used_inside_a_dask_worker(redis_url, dask_cluster):
    RedisGameCounter.from_url(redis_url, key_prefix="blocktest").save("blocktest-counter", overwrite=True)
    run_key = f"block-{uuid.uuid4().hex[:6]}"

    @task
    def claim_in_worker(name: str) -> tuple[int, dict]:
        counter = RedisGameCounter.load(name).counter(run_key)
        counter.initialise("fp", 10, [10])
        counter.begin_chunk(0, "t", 1)
        games = np.array([[5, 10, 15, 20, 25, 30]], dtype=np.uint8)
        counter.claim(0, "t", 1, games_to_masks(games), games[:, 0], np.zeros(1, int), 1)
        return os.getpid(), counter.snapshot()

    @flow(task_runner=DaskTaskRunner(address=dask_cluster))  # the session's cluster: worker processes of its own
    def use_block() -> tuple[int, dict]:
        return claim_in_worker.submit("blocktest-counter").result()

    pid, snapshot = use_block()
    assert pid != os.getpid()
    assert snapshot == {"counter": {"5": 1}, "total_generated": 1}
    RedisGameCounter.load("blocktest-counter").counter(run_key).delete_run()


def test_resume_after_the_flow_process_is_killed(dask_settings, dask_cluster, monkeypatch):
    """SIGKILL the whole flow process group (flow, its own LocalCluster) mid-run; the re-run with the same
    run_key (on the session's cluster) generates only the chunks that had not committed, releases the killed
    attempts' claims, and its counter matches its spreadsheets exactly."""
    run_key = f"killed-{uuid.uuid4().hex[:6]}"
    block = RedisGameCounter.from_url(os.environ["REDIS_URL"], key_prefix="flowtest")
    block.save("flowtest-counter", overwrite=True)
    counter = block.counter(run_key)
    quantity = 30_000  # 6 chunks of 5,000: killed after 2 have committed, 4 are left to resume
    script = (
        "from flows.generate_games import generate_games\n"
        f"generate_games(quantity={quantity}, run_key={run_key!r}, counter_block='flowtest-counter')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}  # a LocalCluster of its own
    env["DASK_N_WORKERS"] = "1"  # of one worker process: a kill of its group is what is tested, not its size
    process = subprocess.Popen(
        [sys.executable, "-c", script], start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.monotonic() + 180
    try:
        while len(counter.committed_chunks()) < 2:
            assert process.poll() is None, "the flow ended before it could be killed"
            assert time.monotonic() < deadline, "no chunk committed in time"
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    committed = set(counter.committed_chunks())
    # The killed run still holds its generation slot: a run waiting for it frees it once the killed holder's
    # heartbeat has been still for ~15 s (tasks/slots.py, tested in test_concurrency_limits.py). Resuming is what
    # this test checks, so the limit is made anew without the dead holder.
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(GAMES_LIMIT).active_slots == 1
        client.delete_global_concurrency_limit_by_name(GAMES_LIMIT)
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", dask_cluster)  # the re-run needs no cluster of its own
    get_settings.cache_clear()
    state = generate_games(quantity=quantity, run_key=run_key, counter_block="flowtest-counter", return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["chunks"] == 6 and result["chunks_generated"] == 6 - len(committed) < 6
    _check_run(result, quantity)
    assert counter.outputs()["games"] == quantity and counter.seen_count() == 0  # claims dropped once done
    counter.delete_run()


def test_an_unreachable_dask_scheduler_fails_fast_with_a_clear_message(settings, monkeypatch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", f"tcp://127.0.0.1:{port}")
    monkeypatch.setenv("DASK_CONNECT_TIMEOUT_SECONDS", "2")
    monkeypatch.setenv("IN_PROCESS_MAX_QUANTITY", "0")
    get_settings.cache_clear()
    started = time.monotonic()
    state = generate_games(quantity=1_000, run_key=f"nosched-{uuid.uuid4().hex[:6]}", return_state=True)
    assert state.is_failed()
    assert f"Dask scheduler tcp://127.0.0.1:{port}" in state.message and "unreachable" in state.message
    assert time.monotonic() - started < 60
    get_settings.cache_clear()


def test_a_cancelled_generation_starts_no_new_chunk_and_reports_what_it_committed(dask_settings, on_session_cluster):
    """The flow run is set CANCELLING through the API once 2 chunks have committed on Dask: no chunk commits
    seconds later (the chunks not started are cancelled, those starting see the cancel), the run's slot is given
    back, the run ends Cancelled with a summary of the committed chunks. (The in-process runner shares the
    flow's loop: one runner is enough here.)"""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.states import Cancelling

    run_key = f"cancel-{uuid.uuid4().hex[:6]}"
    block = RedisGameCounter.from_url(os.environ["REDIS_URL"], key_prefix="flowtest")
    block.save("flowtest-counter", overwrite=True)
    counter = block.counter(run_key)
    quantity, chunks, marks = 150_000, 30, {}  # chunks of 5,000: many left to cancel however fast they run

    def cancel_after_two_chunks() -> None:
        while len(counter.committed_chunks()) < 2:
            time.sleep(0.02)
        with get_client(sync_client=True) as client:
            [run] = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_key])))
            client.set_flow_run_state(run.id, Cancelling(), force=True)
        marks["cancelled"], seen = time.monotonic(), set(counter.committed_chunks())
        marks["last commit"] = marks["cancelled"]
        while "ended" not in marks:
            now = set(counter.committed_chunks())
            if now != seen:
                seen, marks["last commit"] = now, time.monotonic()
            time.sleep(0.05)

    watcher = threading.Thread(target=cancel_after_two_chunks, daemon=True)
    watcher.start()
    state = generate_games.with_options(flow_run_name=run_key)(
        quantity=quantity, run_key=run_key, counter_block="flowtest-counter", return_state=True)
    ended = time.monotonic()
    time.sleep(1.0)  # a chunk committing late would still be seen
    marks["ended"] = time.monotonic()
    watcher.join(10)
    last_commit = marks["last commit"] - marks["cancelled"]
    print(f"dask: last chunk committed {last_commit:.2f} s after the cancel, run ended "
          f"{ended - marks['cancelled']:.1f} s after it")
    assert state.is_cancelled(), state
    assert last_commit <= 10, last_commit
    committed = counter.committed_chunks()
    assert 2 <= len(committed) < chunks and f"{len(committed)} of {chunks} chunk(s) committed" in state.message, \
        state.message
    summary = next(a for a in run_artifacts(state.state_details.flow_run_id) if a.key == "games-run-summary")
    assert f"| Chunks committed | {len(committed)} of {chunks}" in summary.data and "cancelled" in summary.data
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(GAMES_LIMIT).active_slots == 0
    counter.delete_run()


def test_a_permanent_os_error_of_the_output_folder_is_not_retried(settings, monkeypatch, tmp_path):
    """OUTPUT_DIR that cannot hold the run's folder (here a file where the folder should be, the same as a
    read-only folder for the retry rule: an OSError that no retry heals): each chunk runs once, and the run fails
    at once, naming the path, instead of after its retries (1, 4 and 10 s apart)."""
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    blocked = tmp_path / "output-is-a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("OUTPUT_DIR", str(blocked))
    get_settings.cache_clear()
    state = generate_games(quantity=3_000, run_key=f"oserror-{uuid.uuid4().hex[:6]}", return_state=True)
    assert state.is_failed() and str(blocked) in state.message, state.message
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    chunks = [run for run in runs if run.name.startswith("chunk-")]
    assert chunks and all(run.run_count == 1 for run in chunks), [(r.name, r.run_count) for r in chunks]
    get_settings.cache_clear()
