"""The file server of OUTPUT_DIR and the links of artifacts, against real servers: the detached uvicorn file server
over HTTP (raw requests where a client would tidy the path), the session's Prefect server and Redis for the flow
runs whose link artifacts are followed."""

from __future__ import annotations

import http.client
import io
import uuid
from pathlib import Path

import httpx
import pytest
from openpyxl import Workbook, load_workbook
from pydantic import SecretStr

from operations.infra.file_server import (
    STATE_FILE,
    FileServerService,
    ensure_file_server,
    running_file_server,
    stop_file_server,
)
from operations.infra.links import output_link
from operations.infra.processes import ExposedWithoutAuth, free_port
from operations.infra.services import NotConfigured
from operations.settings import Settings, StackSettings, get_settings
from run_checks import fetch_link, link_url, run_artifacts, run_texts

XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
SECRET = "the-secret-outside-output-dir"


def _settings(tmp: Path, **overrides) -> Settings:
    """A file server's settings of its own (not the session's OUTPUT_BASE_URL)."""
    fields = {"data_dir": tmp / "data", "output_dir": tmp / "output", "file_server_port": free_port(),
              "output_base_url": None}
    return Settings(stack=StackSettings(**{**fields, **overrides}))


def _sheet_values(source) -> list[list[tuple]]:
    """Every sheet's rows (values), of a path or of bytes."""
    workbook = load_workbook(io.BytesIO(source) if isinstance(source, bytes) else source, read_only=True)
    try:
        return [list(sheet.iter_rows(values_only=True)) for sheet in workbook.worksheets]
    finally:
        workbook.close()


def _raw_get(server, path: str, headers: dict | None = None) -> tuple[int, bytes]:
    """GET `path` exactly as written: http.client sends it untouched, where httpx would resolve `../`."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A file server over a folder of run files, beside a secret outside it and symlinks that lead there."""
    tmp = tmp_path_factory.mktemp("served")
    settings = _settings(tmp)
    run = settings.stack.output_dir / "run 1"
    run.mkdir(parents=True)
    workbook = Workbook()
    workbook.active.append(["rank", "game"])
    workbook.active.append([1, "01 02 03 04 05 06"])
    workbook.save(run / "games.xlsx")
    (run / "counter.json").write_text('{"total_generated": 1}')
    (settings.stack.output_dir / "report.csv").write_text("row,reason\n2,bad price\n")
    (settings.stack.output_dir / ".hidden").write_text(SECRET)
    outside = tmp / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    (tmp / "secret.txt").write_text(SECRET)
    (settings.stack.output_dir / "escape.txt").symlink_to(outside / "secret.txt")
    (settings.stack.output_dir / "out-link").symlink_to(outside, target_is_directory=True)
    (settings.stack.output_dir / "alias.json").symlink_to(run / "counter.json")  # a symlink that stays inside
    server = ensure_file_server(settings)
    yield settings, server
    stop_file_server(settings.stack.file_server_dir)


def test_files_are_served_read_only_with_their_types(served):
    settings, server = served
    assert server.started and server.url == f"http://127.0.0.1:{server.port}"
    for name, content_type in (("run 1/games.xlsx", XLSX), ("run 1/counter.json", "application/json"),
                               ("report.csv", "text/csv"), ("alias.json", "application/json")):
        response = httpx.get(output_link(settings.stack.output_dir / name, settings))
        assert response.status_code == 200, name
        assert response.headers["content-type"].split(";")[0] == content_type, name
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.content == (settings.stack.output_dir / name).read_bytes()
    assert _sheet_values(httpx.get(f"{server.url}/run%201/games.xlsx").content)[0][1] == (1, "01 02 03 04 05 06")
    before = (settings.stack.output_dir / "report.csv").read_bytes()
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        assert httpx.request(method, f"{server.url}/report.csv", content=b"x").status_code == 405, method
    assert (settings.stack.output_dir / "report.csv").read_bytes() == before
    assert httpx.head(f"{server.url}/report.csv").status_code == 200


@pytest.mark.parametrize("path", [
    "/../secret.txt", "/%2e%2e/secret.txt", "/%2E%2E%2Fsecret.txt", "/run%201/../../secret.txt",
    "/run%201/..%2f..%2fsecret.txt", "/escape.txt", "/out-link/secret.txt",
    "/.hidden", "/%2ehidden",
])
def test_nothing_outside_output_dir_or_hidden_is_served(served, path):
    settings, server = served
    assert (settings.stack.output_dir.parent / "secret.txt").read_text() == SECRET  # there to be leaked, were it not refused
    status, body = _raw_get(server, path)
    assert status == 404 and SECRET.encode() not in body, (path, status, body[:200])


