"""The .xlsx writer: rows read back (values and types, as openpyxl's own `append` writes them), sheet limits and
dimensions, the Summary sheet and its chart, escaping, empty slices, atomic rewrites, LibreOffice."""

from __future__ import annotations

import shutil
import subprocess
import zipfile

import numpy as np
import openpyxl
import pytest

from operations.lottery.sheet_xml import game_rows
from operations.lottery.spreadsheet import RegionRow, WorkbookSummary, read_game_rows, write_games_workbook

SUMMARY = WorkbookSummary(
    title="Mega-Sena games - run t",
    parameters=[("games", "20"), ("sum", "118..248")],
    regions=[RegionRow("1-10", 0.7, 14, 13), RegionRow("11-20", 0.3, 6, 7)],
    total_games=20,
)


def _games(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    games = np.sort(np.array([rng.choice(60, k, replace=False) + 1 for _ in range(n)]), axis=1).astype(np.uint8)
    return games, np.sort(rng.random(n))[::-1]


@pytest.mark.parametrize("k", [6, 20])
def test_rows_read_back_across_sheets_of_bounded_size(tmp_path, k):
    games, scores = _games(20, k)
    written = write_games_workbook(tmp_path / "g.xlsx", games, scores, 101, SUMMARY, rows_per_sheet=7)
    assert [(s.first_rank, s.last_rank) for s in written.sheets] == [(101, 107), (108, 114), (115, 120)]
    rows = list(read_game_rows(written.path))
    assert [r[0] for r in rows] == list(range(101, 121))
    assert [list(r[1 : 1 + k]) for r in rows] == games.tolist()
    assert [r[k + 1] for r in rows] == games.astype(int).sum(axis=1).tolist()
    assert [r[k + 2] for r in rows] == (games % 2 == 0).sum(axis=1).tolist()
    assert [r[-1] for r in rows] == pytest.approx(np.round(scores, 6).tolist())
    wb = openpyxl.load_workbook(written.path, read_only=True)
    assert wb.sheetnames[0] == "Summary"
    for ws in wb.worksheets[1:]:
        assert len(ws.title) <= 31
        assert sum(1 for _ in ws.iter_rows()) - 1 <= 7


def _openpyxl_reference(path, games: np.ndarray, scores: np.ndarray, first_rank: int, rows_per_sheet: int) -> None:
    """The game sheets as openpyxl's write-only `append` writes them (the writer before `sheet_xml`)."""
    wb = openpyxl.Workbook(write_only=True)
    k = games.shape[1]
    for start in range(0, len(games), rows_per_sheet):
        ws = wb.create_sheet(f"s{start}")
        ws.append(["Rank", *[f"N{i}" for i in range(1, k + 1)], "Sum", "Evens", "Score"])
        for i in range(start, min(start + rows_per_sheet, len(games))):
            numbers = [int(n) for n in games[i]]
            ws.append([first_rank + i, *numbers, sum(numbers), sum(n % 2 == 0 for n in numbers), float(scores[i])])
    wb.save(path)


def _typed_rows(path, prefix: str) -> list[list[tuple[type, object]]]:
    wb = openpyxl.load_workbook(path, read_only=True)
    sheets = [ws for ws in wb.worksheets if ws.title.startswith(prefix)]
    rows = [[(type(v), v) for v in row] for ws in sheets for row in ws.iter_rows(values_only=True)]
    wb.close()
    return rows


@pytest.mark.parametrize("k", [6, 20])
def test_rows_read_back_as_openpyxl_append_writes_them(tmp_path, k):
    games, scores = _games(45, k, seed=k)
    scores[-3:] = [0.5, 0.000001, 0.0000004]  # "0.5", "1e-06": still floats; the last rounds to 0.0
    written = write_games_workbook(tmp_path / "g.xlsx", games, scores, 1_048_570, SUMMARY, rows_per_sheet=20)
    _openpyxl_reference(tmp_path / "ref.xlsx", games, np.round(scores, 6), 1_048_570, rows_per_sheet=20)
    ours, reference = _typed_rows(written.path, "Games"), _typed_rows(tmp_path / "ref.xlsx", "s")
    assert len(ours) == 45 + 3
    reference[-1][-1] = (float, 0.0)  # openpyxl's "%.16g" writes 0.0 as "0", read back as the int 0
    assert ours == reference
    assert ours[-1][-1] == (float, 0.0) and ours[-2][-1] == (float, 0.000001)


def test_a_score_of_one_stays_a_float(tmp_path):
    games, scores = _games(3, 6)
    scores[0] = 1.0  # the highest score (every feature at its most common value)
    path = write_games_workbook(tmp_path / "g.xlsx", games, scores, 1, SUMMARY).path
    first = _typed_rows(path, "Games")[1]  # as openpyxl reads it: "1" would come back as an int
    assert first[-1] == (float, 1.0)
    assert all(kind is int for kind, _ in first[:-1])
    assert next(read_game_rows(path)) == tuple(value for _, value in first)


def test_game_sheets_keep_header_freeze_pane_widths_and_dimension(tmp_path):
    games, scores = _games(25, 6)
    path = write_games_workbook(tmp_path / "g.xlsx", games, scores, 1, SUMMARY, rows_per_sheet=10).path
    wb = openpyxl.load_workbook(path)
    assert wb.sheetnames == ["Summary", "Games 1-10", "Games 11-20", "Games 21-25"]
    for ws in wb.worksheets[1:]:
        assert ws.freeze_panes == "A2"
        assert ws.column_dimensions["A"].width == 10 and ws.column_dimensions["J"].width == 10
        assert [c.value for c in ws[1]] == ["Rank", "N1", "N2", "N3", "N4", "N5", "N6", "Sum", "Evens", "Score"]
    with zipfile.ZipFile(path) as archive:
        parts = [archive.read(f"xl/worksheets/sheet{i}.xml") for i in (2, 3, 4)]
    assert [b'<dimension ref="A1:J11"/>' in parts[0], b'<dimension ref="A1:J6"/>' in parts[2]] == [True, True]
    read_only = openpyxl.load_workbook(path, read_only=True)
    # the read-only loader takes the size from <dimension> instead of scanning the sheet
    assert [ws.max_row for ws in read_only.worksheets[1:]] == [11, 11, 6]
    assert [ws.max_column for ws in read_only.worksheets[1:]] == [10, 10, 10]


def test_an_empty_slice_still_makes_a_valid_file(tmp_path):
    games, scores = np.zeros((0, 6), np.uint8), np.zeros(0)
    written = write_games_workbook(tmp_path / "g.xlsx", games, scores, 1, SUMMARY)
    assert written.rows == 0 and [(s.first_rank, s.last_rank) for s in written.sheets] == [(1, 0)]
    wb = openpyxl.load_workbook(written.path)
    assert wb.sheetnames == ["Summary", "Games 1-1"]
    assert [[c.value for c in row] for row in wb["Games 1-1"].iter_rows()] == [
        ["Rank", "N1", "N2", "N3", "N4", "N5", "N6", "Sum", "Evens", "Score"]
    ]
    assert list(read_game_rows(written.path)) == []


def test_text_of_the_summary_is_escaped(tmp_path):
    tricky = 'a<b & c>"d\'e'
    summary = WorkbookSummary(
        title=f"run {tricky}", parameters=[(tricky, "<x/>&amp;")], regions=SUMMARY.regions, total_games=20
    )
    games, scores = _games(4, 6)
    path = write_games_workbook(tmp_path / "g.xlsx", games, scores, 1, summary).path
    values = [v for row in openpyxl.load_workbook(path)["Summary"].iter_rows(values_only=True) for v in row]
    assert f"run {tricky}" in values and tricky in values and "<x/>&amp;" in values
    assert len(list(read_game_rows(path))) == 4


def test_rows_come_in_bounded_blocks_that_join_to_the_whole():
    games, scores = _games(10, 6)
    blocks = list(game_rows(games, scores, 5, 2, block_rows=4))
    assert [b.count(b"<row ") for b in blocks] == [4, 4, 2]
    assert b"".join(blocks) == b"".join(game_rows(games, scores, 5, 2, block_rows=100))
    assert blocks[0].startswith(b'<row r="2"><c><v>5</v></c>') and blocks[-1].count(b'<row r="11">') == 1


@pytest.mark.parametrize("bad", [[1, 2, 3, 4, 5, 61], [0, 2, 3, 4, 5, 6], list(range(1, 22))])
def test_games_outside_the_precomputed_cells_are_refused(bad):
    with pytest.raises(ValueError, match="numbers"):
        list(game_rows(np.array([bad], np.int64), np.array([0.5]), 1, 2))


def test_summary_sheet_holds_parameters_distribution_and_a_chart(tmp_path):
    games, scores = _games(20, 6)
    path = write_games_workbook(tmp_path / "g.xlsx", games, scores, 1, SUMMARY).path
    ws = openpyxl.load_workbook(path)["Summary"]
    values = [[c for c in row if c is not None] for row in ws.iter_rows(values_only=True)]
    assert ["games", "20"] in values and ["sum", "118..248"] in values
    assert ["1-10", 0.7, 14, 13, 0.65] in values and ["11-20", 0.3, 6, 7, 0.35] in values
    with zipfile.ZipFile(path) as archive:
        assert any(name.startswith("xl/charts/chart") for name in archive.namelist())


def test_bad_input_is_refused(tmp_path):
    games, scores = _games(5, 6)
    with pytest.raises(ValueError, match="same rows"):
        write_games_workbook(tmp_path / "g.xlsx", games, scores[:3], 1, SUMMARY)
    with pytest.raises(ValueError, match="rows_per_sheet"):
        write_games_workbook(tmp_path / "g.xlsx", games, scores, 1, SUMMARY, rows_per_sheet=1_048_576)
    with pytest.raises(ValueError, match="finite"):
        write_games_workbook(tmp_path / "g.xlsx", games, np.full(5, np.nan), 1, SUMMARY)


def test_rewriting_the_same_path_replaces_it_whole(tmp_path):
    target = tmp_path / "g.xlsx"
    games, scores = _games(10, 6, seed=1)
    write_games_workbook(target, games, scores, 1, SUMMARY)
    games2, scores2 = _games(4, 6, seed=2)
    write_games_workbook(target, games2, scores2, 1, SUMMARY)
    assert [list(r[1:7]) for r in read_game_rows(target)] == games2.tolist()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.xlsx"]


@pytest.mark.skipif(shutil.which("soffice") is None, reason="LibreOffice (Debian libreoffice-calc-nogui) not installed")
def test_libreoffice_opens_every_sheet(tmp_path):
    games, scores = _games(30, 6)
    path = write_games_workbook(tmp_path / "g.xlsx", games, scores, 1, SUMMARY, rows_per_sheet=20).path
    games20, scores20 = _games(5, 20)
    wide = write_games_workbook(tmp_path / "w.xlsx", games20, scores20, 7, SUMMARY).path
    empty = write_games_workbook(tmp_path / "e.xlsx", np.zeros((0, 6), np.uint8), np.zeros(0), 1, SUMMARY).path
    done = subprocess.run(
        ["soffice", "--headless", "--norestore", f"-env:UserInstallation=file://{tmp_path}/lo-profile",
         "--convert-to", "csv:Text - txt - csv (StarCalc):44,34,UTF8,1,,0,false,true,false,false,false,-1",
         "--outdir", str(tmp_path), str(path), str(wide), str(empty)],
        capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr
    first = (tmp_path / "g-Games 1-20.csv").read_text().splitlines()
    assert first[0] == "Rank,N1,N2,N3,N4,N5,N6,Sum,Evens,Score" and len(first) == 21
    assert first[1].split(",") == [
        "1", *[str(n) for n in games[0]], str(int(games[0].sum())), str(int((games[0] % 2 == 0).sum())),
        str(np.round(scores[0], 6)),
    ]
    assert len((tmp_path / "g-Games 21-30.csv").read_text().splitlines()) == 11
    assert "1-10" in (tmp_path / "g-Summary.csv").read_text()
    wide_rows = (tmp_path / "w-Games 7-11.csv").read_text().splitlines()
    assert len(wide_rows) == 6 and wide_rows[5].split(",")[:21] == ["11", *[str(n) for n in games20[4]]]
    assert (tmp_path / "e-Games 1-1.csv").read_text().splitlines() == ["Rank,N1,N2,N3,N4,N5,N6,Sum,Evens,Score"]
