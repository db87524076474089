"""Small input files written by the file-reading tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import zipfile
from datetime import date, datetime
from pathlib import Path
from xml.sax.saxutils import escape

import openpyxl
import pytest


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


def write_ods(tmp_path: Path, *rows: list[object], name: str) -> Path:
    """An OpenDocument spreadsheet (.ods) whose first sheet holds the given rows: text, numbers, booleans,
    dates and date-times as typed cells, None an empty cell. A minimal writer, enough for the readers' tests."""
    cells_xml = []
    for row in rows:
        cells = "".join(_ods_cell(value) for value in row)
        cells_xml.append(f"<table:table-row>{cells or '<table:table-cell/>'}</table:table-row>")
    content = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<office:document-content xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0" '
        'xmlns:table="urn:oasis:names:tc:opendocument:xmlns:table:1.0" '
        'xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0" office:version="1.2">'
        '<office:body><office:spreadsheet><table:table table:name="Sheet1">'
        f'{"".join(cells_xml)}</table:table></office:spreadsheet></office:body></office:document-content>'
    )
    manifest = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<manifest:manifest xmlns:manifest="urn:oasis:names:tc:opendocument:xmlns:manifest:1.0" '
        'manifest:version="1.2"><manifest:file-entry manifest:full-path="/" '
        f'manifest:media-type="{_ODS_MIME}"/><manifest:file-entry manifest:full-path="content.xml" '
        'manifest:media-type="text/xml"/></manifest:manifest>'
    )
    path = tmp_path / name
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("mimetype", _ODS_MIME, compress_type=zipfile.ZIP_STORED)
        archive.writestr("META-INF/manifest.xml", manifest, compress_type=zipfile.ZIP_DEFLATED)
        archive.writestr("content.xml", content, compress_type=zipfile.ZIP_DEFLATED)
    return path


_ODS_MIME = "application/vnd.oasis.opendocument.spreadsheet"


def _ods_cell(value: object) -> str:
    if value is None:
        return "<table:table-cell/>"
    if isinstance(value, bool):
        typed = f'office:value-type="boolean" office:boolean-value="{str(value).lower()}"'
    elif isinstance(value, (int, float)):
        typed = f'office:value-type="float" office:value="{value!r}"'
    elif isinstance(value, (date, datetime)):
        typed = f'office:value-type="date" office:date-value="{value.isoformat()}"'
    else:
        return f'<table:table-cell office:value-type="string"><text:p>{escape(str(value))}</text:p></table:table-cell>'
    return f"<table:table-cell {typed}><text:p>{escape(str(value))}</text:p></table:table-cell>"


def convert_with_libreoffice(paths: list[Path], extension: str) -> list[Path]:
    """The given workbooks converted by LibreOffice (one `soffice --headless --convert-to` for all of them),
    beside the originals; skips the calling test when LibreOffice is not installed."""
    soffice = shutil.which("soffice")
    if soffice is None:
        pytest.skip("LibreOffice (soffice) is not installed: no way to write the file here")
    folder = paths[0].parent
    environment = {**os.environ, "HOME": str(folder)}  # a profile of its own: no clash with a running office
    subprocess.run([soffice, "--headless", "--convert-to", extension, "--outdir", str(folder), *map(str, paths)],
                   check=True, capture_output=True, timeout=120, env=environment)
    return [path.with_suffix(f".{extension}") for path in paths]
