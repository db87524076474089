"""What the generate-games and cleanup-runs flows show: log lines, progress, artifact tables and markdown, and
their return values, built as plain data from the domain's results (no Prefect, no service): the flows only
hand them to Prefect's `create_*_artifact` calls."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from operations.lottery.generation import ChunkResult
from operations.lottery.plan import GenerationPlan
from operations.lottery.retention import AofCheck, CleanupReport, RunOutputs
from operations.lottery.spreadsheet import RegionRow, WorkbookSummary

Link = Callable[[Path], str]  # the URL an artifact shows for a file (operations/infra/links.py)

# Shares of the progress bar: the chunks, then ranking the run, then writing its spreadsheets (100% only once
# every file is written).
CHUNKS_PERCENT, RANK_PERCENT, WRITE_PERCENT = 90.0, 5.0, 5.0


def artifact_key(*parts: str) -> str:
    """An artifact key (lowercase letters, digits and dashes, at most 100) made of `parts`."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


@dataclass
class GenerationProgress:
    """A run's progress in percent: CHUNKS_PERCENT by games generated, then RANK_PERCENT once ranked, then
    WRITE_PERCENT by spreadsheets written."""

    quantity: int
    files: int
    games: int = 0
    ranked: bool = False
    written: int = 0

    @property
    def percent(self) -> float:
        chunks = CHUNKS_PERCENT * min(self.games, self.quantity) / max(1, self.quantity)
        files = WRITE_PERCENT * min(self.written, self.files) / max(1, self.files)
        return chunks + (RANK_PERCENT if self.ranked else 0.0) + files


def planned_line(plan: GenerationPlan, pending: int, resumed: bool, seconds: float) -> str:
    """The log line of a planned run."""
    return (
        f"run {plan.run_key}: {plan.request.quantity:,} games in {len(plan.chunk_quotas)} chunks ({pending} pending"
        f"{', resumed' if resumed else ''}), {plan.feasibility.total:,.0f} feasible games "
        f"({'exact' if plan.feasibility.exact else 'estimate'}), planned in {seconds:.1f} s"
    )


def chunk_line(result: ChunkResult, total_chunks: int) -> str:
    """The log line of a finished chunk."""
    if result.resumed:
        return f"chunk {result.chunk + 1}/{total_chunks}: {result.games:,} games already committed (resumed)"
    rejected = sum(result.rejected_by_rule.values())
    return (
        f"chunk {result.chunk + 1}/{total_chunks}: {result.games:,} games in {result.seconds:.1f} s "
        f"({result.candidates:,} candidates, {rejected:,} failed rules, {result.repeats:,} repeats, "
        f"{result.region_full:,} in full regions, {result.unused:,} past the quota, "
        f"{result.released:,} released from an earlier attempt)"
    )


def workbook_summary(plan: GenerationPlan, region_counts: list[int]) -> WorkbookSummary:
    """The summary sheet of every spreadsheet of the run."""
    req = plan.request
    params = [
        ("run key", plan.run_key),
        ("games", f"{req.quantity:,}"),
        ("numbers per game", str(req.numbers_per_game)),
        ("universe", f"1..{req.highest_number}"),
        ("seed", str(req.seed)),
        *plan.rules.describe(),
        ("feasible games", f"{plan.feasibility.total:,.0f} ({'exact' if plan.feasibility.exact else 'estimate'})"),
    ]
    regions = [
        RegionRow(label=r.label, target_share=r.share, cap=r.cap, count=c)
        for r, c in zip(plan.regions, region_counts)
    ]
    return WorkbookSummary(
        title=f"Mega-Sena games - run {plan.run_key}", parameters=params, regions=regions, total_games=req.quantity
    )


def spreadsheet_name(run_key: str, quantity: int, start: int, stop: int) -> str:
    """The file name of the spreadsheet of ranks start+1..stop."""
    width = len(str(quantity))
    return f"games-{run_key}-ranks-{start + 1:0{width}d}-{stop:0{width}d}.xlsx"


