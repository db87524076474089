"""Small input files written by the file-reading tests."""

from __future__ import annotations

from pathlib import Path

import openpyxl


def write_csv(tmp_path: Path, *lines: str, name: str) -> Path:
    """A UTF-8 CSV of the given lines."""
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_xlsx(tmp_path: Path, *rows: list[object], name: str) -> Path:
    """An .xlsx whose first sheet holds the given rows."""
    workbook = openpyxl.Workbook()
    for row in rows:
        workbook.active.append(row)
    path = tmp_path / name
    workbook.save(path)
    return path
