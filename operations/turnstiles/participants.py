"""Read and check the participants file of `register-participants` (.xlsx or .csv with a header row).

Every participant is registered on every turnstile, so a bad cell is not one row's failure: it means the file
is not what the operator meant, and the whole file is refused (`ParticipantsFileError`, listing every problem
with its row and column) before any device is called. A registration or card value that repeats an earlier
row is different: the earlier row is unambiguous, so it is kept and the later row becomes that row's failure
(`ParticipantsFile.duplicates`). Headers may be English or Portuguese; dates may be ISO, Brazilian (day first),
spreadsheet dates or Unix seconds, and are stored as Unix seconds as the devices want them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

from operations.errors import UserError
from operations.infra.tabular import cell_text, is_blank, open_records, parse_whole, read_header

DEFAULT_TIMEZONE = "America/Sao_Paulo"
REQUIRED_COLUMNS = ("registration", "name")
HEADER_ALIASES: dict[str, tuple[str, ...]] = {
    "registration": ("registration", "matricula", "registro", "inscricao", "cracha", "id_participante", "badge"),
    "name": ("name", "nome", "participante", "nome_completo"),
    "card": ("card", "card_number", "cartao", "numero_cartao", "numero_do_cartao"),
    "group": ("group", "group_id", "grupo", "id_grupo"),
    "begin": ("begin", "begin_time", "valid_from", "inicio", "validade_inicio", "data_inicio"),
    "end": ("end", "end_time", "valid_until", "fim", "validade_fim", "data_fim"),
}
MAX_REGISTRATION_LENGTH = 64
MAX_NAME_LENGTH = 120
MAX_CARD = 2**64 - 1  # the devices store card values as uint64
MAX_GROUP = 2**63 - 1  # and group ids as int64
MAX_PROBLEMS_SHOWN = 20
READING_VERSION = 1  # of how a file is read and checked: a change to it makes every file unknown again
_EXACT_FLOAT_LIMIT = 2**53  # above it, an xlsx number (a double) no longer holds every whole number
_DATE_FORMS = "YYYY-MM-DD or DD/MM/YYYY, optionally with HH:MM[:SS], or Unix seconds"
_ISO_DATE = re.compile(r"(?P<year>\d{4})-(?P<month>\d{1,2})-(?P<day>\d{1,2})(?:[T ](?P<time>.+))?")
_BRAZILIAN_DATE = re.compile(r"(?P<day>\d{1,2})/(?P<month>\d{1,2})/(?P<year>\d{4})(?: +(?P<time>.+))?")
_TIME = re.compile(r"(?P<hour>\d{1,2}):(?P<minute>\d{2})(?::(?P<second>\d{2}))?")
# Ten digits, 10**9 (2001-09-09) to 10**10 - 1 (2286): fewer is not taken for a date, more is likely milliseconds.
_UNIX_SECONDS = re.compile(r"[1-9]\d{9}")


@dataclass(frozen=True, slots=True)
class Participant:
    """A valid row: what every device must hold for this person. `row_number` is the row as the spreadsheet
    shows it (the header is row 1); `begin` and `end` are Unix seconds, None when the row leaves them open."""

    row_number: int
    registration: str
    name: str
    card: int | None
    group: int | None
    begin: int | None
    end: int | None

    def fingerprint(self) -> str:
        """16 hex characters that change exactly when what a device must hold changes (not the row number), so
        that a participant already written with the same data need not be written again."""
        data = [self.registration, self.name, self.card, self.group, self.begin, self.end]
        try:  # orjson writes the same bytes as json.dumps(ensure_ascii=False, compact), ~5x faster
            encoded = orjson.dumps(data)
        except orjson.JSONEncodeError:  # a lone surrogate, which the json module passes through
            encoded = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
        return hashlib.blake2b(encoded, digest_size=8).hexdigest()


@dataclass(frozen=True, slots=True)
class RowProblem:
    """One problem of one row: a bad cell (the whole file is refused) or a row refused on its own, such as a
    repeated registration. `column` is canonical; `value` is the cell as text; `registration` the row's, when
    the row itself was readable (a repeated registration or card)."""

    row_number: int
    column: str
    reason: str
    value: str = ""
    registration: str = ""

    def __str__(self) -> str:
        shown = f" ({self.value!r})" if self.value else ""
        return f"row {self.row_number}, {self.column}: {self.reason}{shown}"


class ParticipantsFileError(UserError, ValueError):
    """The file is refused as a whole before any device is called; `problems` holds every bad cell, and the
    message the first `MAX_PROBLEMS_SHOWN` of them with their count."""

    def __init__(self, file_name: str, problems: list[RowProblem]) -> None:
        count = f"{len(problems):,} problem{'s' if len(problems) > 1 else ''}"
        shown = "".join(f"\n  {problem}" for problem in problems[:MAX_PROBLEMS_SHOWN])
        hidden = len(problems) - MAX_PROBLEMS_SHOWN
        more = f"\n  ... and {hidden:,} more" if hidden > 0 else ""
        super().__init__(f"{file_name}: {count}, so no participant was registered; fix and run again:{shown}{more}")
        self.file_name, self.problems = file_name, problems

    def __reduce__(self) -> tuple[type[ParticipantsFileError], tuple[str, list[RowProblem]]]:
        return type(self), (self.file_name, self.problems)  # pickled by its arguments, not by its message


@dataclass(frozen=True, slots=True)
class ParticipantsFile:
    """A file that passed its checks: its `participants` in file order, less the rows that repeat an earlier
    row's registration or card value (`duplicates`, failures of those rows); `rows` counts the data rows read,
    blank rows aside."""

    participants: list[Participant]
    duplicates: list[RowProblem]
    rows: int


class NoParticipantsFile(UserError, FileNotFoundError):
    """No participants file was given (nor PARTICIPANTS_FILE set), or the one named is not a file here."""


def participants_path(given: str, default: Path | None) -> Path:
    """The participants file to read: `given`, else `default` (PARTICIPANTS_FILE); raises NoParticipantsFile
    when neither is set or the file is not on this machine."""
    if not given and default is None:
        raise NoParticipantsFile("no participants file: give one, or set PARTICIPANTS_FILE for scheduled runs")
    path = Path(given or default)
    if not path.is_file():
        raise NoParticipantsFile(f"participants file {path} does not exist (or is not a file) on this machine")
    return path


def file_key(path: Path, timezone: str = DEFAULT_TIMEZONE) -> str:
    """A digest of the file's bytes, the time zone its dates are read in and READING_VERSION: two files with the
    same key read to the same participants (or are refused alike)."""
    digest = hashlib.blake2b(f"{READING_VERSION}\n{timezone}\n".encode(), digest_size=16)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_participants(path: Path, timezone: str = DEFAULT_TIMEZONE) -> ParticipantsFile:
    """Read and check the participants file at `path`, streaming it; dates without a time zone are in `timezone`.

    Raises `ParticipantsFileError` when any cell is bad, and the `UnreadableFile` or `HeaderError` of
    `operations.infra.tabular` when the file or its header is unusable (the message names the column).
    """
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {timezone!r}; use an IANA name such as {DEFAULT_TIMEZONE!r}") from exc
    path = Path(path)
    participants: list[Participant] = []
    duplicates: list[RowProblem] = []
    problems: list[RowProblem] = []
    first_row_of_registration: dict[str, int] = {}
    first_row_of_card: dict[int, int] = {}
    rows = 0
    with open_records(path) as records:
        numbered = enumerate(records, start=1)
        indexes, _ = read_header(numbered, HEADER_ALIASES, REQUIRED_COLUMNS, path.name)
        for row_number, cells in _data_rows(numbered, indexes):
            rows += 1
            checked = _check_row(row_number, cells, zone)
            if isinstance(checked, list):
                problems.extend(checked)
                continue
            repeated = _repeated(checked, first_row_of_registration, first_row_of_card)
            if repeated:
                duplicates.append(repeated)
                continue
            first_row_of_registration[checked.registration] = row_number
            if checked.card is not None:
                first_row_of_card[checked.card] = row_number
            participants.append(checked)
    if problems:
        raise ParticipantsFileError(path.name, problems)
    return ParticipantsFile(participants=participants, duplicates=duplicates, rows=rows)


def _data_rows(
    numbered: Iterator[tuple[int, Sequence[object]]], indexes: dict[str, int]
) -> Iterator[tuple[int, dict[str, object]]]:
    """(row number, cell of each canonical column found) of the rows with a value in one of those columns."""
    for row_number, cells in numbered:
        values = {column: cells[index] if index < len(cells) else None for column, index in indexes.items()}
        if not all(is_blank(value) for value in values.values()):
            yield row_number, values


def _repeated(
    participant: Participant, registrations: dict[str, int], cards: dict[int, int]
) -> RowProblem | None:
    """The problem of a participant whose registration or card value an earlier kept row has, if any."""
    row_number = participant.row_number
    if participant.registration in registrations:
        first = registrations[participant.registration]
        return RowProblem(row_number, "registration", f"registration repeated (first at row {first})",
                          participant.registration, participant.registration)
    if participant.card is not None and participant.card in cards:
        first = cards[participant.card]
        return RowProblem(row_number, "card", f"card value repeated (first at row {first})", str(participant.card),
                          participant.registration)
    return None


def _check_row(row_number: int, cells: dict[str, object], zone: ZoneInfo) -> Participant | list[RowProblem]:
    """The row as a `Participant`, or every problem of its cells."""
    values: dict[str, object] = {}
    problems: list[RowProblem] = []
    for column, check in _CELL_CHECKS.items():
        try:
            values[column] = check(cells.get(column), zone)
        except _CellError as error:
            problems.append(RowProblem(row_number, column, error.reason, cell_text(cells.get(column))))
    begin, end = values.get("begin"), values.get("end")
    if begin is not None and end is not None and end < begin:
        problems.append(RowProblem(row_number, "end", "before begin", cell_text(cells["end"])))
    return problems or Participant(row_number, **values)


class _CellError(Exception):
    """One cell's problem, raised by the cell checks and turned into a `RowProblem`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _text(value: object, limit: int) -> str:
    text = cell_text(value)
    if not text:
        raise _CellError("empty")
    if len(text) > limit:
        raise _CellError(f"too long: {len(text)} characters, at most {limit}")
    return text


