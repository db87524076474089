"""Flow `register-participants`: every participant of a file on every access-control turnstile, one mapped task
per turnstile, in batches, cached in Redis, within each device's limits across flow runs, retried, reported.

Stages: read and check the participants file (a malformed file is refused naming the row and column, before
any device call), resolve the turnstiles (saved TurnstileDevice blocks: all of them by default) and create or
update each one's global concurrency limit; register on every turnstile in parallel (an unreachable one fails
its own task after its retries, the others finish); then publish the report (the seed's figures, a table of
turnstiles, the failed records as a linked spreadsheet) and end Failed if any record failed.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
)
from prefect.client.orchestration import get_client
from prefect.futures import wait
from prefect.runtime import flow_run
from prefect.utilities.annotations import unmapped
from pydantic import Field
from typing_extensions import Annotated

from blocks.turnstile_device import TurnstileCache, TurnstileDevice
from flows.concurrency_limits import upsert_concurrency_limit
from flows.forms import form_field
from flows.task_runners import io_task_runner
from operations.infra.links import output_link
from operations.settings import get_settings
from operations.turnstiles.participants import read_participants
from operations.turnstiles.registration import DeviceFailed, DeviceReport, RegistrationOptions
from operations.turnstiles.report import write_registration_failures
from tasks.turnstiles import Participants, RunProgress, device_limit_name, register_on_turnstile

FILE_PATTERN = r"^$|^.+\.([xX][lL][sS][xX]|[cC][sS][vV])$"  # empty: PARTICIPANTS_FILE


def load_turnstiles(names: list[str]) -> dict[str, TurnstileDevice]:
    """The named TurnstileDevice blocks (every saved one when `names` is empty); unknown names are an error
    naming them and the devices that exist."""
    with get_client(sync_client=True) as client:
        documents = client.read_block_documents_by_type("turnstile-device", include_secrets=False)
    saved = sorted(document.name for document in documents)
    unknown = sorted(set(names) - set(saved))
    if unknown:
        raise ValueError(f"no TurnstileDevice block named {', '.join(unknown)}; saved: {', '.join(saved) or 'none'}")
    chosen = list(dict.fromkeys(names)) or saved
    if not chosen:
        raise ValueError("no turnstile is configured: save TurnstileDevice blocks (UI, or "
                         "python -m deployments.turnstiles load FILE)")
    return {name: TurnstileDevice.load(name) for name in chosen}


def ensure_device_limits(devices: dict[str, TurnstileDevice]) -> None:
    """Each device's global concurrency limit, created or updated from its block (max concurrent requests)."""
    with get_client(sync_client=True) as client:
        for name, device in devices.items():
            upsert_concurrency_limit(client, device_limit_name(name), device.max_concurrent_requests)


@flow(name="register-participants", log_prints=False)
def register_participants(
    participants_file: Annotated[str, Field(max_length=4096, pattern=FILE_PATTERN)] = form_field(
        "", "Participants file",
        "Path of the .xlsx or .csv on the machine that runs the flow: registration, name, and optionally card, "
        "group, begin and end. Empty: PARTICIPANTS_FILE.",
    ),
    turnstiles: Annotated[list[Annotated[str, Field(min_length=1, max_length=120)]], Field(max_length=500)] = (
        form_field(
            [], "Turnstiles", "Names of TurnstileDevice blocks. Empty: every saved turnstile."
        )
    ),
    skip_cache: bool = form_field(
        False, "Skip cache", "Neither consult nor update the Redis cache: every participant is checked on the device."
    ),
    verify: bool = form_field(
        False, "Verify devices", "Read every device instead of trusting the cache (and refresh the cache)."
    ),
    dry_run: bool = form_field(
        False, "Dry run", "Read the devices and report, per turnstile, what would be created, updated, left "
        "unchanged or skipped by the cache, without writing."
    ),
    batch_size: Annotated[int, Field(ge=1, le=1000)] = form_field(
        250, "Batch size", "Objects per write request (the device's SDK writes at most 250; its buffer is ~2 MB)."
    ),
    concurrency_per_device: Annotated[int, Field(ge=1, le=16)] = form_field(
        1, "Requests at once per turnstile",
        "Write requests in flight on one turnstile; never more than its block's max concurrent requests.",
    ),
    cache_block: Annotated[str, Field(max_length=120)] = form_field(
        "", "Cache block", "Name of the TurnstileCache block. Empty: TURNSTILE_CACHE_BLOCK (turnstile-cache)."
    ),
) -> dict:
    """Register every participant of the file on every chosen turnstile."""
    started = time.perf_counter()
    logger = get_run_logger()
    settings = get_settings()
    source = Path(participants_file or settings.participants_file or "")
    if not participants_file and settings.participants_file is None:
        raise ValueError("no participants file: give one, or set PARTICIPANTS_FILE for scheduled runs")
    if not source.is_file():
        raise FileNotFoundError(f"participants file {source} does not exist (or is not a file) on this machine")
    people = read_participants(source, settings.turnstiles_timezone)  # refuses a malformed file, naming row/column
    devices = load_turnstiles(turnstiles)
    cache = TurnstileCache.load_or_create_default(
        cache_block or settings.turnstile_cache_block, settings.turnstile_cache_block, settings
    )
    cache.ping()
    ensure_device_limits(devices)
    run_id = str(flow_run.get_id() or "local")
    total = len(people.participants) * len(devices)
    progress = RunProgress(
        create_progress_artifact(0.0, key="registration-progress",
                                 description=f"Participant x turnstile pairs settled of {source.name}"),
        f"{cache.key_prefix}:progress:{run_id}", total,
    )
    options = RegistrationOptions(skip_cache=skip_cache, verify=verify, dry_run=dry_run, batch_size=batch_size,
                                  concurrency=concurrency_per_device)
    logger.info(
        "registering %d participant(s) of %s on %d turnstile(s) (%d operations; %d row(s) repeated in the file)%s",
        len(people.participants), source.name, len(devices), total, len(people.duplicates),
        " - dry run" if dry_run else "",
    )
    concurrency = max(1, min(settings.turnstiles_concurrency, len(devices)))
    runner = io_task_runner(settings, concurrency, settings.turnstiles_task_runner)
    try:
        reports = register_on_turnstiles.with_options(task_runner=runner)(
            list(devices), list(devices.values()), source, settings.turnstiles_timezone, cache, options, progress,
            settings.turnstile_task_retries,
        )
    finally:
        cache.get_client().delete(progress.counter_key)
    summary = _publish(source, people, reports, dry_run, time.perf_counter() - started, settings.output_dir, run_id)
    if summary["errors"] or summary["turnstiles_failed"]:
        raise RuntimeError(
            f"{summary['errors']:,} record(s) failed and {summary['turnstiles_failed']} turnstile(s) could not be "
            f"worked on: see the registration-failures spreadsheet ({summary['failures_file']})"
        )
    return summary


