"""The operator's day end to end: deployments made by `prefect deploy --all` from prefect.yaml, a real
process worker, runs started and cancelled through the Prefect REST API, as other applications do; all of it
the session's stack, started by the operator's `python -m deployments.stack up` (`deployed_stack`)."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from dataclasses import dataclass

import httpx
import pytest

from blocks.marketplace_app import MarketplaceApp
from blocks.redis_game_counter import RedisGameCounter
from blocks.turnstile_device import TurnstileDevice
from emulators import controlid as turnstile_emulator
from deployments.after_deploy import ALWAYS_SCHEDULED, apply_after_deploy
from deployments.prefect_worker import LOCAL_WORK_POOL
from deployments.services import DEMO_MARKETPLACE
from deployments.stack import EMULATED_TURNSTILE, ensure_generation_limit
from emulators.marketplace import EmulatorControl
from flows.concurrency import GAMES_LIMIT
from marketplace_fixtures import Marketplace
from operations.infra.database import get_engine
from operations.marketplace.store import clear_marketplace_data, count_rows, get_account
from operations.lottery.generation import chunk_path
from operations.products.report import read_failures_workbook
from operations.products.sample import SampleStats, dealer_codes, generate_products_file
from operations.products.store import clear_products_data, upsert_dealers
from operations.turnstiles.sample import write_participants_file
from operations.settings import PROJECT_ROOT, Settings, get_settings
from run_checks import TERMINAL, assert_operator_form, check_generated_run, fetch_link, wait_for_run

pytestmark = pytest.mark.slow

# Parameters of a small run of each flow, for starting every on-demand deployment, and what its finished run
# must show. A flow that adds an on-demand deployment to prefect.yaml adds its entries here (the first test
# fails until it does). `stack` is the operator_stack fixture's OperatorStack.
SMALL_RUN_PARAMETERS = {
    # in the worker's flow run itself (below IN_PROCESS_MAX_QUANTITY); its runs on a LocalCluster: the take-turns
    # and cancel tests below
    "generate-games": lambda key, stack: {"quantity": 5_000, "run_key": key},
    "sync-marketplace": lambda key, stack: {"accounts": stack.market.seller_ids()[:2], "resources": "both"},
    "onboard-account": lambda key, stack: {
        "authorization_code": stack.market.control.authorize(stack.market.seller_ids()[2]),
        "nickname": f"rest-{key}",
    },
    "process-products": lambda key, stack: {"file_path": str(stack.products_file), "run_key": key},
    "register-participants": lambda key, stack: {
        "participants_file": str(stack.participants_file), "turnstiles": list(stack.turnstiles),
    },
    "cleanup-runs": lambda key, stack: _plant_expired_run(stack, key),
    "marketplace-notifications": lambda key, stack: {"idle_seconds": 0, "missed_feeds": True},
}


class RetryingClient(httpx.Client):
    """What an application calling the Prefect API should do, as Prefect's own client does: retry 429, 502
    and 503 with backoff (a busy SQLite answers 503). Starting runs with an idempotency key makes it safe."""

    def request(self, method, url, **kwargs):
        for attempt in range(6):
            response = super().request(method, url, **kwargs)
            if response.status_code not in (429, 502, 503):
                return response
            time.sleep(0.5 * 2**attempt)
        return response


@pytest.fixture(scope="module")
def operator_stack(deployed_stack, database_url, tmp_path_factory):
    """The session's deployed stack (`deployed_stack`: the deployments of prefect.yaml, a worker whose flow runs
    write under a folder of their own and cut their work in small chunks, so that a short run still has many
    chunks to cancel between), with the data of a small run of each flow: two sellers of the stack's marketplace
    emulator onboarded, dealers and a products file, a participants file and the stack's emulated turnstiles."""
    root = tmp_path_factory.mktemp("operator")
    settings = deployed_stack.settings
    ensure_generation_limit(settings)  # as `up` left it, whatever the modules before changed
    engine = get_engine(database_url)
    clear_marketplace_data(engine, accounts=True)
    market_url = MarketplaceApp.load(settings.marketplace.app_block).api_base_url  # the stack's emulator
    market = Marketplace(market_url, EmulatorControl(market_url), DEMO_MARKETPLACE, engine)
    for seller in market.seller_ids()[:2]:
        market.onboard(seller)
    clear_products_data(engine, dealers=True)
    dealers = dealer_codes(4)
    upsert_dealers(engine, [(code, code) for code in dealers])
    products_file = root / "products.csv"
    products_sample = generate_products_file(products_file, 800, dealers, bad_fraction=0.1, seed=2)
    turnstiles = [EMULATED_TURNSTILE.format(i) for i in (1, 2)]  # two of the stack's emulated turnstiles
    gates = turnstile_emulator.EmulatorControl([TurnstileDevice.load(name).base_url for name in turnstiles])
    for device in range(len(turnstiles)):
        gates.wipe(device)  # no users left from earlier registrations
    participants_file = root / "participants.csv"
    write_participants_file(participants_file, 50)
    client = RetryingClient(base_url=deployed_stack.api_url, timeout=30)
    yield OperatorStack(client, settings, market, products_file, products_sample, gates, tuple(turnstiles),
                        participants_file)
    client.close()
    gates.close()


