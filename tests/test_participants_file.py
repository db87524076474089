"""The participants file of `register-participants`: headers in English or Portuguese, every bad cell refusing the
file with its row and column, dates in each accepted form and time zone, repeated registrations and cards as
failures of the later rows, .xlsx and .csv alike, the sample files, fingerprints, a file known by its bytes (its
reading then not done again), and the failures workbook."""

from __future__ import annotations

import dataclasses
import pickle
from datetime import date, datetime
from decimal import Decimal
from functools import partial
from pathlib import Path
from zoneinfo import ZoneInfo

import openpyxl
import pytest

from operations.infra.tabular import HeaderError, UnreadableFile, parse_decimal, parse_whole
from operations.turnstiles.participants import (
    MAX_PROBLEMS_SHOWN,
    Participant,
    ParticipantsFileError,
    RowProblem,
    file_key,
    read_participants,
)
from operations.turnstiles.cache import KnownFile
from operations.turnstiles.report import FAILURE_COLUMNS, read_registration_failures, write_registration_failures
from operations.turnstiles.sample import write_participants_file

SAO_PAULO = ZoneInfo("America/Sao_Paulo")
HEADER = "registration,name,card,group,begin,end"

from files import write_csv, write_ods, write_xlsx


_csv = partial(write_csv, name="participants.csv")
_xlsx = partial(write_xlsx, name="participants.xlsx")


def _seconds(*moment: int, zone: ZoneInfo = SAO_PAULO) -> int:
    return int(datetime(*moment, tzinfo=zone).timestamp())


def _problems(path: Path) -> list[RowProblem]:
    with pytest.raises(ParticipantsFileError) as error:
        read_participants(path)
    return error.value.problems


def test_portuguese_headers_with_accents_and_case_in_any_order(tmp_path):
    path = _csv(
        tmp_path,
        "Validade-Fim;Cartão;NOME COMPLETO;Matrícula;Id Grupo;Data Início",
        "30/11/2026;123456;José da Silva;0042;3;23/11/2026",
    )
    [participant] = read_participants(path).participants
    assert participant == Participant(
        row_number=2,
        registration="0042",
        name="José da Silva",
        card=123456,
        group=3,
        begin=_seconds(2026, 11, 23),
        end=_seconds(2026, 11, 30, 23, 59, 59),
    )


def test_optional_columns_may_be_absent_or_empty(tmp_path):
    path = _csv(tmp_path, "Crachá,Nome,Cartão", "A1,Ana,", "A2,Bruno,77")
    assert read_participants(path).participants == [
        Participant(2, "A1", "Ana", None, None, None, None),
        Participant(3, "A2", "Bruno", 77, None, None, None),
    ]


@pytest.mark.parametrize(
    "header, expected",
    [
        ("nome,cartao", ["missing column 'registration'", "matricula", "headers found: 'nome', 'cartao'"]),
        ("matricula,card", ["missing column 'name'", "nome_completo"]),
        ("card,group", ["missing columns 'registration'", "'name'"]),
        ("matricula,nome,name", ["'nome' and 'name' both mean 'name'"]),
    ],
)
def test_a_bad_header_refuses_the_file_naming_the_column(tmp_path, header, expected):
    with pytest.raises(HeaderError) as error:
        read_participants(_csv(tmp_path, header, "1,2,3"))
    for text in ["participants.csv", *expected]:
        assert text in str(error.value)


def test_unusable_files_are_refused(tmp_path):
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("matrícula,nome\n1,João\n".encode("latin-1"))
    for path, message in [
        (_csv(tmp_path, "", " ", name="empty.csv"), "is empty: expected a header row with registration, name"),
        (latin1, "not UTF-8"),
        (tmp_path / "participants.numbers", "unsupported file type '.numbers'"),
    ]:
        with pytest.raises(UnreadableFile, match=f"{path.name}.*{message}"):
            read_participants(path)


