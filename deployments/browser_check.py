"""Browser check of the Prefect UI with Debian's headless Chromium: an operator's path to a deployment's
"Custom run" form, checking that the form shows every parameter's title.

    python -m deployments.browser_check [--ui-url URL] [--api-url URL] [--deployment FLOW/DEPLOYMENT]
                                        [--screenshot PATH] [--timeout SECONDS]

Deployments list -> the deployment -> "Run" -> "Custom run"; the expected titles are the `title`s of the
deployment's `parameter_openapi_schema`, read through the REST API. Exit 0 when all are shown, 1 naming
what is missing, 2 when Chromium, chromedriver or selenium is not installed. Needs no Prefect import.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from urllib.parse import quote, urljoin

import httpx

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
DEFAULT_UI_URL = "http://127.0.0.1:4200"
DEFAULT_DEPLOYMENT = "generate-games/on-demand"
INSTALL_HINT = "apt-get install chromium chromium-driver (Debian's browser) and pip install selenium"

# Selectors of Prefect 3.8.8's UI (the v1 UI served at /deployments), read from its page source.
SEARCH_INPUT = ".deployment-list__search-input input[type=search]"
ROW_NAME_LINK = "a.deployment-list__name"
ROW_FLOW_NAME = ".flow-popover__link-name"
RUN_BUTTON = "button.run-menu__run-button"
CUSTOM_RUN_ITEM = "//button[contains(@class, 'p-overflow-menu-item')][normalize-space(.)='Custom run']"
RUN_FORM = "form.flow-run-create-form-v2"
FIELD_LABELS = "form.flow-run-create-form-v2 .schema-form-property__label"
OPTIONAL_SUFFIX = " (Optional)"  # the UI appends it to the title of a parameter that has a default


class BrowserUnavailable(RuntimeError):
    """Chromium, chromedriver or selenium is not installed."""


class BrowserCheckError(AssertionError):
    """The UI did not show what it should (the message says what was missing)."""


def browser_missing() -> str | None:
    """Why the browser check cannot run here, or None."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if importlib.util.find_spec("selenium") is None:
        missing.append("the selenium package")
    return f"missing {', '.join(missing)}: {INSTALL_HINT}" if missing else None


def default_urls(ui_url: str | None = None, api_url: str | None = None) -> tuple[str, str]:
    """(ui_url, api_url): given ones, else from PREFECT_API_URL (the UI is the API without /api), else :4200."""
    if ui_url and not api_url:
        api_url = ui_url.rstrip("/") + "/api"
    api_url = (api_url or os.environ.get("PREFECT_API_URL") or DEFAULT_UI_URL + "/api").rstrip("/")
    if not ui_url:
        ui_url = api_url.removesuffix("/api") if api_url.endswith("/api") else DEFAULT_UI_URL
    return ui_url.rstrip("/"), api_url


def read_deployment(api_url: str, deployment: str, timeout: float = 30) -> dict:
    """The deployment `FLOW/DEPLOYMENT` as the REST API returns it."""
    flow_name, sep, deployment_name = deployment.partition("/")
    if not sep or not flow_name or not deployment_name:
        raise ValueError(f"deployment must be FLOW/DEPLOYMENT, got {deployment!r}")
    url = f"{api_url}/deployments/name/{quote(flow_name, safe='')}/{quote(deployment_name, safe='')}"
    try:
        response = httpx.get(url, timeout=timeout)
    except httpx.HTTPError as exc:
        raise BrowserCheckError(f"Prefect API at {api_url} unreachable: {exc}") from exc
    if response.status_code == 404:
        raise BrowserCheckError(f"no deployment {deployment!r} in the Prefect API at {api_url}")
    response.raise_for_status()
    return response.json()


def expected_titles(parameter_schema: dict | None) -> list[str]:
    """The top-level parameters' titles in form order (the UI labels a field with its schema `title`)."""
    properties = (parameter_schema or {}).get("properties") or {}
    ordered = sorted(properties.items(), key=lambda kv: (kv[1].get("position", len(properties)), kv[0]))
    return [prop.get("title") or key for key, prop in ordered]


