"""The .xlsx writer: rows read back, sheet limits, the Summary sheet and its chart, atomic rewrites."""

from __future__ import annotations

import shutil
import subprocess
import zipfile

import numpy as np
import openpyxl
import pytest

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
    done = subprocess.run(
        ["soffice", "--headless", "--norestore", f"-env:UserInstallation=file://{tmp_path}/lo-profile",
         "--convert-to", "csv:Text - txt - csv (StarCalc):44,34,UTF8,1,,0,false,true,false,false,false,-1",
         "--outdir", str(tmp_path), str(path)],
        capture_output=True, text=True, timeout=180,
    )
    assert done.returncode == 0, done.stderr
    first = (tmp_path / "g-Games 1-20.csv").read_text().splitlines()
    assert first[0] == "Rank,N1,N2,N3,N4,N5,N6,Sum,Evens,Score" and len(first) == 21
    assert first[1].split(",")[1:7] == [str(n) for n in games[0]]
    assert len((tmp_path / "g-Games 21-30.csv").read_text().splitlines()) == 11
    assert "1-10" in (tmp_path / "g-Summary.csv").read_text()