BAD_CELLS = [  # (row after the header, column, reason)
    (",Ana,,,,", "registration", "empty"),
    ("R1,,,,,", "name", "empty"),
    (f"{'R' * 65},Ana,,,,", "registration", "too long: 65 characters, at most 64"),
    (f"R1,{'n' * 121},,,,", "name", "too long: 121 characters, at most 120"),
    ("R1,Ana,12a,,,", "card", "not a whole number"),
    ("R1,Ana,1.5,,,", "card", "not a whole number"),
    ("R1,Ana,-1,,,", "card", "out of range 1..18446744073709551615"),
    ("R1,Ana,0,,,", "card", "out of range 1..18446744073709551615"),
    (f"R1,Ana,{2**64},,,", "card", "out of range 1..18446744073709551615"),
    ("R1,Ana,,0,,", "group", "out of range 1..9223372036854775807"),
    ("R1,Ana,,x,,", "group", "not a whole number"),
    ("R1,Ana,,,amanhã,", "begin", "not a date (expected YYYY-MM-DD or DD/MM/YYYY"),
    ("R1,Ana,,,31/02/2026,", "begin", "not a date (day is out of range for month)"),
    ("R1,Ana,,,2026-11-23 25:00,", "begin", "not a date (hour must be in 0..23)"),
    ("R1,Ana,,,,12345", "end", "not a date (expected"),
    ("R1,Ana,,,,1700000000000", "end", "not a date (expected"),  # milliseconds, not seconds
    ("R1,Ana,,,24/11/2026,23/11/2026", "end", "before begin"),
]


@pytest.mark.parametrize("row, column, reason", BAD_CELLS)
def test_a_bad_cell_refuses_the_whole_file_naming_row_and_column(tmp_path, row, column, reason):
    path = _csv(tmp_path, HEADER, "R0,Good,,,,", row)
    [problem] = _problems(path)
    assert (problem.row_number, problem.column) == (3, column) and problem.reason.startswith(reason)
    with pytest.raises(ParticipantsFileError, match=f"participants.csv: 1 problem, .*\n  row 3, {column}: "):
        read_participants(path)


def test_every_problem_is_listed_and_the_message_shows_the_first_ones(tmp_path):
    path = _csv(tmp_path, HEADER, ",,12a,0,x,", *[row for row, _, _ in BAD_CELLS] * 2)
    with pytest.raises(ParticipantsFileError) as raised:
        read_participants(path)
    problems = raised.value.problems
    assert problems[:5] == [
        RowProblem(2, "registration", "empty"),
        RowProblem(2, "name", "empty"),
        RowProblem(2, "card", "not a whole number", "12a"),
        RowProblem(2, "group", "out of range 1..9223372036854775807", "0"),
        RowProblem(2, "begin", problems[4].reason, "x"),
    ]
    assert len(problems) == 5 + 2 * len(BAD_CELLS)
    lines = str(raised.value).splitlines()
    assert lines[0] == (f"participants.csv: {len(problems)} problems, so no participant was registered; "
                        "fix and run again:")
    assert lines[1:4] == ["  row 2, registration: empty", "  row 2, name: empty",
                          "  row 2, card: not a whole number ('12a')"]
    assert len(lines) == 1 + MAX_PROBLEMS_SHOWN + 1 and lines[-1] == f"  ... and {len(problems) - 20} more"
    copy = pickle.loads(pickle.dumps(raised.value))
    assert (str(copy), copy.problems) == (str(raised.value), problems)


def test_xlsx_cells_are_checked_too(tmp_path):
    path = _xlsx(
        tmp_path,
        HEADER.split(","),
        [1.5, "Ana", 2.0**64, 2.5, "2026-11-23", datetime(2026, 11, 22, 8)],
        [12, "Bruno", True, None, 45000, None],
    )
    assert [(p.row_number, p.column, p.reason) for p in _problems(path)] == [
        (2, "card", "too many digits for a spreadsheet number; format the column as text"),
        (2, "group", "not a whole number"),
        (2, "end", "before begin"),
        (3, "card", "not a whole number"),
        (3, "begin", "not a date (expected YYYY-MM-DD or DD/MM/YYYY, optionally with HH:MM[:SS], or Unix seconds)"),
    ]