@dataclass
class OperatorStack:
    client: httpx.Client
    settings: Settings
    market: Marketplace
    products_file: Path
    products_sample: SampleStats
    gates: turnstile_emulator.EmulatorControl  # the control API of the stack's turnstile emulator
    turnstiles: tuple[str, ...]
    participants_file: Path

    def __iter__(self):  # `client, settings = operator_stack`
        return iter((self.client, self.settings))


def _deployment(client: httpx.Client, name: str) -> dict:
    response = client.get(f"/deployments/name/{name}")
    assert response.status_code == 200, response.text
    return response.json()


def _start(client: httpx.Client, deployment_id: str, parameters: dict, idempotency_key: str | None = None,
           env: dict[str, str] | None = None) -> dict:
    body = {"parameters": parameters, **({"job_variables": {"env": env}} if env else {})}
    if idempotency_key:
        body["idempotency_key"] = idempotency_key
    response = client.post(f"/deployments/{deployment_id}/create_flow_run", json=body)
    assert response.status_code in (200, 201), response.text  # 200: the idempotency key's existing run
    return response.json()


def _wait(client: httpx.Client, flow_run_id: str, states=TERMINAL, timeout: float = 240) -> dict:
    return wait_for_run(client, flow_run_id, states, timeout)


def _artifacts(client: httpx.Client, flow_run_id: str) -> list[dict]:
    subflows = client.post("/flow_runs/filter", json={"flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}}})
    ids = [flow_run_id, *[r["id"] for r in subflows.json()]]
    response = client.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": ids}}})
    assert response.status_code == 200, response.text
    return response.json()


def _spreadsheets_from_links(artifacts: list[dict], folder: Path) -> list[str]:
    """The run's spreadsheets as its link artifacts serve them over HTTP (downloaded into `folder`)."""
    links = [a for a in artifacts if (a["key"] or "").startswith("games-spreadsheet")]
    assert links, f"no spreadsheet link among {[a['key'] for a in artifacts]}"
    return sorted(str(fetch_link(artifact["data"], folder)) for artifact in links)


def _cancel_once_under_way(client: httpx.Client, run_id: str, under_way, what: str, timeout: float = 180) -> None:
    """Wait until `under_way()` (the run has done some of its work; it must not end first), then cancel the run as
    the UI does (CANCELLING; the worker does the rest)."""
    deadline = time.monotonic() + timeout
    while not under_way():
        assert client.get(f"/flow_runs/{run_id}").json()["state_type"] not in TERMINAL, "ended too early"
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    response = client.post(f"/flow_runs/{run_id}/set_state", json={"state": {"type": "CANCELLING"}, "force": True})
    assert response.status_code in (200, 201), response.text


def test_prefect_yaml_deployments_have_limits_schedules_and_forms(operator_stack):
    client, _ = operator_stack
    deployments = client.post("/deployments/filter", json={}).json()
    flows = {f["id"]: f["name"] for f in client.post("/flows/filter", json={}).json()}
    on_demand = {flows[d["flow_id"]] for d in deployments if d["name"] == "on-demand"}
    assert on_demand == set(SMALL_RUN_PARAMETERS), "every flow has an on-demand deployment with a test run"
    for deployment in deployments:
        where = f"{flows[deployment['flow_id']]}/{deployment['name']}"
        assert deployment["enforce_parameter_schema"], where
        assert deployment["work_pool_name"] == LOCAL_WORK_POOL, where
        step = deployment["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]
        assert Path(step["directory"]) == PROJECT_ROOT, where
        assert_operator_form(deployment["parameter_openapi_schema"])

    sync = _deployment(client, "sync-marketplace/on-demand")
    assert sync["global_concurrency_limit"] is None, "syncs of different accounts must overlap"
    [every] = _deployment(client, "sync-marketplace/every-15-minutes")["schedules"]
    assert every["schedule"]["cron"] == "*/15 * * * *"

    games = _deployment(client, "generate-games/on-demand")
    assert games["global_concurrency_limit"] is None, "generation runs share the global limit, not one per deployment"
    assert games["schedules"] == []
    scheduled = _deployment(client, "generate-games/draw-day-mornings")
    [schedule] = scheduled["schedules"]
    assert schedule["schedule"]["cron"] == "0 7 * * 2,4,6"
    assert schedule["schedule"]["timezone"] == "America/Sao_Paulo"
    assert scheduled["parameters"] == {"quantity": 1_000_000}
    assert scheduled["global_concurrency_limit"] is None
    [daily] = _deployment(client, "cleanup-runs/daily")["schedules"]
    assert daily["schedule"]["cron"] == "30 3 * * *"


def test_the_outbox_relay_runs_every_minute_whatever_the_schedules_and_through_rest(operator_stack):
    """publish-outbox is not a routine batch: its schedule stays active with the stack's schedules paused, and a
    run started over REST publishes and reports on the products queue."""
    client = operator_stack.client
    relay = _deployment(client, "publish-outbox/every-minute")
    [every] = relay["schedules"]
    assert every["schedule"]["interval"] == 60 and every["active"], every
    assert relay["concurrency_limit"] == 1 or relay["global_concurrency_limit"], "one relay at a time"
    for _ in range(5):  # a run of the every-minute schedule under way cancels this one (CANCEL_NEW): again after it
        run = _wait(client, _start(client, relay["id"], {})["id"])
        if run["state"]["message"] != "Deployment concurrency limit reached.":
            break
        deadline = time.monotonic() + 120
        while client.post("/flow_runs/filter", json={"flow_runs": {
            "deployment_id": {"any_": [relay["id"]]}, "state": {"type": {"any_": ["PENDING", "RUNNING"]}}},
        }).json():
            assert time.monotonic() < deadline, "the scheduled relay run did not finish"
            time.sleep(0.5)
    assert run["state_type"] == "COMPLETED", run["state"]
    [report] = [a for a in _artifacts(client, run["id"]) if a["key"] == "publish-outbox-report"]
    assert "Outbox of" in report["data"], report["data"]


def _check_games_run(stack: OperatorStack, parameters: dict, artifacts: list[dict], run_key: str) -> None:
    assert {"table", "markdown", "progress"} <= {a["type"] for a in artifacts}  # links are stored as markdown
    spreadsheets = _spreadsheets_from_links(artifacts, stack.settings.stack.output_dir.parent / f"downloads-{run_key}")
    assert spreadsheets and all(Path(p).is_file() for p in spreadsheets)
    snapshot = stack.settings.stack.output_dir / run_key / f"counter-{run_key}.json"
    check_generated_run(spreadsheets, str(snapshot), parameters["quantity"])


def _check_sync_run(stack: OperatorStack, parameters: dict, artifacts: list[dict], run_key: str) -> None:
    keys = {a["key"] for a in artifacts}
    assert {"marketplace-sync-accounts", "marketplace-sync-summary"} <= keys, keys
    for seller in parameters["accounts"]:
        stored = count_rows(stack.market.engine, seller)
        assert stored["orders"] == len(stack.market.control.orders(seller)), stored
        assert stored["items"] == len(stack.market.control.items(seller)), stored


def _check_onboarding_run(stack: OperatorStack, parameters: dict, artifacts: list[dict], run_key: str) -> None:
    account = get_account(stack.market.engine, stack.market.seller_ids()[2])
    assert (account.nickname, account.status) == (parameters["nickname"], "active")
    assert "marketplace-onboarded-account" in {a["key"] for a in artifacts}


def _check_products_run(stack: OperatorStack, parameters: dict, artifacts: list[dict], run_key: str) -> None:
    keys = {a["key"] for a in artifacts}
    assert {"products-failures", "products-failure-reasons", "products-summary", "products-progress"} <= keys, keys
    [summary] = [a for a in artifacts if a["key"] == "products-summary"]
    sample = stack.products_sample
    assert f"Successes: {sample.good_rows:,}, Failures: {sample.rows - sample.good_rows:,}" in summary["data"]
    failures = stack.settings.stack.output_dir / "products" / run_key / f"{stack.products_file.stem}-failures.xlsx"
    assert len(read_failures_workbook(failures)) == sample.rows - sample.good_rows


def _check_registration_run(stack: OperatorStack, parameters: dict, artifacts: list[dict], run_key: str) -> None:
    keys = {a["key"] for a in artifacts}
    assert {"registration-report", "registration-turnstiles"} <= keys, keys
    assert "registration-failures" not in keys, "a link to 0 failed records"
    [report] = [a for a in artifacts if a["key"] == "registration-report"]
    assert "| Errors | 0 |" in report["data"] and "| Total operations | 100 |" in report["data"]
    for device in range(len(stack.turnstiles)):
        assert len(stack.gates.users(device)) == 50


def _plant_expired_run(stack: OperatorStack, run_key: str) -> dict:
    """A generation run folder 40 days old (its Redis keys gone) for the cleanup run to remove."""
    folder = stack.settings.stack.output_dir / f"expired-{run_key}"
    (folder / "chunks").mkdir(parents=True)
    (folder / "chunks" / "chunk-00000.npz").write_bytes(b"x" * 100)
    old = time.time() - 40 * 86_400
    for path in (folder / "chunks" / "chunk-00000.npz", folder / "chunks", folder):
        os.utime(path, (old, old))
    return {"retention_days": 30}


def _check_cleanup_run(stack: OperatorStack, parameters: dict, artifacts: list[dict], run_key: str) -> None:
    [report] = [a for a in artifacts if a["key"] == "cleanup-runs-report"]
    assert f"expired-{run_key}" in report["data"], report["data"]
    assert not (stack.settings.stack.output_dir / f"expired-{run_key}").exists()


def _check_notifications_run(stack: OperatorStack, parameters: dict, artifacts: list[dict], run_key: str) -> None:
    [summary] = [a for a in artifacts if a["key"] == "marketplace-notifications"]
    assert "Missed feeds read: 0" in summary["data"], summary["data"]


RUN_CHECKS = {
    "cleanup-runs": _check_cleanup_run,
    "marketplace-notifications": _check_notifications_run,
    "generate-games": _check_games_run,
    "sync-marketplace": _check_sync_run,
    "onboard-account": _check_onboarding_run,
    "process-products": _check_products_run,
    "register-participants": _check_registration_run,
}


@dataclass(frozen=True)
class OnDemandRun:
    run_key: str
    parameters: dict
    started: dict  # the flow run the first request created
    again: dict  # what the same request with the same idempotency key returned


@pytest.fixture(scope="module")
def on_demand_runs(operator_stack) -> dict[str, OnDemandRun]:
    """A small run of each on-demand deployment, all started at once over REST, each request sent twice with
    the same idempotency key: the worker runs them side by side, so the tests below wait for the slowest run,
    not for the sum of them all (each run is a process of its own, whose start-up is mostly waiting)."""
    client, runs = operator_stack.client, {}
    for flow_name in sorted(SMALL_RUN_PARAMETERS):
        deployment = _deployment(client, f"{flow_name}/on-demand")
        run_key = f"rest-{uuid.uuid4().hex[:6]}"
        parameters = SMALL_RUN_PARAMETERS[flow_name](run_key, operator_stack)
        started = _start(client, deployment["id"], parameters, idempotency_key=f"order-{run_key}")
        again = _start(client, deployment["id"], parameters, idempotency_key=f"order-{run_key}")
        runs[flow_name] = OnDemandRun(run_key, parameters, started, again)
    return runs


@pytest.mark.parametrize("flow_name", sorted(SMALL_RUN_PARAMETERS))
def test_on_demand_run_started_through_the_rest_api_completes_with_artifacts(operator_stack, on_demand_runs,
                                                                             flow_name):
    client = operator_stack.client
    run_key, parameters, started, again = (getattr(on_demand_runs[flow_name], name)
                                           for name in ("run_key", "parameters", "started", "again"))
    assert again["id"] == started["id"], "the idempotency key must return the same flow run"

    run = _wait(client, started["id"])
    assert run["state_type"] == "COMPLETED", run["state"]
    RUN_CHECKS[flow_name](operator_stack, parameters, _artifacts(client, started["id"]), run_key)


def test_an_order_changed_in_the_marketplace_is_in_the_database_seconds_later_through_the_trigger(operator_stack):
    """The stack's emulator notifies the stack's marketplace receiver, whose event starts a run of
    marketplace-notifications/on-event on the worker (its trigger in prefect.yaml): the changed order is stored with
    no sync run. Slow (~10-40 s): the worker polls for the run and starts a process for it."""
    client, market = operator_stack.client, operator_stack.market
    seller = market.seller_ids()[0]  # onboarded by the fixture
    on_event = _deployment(client, "marketplace-notifications/on-event")
    [order_id] = market.control.mutate(seller_id=seller, orders_updated=1)["orders_updated"]
    changed = next(o for o in market.control.orders(seller) if o["id"] == order_id)
    started = time.monotonic()
    from sqlalchemy import select

    from operations.marketplace.client import parse_time
    from operations.marketplace.store import ORDERS, utc

    while True:
        with market.engine.connect() as conn:
            stored = conn.execute(select(ORDERS.c.date_last_updated).where(ORDERS.c.id == order_id)).scalar()
        if stored is not None and utc(stored) == parse_time(changed["date_last_updated"]):
            break
        assert time.monotonic() - started < 90, "the changed order never reached the database"
        time.sleep(0.25)
    print(f"order changed -> in the database through the trigger: {time.monotonic() - started:.1f} s")
    runs = client.post("/flow_runs/filter", json={"deployments": {"id": {"any_": [on_event["id"]]}}}).json()
    assert runs, "no run of marketplace-notifications/on-event"
    syncs = client.post("/flow_runs/filter", json={"flows": {"name": {"any_": ["sync-marketplace"]}},
                                                   "flow_runs": {"state": {"type": {"any_": ["RUNNING"]}}}}).json()
    assert not syncs, "a sync ran meanwhile"


def test_invalid_parameters_are_refused_with_409_and_no_run_is_created(operator_stack):
    client, _ = operator_stack
    deployment = _deployment(client, "generate-games/on-demand")
    count = {"deployments": {"id": {"any_": [deployment["id"]]}}}
    before = client.post("/flow_runs/count", json=count).json()
    for parameters, field in [
        ({"quantity": 0}, "quantity"),
        ({"quantity": 10, "numbers_per_game": 61}, "numbers_per_game"),
        ({"run_key": "not a key!"}, "run_key"),
        ({"quantity": "many"}, "quantity"),
    ]:
        response = client.post(f"/deployments/{deployment['id']}/create_flow_run", json={"parameters": parameters})
        assert response.status_code == 409, (parameters, response.text)
        assert "Validation failed" in response.text and field in response.text, response.text
    assert client.post("/flow_runs/count", json=count).json() == before


def test_invalid_parameters_of_the_other_flows_are_refused_with_409_before_any_work(operator_stack):
    client, market = operator_stack.client, operator_stack.market
    market.control.reset_stats()
    for name, parameters, field in [
        ("sync-marketplace/on-demand", {"resources": "everything"}, "resources"),
        ("sync-marketplace/on-demand", {"accounts": ["seller-one"]}, "accounts"),
        ("sync-marketplace/on-demand", {"accounts": [0]}, "accounts"),
        ("sync-marketplace/on-demand", {"full_resync_from": "yesterday"}, "full_resync_from"),
        ("onboard-account/on-demand", {}, "authorization_code"),
        ("process-products/on-demand", {}, "file_path"),
        ("process-products/on-demand", {"file_path": "/data/products.txt"}, "file_path"),
        ("process-products/on-demand", {"file_path": "/data/p.csv", "chunk_rows": -1}, "chunk_rows"),
        ("register-participants/on-demand", {"participants_file": "people.txt"}, "participants_file"),
        ("register-participants/on-demand", {"batch_size": 0}, "batch_size"),
    ]:
        deployment = _deployment(client, name)
        count = {"deployments": {"id": {"any_": [deployment["id"]]}}}
        before = client.post("/flow_runs/count", json=count).json()
        response = client.post(f"/deployments/{deployment['id']}/create_flow_run", json={"parameters": parameters})
        assert response.status_code == 409, (parameters, response.text)
        assert "Validation failed" in response.text and field in response.text, response.text
        assert client.post("/flow_runs/count", json=count).json() == before
    assert market.control.stats()["total"] == 0


# Valid values of each flow's required parameters, so that an unknown parameter is the only thing wrong.
REQUIRED_PARAMETERS = {
    "onboard-account": {"authorization_code": "TG-valid-looking-code"},
    "process-products": {"file_path": "/data/products.csv"},
}


def test_unknown_parameters_are_refused_with_409_naming_them_on_every_deployment(operator_stack):
    """The server refuses a misspelt parameter on every deployment (strict schemas after the deploy), naming
    it, and creates no run; a valid run of the same deployment is still created (201)."""
    client, _ = operator_stack
    deployments = client.post("/deployments/filter", json={}).json()
    flows = {f["id"]: f["name"] for f in client.post("/flows/filter", json={}).json()}
    assert len(deployments) >= 10, [d["name"] for d in deployments]
    again = apply_after_deploy()  # what deploy_all did: nothing left to change, schedules as STACK_SCHEDULES says
    keep = get_settings().stack.schedules
    assert (again.strict_schemas, again.schedules_switched, again.schedules_active) == (0, 0, keep), again
    assert all(s["active"] == (keep or ALWAYS_SCHEDULED in d["tags"]) for d in deployments for s in d["schedules"])
    for deployment in deployments:
        flow_name = flows[deployment["flow_id"]]
        where = f"{flow_name}/{deployment['name']}"
        assert deployment["parameter_openapi_schema"]["additionalProperties"] is False, where
        required = REQUIRED_PARAMETERS.get(flow_name, {})
        assert set(deployment["parameter_openapi_schema"].get("required", [])) <= set(required), where
        bogus = "quantiy" if flow_name == "generate-games" else "no_such_parameter"
        count = {"deployments": {"id": {"any_": [deployment["id"]]}}}
        before = client.post("/flow_runs/count", json=count).json()
        response = client.post(f"/deployments/{deployment['id']}/create_flow_run",
                               json={"parameters": {**required, bogus: 100}})
        assert response.status_code == 409, (where, response.text)
        assert "Validation failed" in response.text and f"'{bogus}' was unexpected" in response.text, response.text
        assert client.post("/flow_runs/count", json=count).json() == before, where

        later = {"type": "SCHEDULED", "state_details": {"scheduled_time": "2099-01-01T00:00:00Z"}}
        valid = client.post(f"/deployments/{deployment['id']}/create_flow_run",
                            json={"parameters": required, "state": later})
        assert valid.status_code == 201, (where, valid.text)
        assert client.delete(f"/flow_runs/{valid.json()['id']}").status_code == 204  # never run by the worker


def _generation(client: httpx.Client, flow_run_id: str) -> dict:
    """When the run's cluster work (the span of its task runs, which a generation slot covers) started and ended."""
    tasks = client.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [flow_run_id]}}}).json()
    assert tasks, f"flow run {flow_run_id} has no task runs"
    return {"start_time": min(t["start_time"] for t in tasks if t["start_time"]),
            "end_time": max(t["end_time"] for t in tasks if t["end_time"])}


