"""The suite's own stack and its probes: the operator's stack started through the registry (`make up`'s
`start_operator_stack`) in a temporary DATA_DIR on free ports, runs started and cancelled over the Prefect REST
API, flow processes found through /proc, and the ground truth read with plain SQL, redis-py and the emulators'
control APIs (never through the project's flows, tasks or domain code).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import httpx

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# Settings that would point the stack at outside services: the suite's stack runs every service itself.
OUTSIDE_SERVICES = (
    "DATABASE_URL", "REDIS_URL", "PREFECT_API_URL", "OUTPUT_BASE_URL", "MARKETPLACE_API_URL", "DASK_SCHEDULER_ADDRESS",
    "PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_AUTH_STRING",
    "STACK_AUTH_STRING", "STACK_HOST", "PARTICIPANTS_FILE",
)


def log(message: str) -> None:
    """A progress line on stderr (the table goes to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def suite_environment(root: Path, devices: int) -> dict[str, str]:
    """The settings of the suite's stack: its own DATA_DIR and OUTPUT_DIR under `root`, a free file-server port,
    enough emulated turnstiles for one per fault, schedules paused, Prefect's client home under `root`."""
    from operations.infra.processes import free_port

    return {
        "DATA_DIR": str(root / "data"),
        "OUTPUT_DIR": str(root / "output"),
        "FILE_SERVER_PORT": str(free_port()),
        "TURNSTILE_EMULATOR_DEVICES": str(devices),
        "STACK_SCHEDULES": "off",
        "PREFECT_HOME": str(root / "prefect-client"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }


class Api(httpx.Client):
    """The Prefect REST API as another application calls it: 429/502/503 and connection errors retried with
    backoff; other failures returned (an API on a dead database answers 500: the suite records it)."""

    def request(self, method, url, **kwargs):
        for attempt in range(5):
            try:
                response = super().request(method, url, **kwargs)
            except httpx.TransportError:
                if attempt == 4:
                    raise
                time.sleep(0.5 * 2**attempt)
                continue
            if response.status_code not in (429, 502, 503):
                return response
            time.sleep(0.5 * 2**attempt)
        return response


@dataclass
class Harness:
    """The running stack of the suite and the probes the faults use."""

    root: Path
    env: dict[str, str]          # the operator's shell of this stack (for `python -m deployments.stack up`)
    api: Api
    database_url: str
    redis_url: str
    market_url: str
    turnstiles: tuple[str, ...]  # TurnstileDevice block names, device i = turnstiles[i]
    turnstile_urls: tuple[str, ...]
    settings: object
    run_ids: list[str] = field(default_factory=list)  # every flow run the suite started
    restarts_by_harness: list[str] = field(default_factory=list)
    _deployments: dict[str, str] = field(default_factory=dict)
    _engine: object = None
    _redis: object = None

    # -- stores ------------------------------------------------------------------------------------------
    @property
    def engine(self):
        if self._engine is None:
            from sqlalchemy import create_engine

            self._engine = create_engine(self.database_url, pool_pre_ping=True, pool_size=2,
                                         connect_args={"connect_timeout": 3})
        return self._engine

    def sql(self, statement: str, **parameters) -> list[tuple] | None:
        """Rows of a plain SQL statement (committed), or None while the database cannot be reached."""
        from sqlalchemy import text

        try:
            with self.engine.begin() as conn:
                result = conn.execute(text(statement), parameters)
                return [tuple(row) for row in result] if result.returns_rows else []
        except Exception:  # noqa: BLE001 - a killed database is what some faults measure
            self.engine.dispose()
            return None

    def scalar(self, statement: str, **parameters):
        rows = self.sql(statement, **parameters)
        return rows[0][0] if rows else None

    @property
    def redis(self):
        if self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(self.redis_url, socket_timeout=5, socket_connect_timeout=3)
        return self._redis

    def redis_alive(self) -> bool:
        try:
            return bool(self.redis.ping())
        except Exception:  # noqa: BLE001
            return False

    def database_alive(self) -> bool:
        return self.scalar("SELECT 1") == 1

    # -- Prefect -----------------------------------------------------------------------------------------
    def deployment_id(self, name: str) -> str | None:
        if name not in self._deployments:
            response = self.api.get(f"/deployments/name/{name}")
            if response.status_code != 200:
                return None
            self._deployments[name] = response.json()["id"]
        return self._deployments[name]

    def start(self, name: str, parameters: dict) -> str:
        """A run of deployment FLOW/DEPLOYMENT (its id)."""
        deployment = self.deployment_id(name)
        if deployment is None:
            raise RuntimeError(f"no deployment {name}")
        response = self.api.post(f"/deployments/{deployment}/create_flow_run", json={"parameters": parameters})
        if response.status_code not in (200, 201):
            raise RuntimeError(f"{name} refused the run: {response.status_code} {response.text[:300]}")
        run_id = response.json()["id"]
        self.run_ids.append(run_id)
        return run_id

    def run(self, run_id: str) -> dict | None:
        try:
            response = self.api.get(f"/flow_runs/{run_id}")
        except httpx.HTTPError:
            return None
        return response.json() if response.status_code == 200 else None

    def state(self, run_id: str) -> str:
        """The run's state type, or '?' while the API cannot answer."""
        run = self.run(run_id)
        return run["state_type"] if run and run.get("state_type") else "?"

    def state_name(self, run_id: str) -> str:
        run = self.run(run_id)
        return run["state_name"] if run and run.get("state_name") else "?"

    def family(self, run_id: str) -> list[dict]:
        """The run and its subflow runs (any depth), or [] while the API cannot answer."""
        found, frontier = [], [run_id]
        while frontier:
            try:
                response = self.api.post("/flow_runs/filter", json={"flow_runs": {"id": {"any_": frontier}}})
                children = self.api.post("/flow_runs/filter",
                                         json={"flow_runs": {"parent_flow_run_id": {"any_": frontier}}})
            except httpx.HTTPError:
                return []
            if response.status_code != 200 or children.status_code != 200:
                return []
            found += response.json()
            frontier = [r["id"] for r in children.json() if r["id"] not in {f["id"] for f in found}]
        return found

    def family_states(self, run_id: str) -> str:
        """'Completed' or 'Crashed, sub load-products Running', for the table."""
        runs = self.family(run_id)
        if not runs:
            return self.state_name(run_id)
        main = next((r for r in runs if r["id"] == run_id), runs[0])
        subs = [f"sub {r['name']} {r['state_name']}" for r in runs if r["id"] != run_id]
        return ", ".join([main["state_name"], *subs])

    def family_terminal(self, run_id: str) -> bool:
        runs = self.family(run_id)
        return bool(runs) and all(r["state_type"] in TERMINAL for r in runs)

    def cancel(self, run_id: str) -> None:
        """What the UI's Cancel does: the run set CANCELLING (the worker then stops it)."""
        response = self.api.post(f"/flow_runs/{run_id}/set_state",
                                 json={"state": {"type": "CANCELLING"}, "force": True})
        if response.status_code not in (200, 201):
            raise RuntimeError(f"cancel refused: {response.status_code} {response.text[:200]}")

    def wait(self, run_id: str, timeout: float, until: set[str] = TERMINAL) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state(run_id)
            if state in until:
                return state
            time.sleep(0.5)
        return self.state(run_id)

    def wait_running(self, run_id: str, timeout: float = 180) -> str:
        return self.wait(run_id, timeout, TERMINAL | {"RUNNING"})

    def artifact_keys(self, run_id: str) -> set[str]:
        ids = [r["id"] for r in self.family(run_id)] or [run_id]
        response = self.api.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": ids}}})
        return {a["key"] for a in response.json() if a.get("key")} if response.status_code == 200 else set()

    def limit_slots(self, name: str) -> int | None:
        """Active slots of a global concurrency limit (None: no such limit, or no answer)."""
        try:
            response = self.api.get(f"/v2/concurrency_limits/{name}")
        except httpx.HTTPError:
            return None
        return response.json().get("active_slots") if response.status_code == 200 else None

    def running_runs(self) -> list[dict]:
        response = self.api.post("/flow_runs/filter",
                                 json={"flow_runs": {"state": {"type": {"any_": ["RUNNING", "PENDING", "CANCELLING"]}}}})
        return response.json() if response.status_code == 200 else []

    # -- processes ---------------------------------------------------------------------------------------
    @staticmethod
    def run_processes(run_id: str) -> dict[int, int]:
        """pid -> parent pid of every process whose environment names the flow run (PREFECT__FLOW_RUN_ID: the
        flow process the worker started and whatever it started, e.g. Dask workers)."""
        needle = f"PREFECT__FLOW_RUN_ID={run_id}".encode()
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if needle not in (entry / "environ").read_bytes().split(b"\0"):
                    continue
                stat = (entry / "stat").read_text()
                found[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
        return found

    def flow_process(self, run_id: str, timeout: float = 60) -> int | None:
        """The flow run's own process: the topmost of its processes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            processes = self.run_processes(run_id)
            top = [pid for pid, parent in processes.items() if parent not in processes]
            if top:
                return min(top)
            time.sleep(0.2)
        return None

    # -- services ----------------------------------------------------------------------------------------
    def service_pid(self, word: str) -> int | None:
        """The pid of the stack's service whose name holds `word` (e.g. 'postgres', 'redis'); for PostgreSQL
        the postmaster of postmaster.pid."""
        if word == "redis":
            try:
                return int(self.redis.info("server")["process_id"])
            except Exception:  # noqa: BLE001 - not answering: the registry says
                pass
        if word == "postgres":
            for pid_file in Path(self.env["DATA_DIR"]).glob("postgres/**/postmaster.pid"):
                try:
                    return int(pid_file.read_text().split()[0])
                except (OSError, ValueError, IndexError):
                    pass
        from deployments import services as registry

        for state in registry.status(registry.stack_services(self.settings)):
            if word in state.name and state.running:
                return state.pid
        return None

    def make_up(self) -> str:
        """What a person does when a service is down: `python -m deployments.stack up` in the stack's shell."""
        from operations.settings import PROJECT_ROOT

        done = subprocess.run([sys.executable, "-m", "deployments.stack", "up"], cwd=PROJECT_ROOT, env=self.env,
                              capture_output=True, text=True, timeout=600)
        self.restarts_by_harness.append(time.strftime("%H:%M:%S"))
        self._follow_redis()
        return "ok" if done.returncode == 0 else f"failed ({done.returncode}): {done.stderr.strip()[-300:]}"

    def _follow_redis(self) -> None:
        """A Redis started again may listen on another port: the suite's client follows the stack's."""
        from deployments import services as registry

        try:
            for state in registry.status(registry.stack_services(self.settings)):
                if "redis" in state.name and state.running and state.address.startswith("redis://"):
                    if state.address != self.redis_url:
                        log(f"Redis now at {state.address} (was {self.redis_url})")
                        self.redis_url, self._redis = state.address, None
        except Exception as exc:  # noqa: BLE001
            log(f"Redis address not re-read: {exc}")

    # -- the Redis stream ----------------------------------------------------------------------------------
    def stream_counts(self, stream: str, start_ms: int = 0) -> Counter | None:
        """Entries per message of the stream added since `start_ms`, keyed by (product_dealer_id, version)
        from each entry's payload (not the project's message key scheme); None while Redis cannot answer."""
        counts: Counter = Counter()
        low = f"{start_ms}-0"
        try:
            while True:
                page = self.redis.xrange(stream, min=low, max="+", count=10_000)
                for entry_id, fields in page:
                    payload = json.loads(fields.get(b"payload", b"{}"))
                    counts[(int(payload.get("product_dealer_id", 0)), int(payload.get("version", 0)))] += 1
                if len(page) < 10_000:
                    return counts
                last = page[-1][0].decode()
                millis, seq = last.split("-")
                low = f"{millis}-{int(seq) + 1}"
        except Exception:  # noqa: BLE001
            return None

    def close(self) -> None:
        self.api.close()
        if self._engine is not None:
            self.engine.dispose()


def start_suite_stack(root: Path, devices: int) -> Harness:
    """The operator's stack (`start_operator_stack`, as `make up`) in `root`, its flow runs' services and
    deployments; this process's environment is the stack's shell from here on."""
    for variable in OUTSIDE_SERVICES:
        os.environ.pop(variable, None)
    os.environ.update(suite_environment(root, devices))
    from operations.settings import get_settings

    get_settings.cache_clear()
    settings = get_settings()
    shell = dict(os.environ)  # the operator's shell: the services' addresses are exported into ours below
    from deployments.stack import start_operator_stack

    try:
        try:
            stack = start_operator_stack(settings, worker_query_seconds=1.0)
        except TypeError:  # a registry without the worker's polling interval
            stack = start_operator_stack(settings)
    except BaseException:
        from deployments.stack import stop_local_stack

        stop_local_stack(settings)
        raise
    from blocks.turnstile_device import TurnstileDevice

    urls = tuple(TurnstileDevice.load(name).base_url for name in stack.emulated_turnstiles)
    env = shell
    api = Api(base_url=stack.api_url, timeout=30)
    activate_relay_schedules(api)
    return Harness(root=root, env=env, api=api, database_url=stack.database_url, redis_url=stack.redis_url,
                   market_url=stack.marketplace_api_url, turnstiles=stack.emulated_turnstiles,
                   turnstile_urls=urls, settings=settings)


def activate_relay_schedules(api: Api) -> list[str]:
    """Schedules of the deployments of an outbox relay flow (a flow named '*outbox*') activated, as production
    runs them; the stack keeps every other schedule paused (STACK_SCHEDULES=off), so that no scheduled sync
    or generation disturbs the faults. Returns the deployments switched on."""
    flows = {f["id"]: f["name"] for f in api.post("/flows/filter", json={}).json()}
    switched = []
    for deployment in api.post("/deployments/filter", json={}).json():
        if "outbox" not in flows.get(deployment["flow_id"], ""):
            continue
        for schedule in deployment.get("schedules", []):
            if not schedule.get("active"):
                api.patch(f"/deployments/{deployment['id']}/schedules/{schedule['id']}", json={"active": True})
        switched.append(f"{flows[deployment['flow_id']]}/{deployment['name']}")
    if switched:
        log(f"outbox relay deployments, schedules active: {', '.join(switched)}")
    return switched


def stop_suite_stack(harness: Harness) -> None:
    """The stack's services stopped in reverse order, then any process left of the suite's own flow runs."""
    from deployments.stack import stop_local_stack

    try:
        stop_local_stack(harness.settings)
    except Exception as exc:  # noqa: BLE001
        log(f"stack down: {exc}")
    for run_id in harness.run_ids:
        for pid in harness.run_processes(run_id):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def poll(until: Callable[[], bool], timeout: float, every: float = 0.5) -> float | None:
    """Seconds until `until()` held, or None after `timeout`."""
    started = time.monotonic()
    while True:
        if until():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            return None
        time.sleep(every)


def kill(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except OSError:
        return False


def alive(pids: Iterable[int]) -> list[int]:
    """The pids that still run (zombies, which only wait for their parent to reap them, left out)."""
    running = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            running.append(pid)
    return running
