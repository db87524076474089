"""The faults: each one injects its fault into runs of the suite's stack, measures with the ground truth of
faults/data.py, and returns its table rows. Nothing here assumes a fix: it waits (bounded), then says what it saw.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from faults import data as d
from faults.harness import TERMINAL, Harness, alive, kill, log, poll
from faults.truth import Row, healed_text, writes_after

QUIET_SECONDS = 8.0  # a stopped run: terminal and no write for this long


@dataclass(frozen=True)
class Options:
    products_rows: int = 40_000       # rows of a products file on Dask (200,000 for a production-sized one)
    cancel_repeats: int = 5
    cancel_at: float = 0.2            # progress at which a run is cancelled or killed
    cancel_wait: float = 120.0        # longest wait for a cancelled run to stop
    zombie_wait: float = 150.0        # longest wait for a killed run's runs to be marked terminal
    service_wait: float = 180.0       # longest wait for a killed service to come back by itself
    relay_wait: float = 90.0          # longest wait for outbox leftovers to be published without a new file
    run_timeout: float = 420.0        # longest wait for a run that should finish
    participants: int = 4_000
    turnstile_latency_ms: float = 150.0
    seller_orders: int = 8_000
    seller_items: int = 3_000
    market_latency_ms: float = 100.0


@dataclass
class Context:
    harness: Harness
    options: Options
    stream: str
    since_ms: int  # stream entries older than the suite are not its own

    def key(self, fault: str) -> str:
        return f"faults-{fault}-{uuid.uuid4().hex[:6]}"


def _progress_watch(count: Callable[[], int | None], total: int, run_id: str, harness: Harness, fraction: float,
                    timeout: float) -> tuple[bool, int]:
    """Wait until `count()` reaches `fraction` of `total` while the run is not terminal: (reached, count)."""
    seen = [0]

    def reached() -> bool:
        value = count()
        seen[0] = value if value is not None else seen[0]
        return seen[0] >= max(1, fraction * total) or harness.state(run_id) in TERMINAL

    poll(reached, timeout, every=0.2)
    return harness.state(run_id) not in TERMINAL and seen[0] >= max(1, fraction * total), seen[0]


def _watch_stop(harness: Harness, run_id: str, count: Callable[[], int | None], since: float, wait: float
                ) -> tuple[list[tuple[float, int]], float | None]:
    """Samples of `count()` from `since` until the run is terminal and `count()` stayed still QUIET_SECONDS
    (or `wait` passed); the second value: seconds from `since` until the run was terminal (None: never)."""
    samples: list[tuple[float, int]] = []
    terminal_at = None
    while time.monotonic() - since < wait:
        value, now = count(), time.monotonic()
        if value is not None:
            samples.append((now, value))
        if terminal_at is None and harness.state(run_id) in TERMINAL:
            terminal_at = now - since
        if terminal_at is not None:
            changed = [at for (at, v), (_, w) in zip(samples[1:], samples) if v != w]
            last = max([since + terminal_at, *changed])
            if now - last >= QUIET_SECONDS:
                break
        time.sleep(0.25)
    return samples, terminal_at


def _stopped_row(fault: str, harness: Harness, run_id: str, samples, cancelled_at: float, terminal_after,
                 unit: str, wait: float) -> tuple[Row, int, float | None]:
    more, last = writes_after(samples, cancelled_at)
    healed = max(terminal_after, last) if terminal_after is not None else None
    left = alive(harness.run_processes(run_id))
    note = f"{more:,} {unit} written after the cancel, the last {last:.1f} s after it"
    if left:
        note += f"; {len(left)} process(es) of the run still alive"
    return Row(fault, harness.family_states(run_id), healed=healed_text(healed, wait), note=note), more, healed


# -- cancel ------------------------------------------------------------------------------------------------------
def cancel_products(ctx: Context) -> list[Row]:
    """Products runs on Dask cancelled at ~20 % of their rows, `cancel_repeats` times; then the outbox of what
    they committed is watched for `relay_wait` seconds (nothing is started to publish it)."""
    h, o = ctx.harness, ctx.options
    files, states, more, heals, whole, summaries, leftovers = [], Counter(), [], [], 0, 0, 0
    for i in range(o.cancel_repeats):
        data = d.products_data(h, f"cp{i + 1}", o.products_rows)
        files.append(data)
        run = h.start("process-products/on-demand", {"file_path": str(data.path), "run_key": ctx.key(f"cp{i + 1}"),
                                                      "chunk_rows": _chunk_rows(o)})
        ok, at = _progress_watch(lambda: d.offers_loaded(h, data), data.rows, run, h, o.cancel_at, o.run_timeout)
        if not ok:
            states[f"{h.state_name(run)} before the cancel"] += 1
            continue
        cancelled_at = time.monotonic()
        h.cancel(run)
        log(f"cancel-products {i + 1}: cancelled at {at:,}/{data.rows:,} rows")
        samples, terminal = _watch_stop(h, run, lambda: d.offers_loaded(h, data), cancelled_at, o.cancel_wait)
        row, written, healed = _stopped_row("", h, run, samples, cancelled_at, terminal, "rows", o.cancel_wait)
        states[row.states] += 1
        more.append(written)
        heals.append(healed)
        final = samples[-1][1] if samples else 0
        whole += final >= data.rows
        summaries += "products-summary" in h.artifact_keys(run)
        leftovers += len(alive(h.run_processes(run)))
    waited = poll(lambda: (t := d.products_truth(h, files, ctx.stream, ctx.since_ms)) is not None
                  and t.messages.lost == 0 and t.waiting == 0, o.relay_wait, every=5)
    truth = d.products_truth(h, files, ctx.stream, ctx.since_ms)
    done = [x for x in heals if x is not None]
    healed = (f"max {max(done):.1f} s ({', '.join(f'{x:.1f}' for x in done)})" if len(done) == len(heals) and done
              else f"not healed after {o.cancel_wait:.0f} s in {len(heals) - len(done)} of {len(heals)}")
    note = (f"{o.products_rows:,}-row CSV per run on Dask; rows written after the cancel: "
            f"{more}; whole file loaded under the cancel in {whole} of {len(heals)}; summary artifact in "
            f"{summaries} of {len(heals)}; processes of the runs alive after the end: {leftovers}")
    if truth is not None:
        note += (f"; outbox after {o.relay_wait:.0f} s with no new file: {truth.waiting:,} message(s) waiting"
                 f" ({'drained in %.0f s' % waited if waited is not None else 'not drained'})")
    return [Row(f"cancel-products x{o.cancel_repeats}", _states(states),
                lost=f"{truth.messages.lost:,} msg" if truth else "?",
                doubled=f"{truth.messages.doubled:,} msg" if truth else "?", healed=healed, note=note)]


def _chunk_rows(options: Options) -> int:
    """16 chunks per file: progress in steps of ~6 %, so a cancel lands near 20 % and leaves most chunks to do."""
    return max(100, options.products_rows // 16)


def _states(counter: Counter) -> str:
    return ", ".join(f"{state} x{n}" if n > 1 else state for state, n in counter.items())


def _sync_under_way(h: Harness, o: Options, seller: d.SellerData) -> tuple[str, bool, int]:
    """Start an on-demand sync of `seller`'s orders and items and wait until `o.cancel_at` of its rows are in
    the database: (the run's id, whether it got there before ending, the rows synced)."""
    run = h.start("sync-marketplace/on-demand", {"accounts": [seller.seller_id], "resources": "both"})
    ok, at = _progress_watch(lambda: d.synced_count(h, seller), seller.total, run, h, o.cancel_at, o.run_timeout)
    return run, ok, at


def cancel_sync(ctx: Context) -> list[Row]:
    """A sync of one seller cancelled at ~20 % of its orders and items: what it wrote after the cancel (rows in
    the database, requests at the marketplace), how long until it stopped, what the account says."""
    from emulators.marketplace import EmulatorControl

    h, o = ctx.harness, ctx.options
    seller = d.seller_data(h, 0, o.seller_orders, o.seller_items)
    d.set_market_latency(h, o.market_latency_ms)
    try:
        run, ok, at = _sync_under_way(h, o, seller)
        if not ok:
            return [Row("cancel-sync", h.family_states(run), note=f"ended before {o.cancel_at:.0%} ({at} rows)")]
        with EmulatorControl(h.market_url) as control:
            requests_at_cancel = control.stats()["total"]
            cancelled_at = time.monotonic()
            h.cancel(run)
            samples, terminal = _watch_stop(h, run, lambda: d.synced_count(h, seller), cancelled_at, o.cancel_wait)
            requests_after = control.stats()["total"] - requests_at_cancel
    finally:
        d.set_market_latency(h, 0)
    row, _, _ = _stopped_row("cancel-sync", h, run, samples, cancelled_at, terminal, "orders/items", o.cancel_wait)
    truth = d.sync_truth(h, seller)
    row.note += (f"; {requests_after:,} marketplace requests after the cancel; account last_sync_status "
                 f"'{d.account_sync_status(h, seller)}'; cancelled at {at:,}/{seller.total:,}")
    row.lost = "n/a (cancelled)"
    row.doubled = f"{truth.doubled:,} rows" if truth else "?"
    return [row]


def cancel_registration(ctx: Context) -> list[Row]:
    """A registration on one turnstile cancelled at ~20 % of its writes: objects the device wrote after the
    cancel, how long until it stopped, the turnstile's slot afterwards."""
    h, o = ctx.harness, ctx.options
    gate = d.turnstile_data(h, 0, o.participants)
    d.set_turnstile_latency(h, o.turnstile_latency_ms)
    expected_writes = 3 * o.participants  # users, cards, group links
    try:
        run = h.start("register-participants/on-demand",
                      {"participants_file": str(gate.path), "turnstiles": [gate.name], "batch_size": 50})
        ok, at = _progress_watch(lambda: d.device_writes(h, gate), expected_writes, run, h, o.cancel_at,
                                 o.run_timeout)
        if not ok:
            return [Row("cancel-registration", h.family_states(run), note=f"ended before the cancel ({at} writes)")]
        cancelled_at = time.monotonic()
        h.cancel(run)
        samples, terminal = _watch_stop(h, run, lambda: d.device_writes(h, gate), cancelled_at, o.cancel_wait)
    finally:
        d.set_turnstile_latency(h, 0)
    row, _, _ = _stopped_row("cancel-registration", h, run, samples, cancelled_at, terminal, "device objects",
                             o.cancel_wait)
    truth = d.turnstile_truth(h, gate)
    slots = h.limit_slots(f"turnstile:{gate.name}")
    row.note += f"; cancelled at {at:,}/{expected_writes:,} objects; turnstile slots held afterwards: {slots}"
    row.lost = "n/a (cancelled)"
    row.doubled = f"{truth.doubled:,} users/cards" if truth else "?"
    return [row]


# -- kill -9 of a flow process ---------------------------------------------------------------------------------
def _kill_flow(h: Harness, run: str) -> tuple[int | None, float]:
    pid = h.flow_process(run)
    killed_at = time.monotonic()
    if not kill(pid):
        return None, killed_at
    return pid, killed_at


def _zombie_watch(h: Harness, run: str, killed_at: float, wait: float, also: Callable[[], bool] = lambda: True,
                  also_wait: float | None = None) -> tuple[float | None, float | None]:
    """(seconds from the kill until the run and its subflows were terminal, seconds until that and `also()`
    held); None: not within `wait` seconds of the kill (`also` gets `also_wait` seconds from the kill, or
    until the runs were terminal when they took longer)."""
    terminal_after = None
    while time.monotonic() - killed_at < wait:
        if terminal_after is None and h.family_terminal(run):
            terminal_after = time.monotonic() - killed_at
        if terminal_after is not None:
            if also():
                return terminal_after, time.monotonic() - killed_at
            if also_wait is not None and time.monotonic() - killed_at > max(also_wait, terminal_after):
                return terminal_after, None
        time.sleep(1)
    return terminal_after, None


def kill_products(ctx: Context) -> list[Row]:
    """kill -9 of a products run's flow process at ~20 %: its runs' states (zombies), whether what it
    committed is published without a new file; then a person's re-run of the same file and the ground truth."""
    h, o = ctx.harness, ctx.options
    data = d.products_data(h, "kp", o.products_rows)
    key = ctx.key("kp")
    run = h.start("process-products/on-demand", {"file_path": str(data.path), "run_key": key,
                                                  "chunk_rows": _chunk_rows(o)})
    ok, at = _progress_watch(lambda: d.offers_loaded(h, data), data.rows, run, h, o.cancel_at, o.run_timeout)
    if not ok:
        return [Row("kill-products", h.family_states(run), note=f"ended before the kill ({at} rows)")]
    processes = h.run_processes(run)
    pid, killed_at = _kill_flow(h, run)
    log(f"kill-products: killed pid {pid} at {at:,}/{data.rows:,} rows")

    def published() -> bool:
        truth = d.products_truth(h, [data], ctx.stream, ctx.since_ms)
        return truth is not None and truth.messages.lost == 0 and truth.waiting == 0

    terminal, healed = _zombie_watch(h, run, killed_at, o.zombie_wait, published, o.relay_wait)
    states = h.family_states(run)
    before = d.products_truth(h, [data], ctx.stream, ctx.since_ms)
    left = alive(processes)
    watched = time.monotonic() - killed_at
    rerun = h.start("process-products/on-demand", {"file_path": str(data.path), "run_key": key})
    rerun_state = h.wait(rerun, o.run_timeout)
    truth = d.products_truth(h, [data], ctx.stream, ctx.since_ms)
    note = (f"killed at {at:,}/{data.rows:,} rows; runs terminal {healed_text(terminal, o.zombie_wait)} after the"
            f" kill; before the re-run: {before.text() if before else '?'}; {len(left)} process(es) of the killed"
            f" run alive {watched:.0f} s after; a person's re-run: "
            f"{rerun_state.title()}, then {truth.text() if truth else '?'}")
    return [Row("kill-products (flow process)", states,
                lost=f"{truth.rows.lost + truth.rows.wrong:,} rows, {truth.messages.lost:,} msg" if truth else "?",
                doubled=f"{truth.messages.doubled:,} msg" if truth else "?",
                healed=healed_text(healed, watched), note=note)]


def kill_sync(ctx: Context) -> list[Row]:
    """kill -9 of a sync's flow process at ~20 %: its runs' states, then whether the `after-crash` deployment
    (started by the Crashed state) released the account and synced it to the end, without a person: the
    emulator's orders and items against the database."""
    h, o = ctx.harness, ctx.options
    seller = d.seller_data(h, 1, o.seller_orders, o.seller_items)
    d.set_market_latency(h, o.market_latency_ms)
    try:
        run, ok, at = _sync_under_way(h, o, seller)
        if not ok:
            return [Row("kill-sync", h.family_states(run), note=f"ended before the kill ({at} rows)")]
        pid, killed_at = _kill_flow(h, run)
    finally:
        d.set_market_latency(h, 0)
    log(f"kill-sync: killed pid {pid} at {at:,}/{seller.total:,}")

    def synced_in_full() -> bool:
        truth = d.sync_truth(h, seller)
        return d.account_sync_status(h, seller) == "synced" and truth is not None and truth.lost == 0

    terminal, healed = _zombie_watch(h, run, killed_at, o.run_timeout, synced_in_full)
    states, status = h.family_states(run), d.account_sync_status(h, seller)
    truth = d.sync_truth(h, seller)
    note = (f"killed at {at:,}/{seller.total:,} orders+items; run terminal {healed_text(terminal, o.zombie_wait)}"
            f" after the kill; the after-crash sync left the account '{status}' with every row "
            f"{healed_text(healed, o.run_timeout)} after the kill, no person")
    return [Row("kill-sync (flow process)", states, lost=f"{truth.lost:,} rows" if truth else "?",
                doubled=f"{truth.doubled:,} rows" if truth else "?", healed=healed_text(healed, o.run_timeout),
                note=note)]


def kill_registration(ctx: Context) -> list[Row]:
    """kill -9 of a registration's flow process at ~20 %, then at once a new registration of the same
    turnstile (as the operator would): seconds until the new run writes (its slot taken), the killed run's
    states, then the device against the file."""
    h, o = ctx.harness, ctx.options
    gate = d.turnstile_data(h, 1, o.participants)
    d.set_turnstile_latency(h, o.turnstile_latency_ms)
    expected_writes = 3 * o.participants
    parameters = {"participants_file": str(gate.path), "turnstiles": [gate.name], "batch_size": 50}
    try:
        run = h.start("register-participants/on-demand", parameters)
        ok, at = _progress_watch(lambda: d.device_writes(h, gate), expected_writes, run, h, o.cancel_at, o.run_timeout)
        if not ok:
            return [Row("kill-registration", h.family_states(run), note=f"ended before the kill ({at} writes)")]
        pid, killed_at = _kill_flow(h, run)
        log(f"kill-registration: killed pid {pid} at {at:,}/{expected_writes:,} objects")
        time.sleep(1.0)
        writes_at_kill = d.device_writes(h, gate) or 0
        rerun = h.start("register-participants/on-demand", parameters)
        slot_after = terminal = None
        while time.monotonic() - killed_at < o.run_timeout:
            since = time.monotonic() - killed_at
            if terminal is None and h.family_terminal(run):
                terminal = since
            if slot_after is None and ((d.device_writes(h, gate) or 0) > writes_at_kill
                                       or h.state(rerun) in TERMINAL):
                slot_after = since
            if slot_after is not None and (terminal is not None or since > o.zombie_wait):
                break
            time.sleep(0.5)
        rerun_state = h.wait(rerun, o.run_timeout)
    finally:
        d.set_turnstile_latency(h, 0)
    if terminal is None:
        terminal, _ = _zombie_watch(h, run, killed_at, o.zombie_wait)
    truth = d.turnstile_truth(h, gate)
    slots = h.limit_slots(f"turnstile:{gate.name}")
    note = (f"killed at {at:,}/{expected_writes:,} objects; the new registration started at once wrote its first "
            f"object {healed_text(slot_after, o.run_timeout)} after the kill (its slot taken) and ended "
            f"{rerun_state.title()}; killed run terminal {healed_text(terminal, o.zombie_wait)} after the kill;"
            f" slots held at the end: {slots}")
    return [Row("kill-registration (flow process) + new registration", h.family_states(run),
                lost=f"{truth.lost:,} users/cards" if truth else "?",
                doubled=f"{truth.doubled:,} users/cards" if truth else "?",
                healed=f"slot back {healed_text(slot_after, o.run_timeout)}", note=note)]


# -- the outbox ----------------------------------------------------------------------------------------------------
_REFUSE_MARKS = """
CREATE OR REPLACE FUNCTION faults_refuse_outbox_marks() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN RAISE EXCEPTION 'faults: the publisher dies before marking'; END $$;
DROP TRIGGER IF EXISTS faults_refuse_outbox_marks ON outbox_batches;
CREATE TRIGGER faults_refuse_outbox_marks BEFORE UPDATE ON outbox_batches
FOR EACH STATEMENT EXECUTE FUNCTION faults_refuse_outbox_marks();
"""
_FIRST_UNPUBLISHED = """
SELECT b.id FROM outbox_batches b
WHERE b.published_at IS NULL AND EXISTS (
    SELECT 1 FROM json_array_elements(CAST(b.messages AS json)) AS m(message)
    WHERE CAST(m.message ->> 4 AS json) ->> 'dealer_code' = ANY(CAST(:c AS text[])))
ORDER BY b.id LIMIT 1
"""  # the first outbox row (a batch of up to 2,000 messages) holding messages of these dealers
_ALLOW_MARKS = "DROP TRIGGER IF EXISTS faults_refuse_outbox_marks ON outbox_batches"


def outbox_guard_expiry(ctx: Context) -> list[Row]:
    """Outbox leftovers (a products run whose every publish failed), one batch of them added to the stream by a
    publisher that died before marking them (the project's own publish, its mark refused by a trigger), then
    the passage of time past every guard's lifetime (the Redis keys of the stream that carry a TTL deleted, as
    the TTL would). Then, without a new file, `relay_wait` seconds for something to publish them; if nothing
    did, the next products file (the only publisher the stack may have). Doubles and losses in the stream."""
    from blocks.products_queue import ProductsQueue
    from operations.products.outbox import publish_outbox

    h, o = ctx.harness, ctx.options
    queue = ProductsQueue.load(h.settings.products.queue_block)
    data = d.products_data(h, "ob", 6_000)
    publisher = queue.publisher()
    publisher.inject_faults(1_000_000)  # every publish fails before adding anything, until cleared
    try:
        run = h.start("process-products/on-demand", {"file_path": str(data.path), "run_key": ctx.key("ob")})
        state = h.wait(run, o.run_timeout)
        left = d.unpublished(h, [data]) or 0
        batch = [i for (i,) in h.sql(_FIRST_UNPUBLISHED, c=data.dealers) or []]
        batch_messages = h.scalar("SELECT coalesce(sum(message_count), 0) FROM outbox_batches "
                                  "WHERE id = ANY(CAST(:ids AS bigint[]))", ids=batch) or 0
        h.sql(_REFUSE_MARKS)
        if h.scalar("SELECT count(*) FROM pg_trigger WHERE tgname = 'faults_refuse_outbox_marks'") != 1:
            raise RuntimeError("the trigger that refuses the outbox marks could not be created")
    finally:
        h.redis.delete(publisher._faults_key)
    died = ""
    try:
        publish_outbox(h.engine, publisher, batch)
    except TypeError:  # not the refused mark: the publisher's signature is not the one this fault calls
        raise
    except Exception as exc:  # noqa: BLE001 - the refused mark: the publisher "dies" after adding the batch
        died = type(exc).__name__
    finally:
        h.sql(_ALLOW_MARKS)
    in_stream = d.products_truth(h, [data], ctx.stream, ctx.since_ms)
    expired = _expire_guards(h, queue.stream)
    died = died or "the publisher raised nothing"
    log(f"outbox: {left:,} left by a {state} run, {batch_messages:,} added unmarked ({died}), {expired:,} TTL keys gone")
    drained = poll(lambda: d.unpublished(h, [data]) == 0, o.relay_wait, every=2)  # None (unreadable): not yet
    how = f"published by the stack within {drained:.0f} s" if drained is not None else ""
    if drained is None:
        nxt = d.products_data(h, "ob-next", 300)
        started = time.monotonic()
        h.wait(h.start("process-products/on-demand", {"file_path": str(nxt.path), "run_key": ctx.key("obn")}),
               o.run_timeout)
        how = (f"nothing published them in {o.relay_wait:.0f} s; the next products file did "
               f"({time.monotonic() - started:.0f} s)" if not d.unpublished(h, [data]) else
               f"nothing published them, not even the next products file")
    truth = d.products_truth(h, [data], ctx.stream, ctx.since_ms)
    note = (f"{left:,} message(s) left in the outbox by a {state.title()} run; {batch_messages:,} added to the stream"
            f" unmarked ({in_stream.messages.found if in_stream else '?'} in the stream); {expired:,} guard key(s) "
            f"with a TTL deleted (the passage of time); {how}; then {truth.text() if truth else '?'}")
    return [Row("outbox leftovers + guard lifetime passed", state.title(),
                lost=f"{truth.messages.lost:,} msg" if truth else "?",
                doubled=f"{truth.messages.doubled:,} msg" if truth else "?",
                healed=healed_text(drained, o.relay_wait), note=note)]


def _expire_guards(h: Harness, stream: str) -> int:
    """Delete the keys of the stream's hash tag that carry a TTL (what their expiry would do); keys without a
    TTL stay (the passage of time does not remove them)."""
    expired = 0
    for key in h.redis.scan_iter(match=f"*{stream}*", count=10_000):
        if key.decode() != stream and h.redis.ttl(key) > 0:
            expired += h.redis.delete(key)
    return expired


# -- kill -9 of a service -------------------------------------------------------------------------------------------
def _kill_service(ctx: Context, service: str, index: int) -> list[Row]:
    """A products load and a sync running, kill -9 of the service (PostgreSQL's postmaster or Redis); then up to
    `service_wait` seconds for everything to heal by itself: the service back, both runs ended, the data exact.
    A service still down then is started by `make up` (a person) so the suite can go on, and said so."""
    h, o = ctx.harness, ctx.options
    tag = f"k{service[:2]}"
    data = d.products_data(h, tag, o.products_rows)
    seller = d.seller_data(h, index, o.seller_orders, o.seller_items)
    d.set_market_latency(h, o.market_latency_ms)
    sync = h.start("sync-marketplace/on-demand", {"accounts": [seller.seller_id], "resources": "both"})
    _progress_watch(lambda: d.synced_count(h, seller), seller.total, sync, h, 0.05, 120)
    products = h.start("process-products/on-demand", {"file_path": str(data.path), "run_key": ctx.key(tag),
                                                       "chunk_rows": _chunk_rows(o)})
    _progress_watch(lambda: d.offers_loaded(h, data), data.rows, products, h, o.cancel_at, o.run_timeout)
    at_products, at_sync = d.offers_loaded(h, data), d.synced_count(h, seller)
    running = [h.state(products), h.state(sync)]
    pid = h.service_pid(service)
    killed_at = time.monotonic()
    killed = kill(pid)
    log(f"kill-{service}: pid {pid} killed={killed}; products {at_products}, sync {at_sync}, runs {running}")
    probe = h.database_alive if service == "postgres" else h.redis_alive
    back_after: float | None = None

    def healed() -> bool:
        nonlocal back_after
        if back_after is None:
            if not probe():
                return False
            back_after = time.monotonic() - killed_at
        if not (h.family_terminal(products) and h.family_terminal(sync)):
            return False
        truth = d.products_truth(h, [data], ctx.stream, ctx.since_ms)
        synced = d.sync_truth(h, seller)
        return bool(truth and synced and truth.rows.exact and truth.messages.exact and synced.exact)

    heal = poll(healed, o.service_wait, every=2)
    d.set_market_latency(h, 0)
    person = ""
    if back_after is None:
        person = f"; {service} still down after {o.service_wait:.0f} s: started by `make up` ({h.make_up()})"
        ended = poll(lambda: h.family_terminal(products) and h.family_terminal(sync), 60, every=2)
        person += "; the runs ended after it" if ended is not None else "; the runs still not terminal 60 s after it"
    truth = d.products_truth(h, [data], ctx.stream, ctx.since_ms)
    synced = d.sync_truth(h, seller)
    back = f"{service} back {healed_text(back_after, o.service_wait)} after the kill" if back_after is not None else ""
    common = f"kill -9 of {service} (pid {pid}){': ' + back if back else ''}{person}"
    return [
        Row(f"kill-{service} during a products load", h.family_states(products),
            lost=f"{truth.rows.lost + truth.rows.wrong:,} rows, {truth.messages.lost:,} msg" if truth else "?",
            doubled=f"{truth.messages.doubled:,} msg" if truth else "?", healed=healed_text(heal, o.service_wait),
            note=f"{common}; at the kill {at_products:,}/{data.rows:,} rows; at the end "
                 f"{truth.text() if truth else '?'}"),
        Row(f"kill-{service} during a sync", h.family_states(sync),
            lost=f"{synced.lost:,} rows" if synced else "?", doubled=f"{synced.doubled:,} rows" if synced else "?",
            healed=healed_text(heal, o.service_wait),
            note=f"{common}; at the kill {at_sync:,}/{seller.total:,} orders+items; account last_sync_status "
                 f"'{d.account_sync_status(h, seller)}' at the end"),
    ]


def kill_postgres(ctx: Context) -> list[Row]:
    return _kill_service(ctx, "postgres", 2)


def kill_redis(ctx: Context) -> list[Row]:
    return _kill_service(ctx, "redis", 3)


# What `--list` shows of each fault.
SUMMARIES = {
    "cancel-products": "products runs on Dask cancelled at ~20 % (x cancel-repeats); writes after, outbox after",
    "cancel-sync": "a sync cancelled at ~20 %: rows and marketplace requests after the cancel",
    "cancel-registration": "a registration cancelled at ~20 %: device writes after the cancel, the slot",
    "kill-products": "kill -9 of a products run's flow process: states, outbox, a person's re-run, the data",
    "kill-sync": "kill -9 of a sync's flow process: states, the after-crash sync of the account, the data",
    "kill-registration": "kill -9 of a registration, a new one of the same turnstile at once: its slot, the data",
    "outbox-guard-expiry": "outbox leftovers, a batch added unmarked, guards expired: who publishes, doubles",
    "kill-postgres": "kill -9 of the PostgreSQL postmaster during a products load and a sync: healing",
    "kill-redis": "kill -9 of Redis during a products load and a sync: healing",
}
FAULTS: dict[str, Callable[[Context], list[Row]]] = {
    "cancel-products": cancel_products,
    "cancel-sync": cancel_sync,
    "cancel-registration": cancel_registration,
    "kill-products": kill_products,
    "kill-sync": kill_sync,
    "kill-registration": kill_registration,
    "outbox-guard-expiry": outbox_guard_expiry,
    "kill-postgres": kill_postgres,
    "kill-redis": kill_redis,
}