def test_a_scheduled_and_an_on_demand_generation_run_take_turns(operator_stack):
    """Runs of different deployments share the machine's one generation slot: started together, the second
    waits (its summary says how long; the log line is tested in test_generation_limit.py, the worker here logs
    at WARNING) and generates only once the first has finished; both complete."""
    client, _ = operator_stack
    limit = client.get(f"/v2/concurrency_limits/{GAMES_LIMIT}").json()
    assert (limit["limit"], limit["active"]) == (1, True), limit  # GAMES_CONCURRENCY_LIMIT, set like `make up`
    scheduled = _deployment(client, "generate-games/draw-day-mornings")
    on_demand = _deployment(client, "generate-games/on-demand")
    runs = []
    for deployment in (scheduled, on_demand):
        key = f"turns-{uuid.uuid4().hex[:6]}"
        # the smallest run on a LocalCluster (IN_PROCESS_MAX_QUANTITY), whose start-up the slot covers too
        quantity = operator_stack.settings.lottery.in_process_max_quantity
        runs.append(_start(client, deployment["id"], {"quantity": quantity, "run_key": key}, key))
    done = [_wait(client, run["id"]) for run in runs]
    assert [d["state_type"] for d in done] == ["COMPLETED", "COMPLETED"], [d["state"] for d in done]
    assert {d["deployment_id"] for d in done} == {scheduled["id"], on_demand["id"]}

    first, second = sorted(runs, key=lambda run: _generation(client, run["id"])["start_time"])
    first_generation, second_generation = _generation(client, first["id"]), _generation(client, second["id"])
    assert second_generation["start_time"] >= first_generation["end_time"], "the two generations overlapped"
    waited = []
    for run in (first, second):
        [summary] = [a for a in _artifacts(client, run["id"]) if a["key"] == "games-run-summary"]
        waited.append(float(summary["data"].split("Waited for a generation slot: ", 1)[1].split(" s ", 1)[0]))
    assert waited[0] < 1 < waited[1], waited
    limit = client.get(f"/v2/concurrency_limits/{GAMES_LIMIT}").json()
    assert limit["active_slots"] == 0, limit


