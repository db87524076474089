"""What products runs leave on disk: the chunk files of runs that never finished.

A products run writes its chunk files under `OUTPUT_DIR/products/<run key>/chunks/` and removes them when it
ends, completed, failed or cancelled. A run whose process was killed (or crashed) leaves them: 6-18 MB per run.
The scheduled `cleanup-runs` flow removes such a `chunks` folder once its newest file is older than the
retention; the run's failures report and logs beside it stay. A run under way keeps writing its chunk files,
so its folder is never that old. No Prefect import here: tasks/retention.py wraps these functions.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

DAY_SECONDS = 86_400


@dataclass
class ChunkCleanup:
    """The chunk folders removed (or, in a dry run, that would be) and the bytes they held."""

    folders: list[str] = field(default_factory=list)
    bytes: int = 0


def _newest_and_size(folder: Path) -> tuple[float, int]:
    newest, size = folder.stat().st_mtime, 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                info = os.lstat(os.path.join(root, name))
            except OSError:  # removed meanwhile
                continue
            newest, size = max(newest, info.st_mtime), size + info.st_size
    return newest, size


def remove_stale_chunk_folders(
    output_dir: Path, retention_days: float, dry_run: bool, now: float | None = None
) -> ChunkCleanup:
    """Remove (or only list, in a dry run) the `products/<run key>/chunks` folders whose newest file is older
    than `retention_days`."""
    now = time.time() if now is None else now
    cleanup = ChunkCleanup()
    runs = Path(output_dir) / "products"
    if not runs.is_dir():
        return cleanup
    for chunks in sorted(runs.glob("*/chunks")):
        if not chunks.is_dir() or chunks.is_symlink():
            continue
        newest, size = _newest_and_size(chunks)
        if (now - newest) / DAY_SECONDS <= retention_days:
            continue
        if not dry_run:
            shutil.rmtree(chunks, ignore_errors=True)
        cleanup.folders.append(chunks.parent.name)
        cleanup.bytes += size
    return cleanup