@flow(name="register-on-turnstiles", log_prints=False)
def register_on_turnstiles(
    names: list[str], devices: list[TurnstileDevice], source: Path, timezone: str, cache: TurnstileCache,
    options: RegistrationOptions, progress: RunProgress, retries: int,
) -> list[dict]:
    """One task per turnstile on this flow's task runner; waits for every one of them. The file is read again
    here (a second, checked read): a subflow's parameters are stored by the API, which takes at most 512 KB."""
    participants = read_participants(source, timezone).participants
    task = register_on_turnstile.with_options(retries=retries)
    futures = task.map(names, devices, unmapped(Participants(participants)), unmapped(cache), unmapped(options),
                       unmapped(progress))
    wait(futures)
    reports = []
    for name, future in zip(names, futures):
        outcome = future.result(raise_on_failure=False)
        if isinstance(outcome, dict):
            reports.append(outcome)
        elif isinstance(outcome, DeviceFailed):
            reports.append(outcome.report.to_json())
        else:
            failed = DeviceReport(name, participants=len(participants), status="failed", error=str(outcome))
            reports.append(failed.to_json())
    return reports


def _publish(source: Path, people, reports: list[dict], dry_run: bool, elapsed: float, output_dir: Path,
             run_id: str) -> dict:
    failures = [(problem.registration, "(file)", str(problem.row_number), str(problem))
                for problem in people.duplicates]
    for r in reports:
        if r["status"] == "failed":  # its work did not complete: none of its records is known to be registered
            failures += [(p.registration, r["device"], str(p.row_number), f"turnstile not worked on: {r['error']}")
                         for p in people.participants]
        else:
            failures += [(registration, r["device"], str(row), error) for registration, row, error in r["failures"]]
    workbook = output_dir / "registrations" / run_id / f"{source.stem}-failures.xlsx"
    write_registration_failures(workbook, failures, title=f"Registration failures of {source.name}")
    operations = len(people.participants) * len(reports)
    cached = sum(r["cached"] for r in reports)
    errors = len(failures)
    failed_devices = [r["device"] for r in reports if r["status"] == "failed"]
    successes = operations - (errors - len(people.duplicates))
    create_table_artifact(
        key="registration-turnstiles",
        table=[{"turnstile": r["device"], "status": r["status"], "participants": r["participants"],
                "cached": r["cached"], "unchanged": r["unchanged"], "created": r["created"], "updated": r["updated"],
                "cards": r["cards"], "group links": r["groups"], "failed": len(r["failures"]),
                "requests": r["requests"], "retries": r["retries"], "logins": r["logins"],
                "seconds": round(r["seconds"], 2), "error": r["error"]} for r in reports],
        description=f"Turnstiles of this registration{' (dry run: planned, not written)' if dry_run else ''}",
    )
    create_link_artifact(key="registration-failures", link=output_link(workbook), link_text=workbook.name,
                         description=f"{errors:,} failed record(s) (registration, turnstile, row, error)")
    create_markdown_artifact(
        key="registration-report",
        markdown=f"""# Registration of `{source.name}`{' (dry run)' if dry_run else ''}

| | |
|---|---|
| Participants | {len(people.participants):,} (+{len(people.duplicates):,} repeated rows of the file) |
| Turnstiles | {len(reports)} |
| Total operations | {operations:,} |
| Successes | {successes:,} |
| Skipped (cache) | {cached:,} |
| Errors | {errors:,} |

{len(failed_devices)} turnstile(s) not worked on{': ' + ', '.join(failed_devices) if failed_devices else ''}.
Time: {elapsed:.1f} s. Failed records: [{workbook.name}]({output_link(workbook)}).
""",
        description=f"Final figures of the registration of {source.name}",
    )
    return {"participants": len(people.participants), "turnstiles": len(reports), "operations": operations,
            "successes": successes, "cached": cached, "errors": errors, "turnstiles_failed": len(failed_devices),
            "failures_file": str(workbook), "reports": reports, "seconds": round(elapsed, 2)}
