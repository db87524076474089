"""Flow `register-participants`: every participant of a file on every access-control turnstile, one mapped task
per turnstile, in batches, cached in Redis, within each device's limits across flow runs, retried, reported.

Stages: read and check the participants file once (a missing or malformed file is refused naming the row and column,
before any device call), resolve the turnstiles (saved TurnstileDevice blocks: all of them by default); check every
turnstile's identity and health before its cache is trusted (in the flow's own body, all at once: a reset or
replaced one is registered in full and told); then, only for the turnstiles with work, create or update each one's
global concurrency limit and register on them in parallel on the configured task runner (an unreachable one fails
its own task after its retries, the others finish); a run with nothing to write ends after the check; then publish
the report (the seed's figures, a table of turnstiles, the failed records as a linked spreadsheet when any failed)
and end Failed if any record failed. A dry run reports its work as planned.

A cancelled run (the run's state, or the worker's SIGTERM) starts no new write within seconds: each device task
stops between batches and returns what it wrote; the run publishes the report of what was done before the
cancel and ends Cancelled.
"""

from __future__ import annotations

import contextvars
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import BlockDocument
from prefect.context import SyncClientContext
from prefect.exceptions import TerminationSignal
from prefect.futures import PrefectFuture, wait
from prefect.runtime import flow_run
from prefect.states import Cancelled, Failed, State
from prefect.utilities.annotations import unmapped
from pydantic import Field
from redis.exceptions import RedisError
from typing_extensions import Annotated

from blocks.turnstile_device import TurnstileCache, TurnstileDevice
from flows.concurrency import upsert_concurrency_limit
from flows.forms import form_field
from flows.outcomes import ends_failed_on_user_error
from flows.task_runners import io_task_runner
from operations.errors import UserError
from operations.infra.heap import settled_heap
from operations.infra.links import output_base_url, output_link
from operations.infra.tabular import READ_FILE_PATTERN
from operations.settings import Settings, get_settings
from operations.turnstiles.identity import Logouts, any_cached, turnstiles_with_work, with_checks
from operations.turnstiles.cache import KnownFile
from operations.turnstiles.participants import ParticipantsFile, file_key, participants_path, read_participants
from operations.turnstiles.registration import DeviceFailed, DeviceReport, RegistrationOptions
from operations.turnstiles.report import (
    RegistrationIncomplete,
    registration_failure_message,
    registration_failures,
    registration_markdown,
    registration_summary,
    turnstile_rows,
    write_registration_failures,
)
from tasks.cancellation import note_termination, run_stop_check, watch_termination
from tasks.retries import with_retries
from tasks.registration import (
    Participants,
    RunProgress,
    check_turnstiles,
    device_limit_name,
    register_on_turnstile,
)

TURNSTILE_SLUG, CACHE_SLUG = TurnstileDevice.get_block_type_slug(), TurnstileCache.get_block_type_slug()
LIMITS_PAGE = 200  # global concurrency limits read per request
BLOCKS_PAGE = 200  # block documents read per request (the server's most)
STOP_WAIT_SECONDS = 20.0  # after a SIGTERM, how long the device tasks get to stop and report (the worker kills at 30 s)

FILE_PATTERN = r"^$|" + READ_FILE_PATTERN  # .xlsx, .xls, .ods or .csv; empty: PARTICIPANTS_FILE


class RegistrationCancelled(RuntimeError):
    """The run was cancelled: its report says what was written before."""


class UnknownTurnstile(UserError, ValueError):
    """A turnstile name with no saved TurnstileDevice block, or no block saved at all."""


def load_turnstiles(names: list[str]) -> dict[str, TurnstileDevice]:
    """The named TurnstileDevice blocks (every saved one when `names` is empty); unknown names are an error
    naming them and the devices that exist."""
    return load_turnstiles_and_cache(names, None)[0]