def test_a_cancelled_run_stops_its_tasks_and_a_rerun_resumes_it(operator_stack):
    client, settings = operator_stack
    deployment = _deployment(client, "generate-games/on-demand")
    run_key = f"cancel-{uuid.uuid4().hex[:6]}"
    quantity, chunks = 40_000, 16  # chunks of MAX_GAMES_PER_CHUNK, one spreadsheet file
    counter = RedisGameCounter.load(settings.lottery.counter_block_name).counter(run_key)
    for chunk in range(chunks - 10, chunks):  # the last chunks fail twice first (retried after 1 s and 4 s, with
        counter.inject_faults(chunk, 2)  # jitter): the run cannot finish before the cancel lands, even on a busy
        # machine where the first chunks commit late and the rest quickly
    run = _start(client, deployment["id"], {"quantity": quantity, "run_key": run_key}, run_key)
    _cancel_once_under_way(client, run["id"], lambda: len(counter.committed_chunks()) >= 2, "no chunk committed in time")
    assert _wait(client, run["id"], timeout=120)["state_type"] == "CANCELLED"
    limit = client.get(f"/v2/concurrency_limits/{GAMES_LIMIT}").json()
    assert limit["active_slots"] == 0, "the cancelled run kept its generation slot"  # not left to its lease

    run_dir = settings.stack.output_dir / run_key
    committed = set(counter.committed_chunks())
    time.sleep(3)  # nothing of the cancelled run may still be working
    assert set(counter.committed_chunks()) == committed
    assert 0 < len(committed) < chunks, f"cancelled too late to test a resume ({len(committed)} chunks)"
    counter.clear_faults()  # the resume runs without injected faults
    assert all(chunk_path(run_dir, i).exists() for i in committed)  # a cancelled run keeps what a resume needs

    rerun = _start(client, deployment["id"], {"quantity": quantity, "run_key": run_key}, f"{run_key}-resume")
    done = _wait(client, rerun["id"])
    assert done["state_type"] == "COMPLETED", done["state"]
    artifacts = _artifacts(client, rerun["id"])
    [summary] = [a for a in artifacts if a["key"] == "games-run-summary"]
    assert f"{chunks - len(committed)} generated by this flow run" in summary["data"], "finished chunks redone"
    downloads = settings.stack.output_dir.parent / f"downloads-{run_key}"
    spreadsheets = _spreadsheets_from_links(artifacts, downloads)
    check_generated_run(spreadsheets, str(run_dir / f"counter-{run_key}.json"), quantity)
    assert not (run_dir / "chunks").exists()  # completed: chunk files removed, claims dropped
    assert counter.outputs()["games"] == quantity and counter.seen_count() == 0
    counter.delete_run()