def _whole(value: object, low: int, high: int) -> int | None:
    """An optional whole number in low..high. A spreadsheet number above 2**53 is refused: the spreadsheet
    has already rounded it, so it may not be the number typed."""
    if type(value) is str and value.isascii() and value.isdigit():  # the common cell, read without a Decimal
        number = int(value)
        if not low <= number <= high:
            raise _CellError(f"out of range {low}..{high}")
        return number
    if is_blank(value):
        return None
    if isinstance(value, float) and abs(value) > _EXACT_FLOAT_LIMIT:
        raise _CellError("too many digits for a spreadsheet number; format the column as text")
    number = parse_whole(value)
    if number is None:
        raise _CellError("not a whole number")
    if not low <= number <= high:
        raise _CellError(f"out of range {low}..{high}")
    return number


def _moment(value: object, zone: ZoneInfo, time_of_day: time) -> int | None:
    """An optional date as Unix seconds. A date without a time takes `time_of_day` (start of the day for a
    begin, its last second for an end); so does a spreadsheet date at midnight, the time of a date-only cell."""
    if is_blank(value):
        return None
    if isinstance(value, datetime):
        at_midnight = value.time() == time.min
        moment = datetime.combine(value.date(), time_of_day, value.tzinfo) if at_midnight else value
    elif isinstance(value, date):
        moment = datetime.combine(value, time_of_day)
    else:
        return _text_moment(cell_text(value), zone, time_of_day)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone)
    return round(moment.timestamp())


