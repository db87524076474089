"""Start a run of any deployment and return at once (a "sync in background" for other systems).

    make run DEPLOYMENT=generate-games/on-demand PARAMS="quantity=200000 run_key=morning-batch"
    python -m deployments.start_run generate-games/on-demand quantity=200000 run_key=morning-batch
    python -m deployments.start_run generate-games/on-demand --parameters '{"rules": {"sum_min": 130}}'
    python -m deployments.start_run generate-games/on-demand quantity=50000 --idempotency-key order-8812

KEY=VALUE values are read as JSON when they parse (numbers, true, lists, objects), else as text. Prints the
flow run id and its UI link. The server validates the parameters against the deployment's schema
(enforce_parameter_schema, and no parameter the schema does not name): invalid or unknown ones are refused
with the server's message and no run is created (exit code 2).
Uses PREFECT_API_URL, else the local server started by `make up`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from deployments.stack import local_api_url


def parse_parameters(pairs: list[str], parameters_json: str | None) -> dict[str, Any]:
    """`--parameters` JSON object, then KEY=VALUE pairs on top of it."""
    parameters: dict[str, Any] = {}
    if parameters_json:
        loaded = json.loads(parameters_json)
        if not isinstance(loaded, dict):
            raise ValueError("--parameters must be a JSON object")
        parameters.update(loaded)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {pair!r}")
        try:
            parameters[key] = json.loads(value)
        except json.JSONDecodeError:
            parameters[key] = value
    return parameters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("deployment", help="FLOW/DEPLOYMENT, e.g. generate-games/on-demand")
    parser.add_argument("params", nargs="*", metavar="KEY=VALUE", help="flow parameters")
    parser.add_argument("--parameters", help="flow parameters as one JSON object")
    parser.add_argument("--idempotency-key", help="a second start with the same key returns the same run")
    parser.add_argument("--tag", action="append", default=[], help="extra tag for the flow run")
    args = parser.parse_args(argv)
    try:
        parameters = parse_parameters(args.params, args.parameters)
    except ValueError as exc:
        parser.error(str(exc))
    api_url = local_api_url()
    if api_url is None:
        print("no Prefect API: run `make up` or set PREFECT_API_URL", file=sys.stderr)
        return 2
    os.environ["PREFECT_API_URL"] = api_url

    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    try:
        flow_run = run_deployment(
            args.deployment,
            parameters=parameters,
            timeout=0,
            idempotency_key=args.idempotency_key,
            tags=args.tag or None,
            as_subflow=False,
        )
    except ObjectNotFound:
        print(f"no deployment named {args.deployment!r} (FLOW/DEPLOYMENT) on {api_url}", file=sys.stderr)
        return 2
    except PrefectHTTPStatusError as exc:
        detail = exc.response.json().get("detail", exc.response.text) if exc.response.content else str(exc)
        print(f"refused by the server ({exc.response.status_code}): {detail}", file=sys.stderr)
        return 2
    ui_url = api_url.removesuffix("/api")
    print(f"flow run:  {flow_run.name} ({flow_run.id})")
    print(f"state:     {flow_run.state.name if flow_run.state else 'unknown'}")
    print(f"UI:        {ui_url}/runs/flow-run/{flow_run.id}")
    print(f"API:       {api_url}/flow_runs/{flow_run.id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