def test_a_cancelled_sync_through_its_deployment_stops_within_seconds_and_reports_what_it_did(operator_stack):
    """The worker's cancel (control intent, then SIGTERM): no request reaches the marketplace seconds after it, the
    run ends Cancelled with its table and summary of what was committed, and the accounts resume later."""
    client, _ = operator_stack
    market = operator_stack.market
    sellers = market.seller_ids()[3:5]
    callback = market.control.config()["notification_url"]
    # no notifications of these orders: the table must count what the cancelled sync alone committed
    market.control.configure(notification_url=None)
    for seller in sellers:
        market.onboard(seller)
        market.control.mutate(seller_id=seller, orders_new=600)
    market.control.configure(latency_ms=150)
    try:
        deployment = _deployment(client, "sync-marketplace/on-demand")
        run = _start(client, deployment["id"], {"accounts": sellers, "resources": "both"})
        _cancel_once_under_way(client, run["id"], lambda: sum(count_rows(market.engine, s)["orders"] for s in sellers) >= 100,
                               "no order stored in time")
        cancelled_at = time.time()
        assert _wait(client, run["id"], timeout=120)["state_type"] == "CANCELLED"
        time.sleep(2)  # nothing of the cancelled run may still be working
        lag = market.control.stats()["last_request_at"] - cancelled_at
        print(f"\nworker cancel: last request at the emulator {lag:.2f} s after the cancel")
        assert lag < 5, f"requests went on {lag:.1f} s after the cancel"
    finally:
        market.control.configure(latency_ms=DEMO_MARKETPLACE.latency_ms, notification_url=callback)
    stored = {s: count_rows(market.engine, s)["orders"] for s in sellers}
    assert all(n < len(market.control.orders(s)) for s, n in stored.items()), f"synced to the end: {stored}"
    artifacts = {a["key"]: a for a in _artifacts(client, run["id"])}
    assert {"marketplace-sync-accounts", "marketplace-sync-summary"} <= set(artifacts), set(artifacts)
    summary = artifacts["marketplace-sync-summary"]["data"]
    assert "**Cancelled.**" in summary, summary
    rows = json.loads(artifacts["marketplace-sync-accounts"]["data"])
    assert sorted(r["status"] for r in rows) == ["cancelled", "cancelled"], rows
    assert sum(r["orders new"] for r in rows) == sum(stored.values()), "the table must count what was committed"

    rerun = _start(client, deployment["id"], {"accounts": sellers, "resources": "orders"})
    assert _wait(client, rerun["id"])["state_type"] == "COMPLETED"
    for seller in sellers:
        assert count_rows(market.engine, seller)["orders"] == len(market.control.orders(seller))


