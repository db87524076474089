"""What `register-participants` reports: the run's figures, the turnstiles table and the summary in markdown
(plain data, no Prefect, no service), and the failures spreadsheet: which participant could not be written on
which turnstile. A dry run's work is labelled planned: nothing was written.

Every failure is one (registration, turnstile, row, error) line of the "Failures" sheet (continued on
"Failures 2", ... past a sheet's row limit), and the "Summary" sheet counts them by turnstile, so an operator
sees at once whether one device or one participant is the problem. Failures are written as they come: a long
list never sits in memory.

A cancelled run reports what its turnstiles wrote before the cancel (users created and updated, cards, group
links added and removed, across every attempt); the participants of a turnstile stopped by the cancel are
neither successes nor failures.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import openpyxl

from operations.infra.tabular import (
    EXCEL_MAX_DATA_ROWS,
    add_counts_sheet,
    add_table_sheet,
    atomic_workbook_save,
    text_cell,
)
from operations.turnstiles.participants import ParticipantsFile

if TYPE_CHECKING:
    from openpyxl.cell import WriteOnlyCell
    from openpyxl.worksheet._write_only import WriteOnlyWorksheet

FAILURE_COLUMNS = ("Registration", "Turnstile", "Row", "Error")
FAILURE_SHEET = "Failures"
SUMMARY_SHEET = "Summary"
NO_TURNSTILE = "(no turnstile)"  # the Summary's name for failures not tied to one, such as a repeated registration
_COLUMN_WIDTHS = (20, 28, 9, 80)
_ROW_NUMBER = re.compile(r"[1-9]\d*")


Failure = tuple[str, str, str, str]  # (registration, turnstile, row, error)


class RegistrationIncomplete(RuntimeError):
    """Records of a run failed or turnstiles could not be worked on (the rest was registered): the run's outcome."""


def registration_failures(people: ParticipantsFile, reports: list[dict]) -> list[Failure]:
    """Every failure of a run: the file's repeated rows, each record a turnstile refused, and every participant
    on a turnstile whose work did not complete (none of its records is known to be registered)."""
    failures = [(problem.registration, "(file)", str(problem.row_number), str(problem)) for problem in people.duplicates]
    for r in reports:
        if r["status"] == "failed":
            failures += [(p.registration, r["device"], str(p.row_number), f"turnstile not worked on: {r['error']}")
                         for p in people.participants]
        else:
            failures += [(registration, r["device"], str(row), error) for registration, row, error in r["failures"]]
    return failures


WRITTEN = ("created", "updated", "cards", "cards_freed", "groups", "groups_removed")


def registration_summary(
    people: ParticipantsFile, reports: list[dict], errors: int, *, dry_run: bool, seconds: float,
    failures_file: str = "",
) -> dict:
    """The run's figures: operations (participants x turnstiles), those done ("planned" in a dry run, which
    writes nothing; "successes" otherwise, the turnstiles stopped by a cancel left out), cached, failed records
    (`errors`), the turnstiles not worked on and those cancelled, and what was written (every attempt)."""
    operations = len(people.participants) * len(reports)
    cancelled = sum(1 for r in reports if r["status"] == "cancelled")
    done = operations - len(people.participants) * cancelled - (errors - len(people.duplicates))
    return {"participants": len(people.participants), "repeated_rows": len(people.duplicates),
            "turnstiles": len(reports), "operations": operations, ("planned" if dry_run else "successes"): done,
            "cached": sum(r["cached"] for r in reports), "errors": errors,
            "turnstiles_failed": sum(1 for r in reports if r["status"] == "failed"), "turnstiles_cancelled": cancelled,
            "written": {name: 0 if dry_run else sum(r.get(name, 0) for r in reports) for name in WRITTEN},
            "dry_run": dry_run, "failures_file": failures_file, "reports": reports, "seconds": round(seconds, 2)}


def turnstile_rows(reports: list[dict], dry_run: bool) -> list[dict]:
    """The turnstiles table: one row per turnstile; a dry run's writes are headed as planned. A turnstile whose
    participants were all cached has the status "cached" (no write was made to it)."""
    headings = (("to create", "to update", "cards to write", "cards to free", "group links to add",
                 "group links to remove") if dry_run
                else ("created", "updated", "cards", "cards freed", "group links", "group links removed"))
    return [{"turnstile": r["device"], "status": r["status"], "participants": r["participants"],
             "cached": r["cached"], "unchanged": r["unchanged"],
             **{heading: r.get(name, 0) for heading, name in zip(headings, WRITTEN)},
             "failed": len(r["failures"]), "requests": r["requests"],
             "retries": r["retries"], "logins": r["logins"], "seconds": round(r["seconds"], 2), "error": r["error"],
             "reset": r.get("reset", "")}
            for r in reports]


