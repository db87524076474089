"""Redis and disk stay bounded as generation runs accumulate: a completed run keeps a few KB in Redis and no
chunk files, a re-run of it is served from its outputs, and cleanup-runs expires old runs (real Prefect
server, real redis-server)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

from blocks.redis_game_counter import RedisGameCounter
from flows.cleanup_runs import cleanup_runs
from flows.generate_games import generate_games
from operations.infra import embedded_redis
from operations.infra.embedded_redis import ensure_embedded_redis, stop_embedded_redis
from operations.infra.processes import free_port, pid_alive
from operations.lottery.counter import RunFinished
from operations.lottery.retention import DAY_SECONDS, compact_aof
from operations.settings import get_settings
from run_checks import check_generated_run, run_and_subflow_ids, run_artifacts, run_texts

pytestmark = pytest.mark.slow

KEPT_KEYS = {"meta", "caps", "regions", "counter", "outputs"}


@pytest.fixture
def settings(settings, monkeypatch):
    """In-process runs cut in several chunks, so that a completed run has chunk keys and files to drop."""
    monkeypatch.setenv("MIN_GAMES_PER_CHUNK", "1000")
    monkeypatch.setenv("MAX_GAMES_PER_CHUNK", "5000")
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


@pytest.fixture
def counter_block(redis_url) -> tuple[str, RedisGameCounter]:
    """A block of its own key prefix, so cleanup here sees only this test's runs."""
    name = f"retention-{uuid.uuid4().hex[:6]}"
    block = RedisGameCounter.from_url(redis_url, key_prefix=name)
    block.save(name, overwrite=True)
    yield name, block
    keys = list(block.get_client().scan_iter(match=f"{name}:*"))
    if keys:
        block.get_client().delete(*keys)