@pytest.mark.parametrize(
    "begin, end, expected_begin, expected_end",
    [
        ("2026-11-23", "2026-11-30", (2026, 11, 23), (2026, 11, 30, 23, 59, 59)),
        ("2026-11-23T08:00", "2026-11-30T18:30", (2026, 11, 23, 8), (2026, 11, 30, 18, 30)),
        ("2026-11-23 08:00:15", "2026-11-30 18:30:45", (2026, 11, 23, 8, 0, 15), (2026, 11, 30, 18, 30, 45)),
        ("03/04/2026", "4/5/2026", (2026, 4, 3), (2026, 5, 4, 23, 59, 59)),  # day first
        ("03/04/2026 08:00", "04/05/2026 7:05:09", (2026, 4, 3, 8), (2026, 5, 4, 7, 5, 9)),
    ],
)
@pytest.mark.parametrize("timezone", ["America/Sao_Paulo", "Asia/Tokyo"])
def test_dates_as_text_in_each_form_and_the_time_zone(tmp_path, begin, end, expected_begin, expected_end, timezone):
    path = _csv(tmp_path, "matricula;nome;inicio;fim", f"R1;Ana;{begin};{end}")
    [participant] = read_participants(path, timezone=timezone).participants
    zone = ZoneInfo(timezone)
    assert (participant.begin, participant.end) == (_seconds(*expected_begin, zone=zone),
                                                     _seconds(*expected_end, zone=zone))


def test_dates_as_spreadsheet_dates_and_unix_seconds(tmp_path):
    path = _xlsx(
        tmp_path,
        ["registration", "name", "begin", "end"],
        ["R1", "Ana", datetime(2026, 11, 23, 8, 30), datetime(2026, 11, 30)],  # midnight: a date-only cell
        ["R2", "Bruno", date(2026, 11, 23), date(2026, 11, 30)],
        ["R3", "Carla", 1_795_000_000, "1795086400"],
    )
    assert [(p.begin, p.end) for p in read_participants(path).participants] == [
        (_seconds(2026, 11, 23, 8, 30), _seconds(2026, 11, 30, 23, 59, 59)),
        (_seconds(2026, 11, 23), _seconds(2026, 11, 30, 23, 59, 59)),
        (1_795_000_000, 1_795_086_400),
    ]


def test_an_ods_reads_like_its_xlsx_dates_and_big_card_numbers_included(tmp_path):
    rows = [
        ["matrícula", "nome", "cartão", "início", "fim"],
        ["R1", "Ana", 123.0, datetime(2026, 11, 23, 8, 30), datetime(2026, 11, 30)],
        [],
        ["R2", "Bruno", None, date(2026, 11, 23), "30/11/2026"],
    ]
    big_card = ["R3", "Carla", 2.0**60, None, None]
    for write, name in ((partial(write_xlsx, name="p.xlsx"), "p.xlsx"), (partial(write_ods, name="p.ods"), "p.ods")):
        assert [(p.row_number, p.card, p.begin, p.end) for p in read_participants(write(tmp_path, *rows))
                .participants] == [
            (2, 123, _seconds(2026, 11, 23, 8, 30), _seconds(2026, 11, 30, 23, 59, 59)),
            (4, None, _seconds(2026, 11, 23), _seconds(2026, 11, 30, 23, 59, 59)),
        ], name
        assert [(p.row_number, p.column, p.reason) for p in _problems(write(tmp_path, *rows, big_card))] == [
            (5, "card", "too many digits for a spreadsheet number; format the column as text"),
        ], name


def test_an_unknown_time_zone_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown time zone 'America/Nowhere'"):
        read_participants(_csv(tmp_path, "registration,name", "R1,Ana"), timezone="America/Nowhere")


