"""The operator's path in the real Prefect UI, with Debian's headless Chromium: deployments list ->
generate-games/on-demand -> Run -> Custom run, whose form must show every parameter's title."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from deployments.browser_check import browser_missing

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENT = "generate-games/on-demand"
WORK_POOL = "operations-local"
GENERATE_GAMES_TITLES = ["Games", "Numbers per game", "Highest number", "Seed", "Run key"]

pytestmark = pytest.mark.skipif(bool(browser_missing()), reason=f"browser check: {browser_missing()}")


async def _ensure_work_pool() -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    async with get_client() as client:
        try:
            await client.read_work_pool(WORK_POOL)
        except ObjectNotFound:
            try:
                await client.create_work_pool(WorkPoolCreate(name=WORK_POOL, type="process"))
            except ObjectAlreadyExists:  # created meanwhile by another test
                pass


async def _deployment_exists() -> bool:
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    async with get_client() as client:
        try:
            await client.read_deployment_by_name(DEPLOYMENT)
            return True
        except ObjectNotFound:
            return False


def _ensure_deployment() -> None:
    """Create the work pool and generate-games/on-demand unless they exist (prefect.yaml may have made them)."""
    asyncio.run(_ensure_work_pool())
    if asyncio.run(_deployment_exists()):
        return
    from prefect import Flow

    Flow.from_source(source=str(ROOT), entrypoint="flows/generate_games.py:generate_games").deploy(
        name="on-demand",
        work_pool_name=WORK_POOL,
        build=False,
        push=False,
        print_next_steps=False,
        ignore_warnings=True,
    )


def test_custom_run_form_shows_parameter_titles(prefect_api_url, tmp_path):
    from deployments.browser_check import check_custom_run_form

    _ensure_deployment()
    ui_url = prefect_api_url.removesuffix("/api")
    screenshot = tmp_path / "custom-run.png"
    found = check_custom_run_form(ui_url, prefect_api_url, DEPLOYMENT, screenshot=screenshot, timeout=60)
    assert all(title in found for title in GENERATE_GAMES_TITLES), found
    assert screenshot.stat().st_size > 10_000
