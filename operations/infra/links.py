"""Links to the files flows write for people (spreadsheets, reports): one helper, so every artifact and
summary links them the same way, with a URL a browser showing the Prefect UI opens.

A link is OUTPUT_BASE_URL + the file's path under OUTPUT_DIR. The stack hands OUTPUT_BASE_URL (its file server's
URL) to the worker it starts, so flow runs of the worker use it as is. Unset, the file server the local stack runs
for this OUTPUT_DIR is found through its state file under DATA_DIR (a flow run from a shell beside `make up`);
without either, making a link fails with NotConfigured naming OUTPUT_BASE_URL: a link is never left pointing
at a server nobody runs, and no server is started from a flow.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote, urlsplit

from operations.infra.services import not_configured
from operations.settings import Settings, get_settings


def output_base_url(settings: Settings | None = None) -> str:
    """The URL OUTPUT_DIR is served under (no trailing slash): OUTPUT_BASE_URL, else the URL of the file server
    the local stack runs for this OUTPUT_DIR. Raises NotConfigured naming OUTPUT_BASE_URL when there is neither:
    links are looked up, never a server started."""
    settings = settings or get_settings()
    if settings.stack.output_base_url:
        if urlsplit(settings.stack.output_base_url).password is not None:
            raise ValueError("OUTPUT_BASE_URL must not hold a password: every artifact would show it")
        return settings.stack.output_base_url.rstrip("/")
    from operations.infra.file_server import running_file_server

    server = running_file_server(settings.stack.file_server_dir)
    if server is None or Path(server.root) != Path(settings.stack.output_dir).resolve():
        raise not_configured("OUTPUT_BASE_URL", f"a file server of OUTPUT_DIR ({settings.stack.output_dir})",
                             settings.stack.data_dir)
    return server.url


def output_link(path: Path, settings: Settings | None = None) -> str:
    """The URL an artifact shows for a file under OUTPUT_DIR. Raises ValueError for a path outside OUTPUT_DIR,
    which no server of it could serve."""
    settings = settings or get_settings()
    root = Path(settings.stack.output_dir).resolve()
    target = Path(path).resolve()
    if not target.is_relative_to(root):
        raise ValueError(f"{path} is not under OUTPUT_DIR ({root}): only files under OUTPUT_DIR can be linked")
    return f"{output_base_url(settings)}/{quote(target.relative_to(root).as_posix())}"
