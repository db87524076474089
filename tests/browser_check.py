"""Browser checks of the Prefect UI with Debian's headless Chromium, as an operator goes:

- a deployment's "Custom run" form shows every parameter's title: deployments list -> the deployment -> "Run"
  -> "Custom run"; the expected titles are the `title`s of the deployment's `parameter_openapi_schema`, read
  through the REST API;
- `--follow-link RUN_ID`: a finished run's spreadsheet link opens: the run's page -> its Artifacts tab -> the
  link artifact's card -> the link, clicked; the browser must download the file with status 200 and the
  content type its extension calls for (the status and type read from Chromium's own network log).

    .venv/bin/python tests/browser_check.py [--api-url URL] [--ui-url URL] [--deployment FLOW/DEPLOYMENT]
                                            [--follow-link FLOW_RUN_ID [--artifact-key KEY]]
                                            [--screenshot PATH] [--timeout SECONDS]

The server checked is the one its caller names: `--api-url` (or `--ui-url`), else PREFECT_API_URL; there is no
default address, so the check never looks at another stack than the caller's. A test tool
(tests/test_browser_ui.py imports it). Exit 0 when the check passes, 1 naming what is missing, 2 when Chromium,
chromedriver or selenium is not installed or no server is named. Needs no Prefect import.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import mimetypes
import os
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urljoin, urlsplit

import httpx

from operations.infra.file_server import CONTENT_TYPES

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
DEFAULT_DEPLOYMENT = "generate-games/on-demand"
DEFAULT_LINK_ARTIFACT = "games-spreadsheet-1"  # the first spreadsheet link of a generate-games run
INSTALL_HINT = "apt-get install chromium chromium-driver (Debian's browser) and pip install selenium"

# Selectors of Prefect 3.8.8's UI (the v1 UI served at /deployments), read from its page source.
SEARCH_INPUT = ".deployment-list__search-input input[type=search]"
ROW_NAME_LINK = "a.deployment-list__name"
ROW_FLOW_NAME = ".flow-popover__link-name"
RUN_BUTTON = "button.run-menu__run-button"
CUSTOM_RUN_ITEM = "//button[contains(@class, 'p-overflow-menu-item')][normalize-space(.)='Custom run']"
RUN_FORM = "form.flow-run-create-form-v2"
SUBMIT_BUTTON = "//button[normalize-space(.)='Submit']"
FIELD_LABELS = "form.flow-run-create-form-v2 .schema-form-property__label"
OPTIONAL_SUFFIX = " (Optional)"  # the UI appends it to the title of a parameter that has a default
RUN_TAB = "//li[contains(@class, 'p-tab')][normalize-space(.)='{}']"
ARTIFACT_CARD = ("//a[.//*[contains(@class, 'artifact-card__title')][normalize-space(.)='{}']]"
                 "[.//*[contains(@class, 'artifact-card')]]")
MARKDOWN_LINK = "a.markdown-renderer__link"


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
    """(ui_url, api_url) of the server the caller names: given ones, else PREFECT_API_URL (the UI is the API
    without /api); ValueError when none is named."""
    if ui_url and not api_url:
        api_url = ui_url.rstrip("/") + "/api"
    api_url = api_url or os.environ.get("PREFECT_API_URL")
    if not api_url:
        raise ValueError("no Prefect server named: give --api-url (or --ui-url) or set PREFECT_API_URL")
    api_url = api_url.rstrip("/")
    if not ui_url:
        if not api_url.endswith("/api"):
            raise ValueError(f"cannot tell the UI of the API {api_url} (no /api at its end): give --ui-url")
        ui_url = api_url.removesuffix("/api")
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


def _flow_run_ids(api_url: str, deployment_id: str, timeout: float = 30) -> list[str]:
    """The ids of the deployment's flow runs, through the REST API."""
    response = httpx.post(f"{api_url}/flow_runs/filter", timeout=timeout,
                          json={"flow_runs": {"deployment_id": {"any_": [deployment_id]}}})
    response.raise_for_status()
    return [run["id"] for run in response.json()]


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