def registration_markdown(file_name: str, summary: dict, failures_link: str = "") -> str:
    """The run's report: its figures, the turnstiles not worked on and, when any record failed, the link to
    the failures spreadsheet."""
    dry_run = summary["dry_run"]
    failed = [r["device"] for r in summary["reports"] if r["status"] == "failed"]
    done = (f"| Planned | {summary['planned']:,} |" if dry_run
            else f"| Successes | {summary['successes']:,} |")
    failures = (f"[{Path(summary['failures_file']).name}]({failures_link})" if summary["errors"] and failures_link
                else "none")
    cancelled = [r["device"] for r in summary["reports"] if r["status"] == "cancelled"]
    if cancelled:
        written = summary["written"]
        done += (f"\n| Cancelled | {len(cancelled)} turnstile(s) stopped: {', '.join(cancelled)} |"
                 f"\n| Written before the cancel | {written['created']:,} user(s) created, {written['updated']:,} "
                 f"updated, {written['cards']:,} card(s), {written['groups']:,} group link(s) added, "
                 f"{written['groups_removed']:,} removed |")
    return f"""# Registration of `{file_name}`{' (dry run)' if dry_run else ''}{' (cancelled)' if cancelled else ''}

| | |
|---|---|
| Participants | {summary['participants']:,} (+{summary['repeated_rows']:,} repeated rows of the file) |
| Turnstiles | {summary['turnstiles']} |
| Total operations | {summary['operations']:,} |
{done}
| Skipped (cache) | {summary['cached']:,} |
| {'Expected errors' if dry_run else 'Errors'} | {summary['errors']:,} |

{len(failed)} turnstile(s) not worked on{': ' + ', '.join(failed) if failed else ''}.
{_reset_line(summary['reports'], dry_run)}Time: {summary['seconds']:.1f} s. Failed records: {failures}.
"""


def _reset_line(reports: list[dict], dry_run: bool) -> str:
    """The turnstiles found reset or replaced (their cache not trusted), one line; "" when none."""
    reset = [r["device"] for r in reports if r.get("reset")]
    if not reset:
        return ""
    done = "planned in full" if dry_run else "registered again in full"
    return f"{len(reset)} turnstile(s) reset or replaced, {done}: {', '.join(reset)}.\n"


def registration_failure_message(summary: dict) -> str | None:
    """The run's failure in one line (failed records, turnstiles not worked on; in a dry run, the records that
    would fail); None when nothing failed."""
    if not (summary["errors"] or summary["turnstiles_failed"]):
        return None
    failed = "would fail (dry run: nothing was written)" if summary["dry_run"] else "failed"
    return (f"{summary['errors']:,} record(s) {failed} and {summary['turnstiles_failed']} turnstile(s) could not be "
            f"worked on: see the registration-failures spreadsheet ({summary['failures_file']})")


def write_registration_failures(
    path: Path,
    failures: Iterable[tuple[str, str, str, str]],
    *,
    title: str,
    rows_per_sheet: int = EXCEL_MAX_DATA_ROWS,
) -> int:
    """Write `failures` as (registration, turnstile, row, error), in the order given, to the .xlsx at `path`,
    with `title` and the count per turnstile on the "Summary" sheet; return how many were written.

    A row that is a row number is written as a number (it sorts as one); every other value as text, so that a
    value like '=1+1' from the file stays what it was. The workbook is written beside `path` and moved over it.
    """
    if not 1 <= rows_per_sheet <= EXCEL_MAX_DATA_ROWS:
        raise ValueError(f"rows_per_sheet must be 1..{EXCEL_MAX_DATA_ROWS:,}, not {rows_per_sheet}")
    workbook = openpyxl.Workbook(write_only=True)
    by_turnstile: Counter[str] = Counter()
    sheet, rows_in_sheet = add_table_sheet(workbook, FAILURE_SHEET, FAILURE_COLUMNS, _COLUMN_WIDTHS), 0
    for registration, turnstile, row, error in failures:
        if rows_in_sheet == rows_per_sheet:
            sheet = add_table_sheet(
                workbook, f"{FAILURE_SHEET} {len(workbook.worksheets) + 1}", FAILURE_COLUMNS, _COLUMN_WIDTHS
            )
            rows_in_sheet = 0
        row_cell = int(row) if _ROW_NUMBER.fullmatch(row) else _text_or_empty(sheet, row)
        sheet.append([_text_or_empty(sheet, registration), _text_or_empty(sheet, turnstile), row_cell,
                      _text_or_empty(sheet, error)])
        rows_in_sheet += 1
        by_turnstile[turnstile] += 1
    counts = sorted(((turnstile or NO_TURNSTILE, n) for turnstile, n in by_turnstile.items()),
                    key=lambda item: (-item[1], item[0]))
    add_counts_sheet(workbook, SUMMARY_SHEET, title, counts, "failed registrations", ("Turnstile", "Failures"))
    atomic_workbook_save(workbook, path)
    return by_turnstile.total()


def read_registration_failures(path: Path) -> list[tuple[str, str, str, str]]:
    """The failures of every "Failures" sheet of a workbook written by `write_registration_failures`, in order."""
    failures: list[tuple[str, str, str, str]] = []
    workbook = openpyxl.load_workbook(path, read_only=True)
    try:
        for sheet in workbook.worksheets:
            if sheet.title.startswith(FAILURE_SHEET):
                for row in islice(sheet.iter_rows(values_only=True), 1, None):
                    cells = (*row, *(None,) * (len(FAILURE_COLUMNS) - len(row)))  # trailing empty cells are cut
                    failures.append(tuple("" if cell is None else str(cell) for cell in cells[:len(FAILURE_COLUMNS)]))
    finally:
        workbook.close()
    return failures


def _text_or_empty(sheet: WriteOnlyWorksheet, text: str) -> WriteOnlyCell | None:
    """An empty cell for '' (so that it reads back as ''), a `text_cell` otherwise."""
    return text_cell(sheet, text) if text else None