def test_no_folder_is_listed_and_a_missing_file_is_404(served):
    _, server = served
    for path in ("/", "/run%201", "/run%201/", "/out-link/", "/run%201/missing.xlsx", "/nothing/here.csv"):
        status, body = _raw_get(server, path)
        assert status == 404, (path, status)
        assert b"games.xlsx" not in body and b"counter.json" not in body, path


def test_the_running_server_is_reused_and_stopped(served, tmp_path):
    settings, server = served
    again = ensure_file_server(settings)
    assert (again.pid, again.url, again.started) == (server.pid, server.url, False)
    assert running_file_server(settings.stack.file_server_dir).pid == server.pid
    other = _settings(tmp_path)
    assert running_file_server(other.stack.file_server_dir) is None
    started = ensure_file_server(other)
    assert stop_file_server(other.stack.file_server_dir) and not stop_file_server(other.stack.file_server_dir)
    assert running_file_server(other.stack.file_server_dir) is None
    with pytest.raises(httpx.ConnectError):
        httpx.get(started.url + "/-/health")


def test_links_are_the_base_url_and_the_quoted_path_under_output_dir(tmp_path):
    settings = _settings(tmp_path, output_base_url="https://files.example.com/ops/")
    target = settings.stack.output_dir / "run é 1" / "games #1.xlsx"
    assert output_link(target, settings) == "https://files.example.com/ops/run%20%C3%A9%201/games%20%231.xlsx"
    assert not (settings.stack.file_server_dir / STATE_FILE).exists(), "OUTPUT_BASE_URL set: no file server"
    for outside in (tmp_path / "elsewhere.xlsx", settings.stack.output_dir / ".." / "output-other" / "x.xlsx"):
        with pytest.raises(ValueError, match="not under OUTPUT_DIR"):
            output_link(outside, settings)
    with pytest.raises(ValueError, match="must not hold a password"):
        output_link(target, _settings(tmp_path, output_base_url="https://ops:pw@files.example.com/"))


def test_a_server_beyond_loopback_without_auth_is_refused(tmp_path):
    for host in ("0.0.0.0", "192.0.2.10", "files.internal"):
        settings = _settings(tmp_path, host=host)
        with pytest.raises(ExposedWithoutAuth, match="STACK_AUTH_STRING"):
            ensure_file_server(settings)
        assert not (settings.stack.file_server_dir / STATE_FILE).exists()
        assert running_file_server(settings.stack.file_server_dir) is None
    (settings.stack.output_dir / "run").mkdir(parents=True)
    target = settings.stack.output_dir / "run" / "games.xlsx"
    with pytest.raises(NotConfigured, match="OUTPUT_BASE_URL"):  # no server, no link: a link never starts one
        output_link(target, settings)
    assert running_file_server(settings.stack.file_server_dir) is None


@pytest.fixture
def with_auth(tmp_path):
    password = f"pw-{uuid.uuid4().hex}"
    settings = _settings(tmp_path, auth_string=SecretStr(f"ops:{password}"))
    (settings.stack.output_dir / "run").mkdir(parents=True)
    (settings.stack.output_dir / "run" / "report.csv").write_text("a,b\n")
    server = ensure_file_server(settings)
    yield settings, server, password
    stop_file_server(settings.stack.file_server_dir)


def test_basic_auth_is_required_and_the_password_shows_nowhere(with_auth):
    settings, server, password = with_auth
    link = output_link(settings.stack.output_dir / "run" / "report.csv", settings)
    assert link == f"{server.url}/run/report.csv" and password not in link
    for auth in (None, ("ops", "wrong"), ("other", password), ("ops", password + "x"), ("ops", "")):
        response = httpx.get(link, auth=auth)
        assert response.status_code == 401, auth
        assert response.headers["www-authenticate"].startswith('Basic realm="operations files"')
    assert _raw_get(server, "/run/report.csv", {"Authorization": "Basic !!not-base64!!"})[0] == 401
    assert _raw_get(server, "/run/report.csv", {"Authorization": "Bearer " + password})[0] == 401
    assert _raw_get(server, "/../secret.txt", {"Authorization": "Basic x"})[0] == 401  # auth comes first
    response = httpx.get(link, auth=("ops", password))
    assert response.status_code == 200 and response.content == b"a,b\n"
    assert running_file_server(settings.stack.file_server_dir).auth  # seen as running (401) without credentials
    with open(f"/proc/{server.pid}/cmdline", "rb") as fh:
        assert password.encode() not in fh.read()
    for path in settings.stack.file_server_dir.iterdir():
        assert password not in path.read_text(errors="replace"), path