def test_a_cancelled_products_run_on_dask_stops_within_seconds_and_reports_what_it_did(operator_stack, database_url):
    """The worker's own cancel (CANCELLING, its intent, SIGTERM) of a products run on its LocalCluster: no chunk
    starts 10 s after it, the run ends Cancelled with a summary that matches the database."""
    from sqlalchemy import text

    from operations.products.store import product_counts

    client, settings = operator_stack
    engine = get_engine(database_url)
    dealers = [f"CANCEL{i}" for i in range(2)]  # offers of their own: the run's rows are the new offers
    upsert_dealers(engine, [(code, code) for code in dealers])
    source = settings.stack.output_dir.parent / "products-cancel.csv"
    rows = 40_000
    generate_products_file(source, rows, dealers, bad_fraction=0.0, seed=29)
    before = product_counts(engine)
    run_key = f"cancel-products-{uuid.uuid4().hex[:6]}"
    deployment = _deployment(client, "process-products/on-demand")
    run = _start(client, deployment["id"], {"file_path": str(source), "run_key": run_key, "chunk_rows": 400},
                 env={"PRODUCTS_IN_PROCESS_MAX_ROWS": "0"})  # on the worker's Dask cluster, whatever the size
    _cancel_once_under_way(client, run["id"], lambda: product_counts(engine)["offers"] - before["offers"] >= 800,
                           "no chunk committed in time")
    cancelled_at = time.time()
    final = _wait(client, run["id"], timeout=120)
    assert final["state_type"] == "CANCELLED", final["state"]
    print(f"products on Dask, worker cancel: run Cancelled {time.time() - cancelled_at:.1f} s after the cancel")

    written = product_counts(engine)["offers"] - before["offers"]
    time.sleep(3)  # nothing of the cancelled run may still be working
    assert product_counts(engine)["offers"] - before["offers"] == written
    with engine.connect() as conn:  # a chunk's rows carry its transaction's start: when it started
        last_start = conn.execute(text("SELECT extract(epoch FROM max(created_at)) FROM product_dealers "
                                       "WHERE source_run = :run_key"), {"run_key": run_key}).scalar_one()
    late = float(last_start) - cancelled_at
    print(f"products on Dask, worker cancel: last chunk started {late:.2f} s after the cancel")
    assert late < 10, f"a chunk started {late:.1f} s after the cancel"
    assert 0 < written < rows, written
    logs = client.post("/logs/filter", json={"logs": {"flow_run_id": {"any_": [run["id"]]}}, "sort": "TIMESTAMP_ASC",
                                             "limit": 200}).json()
    assert f"{written:,} row(s) written" in final["state"]["message"], (final["state"], [l["message"] for l in logs])
    [summary] = [a for a in _artifacts(client, run["id"]) if a["key"] == "products-summary"]
    assert "**Cancelled**" in summary["data"] and f"{written:,} row(s) written" in summary["data"], summary["data"]
    assert not (settings.stack.output_dir / "products" / run_key / "chunks").exists()


