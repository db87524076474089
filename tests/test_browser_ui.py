"""The operator's paths in the real Prefect UI, with Debian's headless Chromium: deployments list ->
generate-games/on-demand -> Run -> Custom run, whose form must show every parameter's title; and a finished
run's page -> Artifacts -> a spreadsheet link, which must download the .xlsx from the file server."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import pytest

from browser_check import browser_missing, check_custom_run_form, check_link_artifact, default_urls
from deployments.prefect_worker import LOCAL_WORK_POOL

needs_browser = pytest.mark.skipif(bool(browser_missing()), reason=f"browser check: {browser_missing()}")


def test_the_checked_server_is_the_one_the_caller_names(monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(ValueError, match="no Prefect server named"):
        default_urls()  # no default address: never someone else's stack on a well-known port
    assert default_urls(api_url="http://127.0.0.1:4321/api/") == ("http://127.0.0.1:4321", "http://127.0.0.1:4321/api")
    assert default_urls(ui_url="http://10.0.0.5:8080/") == ("http://10.0.0.5:8080", "http://10.0.0.5:8080/api")
    with pytest.raises(ValueError, match="give --ui-url"):
        default_urls(api_url="http://127.0.0.1:4321/prefect")
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:5555/api")
    assert default_urls() == ("http://127.0.0.1:5555", "http://127.0.0.1:5555/api")


@pytest.mark.slow
@needs_browser
def test_custom_run_form_shows_parameter_titles(deployed_stack, tmp_path):
    """The deployments of prefect.yaml as `make up` makes them (the session's deployed stack)."""
    api_url = deployed_stack.api_url
    screenshot = tmp_path / "custom-run.png"
    submitted: list[str] = []
    pool = f"{api_url}/work_pools/{LOCAL_WORK_POOL}"
    assert httpx.patch(pool, json={"is_paused": True}, timeout=30).status_code == 204  # the stack's worker takes
    try:  # no run of a paused pool: the submitted run stays scheduled until deleted
        found = check_custom_run_form(
            api_url.removesuffix("/api"), api_url, "generate-games/on-demand", screenshot=screenshot,
            submitted=submitted,
        )
        assert {"Games", "Numbers per game", "Highest number", "Rules", "Seed", "Run key"} <= set(found), found
        assert screenshot.stat().st_size > 10_000
        # the form as the UI submits it passes the deployment's strict schema (no parameter it does not name)
        [flow_run_id] = submitted
        run = httpx.get(f"{api_url}/flow_runs/{flow_run_id}", timeout=30).json()
        assert run["parameters"]["quantity"] == 10_000, run["parameters"]
        assert run["state_type"] == "SCHEDULED", run["state"]
        assert httpx.delete(f"{api_url}/flow_runs/{flow_run_id}", timeout=30).status_code == 204  # not run
    finally:
        assert httpx.patch(pool, json={"is_paused": False}, timeout=30).status_code == 204


@pytest.mark.slow
@needs_browser
def test_a_spreadsheet_link_in_the_artifacts_tab_downloads_the_file(prefect_api_url, settings, tmp_path):
    from flows.generate_games import generate_games

    state = generate_games(quantity=2_000, run_key=f"browser-{uuid.uuid4().hex[:6]}", return_state=True)
    assert state.is_completed(), state.message
    [spreadsheet] = state.result()["spreadsheets"]
    followed = check_link_artifact(
        prefect_api_url.removesuffix("/api"), prefect_api_url, str(state.state_details.flow_run_id),
        "games-spreadsheet-1", download_dir=tmp_path / "downloads", screenshot=tmp_path / "artifact.png",
    )
    assert followed.status == 200
    assert followed.content_type == "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
    assert followed.url.startswith("http://127.0.0.1:") and followed.url.endswith("/" + Path(spreadsheet).name)
    assert followed.downloaded.read_bytes() == Path(spreadsheet).read_bytes()
