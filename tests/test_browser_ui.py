"""The operator's path in the real Prefect UI, with Debian's headless Chromium: deployments list ->
generate-games/on-demand -> Run -> Custom run, whose form must show every parameter's title."""

from __future__ import annotations

import pytest

from deployments.browser_check import browser_missing, check_custom_run_form
from deployments.stack import deploy_all

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(browser_missing()), reason=f"browser check: {browser_missing()}"),
]


def test_custom_run_form_shows_parameter_titles(prefect_api_url, tmp_path):
    deploy_all(prefect_api_url)  # the work pool and deployments of prefect.yaml, as `make up` makes them
    screenshot = tmp_path / "custom-run.png"
    found = check_custom_run_form(
        prefect_api_url.removesuffix("/api"), prefect_api_url, "generate-games/on-demand", screenshot=screenshot
    )
    assert {"Games", "Numbers per game", "Highest number", "Rules", "Seed", "Run key"} <= set(found), found
    assert screenshot.stat().st_size > 10_000