def make_driver(window_size: str = "1400,1000", download_dir: Path | None = None):
    """Headless Debian Chromium through Debian's chromedriver (Selenium Manager downloads nothing). With
    `download_dir`, downloads are saved there without asking and the network log is kept (driver.get_log)."""
    why = browser_missing()
    if why:
        raise BrowserUnavailable(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={window_size}"):
        options.add_argument(arg)
    if download_dir is not None:
        options.add_experimental_option(
            "prefs", {"download.default_directory": str(download_dir), "download.prompt_for_download": False}
        )
        options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


@contextmanager
def _browser(screenshot: str | Path | None, download_dir: Path | None = None):
    """A driver for one check: `screenshot` (a PNG path) saved when the check ends, passed or failed."""
    driver = make_driver(download_dir=download_dir)
    try:
        yield driver
    finally:
        if screenshot is not None:
            try:
                _save_screenshot(driver, Path(screenshot))
            except Exception:  # noqa: BLE001 - never hide the check's own result
                pass
        driver.quit()


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
    submitted: list[str] | None = None,
) -> list[str]:
    """Open the UI, go deployments list -> `deployment` -> Run -> Custom run, and check that the form shows
    every parameter title of the deployment's schema. Returns the titles found (schema order); raises
    BrowserCheckError naming what was missing, BrowserUnavailable without Chromium/chromedriver/selenium.
    With a `submitted` list, the form is then submitted as it is (its defaults) and the id of the flow run it
    creates is appended to the list: the server accepted what the UI sends. `timeout` bounds each wait;
    `screenshot` (a PNG path) is saved on success and on failure."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ui_url, api_url = ui_url.rstrip("/"), api_url.rstrip("/")
    flow_name, _, deployment_name = deployment.partition("/")
    record = read_deployment(api_url, deployment)
    titles = expected_titles(record.get("parameter_openapi_schema"))
    check_ui_uses_api(ui_url, api_url, record)

    with _browser(screenshot) as driver:
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
                    row = link.find_element(By.XPATH, "./ancestor::tr[1]")
                    flows = row.find_elements(By.CSS_SELECTOR, ROW_FLOW_NAME)
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
            if submitted is not None:
                before = set(_flow_run_ids(api_url, record["id"]))
                _click(driver, wait, lambda d: d.find_element(By.XPATH, SUBMIT_BUTTON), 'the "Submit" button')
                step = "waiting for the flow run the form creates (did the server refuse it? see the screenshot)"
                created = wait.until(lambda d: set(_flow_run_ids(api_url, record["id"])) - before)
                submitted.extend(sorted(created))
            return [t for t in titles if t in shown]
        except TimeoutException:
            raise BrowserCheckError(f"timed out after {timeout:g} s {step} ({driver.current_url})") from None


@dataclass(frozen=True)
class FollowedLink:
    """What the browser got from following a link artifact."""

    url: str
    status: int
    content_type: str
    downloaded: Path  # the file as Chromium saved it


def read_link_artifact(api_url: str, flow_run_id: str, key: str, timeout: float = 30) -> tuple[str, str]:
    """(artifact id, link URL) of the run's artifact `key` (a link artifact: markdown `[text](url)`)."""
    try:
        response = httpx.post(
            f"{api_url}/artifacts/filter",
            json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}, "key": {"any_": [key]}}}, timeout=timeout,
        )
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise BrowserCheckError(f"Prefect API at {api_url} did not list the run's artifacts: {exc}") from exc
    found = [a for a in response.json() if "](" in str(a.get("data"))]
    if not found:
        raise BrowserCheckError(f"flow run {flow_run_id} has no link artifact {key!r}")
    artifact = found[0]
    return artifact["id"], artifact["data"].split("](", 1)[1].rsplit(")", 1)[0]


def _network_response(driver, url: str, events: list[dict]) -> dict | None:
    """The response Chromium received for `url` (its network log, read as it grows into `events`)."""
    events.extend(json.loads(entry["message"])["message"] for entry in driver.get_log("performance"))
    for event in events:
        if event["method"] == "Network.responseReceived" and event["params"]["response"]["url"] == url:
            return event["params"]["response"]
    return None