def test_repeated_registrations_and_cards_fail_the_later_rows_and_the_first_wins(tmp_path):
    path = _csv(
        tmp_path,
        "registration,name,card",
        "R1,Ana,100",
        "R2,Bruno,200",
        "R1,Ana again,300",  # registration of row 2
        "R3,Carla,100",  # card of row 2
        "R4,Diego,300",  # row 4 was not kept, so its card is free
        "R1,Ana thrice,200",  # both repeated: the registration is reported
    )
    result = read_participants(path)
    assert [(p.row_number, p.registration) for p in result.participants] == [(2, "R1"), (3, "R2"), (6, "R4")]
    assert result.duplicates == [
        RowProblem(4, "registration", "registration repeated (first at row 2)", "R1", "R1"),
        RowProblem(5, "card", "card value repeated (first at row 2)", "100", "R3"),
        RowProblem(7, "registration", "registration repeated (first at row 2)", "R1", "R1"),
    ]
    assert result.rows == 6


def test_blank_rows_are_skipped_and_row_numbers_stay_those_of_the_file(tmp_path):
    rows = [[], ["registration", "name", "notes"], ["R1", "Ana"], [None, " ", "only a note"], [], ["R2", "Bruno"]]
    csv_lines = [",".join("" if cell is None else cell for cell in row) for row in rows]
    for path in (_csv(tmp_path, *csv_lines), _xlsx(tmp_path, *rows)):
        result = read_participants(path)
        assert [(p.row_number, p.registration) for p in result.participants] == [(3, "R1"), (6, "R2")]
        assert result.rows == 2


def test_csv_and_xlsx_give_the_same_participants(tmp_path):
    rows = [
        ["Matrícula", "Nome", "Cartão", "Grupo", "Início", "Fim"],
        ["0042", "Ana", "18446744073709551615", "1", "2026-11-23 08:00", "30/11/2026"],
        ["123", "Bruno", "1.234.567", "2", "1795000000", ""],
    ]
    typed = [rows[0], ["0042", "Ana", "18446744073709551615", 1, datetime(2026, 11, 23, 8), date(2026, 11, 30)],
             [123, "Bruno", 1_234_567, 2.0, 1_795_000_000, None]]
    from_csv = read_participants(_csv(tmp_path, *(";".join(row) for row in rows)))
    from_xlsx = read_participants(_xlsx(tmp_path, *typed))
    assert from_csv == from_xlsx
    assert [(p.registration, p.card, p.end) for p in from_csv.participants] == [
        ("0042", 2**64 - 1, _seconds(2026, 11, 30, 23, 59, 59)),
        ("123", 1_234_567, None),
    ]


@pytest.mark.parametrize("suffix", [".csv", ".xlsx"])
def test_a_sample_file_reads_back_as_written(tmp_path, suffix):
    written = write_participants_file(tmp_path / f"participants{suffix}", 1_000, seed=5)
    result = read_participants(tmp_path / f"participants{suffix}")
    assert result.participants == written and result.duplicates == [] and result.rows == 1_000
    assert written[0].registration == "R000001" and written[0].card == 10_000_001
    assert {p.group for p in written} == {1, 2} and sum(p.begin is None for p in written) == 250

    renamed = write_participants_file(tmp_path / f"renamed{suffix}", 1_000, seed=5, rename_every=7)
    assert read_participants(tmp_path / f"renamed{suffix}").participants == renamed
    changed = [old.row_number - 1 for old, new in zip(written, renamed, strict=True)
               if old.fingerprint() != new.fingerprint()]
    assert changed == list(range(7, 1_001, 7))


def test_a_sample_file_without_optional_columns(tmp_path):
    path = tmp_path / "participants.csv"
    written = write_participants_file(path, 3, cards=False, groups=(), validity=False)
    assert path.read_text().splitlines()[0] == "registration,name"
    assert read_participants(path).participants == written
    assert {(p.card, p.group, p.begin, p.end) for p in written} == {(None, None, None, None)}


def test_the_fingerprint_follows_what_a_device_holds():
    participant = Participant(2, "R1", "Ana", 100, 1, 1_795_000_000, 1_796_000_000)
    fingerprint = participant.fingerprint()
    assert len(fingerprint) == 16 and int(fingerprint, 16) >= 0
    assert dataclasses.replace(participant, row_number=9).fingerprint() == fingerprint
    for change in [{"registration": "R2"}, {"name": "Ana B"}, {"card": 101}, {"card": None}, {"group": 2},
                   {"group": None}, {"begin": 1_795_000_001}, {"begin": None}, {"end": 1_796_000_001}, {"end": None}]:
        assert dataclasses.replace(participant, **change).fingerprint() != fingerprint, change