@dataclass(frozen=True)
class RunReport:
    """What a generation run did, as its artifacts and return value show it."""

    plan: GenerationPlan
    outputs: RunOutputs
    region_counts: list[int]
    on_dask: bool
    chunks: list[dict] = field(default_factory=list)  # ChunkResult.to_json() of the chunks this flow run made
    slot_wait: float | None = None  # seconds waited for a generation slot; None when nothing was generated
    served_from: str | None = None  # completion time of the run a re-run served

    @property
    def run_key(self) -> str:
        return self.plan.run_key


def run_result(report: RunReport) -> dict:
    """The flow's return value."""
    outputs = report.outputs
    return {
        "run_key": report.run_key,
        "games": outputs.games,
        "chunks": len(report.plan.chunk_quotas),
        "chunks_generated": len(report.chunks),
        "spreadsheets": [w["path"] for w in outputs.spreadsheets],
        "counter_snapshot": outputs.snapshot,
        "seconds": outputs.seconds,
        "completed_at": outputs.completed_at,
    }


def spreadsheet_links(report: RunReport, link: Link) -> list[dict]:
    """Keyword arguments of one link artifact per spreadsheet."""
    workbooks = report.outputs.spreadsheets
    return [
        {
            "key": artifact_key("games-spreadsheet", str(i)),
            "link": link(Path(w["path"])),
            "link_text": Path(w["path"]).name,
            "description": f"Run {report.run_key}: spreadsheet {i} of {len(workbooks)}, {w['rows']:,} games in "
            f"{w['sheets']} sheet(s)",
        }
        for i, w in enumerate(workbooks, start=1)
    ]


def distribution_rows(report: RunReport) -> list[dict]:
    """The first-number distribution against the targets, one row per region."""
    total = max(1, sum(report.region_counts))
    return [
        {
            "region": r.label,
            "target share": f"{r.share:.4%}",
            "cap": r.cap,
            "generated": c,
            "generated share": f"{c / total:.4%}",
        }
        for r, c in zip(report.plan.regions, report.region_counts)
    ]


def summary_markdown(report: RunReport, link: Link) -> str:
    """The run's summary: games, time, rejected candidates by cause and rule, feasibility, files."""
    plan = report.plan
    rejected: dict[str, int] = {}
    kept = repeats = region_full = unused = candidates = 0
    for chunk in report.chunks:
        kept += chunk["games"]
        candidates += chunk["candidates"]
        repeats += chunk["repeats"]
        region_full += chunk["region_full"]
        unused += chunk.get("unused", 0)
        for rule, n in chunk["rejected_by_rule"].items():
            rejected[rule] = rejected.get(rule, 0) + n
    rule_rows = "\n".join(f"| {rule} | {n:,} |" for rule, n in sorted(rejected.items(), key=lambda kv: -kv[1]))
    files = "\n".join(f"- [{Path(w['path']).name}]({link(Path(w['path']))}) ({w['rows']:,} games)"
                      for w in report.outputs.spreadsheets)
    snapshot = Path(report.outputs.snapshot)
    served = (f"\nServed from the run completed at {report.served_from}: nothing generated again.\n"
              if report.served_from else "")
    waited = "" if report.slot_wait is None else (
        f"\nWaited for a generation slot: {report.slot_wait:.1f} s (one generation at a time per machine).\n"
    )
    return f"""# Run `{plan.run_key}`

**{plan.request.quantity:,} games** of {plan.k} numbers in **{report.outputs.seconds:.1f} s**
({'Dask' if report.on_dask else 'in-process'}, {len(plan.chunk_quotas)} chunks; {len(report.chunks)} generated by this flow run).
{served}
| candidates drawn (this flow run) | count |
|---|---|
| kept: the run's new games | {kept:,} |
| failed a rule (below) | {sum(rejected.values()):,} |
| repeated an earlier game | {repeats:,} |
| first-number region full | {region_full:,} |
| drawn past the chunk's quota, not used | {unused:,} |
| candidates drawn | {candidates:,} |

| rule | rejected |
|---|---|
{rule_rows or '| none | 0 |'}

Feasible games under the rules: {plan.feasibility.total:,.0f} ({'exact count' if plan.feasibility.exact else 'estimate'}).
{waited}
## Files
{files}
- counter snapshot: [{snapshot.name}]({link(snapshot)})
"""


