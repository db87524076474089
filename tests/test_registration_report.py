"""What a `register-participants` run reports, and which participants file it reads: pure functions, no service."""

from __future__ import annotations

import pytest

from operations.errors import UserError
from operations.infra.tabular import UnreadableFile
from operations.turnstiles.participants import (
    NoParticipantsFile,
    Participant,
    ParticipantsFile,
    ParticipantsFileError,
    RowProblem,
    participants_path,
)
from operations.turnstiles.registration import DeviceReport
from operations.turnstiles.report import (
    registration_failure_message,
    registration_failures,
    registration_markdown,
    registration_summary,
    turnstile_rows,
)


def _people(count: int, repeated: int = 0) -> ParticipantsFile:
    participants = [Participant(i + 2, f"R{i:03d}", f"Person {i}", None, None, None, None) for i in range(count)]
    duplicates = [RowProblem(count + 2 + i, "registration", "repeats row 2", "R000", "R000") for i in range(repeated)]
    return ParticipantsFile(participants, duplicates, count + repeated)


def _device(name: str, participants: int, **fields) -> dict:
    return DeviceReport(name, participants=participants, **fields).to_json()


def test_figures_count_refused_records_the_files_repeated_rows_and_every_pair_of_a_failed_turnstile():
    people = _people(10, repeated=1)
    reports = [
        _device("gate-a", 10, created=8, cached=1, failures=[("R004", 6, "card held by another user")]),
        _device("gate-b", 10, status="failed", error="login refused"),
    ]
    failures = registration_failures(people, reports)
    assert failures[0] == ("R000", "(file)", "12", "row 12, registration: repeats row 2 ('R000')")
    assert ("R004", "gate-a", "6", "card held by another user") in failures
    assert [f for f in failures if f[1] == "gate-b"][0] == ("R000", "gate-b", "2", "turnstile not worked on: login refused")
    assert len(failures) == 1 + 1 + 10

    summary = registration_summary(people, reports, len(failures), dry_run=False, seconds=2.345, failures_file="f.xlsx")
    assert {k: summary[k] for k in ("participants", "repeated_rows", "turnstiles", "operations", "successes",
                                    "cached", "errors", "turnstiles_failed", "seconds")} == {
        "participants": 10, "repeated_rows": 1, "turnstiles": 2, "operations": 20, "successes": 9, "cached": 1,
        "errors": 12, "turnstiles_failed": 1, "seconds": 2.35}
    assert registration_failure_message(summary) == (
        "12 record(s) failed and 1 turnstile(s) could not be worked on: see the registration-failures spreadsheet "
        "(f.xlsx)"
    )
    markdown = registration_markdown("people.csv", summary, "http://files/f.xlsx")
    assert "| Successes | 9 |" in markdown and "| Errors | 12 |" in markdown
    assert "(+1 repeated rows of the file)" in markdown
    assert "1 turnstile(s) not worked on: gate-b." in markdown
    assert "Failed records: [f.xlsx](http://files/f.xlsx)." in markdown


def test_a_clean_run_links_no_failures_and_does_not_fail():
    people = _people(5)
    reports = [_device("gate-a", 5, created=5)]
    summary = registration_summary(people, reports, len(registration_failures(people, reports)), dry_run=False,
                                   seconds=1.0)
    assert (summary["successes"], summary["errors"], summary["failures_file"]) == (5, 0, "")
    assert registration_failure_message(summary) is None
    markdown = registration_markdown("people.csv", summary)
    assert "Failed records: none." in markdown and "0 turnstile(s) not worked on." in markdown


def test_a_dry_run_reports_planned_work_never_successes():
    people = _people(30)
    reports = [_device("gate-a", 30, status="dry-run", created=20, cached=10),
               _device("gate-b", 30, status="dry-run", created=30)]
    summary = registration_summary(people, reports, 0, dry_run=True, seconds=0.5)
    assert summary["planned"] == 60 and "successes" not in summary
    markdown = registration_markdown("people.csv", summary)
    assert markdown.startswith("# Registration of `people.csv` (dry run)")
    assert "| Planned | 60 |" in markdown and "Successes" not in markdown
    rows = turnstile_rows(reports, dry_run=True)
    assert (rows[0]["to create"], rows[0]["cached"]) == (20, 10) and "created" not in rows[0]
    assert turnstile_rows(reports, dry_run=False)[1]["created"] == 30


def test_the_participants_file_is_the_given_one_else_the_setting_and_must_exist(tmp_path):
    given, default = tmp_path / "given.csv", tmp_path / "default.csv"
    given.write_text("registration,name\n", encoding="utf-8")
    default.write_text("registration,name\n", encoding="utf-8")
    assert participants_path(str(given), default) == given
    assert participants_path("", default) == default
    with pytest.raises(NoParticipantsFile, match="PARTICIPANTS_FILE"):
        participants_path("", None)
    with pytest.raises(NoParticipantsFile, match="absent.csv does not exist"):
        participants_path(str(tmp_path / "absent.csv"), default)
    assert issubclass(NoParticipantsFile, UserError) and issubclass(ParticipantsFileError, UserError)
    assert issubclass(UnreadableFile, UserError)  # and so HeaderError: a file the operator fixes


def test_the_turnstiles_table_shows_removals_freed_cards_and_all_cached_turnstiles():
    reports = [_device("gate-a", 10, created=2, cards=3, cards_freed=1, groups=4, groups_removed=5,
                       failures=[("R001", 3, "groups: group 99 does not exist on gate-a")]),
               _device("gate-b", 10, status="cached", cached=10)]
    rows = turnstile_rows(reports, dry_run=False)
    assert {k: rows[0][k] for k in ("created", "cards", "cards freed", "group links", "group links removed",
                                    "failed")} == {"created": 2, "cards": 3, "cards freed": 1, "group links": 4,
                                                   "group links removed": 5, "failed": 1}
    assert (rows[1]["status"], rows[1]["cached"]) == ("cached", 10)
    planned = turnstile_rows([_device("gate-a", 10, status="dry-run", groups_removed=5, cards_freed=1)], dry_run=True)
    assert (planned[0]["group links to remove"], planned[0]["cards to free"]) == (5, 1)
    assert "group links removed" not in planned[0]
    summary = registration_summary(_people(10), reports, 1, dry_run=False, seconds=1.0)
    assert summary["written"] == {"created": 2, "updated": 0, "cards": 3, "cards_freed": 1, "groups": 4,
                                  "groups_removed": 5}
    assert summary["successes"] == 19


def test_a_dry_runs_refusals_are_labelled_as_expected():
    people = _people(4)
    reports = [_device("gate-a", 4, status="dry-run", created=4,
                       failures=[("R001", 3, "groups: group 99 does not exist on gate-a")])]
    summary = registration_summary(people, reports, 1, dry_run=True, seconds=0.1, failures_file="f.xlsx")
    assert "| Expected errors | 1 |" in registration_markdown("people.csv", summary)
    assert registration_failure_message(summary).startswith("1 record(s) would fail (dry run: nothing was written)")