def load_turnstiles_and_cache(names: list[str], cache_block: str | None
                              ) -> tuple[dict[str, TurnstileDevice], BlockDocument | None]:
    """`load_turnstiles`, and the document of the TurnstileCache block named `cache_block` read in the same
    request (None when it is not saved)."""
    with get_client(sync_client=True) as client:
        documents, cache = _turnstile_documents(client, names, cache_block=cache_block)
        unknown = sorted(set(names) - set(documents))
        if unknown:
            saved = sorted(_turnstile_documents(client, [], include_secrets=False)[0])
            raise UnknownTurnstile(f"no TurnstileDevice block named {', '.join(unknown)}; "
                                   f"saved: {', '.join(saved) or 'none'}")
    chosen = list(dict.fromkeys(names)) or sorted(documents)
    if not chosen:
        raise UnknownTurnstile("no turnstile is configured: save TurnstileDevice blocks (UI, or "
                               "python -m deployments.turnstile_devices load FILE)")
    return {name: _device_block(documents[name]) for name in chosen}, cache


def _turnstile_documents(client: SyncPrefectClient, names: list[str], include_secrets: bool = True,
                         cache_block: str | None = None) -> tuple[dict[str, BlockDocument], BlockDocument | None]:
    """The saved TurnstileDevice block documents named `names` (every one when empty), by name: only those
    (the server decrypts each document's secrets), BLOCKS_PAGE a request; and the TurnstileCache document named
    `cache_block` (if given and saved), read by the same requests."""
    slugs = [TURNSTILE_SLUG] + ([CACHE_SLUG] if cache_block else [])
    named = [*names, cache_block] if names and cache_block else names
    body = {"block_types": {"slug": {"any_": slugs}},
            "block_documents": {"is_anonymous": {"eq_": False}, **({"name": {"any_": named}} if named else {})},
            "include_secrets": include_secrets, "limit": BLOCKS_PAGE}
    documents, cache, offset = {}, None, 0
    while True:
        page = client.request("POST", "/block_documents/filter", json={**body, "offset": offset}).json()
        for document in BlockDocument.model_validate_list(page):
            slug = document.block_type.slug if document.block_type else TURNSTILE_SLUG
            if slug == TURNSTILE_SLUG:
                documents[document.name] = document
            elif document.name == cache_block:
                cache = document
        if len(page) < BLOCKS_PAGE:
            return documents, cache
        offset += BLOCKS_PAGE


def _device_block(document) -> TurnstileDevice:
    """The block of a document read with the others (one API call for all), else loaded on its own."""
    if document.block_schema is None:
        return TurnstileDevice.load(document.name, _sync=True)
    return TurnstileDevice._load_from_block_document(document)


def ensure_device_limits(devices: dict[str, TurnstileDevice]) -> None:
    """Each device's global concurrency limit, created or updated from its block (max concurrent requests): one
    read of every limit, then a write only for those missing or different (none on most runs)."""
    wanted = {device_limit_name(name): device.max_concurrent_requests for name, device in devices.items()}
    with get_client(sync_client=True) as client:
        existing, offset = {}, 0
        while True:
            page = client.read_global_concurrency_limits(limit=LIMITS_PAGE, offset=offset)
            existing.update((limit.name, limit.limit) for limit in page)
            if len(page) < LIMITS_PAGE:
                break
            offset += LIMITS_PAGE
        for name, slots in wanted.items():
            if existing.get(name) != slots:
                upsert_concurrency_limit(client, name, slots)


def load_inputs(source: Path, names: list[str], cache_block: str, settings: Settings
                ) -> tuple[ParticipantsFile, str, str, dict[str, TurnstileDevice], TurnstileCache]:
    """The participants file, its `file_key`, the `roster_digest` of its participants when the file was known
    ("" when it was read now), the turnstiles' blocks and the cache block (answering). A file Redis knows by its
    key (read and accepted by an earlier run) is taken as it read then; any other is read and checked here."""
    key = file_key(source, settings.turnstiles.timezone)
    devices, cache, known = blocks_and_known_file(names, cache_block, settings, key)
    if known is not None:
        return known.people, key, known.digest, devices, cache
    return read_participants(source, settings.turnstiles.timezone), key, "", devices, cache


def blocks_and_known_file(names: list[str], cache_block: str, settings: Settings, key: str
                          ) -> tuple[dict[str, TurnstileDevice], TurnstileCache, KnownFile | None]:
    """The turnstiles' blocks and the cache block (one request for both; answering), then the file Redis knows
    under `key`, if any."""
    name = cache_block or settings.turnstiles.cache_block
    devices, document = load_turnstiles_and_cache(names, name)
    cache = (checked_cache(name, settings) if document is None or document.block_schema is None
             else _answering(TurnstileCache._load_from_block_document(document)))
    return devices, cache, cache.cache().known_file(key)