@functools.lru_cache(maxsize=4096)
def _text_moment(text: str, zone: ZoneInfo, time_of_day: time) -> int:
    """A date written as text, as Unix seconds (remembered: a file repeats a few hundred dates)."""
    if _UNIX_SECONDS.fullmatch(text):
        return int(text)
    moment = _parsed_date(text, time_of_day)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone)
    return round(moment.timestamp())


def _parsed_date(text: str, time_of_day: time) -> datetime:
    """A date in text, ISO or Brazilian (day first), with an optional time."""
    match = _ISO_DATE.fullmatch(text) or _BRAZILIAN_DATE.fullmatch(text)
    clock = _TIME.fullmatch(match["time"]) if match and match["time"] else None
    if match is None or (match["time"] and clock is None):
        raise _CellError(f"not a date (expected {_DATE_FORMS})")
    try:
        day = date(int(match["year"]), int(match["month"]), int(match["day"]))
        if clock is None:
            return datetime.combine(day, time_of_day)
        return datetime.combine(day, time(int(clock["hour"]), int(clock["minute"]), int(clock["second"] or 0)))
    except ValueError as exc:
        raise _CellError(f"not a date ({exc})") from exc


_END_OF_DAY = time(23, 59, 59)
# Every column's check, in column order (the order problems are listed in); each takes the cell and the zone.
_CELL_CHECKS: dict[str, Callable[[object, ZoneInfo], object]] = {
    "registration": lambda value, _: _text(value, MAX_REGISTRATION_LENGTH),
    "name": lambda value, _: _text(value, MAX_NAME_LENGTH),
    "card": lambda value, _: _whole(value, 1, MAX_CARD),
    "group": lambda value, _: _whole(value, 1, MAX_GROUP),
    "begin": lambda value, zone: _moment(value, zone, time.min),
    "end": lambda value, zone: _moment(value, zone, _END_OF_DAY),
}