def _task_run_names(flow_run_id) -> list[str]:
    """Names of the task runs of a flow run and of its subflows."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        ids = run_and_subflow_ids(client, flow_run_id)
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
        return [r.name for r in runs]


def _run(name: str, run_key: str, quantity: int = 3_000, **parameters):
    return generate_games(quantity=quantity, run_key=run_key, counter_block=name, return_state=True, **parameters)


def test_a_completed_run_keeps_a_few_kb_and_a_rerun_is_served_from_its_outputs(settings, counter_block):
    name, block = counter_block
    run_key = f"done-{uuid.uuid4().hex[:6]}"
    counter = block.counter(run_key)
    first = _run(name, run_key, quantity=3_000)
    assert first.is_completed(), first.message
    result = first.result()
    assert result["chunks_generated"] == result["chunks"] > 1
    check_generated_run(result["spreadsheets"], result["counter_snapshot"], 3_000)

    keys = {k.rsplit(":", 1)[-1] for k in counter.run_keys()}
    assert keys == KEPT_KEYS, keys
    memory = counter.memory_usage()
    assert memory < 8_192, f"{memory} bytes in Redis after the run"  # the seen set alone is many times that
    assert counter.snapshot()["total_generated"] == 3_000  # the counter stays for audits
    assert counter.outputs()["spreadsheets"][0]["path"] == result["spreadsheets"][0]
    run_dir = settings.stack.output_dir / run_key
    assert not (run_dir / "chunks").exists()
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        [Path(p).name for p in result["spreadsheets"]] + [f"counter-{run_key}.json"]
    )

    mtimes = [Path(p).stat().st_mtime_ns for p in result["spreadsheets"]]
    again = _run(name, run_key, quantity=3_000)
    assert again.is_completed(), again.message
    served = again.result()
    assert served["chunks_generated"] == 0
    assert (served["spreadsheets"], served["counter_snapshot"]) == (result["spreadsheets"], result["counter_snapshot"])
    assert [Path(p).stat().st_mtime_ns for p in served["spreadsheets"]] == mtimes
    assert not [n for n in _task_run_names(again.state_details.flow_run_id) if n.startswith(("chunk-", "spread"))]
    artifacts = run_artifacts(again.state_details.flow_run_id)
    assert any((a.key or "").startswith("games-spreadsheet") for a in artifacts)
    summary = next(a for a in artifacts if a.key == "games-run-summary")
    assert "Served from the run completed at" in summary.data
    assert {k.rsplit(":", 1)[-1] for k in counter.run_keys()} == KEPT_KEYS

    other = _run(name, run_key, quantity=3_000, seed=1)
    assert other.is_failed() and "other parameters" in other.message
    logs = run_texts(other.state_details.flow_run_id)  # a user error: one clear line, no traceback
    assert any("other parameters" in t for t in logs) and not [t for t in logs if "Traceback" in t], logs

    Path(result["spreadsheets"][0]).unlink()
    gone = _run(name, run_key, quantity=3_000)
    assert gone.is_failed()
    assert "files are gone" in gone.message and "another run_key" in gone.message, gone.message


def test_a_run_stopped_around_its_finish_resumes_or_is_served(settings, counter_block, monkeypatch):
    """Stopped just before the finishing script: the re-run generates nothing, rewrites the spreadsheets and
    finishes. Stopped between the script and the chunk files' removal: the re-run is served and removes them."""
    name, block = counter_block
    from flows import generate_games as flow_module
    from operations.lottery import retention

    def crash(*args, **kwargs):
        raise RuntimeError("stopped here")

    before, between = f"before-{uuid.uuid4().hex[:6]}", f"between-{uuid.uuid4().hex[:6]}"
    with monkeypatch.context() as patched:
        patched.setattr(flow_module, "finish_run", crash)
        assert _run(name, before, quantity=3_000).is_failed()
    assert block.counter(before).outputs() is None and block.counter(before).seen_count() == 3_000
    resumed = _run(name, before, quantity=3_000)
    assert resumed.is_completed(), resumed.message
    assert resumed.result()["chunks_generated"] == 0
    check_generated_run(resumed.result()["spreadsheets"], resumed.result()["counter_snapshot"], 3_000)
    assert {k.rsplit(":", 1)[-1] for k in block.counter(before).run_keys()} == KEPT_KEYS

    with monkeypatch.context() as patched:
        patched.setattr(retention, "remove_chunk_files", crash)
        assert _run(name, between, quantity=3_000).is_failed()
    assert block.counter(between).outputs() is not None
    assert (settings.stack.output_dir / between / "chunks").is_dir()
    served = _run(name, between, quantity=3_000)
    assert served.is_completed() and served.result()["chunks_generated"] == 0, served.message
    assert not (settings.stack.output_dir / between / "chunks").exists()
    with pytest.raises(RunFinished):  # a stray chunk attempt (a Dask recompute) cannot claim again
        block.counter(between).begin_chunk(0, "late", 5)
    assert block.counter(between).finish_run({"again": True}, 3) == 0  # nothing left to drop


def test_chunk_files_are_kept_with_the_setting(settings, counter_block, monkeypatch):
    name, block = counter_block
    monkeypatch.setenv("KEEP_CHUNK_FILES", "true")
    get_settings.cache_clear()
    run_key = f"kept-{uuid.uuid4().hex[:6]}"
    state = _run(name, run_key, quantity=3_000)
    assert state.is_completed(), state.message
    chunks = sorted((settings.stack.output_dir / run_key / "chunks").glob("chunk-*.npz"))
    assert len(chunks) == state.result()["chunks"] > 1
    assert {k.rsplit(":", 1)[-1] for k in block.counter(run_key).run_keys()} == KEPT_KEYS