def check_ui_uses_api(ui_url: str, api_url: str, deployment: dict, timeout: float = 30) -> None:
    """Fail clearly if the UI's JavaScript talks to another API than `api_url` (its /ui-settings says which)."""
    try:
        ui_api = httpx.get(f"{ui_url}/ui-settings", timeout=timeout).json()["api_url"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        raise BrowserCheckError(f"{ui_url}/ui-settings did not answer with the UI's API address: {exc}") from exc
    ui_api = urljoin(ui_url + "/", ui_api).rstrip("/")
    if ui_api == api_url:
        return
    try:  # another address of the same server (localhost vs 127.0.0.1, a proxy) is fine
        same = httpx.get(f"{ui_api}/deployments/{deployment['id']}", timeout=timeout).status_code == 200
    except httpx.HTTPError:
        same = False
    if not same:
        raise BrowserCheckError(
            f"the UI at {ui_url} talks to the API at {ui_api}, not {api_url}, so it cannot show this "
            f"deployment ({ui_url}/ui-settings): a `prefect server start --port N` other than 4200 needs "
            f"PREFECT_SERVER_API_PORT=N (or PREFECT_UI_API_URL) in the server's environment"
        )


def make_driver(window_size: str = "1400,1000"):
    """Headless Debian Chromium through Debian's chromedriver (Selenium Manager downloads nothing)."""
    why = browser_missing()
    if why:
        raise BrowserUnavailable(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={window_size}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _save_screenshot(driver, path: Path, max_height: int = 8000) -> None:
    """The whole page: the UI scrolls inside its own container, so the window grows to that height first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        height = driver.execute_script(
            "const e = document.querySelector('.app-router-view') || document.documentElement;"
            "return Math.max(e.scrollHeight, document.documentElement.scrollHeight);"
        )
        width = driver.get_window_size()["width"]
        if height > driver.execute_script("return window.innerHeight;"):
            driver.set_window_size(width, min(int(height) + 40, max_height))
    except Exception:  # noqa: BLE001 - a window-sized screenshot is still worth having
        pass
    driver.save_screenshot(str(path))


def _label_texts(driver) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]), e => e.textContent.trim());", FIELD_LABELS
    )


def _click(driver, wait, find, what: str) -> None:
    """Wait until `find(driver)` gives a clickable element and the click lands (the UI re-renders a lot)."""
    from selenium.common.exceptions import TimeoutException, WebDriverException

    def attempt(_):
        try:
            element = find(driver)
            if element is None or not (element.is_displayed() and element.is_enabled()):
                return False
            element.click()
            return True
        except WebDriverException:  # stale, intercepted by an overlay, not yet there: try again
            return False

    try:
        wait.until(attempt)
    except TimeoutException:
        raise BrowserCheckError(f"could not click {what} at {driver.current_url}") from None


def check_custom_run_form(
    ui_url: str,
    api_url: str,
    deployment: str,
    screenshot: str | Path | None = None,
    timeout: float = 60,
) -> list[str]:
    """Open the UI, go deployments list -> `deployment` -> Run -> Custom run, and check that the form shows
    every parameter title of the deployment's schema. Returns the titles found (schema order); raises
    BrowserCheckError naming what was missing, BrowserUnavailable without Chromium/chromedriver/selenium.
    `timeout` bounds each wait; `screenshot` (a PNG path) is saved on success and on failure."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ui_url, api_url = ui_url.rstrip("/"), api_url.rstrip("/")
    flow_name, _, deployment_name = deployment.partition("/")
    record = read_deployment(api_url, deployment)
    titles = expected_titles(record.get("parameter_openapi_schema"))
    check_ui_uses_api(ui_url, api_url, record)

    driver = make_driver()
    wait = WebDriverWait(driver, timeout, poll_frequency=0.2)
    step = "opening the deployments page"
    try:
        driver.get(f"{ui_url}/deployments")
        step = f"waiting for {deployment!r} in the deployments list (search box: {deployment_name!r})"
        search = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, SEARCH_INPUT))
        search.send_keys(deployment_name)

        def row_link(d):  # the row of this deployment name *and* flow (every flow has an on-demand)
            for link in d.find_elements(By.CSS_SELECTOR, ROW_NAME_LINK):
                if link.get_attribute("title") != deployment_name:
                    continue
                flows = link.find_element(By.XPATH, "./ancestor::tr[1]").find_elements(By.CSS_SELECTOR, ROW_FLOW_NAME)
                if any(f.get_attribute("title") == flow_name for f in flows):
                    return link
            return None

        _click(driver, wait, row_link, f"deployment {deployment!r} in the deployments list")
        step = "opening the deployment page"
        wait.until(lambda d: f"/deployments/deployment/{record['id']}" in d.current_url)
        _click(driver, wait, lambda d: d.find_element(By.CSS_SELECTOR, RUN_BUTTON), 'the "Run" button')
        _click(driver, wait, lambda d: d.find_element(By.XPATH, CUSTOM_RUN_ITEM), 'the "Custom run" menu item')
        step = "waiting for the custom-run form"
        wait.until(lambda d: f"/deployments/deployment/{record['id']}/run" in d.current_url)
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, RUN_FORM).is_displayed())

        step = "waiting for the parameter titles in the form"
        shown: list[str] = []

        def all_titles_shown(driver) -> bool:
            shown[:] = [t.removesuffix(OPTIONAL_SUFFIX).strip() for t in _label_texts(driver)]
            return all(title in shown for title in titles)

        try:
            wait.until(all_titles_shown)
        except TimeoutException:
            missing = [t for t in titles if t not in shown]
            raise BrowserCheckError(
                f"the custom-run form of {deployment!r} ({driver.current_url}) does not show the parameter "
                f"title(s) {missing}; it shows {list(dict.fromkeys(shown))}"
            ) from None
        return [t for t in titles if t in shown]
    except TimeoutException:
        raise BrowserCheckError(f"timed out after {timeout:g} s {step} ({driver.current_url})") from None
    finally:
        if screenshot is not None:
            try:
                _save_screenshot(driver, Path(screenshot))
            except Exception:  # noqa: BLE001 - never hide the check's own result
                pass
        driver.quit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deployments.browser_check",
        description="Check a deployment's 'Custom run' form in the Prefect UI with headless Chromium.",
    )
    parser.add_argument("--ui-url", help=f"Prefect UI (default: PREFECT_API_URL without /api, else {DEFAULT_UI_URL})")
    parser.add_argument("--api-url", help="Prefect API (default: the UI's /api if --ui-url, else PREFECT_API_URL)")
    parser.add_argument("--deployment", default=DEFAULT_DEPLOYMENT, help="FLOW/DEPLOYMENT (default: %(default)s)")
    parser.add_argument("--screenshot", help="PNG of the form (default: /tmp/prefect-custom-run-FLOW-DEPLOYMENT.png)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds for each wait (default: %(default)s)")
    args = parser.parse_args(argv)

    why = browser_missing()
    if why:
        print(f"browser check: cannot run: {why}", file=sys.stderr)
        return 2
    ui_url, api_url = default_urls(args.ui_url, args.api_url)
    screenshot = Path(args.screenshot or f"/tmp/prefect-custom-run-{args.deployment.replace('/', '-')}.png")
    screenshot.unlink(missing_ok=True)  # a screenshot named on failure is this run's
    print(f"browser check: {ui_url}/deployments -> {args.deployment} -> Run -> Custom run (API {api_url})")
    try:
        titles = check_custom_run_form(ui_url, api_url, args.deployment, screenshot, args.timeout)
    except BrowserUnavailable as exc:
        print(f"browser check: cannot run: {exc}", file=sys.stderr)
        return 2
    except (BrowserCheckError, ValueError, httpx.HTTPError) as exc:
        print(f"browser check FAILED: {exc}", file=sys.stderr)
        if screenshot.exists():
            print(f"screenshot: {screenshot}", file=sys.stderr)
        return 1
    print(f"custom-run form shows all {len(titles)} parameter titles: {', '.join(titles)}")
    print(f"screenshot: {screenshot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