def publish_and_check_stop(source: Path, people: ParticipantsFile, reports: list[dict], dry_run: bool,
                           started: float, workbook: Path) -> tuple[dict, bool]:
    """The report published (`publish`), and whether the run is being stopped: asked of the API while the report
    is made, so a run's end waits for one of them only."""
    with ThreadPoolExecutor(1, thread_name_prefix="stop-check") as side:
        stopping = side.submit(contextvars.copy_context().run, run_stop_check())
        summary = publish(source, people, reports, dry_run, time.perf_counter() - started, workbook)
        return summary, stopping.result()


def remember_file(cache: TurnstileCache, key: str, source: Path, people: ParticipantsFile, roster: Participants,
                  timezone: str) -> None:
    """Remember a file just read and accepted under its key (unless it changed while it was read), so that the
    next run of the same file does not read it again; best effort (that run reads the file otherwise)."""
    try:
        if file_key(source, timezone) == key:
            cache.cache().remember_file(key, KnownFile(people, roster.digest()))
    except (OSError, RedisError) as exc:
        get_run_logger().warning("could not remember %s as read (%s): the next run reads it again", source.name, exc)


def checked_cache(name: str, settings: Settings) -> TurnstileCache:
    """The cache block `name` (empty: TURNSTILE_CACHE_BLOCK), answering; a missing block is the user's to fix."""
    try:
        cache = TurnstileCache.load_or_create_default(
            name or settings.turnstiles.cache_block, settings.turnstiles.cache_block, settings
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return _answering(cache)


def _answering(cache: TurnstileCache) -> TurnstileCache:
    cache.ping()
    return cache


def run_progress(cache: TurnstileCache, run_id: str, total: int, file_name: str) -> RunProgress:
    """The run's progress artifact and the Redis counter its device tasks add to."""
    artifact = create_progress_artifact(0.0, key="registration-progress",
                                        description=f"Participant x turnstile pairs settled of {file_name}", _sync=True)
    return RunProgress(artifact, f"{cache.key_prefix}:progress:{run_id}", total)


def finish_progress(cache: TurnstileCache, progress: RunProgress) -> None:
    """The progress artifact at what the tasks settled in all (their own updates may land out of order), and
    the counter gone."""
    settled = int(cache.get_client().getdel(progress.counter_key) or 0)
    if progress.artifact_id is not None:
        update_progress_artifact(progress.artifact_id, 100.0 * min(settled, progress.total) / max(1, progress.total),
                                 _sync=True)


def register_everywhere(
    devices: dict[str, TurnstileDevice], people: Participants, cache: TurnstileCache,
    options: dict[str, RegistrationOptions], progress: RunProgress, settings: Settings,
) -> dict[str, dict]:
    """One task per turnstile on TURNSTILES_TASK_RUNNER, waiting for every one; each turnstile's report, a
    failed one's saying why; `options`: each turnstile's. The participants travel as one opaque object, read
    once by the flow (and their fingerprints and user ids worked out once per process). A SIGTERM interrupting the wait gives the tasks (which stop at their next batch)
    STOP_WAIT_SECONDS to report."""
    task = with_retries(register_on_turnstile, settings.turnstiles.task_retries)
    runner = io_task_runner(settings, max(1, min(settings.turnstiles.concurrency, len(devices))),
                            settings.turnstiles.task_runner)
    with runner, settled_heap():
        futures = runner.map(task, {
            "device_name": list(devices), "device": list(devices.values()),
            "participants": unmapped(people), "cache_block": unmapped(cache),
            "options": [options[name] for name in devices], "progress": unmapped(progress),
        })
        try:
            wait(futures)
        except TerminationSignal:
            note_termination()  # the device tasks' stop checks answer True from here on
            get_run_logger().warning("termination signal: the turnstile tasks stop at their next batch")
        deadline = time.monotonic() + STOP_WAIT_SECONDS  # reached only after a termination signal
        outcomes = [_outcome(future, deadline) for future in futures]
    return {
        name: outcome if isinstance(outcome, dict)
        else outcome.report.to_json() if isinstance(outcome, DeviceFailed)
        else DeviceReport(name, participants=len(people), status="failed", error=str(outcome)).to_json()
        for name, outcome in zip(devices, outcomes)
    }


def register_where_needed(
    devices: dict[str, TurnstileDevice], people: ParticipantsFile, participants: Participants, cache: TurnstileCache,
    options: RegistrationOptions, run_id: str, file_name: str, settings: Settings, logouts: Logouts,
) -> list[dict]:
    """Check the turnstiles (unless the cache is skipped, every device is read anyway or the cache holds nothing
    of any of them, so nothing is trusted), then register on
    those with work only (their concurrency limits, the progress artifact, one task each); every turnstile's
    report. `participants`: the file's, as the tasks share them; `logouts`: where the checks of turnstiles left
    with no work end their sessions."""
    checks = ({} if options.skip_cache or options.verify or not any_cached(cache.cache(), list(devices))
              else check_turnstiles(devices, participants, cache, options.dry_run, logouts))
    work = turnstiles_with_work(list(devices), checks, options)
    get_run_logger().info("%d of %d turnstile(s) have work%s", len(work), len(devices),
                          "" if work else ": every participant is confirmed on every turnstile")
    reports: dict[str, dict] = {}
    if work:
        busy = {name: devices[name] for name in work}
        ensure_device_limits(busy)
        progress = run_progress(cache, run_id, len(people.participants) * len(busy), file_name)
        try:
            reports = register_everywhere(busy, participants, cache, work, progress, settings)
        finally:
            finish_progress(cache, progress)
    return with_checks(list(devices), reports, checks)


def _outcome(future: PrefectFuture, deadline: float) -> object:
    """A device task's return value or the exception it ended with, waiting for it until `deadline`."""
    try:
        return future.result(timeout=max(0.0, deadline - time.monotonic()), raise_on_failure=False)
    except TimeoutError:
        return RuntimeError("stopped before it reported")


def publish(source: Path, people: ParticipantsFile, reports: list[dict], dry_run: bool, seconds: float,
            workbook: Path) -> dict:
    """The failures spreadsheet and its link (when any record failed), the turnstiles table and the report;
    returns the run's figures."""
    failures = registration_failures(people, reports)
    summary = registration_summary(people, reports, len(failures), dry_run=dry_run, seconds=seconds,
                                   failures_file=str(workbook) if failures else "")
    link = ""
    if failures:
        write_registration_failures(workbook, failures, title=f"Registration failures of {source.name}")
        link = output_link(workbook)
        create_link_artifact(key="registration-failures", link=link, link_text=workbook.name,
                             description=f"{len(failures):,} failed record(s) (registration, turnstile, row, error)",
                             _sync=True)
    with ThreadPoolExecutor(1, thread_name_prefix="artifacts") as side:  # the two API calls at once
        table = side.submit(
            contextvars.copy_context().run, create_table_artifact, key="registration-turnstiles",
            table=turnstile_rows(reports, dry_run), _sync=True,
            description=f"Turnstiles of this registration{' (dry run: planned, not written)' if dry_run else ''}",
        )
        create_markdown_artifact(key="registration-report", markdown=registration_markdown(source.name, summary, link),
                                 description=f"Final figures of the registration of {source.name}", _sync=True)
        table.result()
    return summary


def cancelled_state(summary: dict) -> State:
    """The final state of a cancelled run: Cancelled, saying what was written before the cancel."""
    written = summary["written"]
    stopped = (f"cancelled: {summary['turnstiles_cancelled']} turnstile(s) stopped; written before the cancel: "
               f"{written['created']:,} user(s) created, {written['updated']:,} updated, {written['cards']:,} "
               f"card(s), {written['groups']:,} group link(s)")
    return Cancelled(message=stopped, data=RegistrationCancelled(stopped))


FileName = Annotated[str, Field(max_length=4096, pattern=FILE_PATTERN)]
TurnstileNames = Annotated[list[Annotated[str, Field(min_length=1, max_length=120)]], Field(max_length=500)]
BatchSize = Annotated[int, Field(ge=1, le=1000)]
RequestsAtOnce = Annotated[int, Field(ge=1, le=16)]
BlockName = Annotated[str, Field(max_length=120)]
# The form: each parameter's default, title and help text.
PARTICIPANTS_FILE = form_field(
    "", "Participants file",
    "Path of the .xlsx, .xls, .ods or .csv on the machine that runs the flow: registration, name, and optionally "
    "card, group, begin and end. Empty: PARTICIPANTS_FILE.",
)
TURNSTILES = form_field([], "Turnstiles", "Names of TurnstileDevice blocks. Empty: every saved turnstile.")
SKIP_CACHE = form_field(
    False, "Skip cache", "Neither consult nor update the Redis cache: every participant is checked on the device."
)
VERIFY = form_field(False, "Verify devices", "Read every device instead of trusting the cache (and refresh the cache).")
DRY_RUN = form_field(
    False, "Dry run", "Read the devices and report, per turnstile, what would be created, updated, left "
    "unchanged or skipped by the cache, without writing."
)
BATCH_SIZE = form_field(
    250, "Batch size", "Objects per write request (the device's SDK writes at most 250; its buffer is ~2 MB)."
)
CONCURRENCY_PER_DEVICE = form_field(
    1, "Requests at once per turnstile",
    "Write requests in flight on one turnstile; never more than its block's max concurrent requests.",
)
CACHE_BLOCK = form_field(
    "", "Cache block", "Name of the TurnstileCache block. Empty: TURNSTILE_CACHE_BLOCK (turnstile-cache)."
)


@flow(name="register-participants", log_prints=False)
@ends_failed_on_user_error
async def register_participants(
    participants_file: FileName = PARTICIPANTS_FILE, turnstiles: TurnstileNames = TURNSTILES,
    skip_cache: bool = SKIP_CACHE, verify: bool = VERIFY, dry_run: bool = DRY_RUN, batch_size: BatchSize = BATCH_SIZE,
    concurrency_per_device: RequestsAtOnce = CONCURRENCY_PER_DEVICE, cache_block: BlockName = CACHE_BLOCK,
) -> dict:
    """Register every participant of the file on every chosen turnstile. `async def` for Prefect's async engine,
    which ends a run without waiting out its heartbeat thread's one-second sleep; the calls stay blocking (a
    SIGTERM lands in them as under the sync engine) and share one sync API client, as the sync engine's do."""
    watch_termination()
    # one API client for the run's calls and its task threads; the heap alive at the start (Prefect, the imports,
    # an earlier run's leftovers in a long-lived process) is left out of the collector's passes during the run
    with SyncClientContext.get_or_create(), settled_heap():
        started, settings = time.perf_counter(), get_settings()
        output_base_url(settings)  # where a failures link will point: a missing OUTPUT_BASE_URL fails before any call
        source = participants_path(participants_file, settings.turnstiles.participants_file)
        # the blocks, Redis, and the file: known, or read and checked (a malformed one refused, naming row and column)
        people, key, digest, devices, cache = load_inputs(source, turnstiles, cache_block, settings)
        roster = Participants(people.participants, digest or None)
        run_id = str(flow_run.get_id() or "local")
        options = RegistrationOptions(skip_cache=skip_cache, verify=verify, dry_run=dry_run, batch_size=batch_size,
                                      concurrency=concurrency_per_device)
        get_run_logger().info(
            "registering %d participant(s) of %s on %d turnstile(s) (%d operations; %d row(s) repeated in the file)%s",
            len(people.participants), source.name, len(devices), len(people.participants) * len(devices),
            len(people.duplicates), " - dry run: planned, nothing written" if dry_run else "",
        )
        # the checked turnstiles with no work log out while the run goes on; a file read now is remembered meanwhile
        with Logouts() as logouts, ThreadPoolExecutor(1, thread_name_prefix="known-file") as later:
            if not digest:
                later.submit(contextvars.copy_context().run, remember_file, cache, key, source, people, roster,
                             settings.turnstiles.timezone)
            reports = register_where_needed(devices, people, roster, cache, options, run_id, source.name, settings,
                                            logouts)
            workbook = settings.stack.output_dir / "registrations" / run_id / f"{source.stem}-failures.xlsx"
            summary, stopped = publish_and_check_stop(source, people, reports, dry_run, started, workbook)
        if summary["turnstiles_cancelled"] or stopped:
            return cancelled_state(summary)
    failed = registration_failure_message(summary)
    return Failed(message=failed, data=RegistrationIncomplete(failed)) if failed else summary
