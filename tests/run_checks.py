"""Checks shared by the flow tests: a finished generation run read back from its files; a run awaited over REST."""

from __future__ import annotations

import json
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx
import numpy as np

from operations.lottery.engine import games_to_masks
from operations.lottery.spreadsheet import read_game_rows


def read_spreadsheets(paths: list[str], k: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ranks, games, scores = [], [], []
    for path in paths:
        for row in read_game_rows(Path(path)):
            ranks.append(row[0])
            games.append(row[1 : 1 + k])
            scores.append(row[-1])
    return np.array(ranks), np.array(games, dtype=np.uint8), np.array(scores)


def check_generated_run(spreadsheets: list[str], counter_snapshot: str, quantity: int, k: int = 6) -> np.ndarray:
    """Spreadsheets hold exactly the run: contiguous ranks, sorted by score, valid distinct games, and the
    counter snapshot written beside them agrees with them number by number."""
    ranks, games, scores = read_spreadsheets(spreadsheets, k)
    assert ranks.tolist() == list(range(1, quantity + 1))
    assert (np.diff(scores) <= 0).all(), "not sorted by score across the whole run"
    assert ((games >= 1) & (games <= 60)).all() and (np.diff(games.astype(int), axis=1) > 0).all()
    masks = games_to_masks(games)
    assert len(np.unique(masks)) == quantity, "a repeated game"
    snapshot = json.loads(Path(counter_snapshot).read_text())
    firsts = np.bincount(games[:, 0], minlength=61)
    assert snapshot == {
        "counter": {str(i): int(c) for i, c in enumerate(firsts) if c},
        "total_generated": quantity,
    }
    return games


def _schema_fields(schema: dict):
    for name, prop in schema["properties"].items():
        yield "", name, prop
    for model, definition in schema.get("definitions", {}).items():
        for name, prop in definition.get("properties", {}).items():
            yield model, name, prop


def assert_operator_form(schema: dict) -> list[str]:
    """A flow's parameter schema renders as a usable UI form: every field (nested models included) has a
    human title and a description, every number has bounds and is a plain number field (not `int | None`, which
    the UI shows as a type switch). Returns the top-level parameter names."""
    fields = list(_schema_fields(schema))
    for model, name, prop in fields:
        where = f"{model}.{name}" if model else name
        assert prop.get("title") and prop["title"] != name, f"{where} has no human title"
        assert prop.get("description"), f"{where} has no description"
        types = [prop.get("type")] + [alt.get("type") for alt in prop.get("anyOf", [])]
        if "integer" in types or "number" in types:
            assert "anyOf" not in prop and "null" not in types, f"{where} shows a number/None switch: {prop}"
            bounded = [prop] + [alt for alt in prop.get("anyOf", []) if alt.get("type") in ("integer", "number")]
            assert any("minimum" in b and "maximum" in b for b in bounded), f"{where} has no bounds"
    return [name for model, name, _ in fields if not model]


def run_and_subflow_ids(client, flow_run_id) -> list:
    """The flow run's id and its subflow runs' ids."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    children = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id]))
    )
    return [flow_run_id, *[c.id for c in children]]


def run_artifacts(flow_run_id) -> list:
    """The artifacts of a flow run and of its subflows."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        ids = run_and_subflow_ids(client, flow_run_id)
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)))


def run_texts(flow_run_id) -> list[str]:
    """Every log line and artifact (data and description) of a flow run and of its subflows."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        ids = run_and_subflow_ids(client, flow_run_id)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)), limit=200)
    artifacts = run_artifacts(flow_run_id)
    return [log.message for log in logs] + [str(a.data) for a in artifacts] + [str(a.description) for a in artifacts]


def link_url(data: str) -> str:
    """The URL of a link artifact's data: a markdown link `[text](url)` or the bare URL."""
    return data.split("](", 1)[1].rsplit(")", 1)[0] if "](" in data else data


def fetch_link(data: str, folder: Path, **get_options) -> Path:
    """Download the file a link artifact points at over HTTP, as a person clicking it would, into `folder`
    (under the link's file name); fails unless the server answers 200."""
    url = link_url(data)
    assert urlsplit(url).scheme in ("http", "https"), f"not a link a browser opens from the UI: {url}"
    response = httpx.get(url, timeout=30, **get_options)
    assert response.status_code == 200, f"{url}: {response.status_code} {response.text[:200]}"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    target.write_bytes(response.content)
    return target


TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}  # flow run state types after which nothing changes


def wait_for_run(client, flow_run_id: str, states=TERMINAL, timeout: float = 240) -> dict:
    """The flow run, read over REST (`client`: an httpx client on the API) until its state type is one of
    `states`; fails after `timeout` seconds naming the state it is still in."""
    deadline = time.monotonic() + timeout
    while True:
        run = client.get(f"/flow_runs/{flow_run_id}").json()
        if run["state_type"] in states:
            return run
        assert time.monotonic() < deadline, f"flow run {flow_run_id} still {run['state_name']} after {timeout} s"
        time.sleep(0.25)