FAILURES = [
    ("R000001", "Portaria 1", "2", "timeout after 5 s"),
    ("=1+1", "Portaria 2", "3", "refused: card value in use"),
    ("R000003", "", "", "device unreachable \x01"),
    ("R000004", "Portaria 2", "row?", "=HYPERLINK(\"http://x\")"),
    ("R000005", "Portaria 2", "6", ""),
]


def test_failures_workbook_round_trip(tmp_path):
    path = tmp_path / "out" / "failures.xlsx"
    assert write_registration_failures(path, iter(FAILURES), title="Participants file p.xlsx", rows_per_sheet=3) == 5
    expected = [(r, t, row, e.replace("\x01", "\ufffd")) for r, t, row, e in FAILURES]
    assert read_registration_failures(path) == expected
    assert [p.name for p in path.parent.iterdir()] == ["failures.xlsx"]  # no temporary file left behind

    workbook = openpyxl.load_workbook(path)
    assert workbook.sheetnames == ["Failures", "Failures 2", "Summary"]
    sheet = workbook["Failures"]
    assert [cell.value for cell in sheet[1]] == list(FAILURE_COLUMNS) and sheet["A1"].font.b
    assert sheet.freeze_panes == "A2" and sheet.column_dimensions["D"].width == 80
    assert (sheet["A3"].value, sheet["A3"].data_type) == ("=1+1", "s")  # text, not a formula
    assert (sheet["C2"].value, workbook["Failures 2"]["C2"].value) == (2, "row?")  # row numbers are numbers
    summary = [[value for value in row if value is not None] for row in workbook["Summary"].values]
    assert summary == [["Participants file p.xlsx"], ["5 failed registrations"], [], ["Turnstile", "Failures"],
                       ["Portaria 2", 3], ["(no turnstile)", 1], ["Portaria 1", 1]]


def test_failures_workbook_without_failures(tmp_path):
    path = tmp_path / "failures.xlsx"
    assert write_registration_failures(path, [], title="Nothing failed") == 0
    assert read_registration_failures(path) == []
    workbook = openpyxl.load_workbook(path)
    assert [row for row in workbook["Summary"].values] == [("Nothing failed",), ("No failures",)]
    with pytest.raises(ValueError, match="rows_per_sheet"):
        write_registration_failures(path, [], title="t", rows_per_sheet=0)


def test_a_file_is_known_by_its_bytes_and_time_zone_and_its_reading_kept_as_it_was(tmp_path):
    path = tmp_path / "participants.csv"
    people = write_participants_file(path, 600)
    with path.open("a", encoding="utf-8") as handle:  # a repeated registration: a failure the record keeps
        handle.write("R000001,Repeated Row,,,,\n")
    key = file_key(path)
    assert file_key(path) == key and file_key(path, "UTC") != key, "the time zone reads the dates"
    read = read_participants(path)
    known = KnownFile(read, "digest-of-the-fingerprints")
    assert KnownFile.decode(known.encode()) == known, "a record reads back to the same participants and failures"
    assert read.participants == people and len(read.duplicates) == 1 and read.rows == 601

    path.write_bytes(path.read_bytes().replace(b"R000002", b"R000002X"))
    assert file_key(path) != key, "any byte changed: another file, read and checked again"


@pytest.mark.parametrize(
    "value, decimal, whole",
    [
        ("1.234", Decimal("1.234"), 1234),
        ("1,234.50", Decimal("1234.50"), None),
        ("R$ 1.234,56", Decimal("1234.56"), None),
        ("-7", Decimal("-7"), -7),
        (5.0, Decimal("5.0"), 5),
        (True, None, None),
        (float("nan"), None, None),
        ("12a", None, None),
        (None, None, None),
    ],
)
def test_shared_number_parsing(value, decimal, whole):
    assert (parse_decimal(value), parse_whole(value)) == (decimal, whole)