def test_a_changed_password_replaces_the_running_server(with_auth):
    settings, server, password = with_auth
    changed = settings.replace(stack={"auth_string": SecretStr("ops:another-password")})
    replaced = ensure_file_server(changed)
    assert replaced.started and replaced.pid != server.pid
    url = f"{replaced.url}/run/report.csv"
    assert httpx.get(url, auth=("ops", password)).status_code == 401
    assert httpx.get(url, auth=("ops", "another-password")).status_code == 200
    opened = ensure_file_server(settings.replace(stack={"auth_string": None}))  # auth off: replaced too
    assert opened.started and not opened.auth
    assert httpx.get(f"{opened.url}/run/report.csv").status_code == 200


# -- the flows' links, from finished runs --------------------------------------------------------------------------

@pytest.mark.slow
def test_a_generation_runs_links_open_over_http_with_the_same_rows(settings, tmp_path):
    from flows.generate_games import generate_games

    state = generate_games(quantity=2_500, run_key=f"links-{uuid.uuid4().hex[:6]}", return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    artifacts = run_artifacts(state.state_details.flow_run_id)
    links = sorted((a for a in artifacts if (a.key or "").startswith("games-spreadsheet")), key=lambda a: a.key)
    assert len(links) == len(result["spreadsheets"]) >= 1
    for artifact, path in zip(links, sorted(result["spreadsheets"])):
        url = link_url(artifact.data)
        assert url.startswith(running_file_server(settings.stack.file_server_dir).url + "/"), url
        response = httpx.get(url)
        assert response.status_code == 200 and response.headers["content-type"] == XLSX
        assert _sheet_values(response.content) == _sheet_values(path)
        assert sum(len(rows) for rows in _sheet_values(response.content)[1:]) == 2_500 + 1  # games + header
    summary = next(a for a in artifacts if a.key == "games-run-summary").data
    listed = [line.split("](", 1)[1].split(")", 1)[0] for line in summary.splitlines() if line.startswith("- [")]
    assert sorted(listed) == sorted(link_url(a.data) for a in links)
    for url in listed:
        assert fetch_link(url, tmp_path / "summary").stat().st_size > 0
    [snapshot] = [line.split("](", 1)[1].rstrip(")") for line in summary.splitlines()
                  if line.startswith("- counter snapshot: [")]
    response = httpx.get(snapshot)
    assert response.headers["content-type"] == "application/json"
    assert response.json()["total_generated"] == 2_500


@pytest.mark.slow
def test_a_flow_behind_auth_links_without_the_password(settings, monkeypatch, tmp_path):
    """The flow's links on a file server behind basic auth (one started for its OUTPUT_DIR, as `make up` with
    STACK_AUTH_STRING does): they open with the credentials only, and no text of the run shows the password."""
    from flows.generate_games import generate_games

    password = f"pw-{uuid.uuid4().hex}"
    files = FileServerService(_settings(tmp_path, output_dir=settings.stack.output_dir,
                                        auth_string=SecretStr(f"ops:{password}")))
    server = files.ensure()
    monkeypatch.setenv("OUTPUT_BASE_URL", server.url)
    get_settings.cache_clear()
    try:
        state = generate_games(quantity=1_000, run_key=f"auth-{uuid.uuid4().hex[:6]}", return_state=True)
        assert state.is_completed(), state.message
        [link] = [a.data for a in run_artifacts(state.state_details.flow_run_id) if a.key == "games-spreadsheet-1"]
        assert link_url(link).startswith(server.url + "/")
        assert httpx.get(link_url(link)).status_code == 401
        path = fetch_link(link, tmp_path, auth=("ops", password))
        assert _sheet_values(path) == _sheet_values(state.result()["spreadsheets"][0])
        texts = run_texts(state.state_details.flow_run_id)
        assert texts and not [t for t in texts if password in t]
        assert password not in files.log.read_text(errors="replace")
    finally:
        get_settings.cache_clear()
        files.stop()
