"""Files already loaded: what lets a run of the same bytes against an unchanged catalog skip reading them.

A run that accounted for every row (none unaccounted, every message published, its report written) leaves a
record under `OUTPUT_DIR/products/loaded/`, keyed by the file's content hash and the database and stream it
loaded into: what it read (rows, failures) and the catalog's marks just after it (count, highest id and
latest change of products and offers, and the dealers). A later run of the same bytes finds the record; when
the catalog's marks are still those, no offer or product has been written since, so loading the file again
would change nothing: the run reports every row unchanged and the same failures (the earlier run's log and
spreadsheet, copied), without reading the file.
Any write to the catalog (another file, a removed offer, a dealer added or removed) moves a mark, and the
file is loaded as usual. A run that overlapped another run's writes leaves no record.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Engine

from operations.products.reader import RowFailure

LOADED_DIR = "loaded"
_BLOCK = 1 << 20

_MARKS = text("""
SELECT (SELECT count(*) FROM products), (SELECT max(id) FROM products), (SELECT max(updated_at) FROM products),
       (SELECT count(*) FROM product_dealers), (SELECT max(id) FROM product_dealers),
       (SELECT max(updated_at) FROM product_dealers)
""")
_OTHER_WRITES = text(
    "SELECT count(*) FROM product_dealers WHERE updated_at >= :since AND source_run <> :run_key"
)


@dataclass(frozen=True)
class LoadedFile:
    """What a complete run of a file found, and the catalog's marks just after it."""

    run_key: str
    marks: list[str]
    rows: int
    valid_rows: int
    failed_rows: int
    chunks: int
    extra_columns: list[str]
    database_failures: list[list]  # RowFailure fields of the rows the database refused
    failures_file: str             # the name of its failures spreadsheet, in its run folder


def file_digest(path: Path) -> str:
    """The file's content hash (BLAKE2b, 32 hex digits), read by blocks."""
    digest = hashlib.blake2b(digest_size=16)
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def record_path(output_dir: Path, digest: str, database_url: str, stream: str) -> Path:
    """Where the record of a file's content loaded into this database and stream lives."""
    target = hashlib.blake2b(f"{database_url}\n{stream}".encode(), digest_size=8).hexdigest()
    return Path(output_dir) / "products" / LOADED_DIR / f"{digest}-{target}.json"


def catalog_marks(engine: Engine, dealers: dict[str, int]) -> list[str]:
    """What moves whenever a product, an offer or a dealer is written or removed."""
    with engine.connect() as conn:
        marks = [str(value) for value in conn.execute(_MARKS).one()]
    dealer_text = json.dumps(sorted(dealers.items()), separators=(",", ":"))
    return [*marks, hashlib.blake2b(dealer_text.encode(), digest_size=8).hexdigest()]


def unchanged_since(path: Path, engine: Engine, dealers: dict[str, int]) -> LoadedFile | None:
    """The record at `path` when the catalog still has the marks it saw, else None (no record, an unreadable
    one, or a catalog written since)."""
    try:
        loaded = LoadedFile(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None
    return loaded if loaded.marks == catalog_marks(engine, dealers) else None


def save_record(
    path: Path, engine: Engine, dealers: dict[str, int], loaded: LoadedFile, since: object
) -> bool:
    """Write the record of a complete run (replaced atomically), unless another run wrote offers since `since`
    (the run's start, a database timestamp): then the catalog may not be what this file says, and any old
    record is removed. Returns whether a record was written."""
    with engine.connect() as conn:
        others = conn.execute(_OTHER_WRITES, {"since": since, "run_key": loaded.run_key}).scalar_one()
    if others:
        path.unlink(missing_ok=True)
        return False
    record = asdict(loaded) | {"marks": catalog_marks(engine, dealers)}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    temporary.write_text(json.dumps(record), encoding="utf-8")
    os.replace(temporary, path)
    return True


def database_now(engine: Engine) -> object:
    """The database's clock, to compare with the rows' `updated_at`."""
    with engine.connect() as conn:
        return conn.execute(text("SELECT now()")).scalar_one()


def failures_of(loaded: LoadedFile) -> list[RowFailure]:
    return [RowFailure(*fields) for fields in loaded.database_failures]


def copy_failures(earlier: LoadedFile, earlier_run_dir: Path, run_dir: Path, log_name: str,
                  workbook_name: str) -> bool:
    """Copy the earlier run's log of rows that failed the checks and its failures spreadsheet into this run's
    folder (under this file's name); False, copying nothing, when either is gone (removed with its folder)."""
    copies = [(earlier_run_dir / log_name, run_dir / log_name),
              (earlier_run_dir / earlier.failures_file, run_dir / workbook_name)]
    if not all(source.is_file() for source, _ in copies):
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    for source, target in copies:
        if source.resolve() != target.resolve():
            shutil.copyfile(source, target)
    return True