def test_cleanup_removes_old_runs_and_keeps_recent_ones(settings, counter_block, monkeypatch):
    name, block = counter_block
    client = block.get_client()
    old_done, recent_done, old_failed = (f"{k}-{uuid.uuid4().hex[:6]}" for k in ("old", "recent", "failed"))
    for run_key in (old_done, recent_done):
        assert _run(name, run_key).is_completed()
    block.counter(old_failed).inject_faults(0, failures=10)  # more than the task's retries: the run fails
    with monkeypatch.context() as patched:
        patched.setenv("GAMES_TASK_RETRIES", "1")  # one retry, ~1 s: the run still fails after its retries
        get_settings.cache_clear()
        assert _run(name, old_failed).is_failed()
    get_settings.cache_clear()
    failed_keys = block.counter(old_failed).run_keys()
    assert f"{name}:{old_failed}:seen" in failed_keys  # a failed run keeps what a resume needs
    forty_days_ago = time.time() - 40 * DAY_SECONDS
    outputs_key = f"{name}:{old_done}:outputs"
    record = json.loads(client.get(outputs_key))
    client.set(outputs_key, json.dumps({**record, "completed_at": forty_days_ago}))
    client.hset(f"{name}:{old_failed}:meta", "active_at", int(forty_days_ago))
    output = settings.stack.output_dir
    orphan = output / "orphan-run"  # a run folder whose Redis keys are gone
    (orphan / "chunks").mkdir(parents=True)
    (orphan / "chunks" / "chunk-00000.npz").write_bytes(b"x" * 1000)
    other_flow = output / "products" / "old-file"  # another flow's outputs: never touched
    other_flow.mkdir(parents=True)
    (other_flow / "failures.xlsx").write_bytes(b"x")
    for path in (orphan / "chunks" / "chunk-00000.npz", orphan / "chunks", orphan, other_flow, output / "products"):
        os.utime(path, (forty_days_ago, forty_days_ago))

    dry = cleanup_runs(retention_days=30, dry_run=True, counter_block=name, return_state=True)
    assert dry.is_completed(), dry.message
    listed = dry.result()
    assert sorted(listed["removed"]) == sorted([old_done, old_failed, "orphan-run"])
    assert listed["kept"] == 1 and listed["redis_keys"] > 0 and listed["folder_bytes"] > 1000
    assert all((output / k).exists() for k in (old_done, old_failed, "orphan-run"))
    assert set(block.counter(old_failed).run_keys()) == set(failed_keys)

    state = cleanup_runs(retention_days=30, counter_block=name, return_state=True)
    assert state.is_completed(), state.message
    report = state.result()
    assert sorted(report["removed"]) == sorted(listed["removed"])
    assert (report["folder_bytes"], report["redis_keys"]) == (listed["folder_bytes"], listed["redis_keys"])
    for run_key in (old_done, old_failed, "orphan-run"):
        assert not (output / run_key).exists(), run_key
    assert not block.counter(old_done).run_keys() and not block.counter(old_failed).run_keys()
    assert (output / recent_done).is_dir() and block.counter(recent_done).outputs() is not None
    assert (other_flow / "failures.xlsx").exists()
    artifact = next(a for a in run_artifacts(state.state_details.flow_run_id) if a.key == "cleanup-runs-report")
    assert old_done in artifact.data and "Freed" in artifact.data
    assert _run(name, recent_done).result()["chunks_generated"] == 0  # still served after the cleanup


def test_aof_is_rewritten_once_it_has_outgrown_the_data(tmp_path):
    """A Redis of its own: 200,000 set members written one command each, then deleted, leave an append-only
    file many times its (empty) dataset; the rule asks for BGREWRITEAOF and the file shrinks."""
    server = ensure_embedded_redis(tmp_path / "redis")
    try:
        client = redis.Redis.from_url(server.url)
        pipe = client.pipeline(transaction=False)
        for i in range(200_000):
            pipe.sadd("bulk", i.to_bytes(8, "little"))
        pipe.execute()
        client.delete("bulk")
        before = compact_aof(client, dry_run=True, min_bytes=0)
        assert before.rewrite and before.current_bytes > 5_000_000, before
        assert compact_aof(client, dry_run=True).rewrite is False  # under the 64 MiB floor by default
        assert compact_aof(client, dry_run=False, min_bytes=0).rewrite
        deadline = time.monotonic() + 60
        while client.info("persistence")["aof_rewrite_in_progress"] or client.info("persistence")[
            "aof_rewrite_scheduled"
        ]:
            assert time.monotonic() < deadline, "the rewrite did not finish"
            time.sleep(0.1)
        after = compact_aof(client, dry_run=True, min_bytes=0)
        assert after.current_bytes < before.current_bytes / 50, (before, after)
        assert not after.rewrite, after
    finally:
        stop_embedded_redis(tmp_path / "redis")