def cancelled_markdown(plan: GenerationPlan, committed: list[int], generated: int, games: int, reason: str) -> str:
    """The summary of a cancelled run: what was committed before the cancel, and how to resume."""
    chunks, quantity = len(plan.chunk_quotas), plan.request.quantity
    return f"""# Run `{plan.run_key}` cancelled

| | |
|---|---|
| Chunks committed | {len(committed):,} of {chunks:,} ({generated:,} by this run) |
| Games generated | {games:,} of {quantity:,} |
| Stopped | {reason} |

No spreadsheet was written. Re-run with run key `{plan.run_key}` to resume: the committed chunks are kept and
only the others are generated.
"""


def completed_at_text(outputs: RunOutputs) -> str:
    """When a completed run finished, as its summary and log say it."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(outputs.completed_at))


# -- cleanup-runs ------------------------------------------------------------------------------------------


def cleanup_line(report: CleanupReport, aof: AofCheck, days: float, dry_run: bool) -> str:
    """The log line of a cleanup."""
    return (
        f"{'would remove' if dry_run else 'removed'} {len(report.removed)} run(s) older than {days:g} days "
        f"({report.folder_bytes:,} bytes on disk, {report.keys} Redis keys, {report.redis_bytes:,} bytes of Redis "
        f"memory), kept {report.kept}; append-only file: {aof.reason}"
        f"{'; rewrite started' if aof.rewrite and not dry_run else ''}"
    )


def cleanup_result(report: CleanupReport, aof: AofCheck, days: float, dry_run: bool) -> dict:
    """The cleanup flow's return value."""
    return {
        "dry_run": dry_run,
        "retention_days": days,
        "removed": [r.run_key for r in report.removed],
        "kept": report.kept,
        "skipped": report.skipped,
        "folder_bytes": report.folder_bytes,
        "redis_keys": report.keys,
        "redis_bytes": report.redis_bytes,
        "aof_rewrite": aof.rewrite and not dry_run,
    }


def cleanup_markdown(report: CleanupReport, aof: AofCheck, days: float, dry_run: bool, now: float) -> str:
    """The cleanup's report: each run removed (or that would be), what was freed, the append-only file."""
    rows = "\n".join(
        f"| `{r.run_key}` | {r.status} | {r.age_days(now):.1f} | {r.folder_bytes:,} | {len(r.keys)} | "
        f"{r.redis_bytes:,} |"
        for r in report.removed
    )
    skipped = ""
    if report.skipped:
        skipped = f"\nSkipped (a flow run started on them meanwhile): {', '.join(report.skipped)}\n"
    return f"""# Generation runs older than {days:g} days{' (dry run: nothing removed)' if dry_run else ''}

| run key | status | age (days) | folder bytes | Redis keys | Redis bytes |
|---|---|---|---|---|---|
{rows or '| none | | | | | |'}

**{'Would free' if dry_run else 'Freed'}: {report.folder_bytes:,} bytes on disk, {report.keys} Redis keys,
{report.redis_bytes:,} bytes of Redis memory.** Runs kept: {report.kept}.
{skipped}
Append-only file: {aof.current_bytes:,} bytes for a {aof.dataset_bytes:,}-byte dataset: {aof.reason}
({'rewrite due' if aof.rewrite else 'no rewrite'}{', BGREWRITEAOF sent' if aof.rewrite and not dry_run else ''}).
"""
