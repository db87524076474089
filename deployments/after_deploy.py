"""What every deployment of prefect.yaml gets once `prefect deploy --all` has made it:

- unknown parameters refused: each deployment's parameter schema gets `"additionalProperties": false`, so the
  server answers 409 naming a misspelt parameter (`{"quantiy": 100}`) instead of creating a run that crashes;
  `enforce_parameter_schema` alone checks only the values of the parameters the schema knows;
- schedules paused unless STACK_SCHEDULES is on: a laptop's `make up` runs only what is started by hand, while
  production (STACK_SCHEDULES=on) keeps the draw-day batch, the 15-minute sync, the nightly registration and
  the daily cleanup running. Deployments tagged `always-scheduled` (the `publish-outbox` relay, which the
  products messages' delivery depends on) keep their schedules active either way.

    python -m deployments.after_deploy          # apply both to the deployments of PREFECT_API_URL / the stack
    python -m deployments.after_deploy status   # whether the schedules are active, without changing anything

`make up` applies them after its deploy (deployments/stack.py `deploy_all`). A production deploy runs
`prefect deploy --all` then `STACK_SCHEDULES=on python -m deployments.after_deploy`. Re-deploying makes the
schedules active again (prefect.yaml says `active: true`) and resets the schemas, so both steps follow every
deploy. Exit codes: 0 done, 2 no Prefect server.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any

from operations.settings import get_settings


@dataclass(frozen=True)
class AfterDeploy:
    """What `apply_after_deploy` changed: deployments whose schema became strict, schedules switched, and
    whether schedules are now active."""

    strict_schemas: int
    schedules_switched: int
    schedules_active: bool


def strict_parameter_schema(schema: dict[str, Any] | None) -> dict[str, Any]:
    """A copy of a deployment's parameter schema that refuses parameters it does not name."""
    strict = dict(schema or {"type": "object", "properties": {}})
    strict["additionalProperties"] = False
    return strict


def refuse_unknown_parameters(client: Any, deployments: list) -> int:
    """Make each deployment's parameter schema refuse unknown names (the server checks it on each run created,
    with `enforce_parameter_schema`); returns how many schemas changed (0 when all already were)."""
    from prefect.client.schemas.actions import DeploymentUpdate

    changed = 0
    for deployment in deployments:
        schema = deployment.parameter_openapi_schema or {}
        if schema.get("additionalProperties") is False:
            continue
        client.update_deployment(
            deployment.id, DeploymentUpdate(parameter_openapi_schema=strict_parameter_schema(schema))
        )
        changed += 1
    return changed


ALWAYS_SCHEDULED = "always-scheduled"  # a deployment tag: its schedules stay active whatever STACK_SCHEDULES says


def always_scheduled(deployment: Any) -> bool:
    return ALWAYS_SCHEDULED in (deployment.tags or [])


def set_schedules_active(client: Any, deployments: list, active: bool) -> int:
    """Activate or pause every schedule of the deployments (those tagged `always-scheduled` stay active);
    returns how many were switched. Pausing a schedule also deletes the future runs the scheduler had already
    planned for it (the server does it)."""
    switched = 0
    for deployment in deployments:
        wanted = active or always_scheduled(deployment)
        for schedule in deployment.schedules:
            if schedule.active != wanted:
                client.update_deployment_schedule(deployment.id, schedule.id, active=wanted)
                switched += 1
    return switched


def schedule_counts(client: Any) -> tuple[int, int]:
    """(active schedules, all schedules) over the deployments STACK_SCHEDULES governs (not `always-scheduled`)."""
    schedules = [schedule for deployment in client.read_deployments() if not always_scheduled(deployment)
                 for schedule in deployment.schedules]
    return sum(schedule.active for schedule in schedules), len(schedules)


def apply_after_deploy(schedules_active: bool | None = None) -> AfterDeploy:
    """Strict parameter schemas on every deployment, and schedules active or paused (STACK_SCHEDULES unless
    given), on the Prefect server this process points at (PREFECT_API_URL)."""
    from prefect.client.orchestration import get_client  # imports Prefect: only once the API URL is set

    active = get_settings().stack.schedules if schedules_active is None else schedules_active
    with get_client(sync_client=True) as client:
        deployments = client.read_deployments()
        strict = refuse_unknown_parameters(client, deployments)
        switched = set_schedules_active(client, deployments, active)
    return AfterDeploy(strict, switched, active)


def describe_schedules(api_url: str | None) -> str:
    """One line for `make status`: how many schedules are active on the server, and the setting."""
    keep = get_settings().stack.schedules
    setting = "STACK_SCHEDULES=on" if keep else "STACK_SCHEDULES off"
    if not api_url:
        return f"no Prefect server ({setting}: `make up` {'keeps' if keep else 'pauses'} them)"
    os.environ["PREFECT_API_URL"] = api_url
    from prefect.client.orchestration import get_client  # imports Prefect: only once the API URL is set

    try:
        with get_client(sync_client=True) as client:
            active, total = schedule_counts(client)
            always = [d.name for d in client.read_deployments() if always_scheduled(d) and d.schedules]
    except Exception as exc:  # noqa: BLE001 - a status line never fails the status command
        return f"unknown ({type(exc).__name__}: {exc})"
    relays = f"; always on: {len(always)} relay deployment(s)" if always else ""
    if not total:
        return f"none deployed ({setting}){relays}"
    state = "on" if active == total else ("paused" if not active else "partly on")
    return f"{state}: {active} of {total} active ({setting}){relays}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", choices=["apply", "status"], default="apply")
    args = parser.parse_args(argv)
    from deployments.stack import local_api_url

    api_url = local_api_url()
    if not api_url:
        print("no Prefect server: set PREFECT_API_URL or run `make up`", file=sys.stderr)
        return 2
    if args.command == "status":
        print(f"schedules: {describe_schedules(api_url)}")
        return 0
    os.environ["PREFECT_API_URL"] = api_url
    done = apply_after_deploy()
    print(f"unknown parameters refused by {done.strict_schemas} more deployment(s); schedules "
          f"{'active' if done.schedules_active else 'paused'} ({done.schedules_switched} switched)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
