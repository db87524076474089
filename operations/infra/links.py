"""Links to the files flows write for people (spreadsheets, reports): one helper, so every artifact and
summary links them the same way, with a URL a browser showing the Prefect UI opens.

A link is OUTPUT_BASE_URL + the file's path under OUTPUT_DIR. Unset OUTPUT_BASE_URL means the local file
server (operations/infra/file_server.py): the running one is found through its state file (so a flow-run
process of the worker finds the one `make up` started), and started on first use like the embedded Redis, so
a flow run outside `make up` still gets links that open. Should it not start (STACK_HOST beyond loopback without
STACK_AUTH_STRING, a broken install), the link falls back to the file's file:// URI with a warning: the run's
files are written by then, and a link never fails a run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import quote, urlsplit

from operations.settings import Settings, get_settings

logger = logging.getLogger(__name__)


def output_base_url(settings: Settings | None = None) -> str:
    """The URL OUTPUT_DIR is served under (no trailing slash): OUTPUT_BASE_URL, else the local file server's."""
    settings = settings or get_settings()
    if settings.output_base_url:
        if urlsplit(settings.output_base_url).password is not None:
            raise ValueError("OUTPUT_BASE_URL must not hold a password: every artifact would show it")
        return settings.output_base_url.rstrip("/")
    from operations.infra.file_server import ensure_file_server

    try:
        return ensure_file_server(settings).url
    except (RuntimeError, ValueError) as exc:  # refused, not started, or a malformed STACK_AUTH_STRING
        logger.warning("no file server for OUTPUT_DIR, so links are file:// URIs a browser will not open "
                       "from the Prefect UI: %s", exc)
        return Path(settings.output_dir).resolve().as_uri()


def output_link(path: Path, settings: Settings | None = None) -> str:
    """The URL an artifact shows for a file under OUTPUT_DIR. Raises ValueError for a path outside OUTPUT_DIR,
    which no server of it could serve."""
    settings = settings or get_settings()
    root = Path(settings.output_dir).resolve()
    target = Path(path).resolve()
    if not target.is_relative_to(root):
        raise ValueError(f"{path} is not under OUTPUT_DIR ({root}): only files under OUTPUT_DIR can be linked")
    return f"{output_base_url(settings)}/{quote(target.relative_to(root).as_posix())}"