def _crash_a_run_of(client: httpx.Client, deployment: dict, parameters: dict) -> str:
    """A run of `deployment` that the worker never picks up (scheduled a day ahead), then marked Running and
    Crashed as the worker does when the run's process dies: the events a killed sync leaves."""
    later = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 86_400))
    response = client.post(f"/deployments/{deployment['id']}/create_flow_run", json={
        "parameters": parameters, "state": {"type": "SCHEDULED", "state_details": {"scheduled_time": later}}})
    assert response.status_code in (200, 201), response.text
    run_id = response.json()["id"]
    for state in ("RUNNING", "CRASHED"):
        done = client.post(f"/flow_runs/{run_id}/set_state", json={"state": {"type": state}, "force": True})
        assert done.status_code in (200, 201), done.text
    return run_id


def _runs_of(client: httpx.Client, deployment: dict) -> list[dict]:
    return client.post("/flow_runs/filter", json={"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}}).json()


def test_a_crashed_sync_is_resumed_at_once_by_the_after_crash_deployment_and_never_loops(operator_stack):
    """A sync whose process died left its account `running`: its Crashed state starts `after-crash` through the
    deployment's trigger, which releases the account and syncs it to the end, without a person; a crash of
    `after-crash` itself starts nothing."""
    from sqlalchemy import text

    client, _ = operator_stack
    market = operator_stack.market
    seller = market.seller_ids()[0]  # onboarded by the fixture
    after_crash = _deployment(client, "sync-marketplace/after-crash")
    before = {r["id"] for r in _runs_of(client, after_crash)}
    dead = _crash_a_run_of(client, _deployment(client, "sync-marketplace/on-demand"), {"accounts": [seller]})
    with market.engine.begin() as conn:  # what the dead run left: the account `running` under its id
        conn.execute(text("UPDATE marketplace_accounts SET last_sync_status = 'running', last_sync_run_id = :run "
                          "WHERE seller_id = :seller"), {"run": dead, "seller": seller})
    crashed_at = time.monotonic()
    while not (started := [r for r in _runs_of(client, after_crash) if r["id"] not in before]):
        assert time.monotonic() - crashed_at < 60, "no after-crash run within 60 s of the crash"
        time.sleep(0.25)
    latency = time.monotonic() - crashed_at
    print(f"\nafter-crash run created {latency:.1f} s after the crash")
    [resume] = started
    assert _wait(client, resume["id"], timeout=180)["state_type"] == "COMPLETED"
    account = get_account(market.engine, seller)
    assert account.last_sync_status == "synced", account
    assert count_rows(market.engine, seller)["orders"] == len(market.control.orders(seller))

    known = {r["id"] for r in _runs_of(client, after_crash)}
    crashed = _crash_a_run_of(client, after_crash, {})
    time.sleep(max(5.0, 3 * latency))
    assert {r["id"] for r in _runs_of(client, after_crash)} - known == {crashed}, "a crash of after-crash looped"