def check_link_artifact(
    ui_url: str,
    api_url: str,
    flow_run_id: str,
    artifact_key: str = DEFAULT_LINK_ARTIFACT,
    download_dir: str | Path | None = None,
    screenshot: str | Path | None = None,
    timeout: float = 60,
) -> FollowedLink:
    """Open the run's page, its Artifacts tab, the card of the link artifact `artifact_key`, and click the link
    the artifact page shows. Chromium must get status 200 with the content type of the file's extension
    (from its network log) and save the download (into `download_dir`, a temporary folder if None).

    The link opens a new tab in the UI (target=_blank); it is followed in the same tab instead, whose network
    log chromedriver records. Raises BrowserCheckError saying what went wrong, BrowserUnavailable without
    Chromium/chromedriver/selenium; `timeout` bounds each wait; `screenshot` is saved on success and failure."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    ui_url, api_url = ui_url.rstrip("/"), api_url.rstrip("/")
    artifact_id, url = read_link_artifact(api_url, flow_run_id, artifact_key)
    folder = Path(download_dir or tempfile.mkdtemp(prefix="browser-check-downloads-")).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    name = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    expected_type = CONTENT_TYPES.get(Path(name).suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"
    with _browser(screenshot, download_dir=folder) as driver:
        wait = WebDriverWait(driver, timeout, poll_frequency=0.2)
        step = "opening the flow run's page"
        try:
            driver.get(f"{ui_url}/runs/flow-run/{flow_run_id}")
            _click(driver, wait, lambda d: d.find_element(By.XPATH, RUN_TAB.format("Artifacts")), "the Artifacts tab")
            _click(driver, wait, lambda d: d.find_element(By.XPATH, ARTIFACT_CARD.format(artifact_key)),
                   f"the card of artifact {artifact_key!r}")
            step = f"waiting for the artifact page with the link {url}"
            wait.until(lambda d: f"/artifacts/artifact/{artifact_id}" in d.current_url)

            def link(d):
                return next((a for a in d.find_elements(By.CSS_SELECTOR, MARKDOWN_LINK)
                             if a.get_attribute("href") == url), None)

            element = wait.until(link)
            driver.execute_script("arguments[0].removeAttribute('target');", element)
            _click(driver, wait, link, f"the link {url}")
            step = f"waiting for the browser to receive {url}"
            events: list[dict] = []
            response = wait.until(lambda d: _network_response(d, url, events))
            content_type = {k.lower(): v for k, v in response["headers"].items()}.get("content-type", "")
            if response["status"] != 200 or content_type.split(";")[0].strip() != expected_type:
                raise BrowserCheckError(
                    f"{url} answered {response['status']} with content type {content_type!r}, "
                    f"expected 200 and {expected_type!r}"
                )
            step = f"waiting for the download of {name} into {folder}"
            downloaded = folder / name
            wait.until(lambda d: downloaded.exists() and not (folder / f"{name}.crdownload").exists())
        except TimeoutException:
            raise BrowserCheckError(f"timed out after {timeout:g} s {step} ({driver.current_url})") from None
    return FollowedLink(url, response["status"], content_type, downloaded)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tests/browser_check.py",
        description="Check a deployment's 'Custom run' form, or a run's spreadsheet link, in the Prefect UI with "
        "headless Chromium.",
    )
    parser.add_argument("--ui-url", help="Prefect UI (default: the API URL without /api)")
    parser.add_argument("--api-url", help="Prefect API (default: the UI's /api if --ui-url, else PREFECT_API_URL)")
    parser.add_argument("--deployment", default=DEFAULT_DEPLOYMENT, help="FLOW/DEPLOYMENT (default: %(default)s)")
    parser.add_argument("--follow-link", metavar="FLOW_RUN_ID",
                        help="check instead that this run's link artifact opens (status 200, the file's type)")
    parser.add_argument("--artifact-key", default=DEFAULT_LINK_ARTIFACT,
                        help="the link artifact --follow-link clicks (default: %(default)s)")
    parser.add_argument("--download-dir", help="where Chromium saves the download (default: a temporary folder)")
    parser.add_argument("--screenshot", help="PNG of the last page (default: /tmp/prefect-<check>.png)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds for each wait (default: %(default)s)")
    args = parser.parse_args(argv)

    why = browser_missing()
    if why:
        print(f"browser check: cannot run: {why}", file=sys.stderr)
        return 2
    try:
        ui_url, api_url = default_urls(args.ui_url, args.api_url)
    except ValueError as exc:
        print(f"browser check: {exc}", file=sys.stderr)
        return 2
    if args.follow_link:
        default_png = f"/tmp/prefect-link-{args.artifact_key}.png"
        print(f"browser check: {ui_url}/runs/flow-run/{args.follow_link} -> Artifacts -> {args.artifact_key} -> "
              f"its link (API {api_url})")
    else:
        default_png = f"/tmp/prefect-custom-run-{args.deployment.replace('/', '-')}.png"
        print(f"browser check: {ui_url}/deployments -> {args.deployment} -> Run -> Custom run (API {api_url})")
    screenshot = Path(args.screenshot or default_png)
    screenshot.unlink(missing_ok=True)  # a screenshot named on failure is this run's
    try:
        if args.follow_link:
            followed = check_link_artifact(ui_url, api_url, args.follow_link, args.artifact_key, args.download_dir,
                                           screenshot, args.timeout)
            done = f"{followed.url}: {followed.status} {followed.content_type}, downloaded to {followed.downloaded}"
        else:
            titles = check_custom_run_form(ui_url, api_url, args.deployment, screenshot, args.timeout)
            done = f"custom-run form shows all {len(titles)} parameter titles: {', '.join(titles)}"
    except BrowserUnavailable as exc:
        print(f"browser check: cannot run: {exc}", file=sys.stderr)
        return 2
    except (BrowserCheckError, ValueError, httpx.HTTPError) as exc:
        print(f"browser check FAILED: {exc}", file=sys.stderr)
        if screenshot.exists():
            print(f"screenshot: {screenshot}", file=sys.stderr)
        return 1
    print(done)
    print(f"screenshot: {screenshot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