def _slow_loading_redis(tmp_path: Path, monkeypatch, keys: int, delay_us: int) -> Path:
    """A Redis folder whose append-only file takes ~keys x delay_us to load: `keys` keys rewritten into the
    file's RDB preamble, and a redis-server started with Redis's own `key-load-delay` (microseconds slept per
    key loaded, the knob Redis's test suite uses for the same purpose). Values of 2 KB make the file ~6 MB:
    Redis 6.2 serves clients (LOADING) every 2 MB it loads. The server, its file and its loading are real;
    only their pace is slowed, so the suite needs no file of hundreds of MB."""
    redis_dir = tmp_path / "slow-redis"
    server = ensure_embedded_redis(redis_dir)
    client = redis.Redis.from_url(server.url)
    pipe = client.pipeline(transaction=False)
    for i in range(keys):
        pipe.set(f"k{i}", os.urandom(2_000))  # random: the file's RDB is compressed
    pipe.execute()
    client.bgrewriteaof()
    while client.info("persistence")["aof_rewrite_in_progress"] or client.info("persistence")["aof_rewrite_scheduled"]:
        time.sleep(0.05)
    stop_embedded_redis(redis_dir)
    real = embedded_redis.redis_server_binary()
    wrapper = tmp_path / "slow-redis-server"
    wrapper.write_text(f'#!/bin/sh\nexec "{real}" "$@" --key-load-delay {delay_us}\n')
    wrapper.chmod(0o755)
    monkeypatch.setattr(embedded_redis, "redis_server_binary", lambda: str(wrapper))
    return redis_dir


def test_redis_startup_waits_while_it_loads_and_fails_only_if_it_stays_unready(tmp_path, monkeypatch, caplog):
    redis_dir = _slow_loading_redis(tmp_path, monkeypatch, keys=3_000, delay_us=1_000)  # ~3 s of loading
    caplog.set_level("INFO", logger="operations.infra.embedded_redis")
    port = free_port()
    monkeypatch.setattr(embedded_redis, "free_port", lambda: port)
    answers: list[str] = []
    watching = threading.Event()

    def watch() -> None:  # another client meanwhile, as a worker starting at the same time would be
        while not watching.is_set():
            try:  # a bare RESP PING: redis-py would retry LOADING on its own
                with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                    sock.sendall(b"PING\r\n")
                    answers.append(sock.recv(64).split(b" ")[0].decode())
            except OSError as exc:
                answers.append(type(exc).__name__)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.monotonic()
    try:
        server = ensure_embedded_redis(redis_dir, start_timeout=60)
        took = time.monotonic() - started
        assert "loading its append-only file" in caplog.text and took > 2, (took, caplog.text)
        assert "-LOADING" in answers, set(answers)  # it answered LOADING, and was waited for
        assert redis.Redis.from_url(server.url).dbsize() == 3_000
    finally:
        watching.set()
        watcher.join()
        stop_embedded_redis(redis_dir)

    with pytest.raises(RuntimeError, match="still not ready after") as raised:
        ensure_embedded_redis(redis_dir, start_timeout=1)  # loading past its timeout: stopped, log shown
    assert "Redis version=" in str(raised.value)
    assert not _processes_using(redis_dir), "the unready server was left running"


def _processes_using(folder: Path) -> list[int]:
    """Pids of live processes whose command line names `folder` (zombies excluded)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and pid_alive(int(proc.name)) and str(folder).encode() in (
                proc / "cmdline"
            ).read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_redis_that_exits_while_starting_fails_at_once_with_its_log(tmp_path):
    redis_dir = tmp_path / "broken-redis"
    redis_dir.mkdir()
    (redis_dir / "appendonly.aof").write_bytes(b"*2\r\n$3\r\nSET\r\nnot a valid file")
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="exited") as raised:
        ensure_embedded_redis(redis_dir, start_timeout=60)
    assert time.monotonic() - started < 15
    assert "appendonly" in str(raised.value).lower() or "aof" in str(raised.value).lower(), raised.value
