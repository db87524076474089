"""The operator's commands as they are typed: `python -m deployments.stack up` (the session's `deployed_stack`,
then once more here), `status` (and on an empty data folder), `python -m deployments.start_run` against the
stack, the account, dealer and turnstile commands, and `make samples`, `make onboard` and the `make run`
commands they print. The session's `down` of that stack is checked in conftest.py. Each command runs at least
once as it is typed (a process of its own); its repeats, listings and refusals run through the same `main` in this
process (`_in_process`), sparing a Python start that imports Prefect (seconds of CPU) each."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from operations.infra.database import get_engine
from operations.marketplace.store import clear_marketplace_data
from operations.products.store import clear_products_data
from operations.settings import PROJECT_ROOT
from run_checks import link_url

pytestmark = pytest.mark.slow

SERVICES = ("embedded postgres", "embedded redis", "prefect server", "file server", "marketplace emulator",
            "turnstile emulator", "notification receiver", "marketplace receiver", "inbox watcher",
            "prefect worker")  # the registry's order
# What an operator's shell has not configured on a fresh machine.
UNSET = ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "REDIS_URL", "DASK_SCHEDULER_ADDRESS", "DATABASE_URL",
         "MARKETPLACE_API_URL", "OUTPUT_BASE_URL")


def _command(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _shell(env: dict, command: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """A command line as an operator pastes it into a shell in the project folder (`make ...`)."""
    return subprocess.run(command, shell=True, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _in_process(env: dict, module: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """`python -m <module> <args>` run in this process, in the shell `env`: the module's own `main`, its exit
    code and what it printed, without the seconds of CPU a new Python process spends importing Prefect. For the
    repeats and refusals of a command whose typed form (`_command`, `_shell`) is run at least once too. Not
    thread-safe (it swaps this process's environment): never inside `_together`."""
    import contextlib
    import importlib
    import io

    from operations.settings import get_settings

    saved, out, err = dict(os.environ), io.StringIO(), io.StringIO()
    os.environ.clear()
    os.environ.update(env)
    get_settings.cache_clear()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                _stdin(io.StringIO(stdin)):
            try:
                code = importlib.import_module(module).main(list(args))
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
                if isinstance(exit_.code, str):
                    print(exit_.code, file=sys.stderr)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        get_settings.cache_clear()
    return subprocess.CompletedProcess([module, *args], code or 0, out.getvalue(), err.getvalue())


@contextmanager
def _stdin(stream):
    saved, sys.stdin = sys.stdin, stream
    try:
        yield
    finally:
        sys.stdin = saved


def _together(*calls):
    """The results of commands that do not depend on one another, run side by side (two operators' shells):
    each one starts Python and imports Prefect, seconds of CPU that a second core halves."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [future.result() for future in [pool.submit(call) for call in calls]]


@pytest.fixture(scope="module")
def operator_env(deployed_stack, database_url):
    """The shell `python -m deployments.stack up` ran in for the session's deployed stack (DATABASE_URL,
    REDIS_URL, PREFECT_API_URL and OUTPUT_BASE_URL name the session's services, a DATA_DIR of its own), its
    project database emptied of the accounts and dealers the commands below add."""
    engine = get_engine(database_url)
    clear_marketplace_data(engine, accounts=True)
    clear_products_data(engine, dealers=True)
    return deployed_stack.env


def test_a_fresh_machine_would_start_every_service_and_runs_none_yet(tmp_path):
    """`status` on an empty DATA_DIR with nothing configured: every service of the registry, in its order, not
    running and none replaced by a setting, so `up` starts them all (the registry's up/status/down of real
    services: tests/test_services.py; the default server on its embedded PostgreSQL: tests/test_prefect_server.py)."""
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env.update({"DATA_DIR": str(tmp_path / "data"), "OUTPUT_DIR": str(tmp_path / "data" / "output")})
    status = _command(env, "deployments.stack", "status")
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert [line.split(":", 1)[0] for line in lines[:len(SERVICES)]] == list(SERVICES), status.stdout
    for service in SERVICES:
        assert re.search(rf"^{service}:\s+not running; log /\S+\.log$", status.stdout, re.M), status.stdout
    assert re.search(r"^schedules:\s+no Prefect server", status.stdout, re.M), status.stdout


def test_stack_up_twice_status_start_run_and_commands(deployed_stack, operator_env):
    first = deployed_stack.up_output  # the session's `up` (conftest.py: its `down` is checked at the session's end)
    ui = re.search(r"Prefect UI:\s+(\S+)", first).group(1)
    api = f"{ui}/api"
    assert api == deployed_stack.api_url
    assert "generate-games/on-demand" in first and "generate-games/draw-day-mornings" in first
    assert 'Start a run:   make run DEPLOYMENT=generate-games/on-demand PARAMS="quantity=100000"' in first
    pids = _command(operator_env, "deployments.stack", "status").stdout
    # a laptop's stack runs nothing by itself: every schedule of prefect.yaml is paused (STACK_SCHEDULES off)
    scheduled = _routine_schedules()
    assert re.search(rf"schedules:\s+paused: 0 of {scheduled} active \(STACK_SCHEDULES off\)", pids), pids

    second = _command(operator_env, "deployments.stack", "up")  # harmless: reuses everything
    assert second.returncode == 0, second.stderr
    assert "Deployments: (unchanged since the last deploy: not deployed again)" in second.stdout, second.stdout
    assert re.search(r"Prefect UI:\s+(\S+)", second.stdout).group(1) == ui
    status = _command(operator_env, "deployments.stack", "status").stdout
    assert status == pids, status
    for service in deployed_stack.started:  # one line each: running, its pid, its address, its log
        assert re.search(rf"^{service}:\s+running, pid \d+, \S.*; log /\S+\.log$", status, re.M), status
    for service, variable in deployed_stack.configured.items():  # configured by environment: used as they are
        assert re.search(rf"^{service}:\s+not running \(not used: {variable} is set\); log /\S+\.log$",
                         status, re.M), status

    misspelt, started = _together(
        lambda: _shell(operator_env, 'make -s run DEPLOYMENT=generate-games/on-demand PARAMS="quantiy=100"'),
        lambda: _command(operator_env, "deployments.start_run", "generate-games/on-demand", "quantity=3000",
                         "run_key=from-the-shell"),
    )
    refused = _in_process(operator_env, "deployments.start_run", "generate-games/on-demand", "quantity=0")
    assert refused.returncode == 2 and "Validation failed for field 'quantity'" in refused.stderr, refused.stderr
    assert misspelt.returncode != 0 and "refused by the server (409)" in misspelt.stderr, misspelt.stderr
    assert "'quantiy' was unexpected" in misspelt.stderr, misspelt.stderr
    assert started.returncode == 0, started.stderr
    flow_run_id = re.search(r"\(([0-9a-f-]{36})\)", started.stdout).group(1)
    assert f"{ui}/runs/flow-run/{flow_run_id}" in started.stdout
    # the worker runs it while the accounts are added from the shell; the sync run they start, while the
    # dealers and turnstiles are
    first_seller, sync_run_id = _marketplace_accounts_from_the_shell(operator_env, first, api)
    run = _wait_run(api, flow_run_id)
    assert run["state_type"] == "COMPLETED", run["state"]
    assert run["parameters"] == {"quantity": 3000, "run_key": "from-the-shell"}
    # the worker's flow run linked its spreadsheet on the file server of OUTPUT_BASE_URL, and the link opens
    files = re.search(r"Output files:\s+(\S+)", first).group(1)
    assert files.rstrip("/") == operator_env["OUTPUT_BASE_URL"], files
    [artifact] = httpx.post(f"{api}/artifacts/filter", json={"artifacts": {
        "flow_run_id": {"any_": [flow_run_id]}, "key": {"any_": ["games-spreadsheet-1"]}}}, timeout=30).json()
    link = link_url(artifact["data"])
    assert link.startswith(files.rstrip("/")) and httpx.get(link, timeout=30).status_code == 200, (files, link)

    _dealers_and_turnstiles_from_the_shell(operator_env, first, api)
    run = _wait_run(api, sync_run_id)
    assert run["state_type"] == "COMPLETED", run["state"]
    listing = _in_process(operator_env, "deployments.marketplace_accounts", "list").stdout
    assert re.search(rf"{first_seller}\s+shop-one\s+active\s+\S+ \S+ UTC\s+synced", listing), listing


def _wait_run(api: str, flow_run_id: str) -> dict:
    deadline = time.monotonic() + 180
    while (run := httpx.get(f"{api}/flow_runs/{flow_run_id}").json())["state_type"] not in (
        "COMPLETED", "FAILED", "CRASHED", "CANCELLED"
    ):
        assert time.monotonic() < deadline, run["state_name"]
        time.sleep(0.5)
    return run


def _marketplace_accounts_from_the_shell(env: dict, up_output: str, api: str) -> tuple[int, str]:
    """The stack's own emulator and embedded PostgreSQL: add, import, list, deactivate accounts, then a sync of
    one account started from the shell. Returns that account and the sync's flow run id (the caller waits for
    it and lists the account as synced)."""
    from emulators.marketplace import EmulatorControl

    url = re.search(r"Marketplace:\s+(\S+?),? \(emulator\)", up_output).group(1)
    control = EmulatorControl(url)
    first, second = [s["seller_id"] for s in control.sellers()[:2]]
    added = _command(env, "deployments.marketplace_accounts", "add", "--code", control.authorize(first),
                     "--nickname", "shop-one")
    assert added.returncode == 0 and f"seller {first} (shop-one) is active" in added.stdout, added.stderr

    # adopt an account whose refresh token "the old system" holds: read from stdin, rotated at once
    code = control.authorize(second)
    import httpx as _httpx

    grant = _httpx.post(f"{url}/oauth/token", data={
        "grant_type": "authorization_code", "client_id": "emulated-app", "client_secret": "emulated-secret",
        "code": code, "redirect_uri": control.config()["redirect_uri"],
    }).json()
    imported = subprocess.run(
        [sys.executable, "-m", "deployments.marketplace_accounts", "import", "--nickname", "shop-two"],
        cwd=PROJECT_ROOT, env=env, input=grant["refresh_token"] + "\n", capture_output=True, text=True, timeout=120,
    )
    reused = _in_process(env, "deployments.marketplace_accounts", "add", "--code", "spent-code")  # a spent code
    assert reused.returncode == 2 and "invalid_grant" in reused.stderr, reused.stderr
    assert imported.returncode == 0 and f"seller {second} (shop-two) is active" in imported.stdout, imported.stderr
    assert grant["refresh_token"] not in imported.stdout + imported.stderr

    onboarded = _shell(env, "make -s onboard")  # the next emulated seller, through the emulator's consent page
    third = control.sellers()[2]
    assert onboarded.returncode == 0, onboarded.stderr
    assert f"seller {third['seller_id']} ({third['nickname']}) is active" in onboarded.stdout, onboarded.stdout

    deactivated = _in_process(env, "deployments.marketplace_accounts", "deactivate", str(second))
    assert deactivated.returncode == 0, deactivated.stderr
    listing = _in_process(env, "deployments.marketplace_accounts", "list").stdout
    assert re.search(rf"{first}\s+shop-one\s+active", listing) and re.search(rf"{second}\s+shop-two\s+inactive", listing)

    started = _in_process(env, "deployments.start_run", "sync-marketplace/on-demand",
                          "--parameters", f'{{"accounts": [{first}], "resources": "orders"}}')
    assert started.returncode == 0, started.stderr
    return first, re.search(r"\(([0-9a-f-]{36})\)", started.stdout).group(1)


def _dealers_and_turnstiles_from_the_shell(env: dict, up_output: str, api: str) -> None:
    """`make samples` on the running stack (dealers loaded, the emulated turnstiles' devices file), dealers
    listed, the emulated turnstiles `up` saved listed and loaded again from the devices file, a bad devices file
    refused, and the products and participants samples run with the `make run` commands `make samples`
    printed."""
    samples = _shell(env, "make -s samples")
    assert samples.returncode == 0, samples.stderr
    assert "dealers loaded into the project database: 20 in the file, 20 new" in samples.stdout, samples.stdout
    dealers = _command(env, "deployments.dealers", "list")
    listing = _in_process(env, "deployments.turnstile_devices", "list")
    assert "D0020" in dealers.stdout
    assert "emulated-turnstile-1" in up_output
    assert listing.returncode == 0 and "emulated-turnstile-3" in listing.stdout, listing.stderr
    again = _in_process(env, "deployments.samples")  # idempotent: the same files, the dealers already there
    assert again.returncode == 0 and "20 in the file, 0 new" in again.stdout, again.stdout

    load = re.search(r"(\.venv/bin/python -m deployments\.turnstile_devices load \S+)", samples.stdout).group(1)
    folder = Path(env["DATA_DIR"]) / "files"  # not the samples' folder the good file is loaded from
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "devices.csv").write_text("name,base_url,password\nGate One,http://10.0.0.1,x\n", encoding="utf-8")
    flows = ("process-products", "register-participants")
    commands = [re.search(rf"  {flow}:\n    (make run .+)\n", samples.stdout).group(1) for flow in flows]
    refused = _in_process(env, "deployments.turnstile_devices", "load", str(folder / "devices.csv"))
    loaded, *started = _together(  # the load saves the blocks `up` saved, with the same values
        lambda: _shell(env, load),
        *[lambda command=command: _shell(env, command) for command in commands],
    )
    assert loaded.returncode == 0 and "3 turnstile(s) saved" in loaded.stdout, loaded.stderr
    assert refused.returncode == 2 and "row 2, column name" in refused.stderr, refused.stderr
    for flow, command, shell in zip(flows, commands, started):  # the two runs side by side on the worker
        assert shell.returncode == 0, (command, shell.stderr)
    for flow, shell in zip(flows, started):
        run = _wait_run(api, re.search(r"\(([0-9a-f-]{36})\)", shell.stdout).group(1))
        assert run["state_type"] == "COMPLETED", (flow, run["state"])


def test_a_deploy_is_skipped_only_while_prefect_yaml_and_the_flows_code_are_unchanged(tmp_path):
    """`make up` redeploys when prefect.yaml or the code a deployment's schema comes from changed, or the server
    is another one; otherwise it keeps the server's deployments (deploy_all also checks they are all there)."""
    import shutil

    from deployments.stack import deployment_digest

    for name in ("prefect.yaml", "flows", "tasks", "blocks", "operations"):
        source = PROJECT_ROOT / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, tmp_path / name)
    first = deployment_digest("http://127.0.0.1:4200/api", tmp_path)
    assert deployment_digest("http://127.0.0.1:4200/api", tmp_path) == first
    assert deployment_digest("http://127.0.0.1:4300/api", tmp_path) != first
    (tmp_path / "docs.md").write_text("not a source")
    assert deployment_digest("http://127.0.0.1:4200/api", tmp_path) == first
    parameters = tmp_path / "operations" / "lottery" / "parameters.py"
    parameters.write_text(parameters.read_text() + "\n# a changed title\n")
    assert deployment_digest("http://127.0.0.1:4200/api", tmp_path) != first


def _routine_schedules() -> int:
    """The schedules of prefect.yaml that STACK_SCHEDULES switches (not those of `always-scheduled` deployments)."""
    import yaml

    with open(PROJECT_ROOT / "prefect.yaml") as f:
        deployments = yaml.safe_load(f)["deployments"]
    return sum(len(d.get("schedules") or []) for d in deployments if "always-scheduled" not in (d.get("tags") or []))
