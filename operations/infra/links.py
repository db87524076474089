"""Links to the files flows write for people (spreadsheets, reports): one helper, so every artifact and
summary links them the same way."""

from __future__ import annotations

from pathlib import Path


def output_link(path: Path) -> str:
    """The URL an artifact shows for a file under OUTPUT_DIR: its absolute file:// URI."""
    return Path(path).resolve().as_uri()
