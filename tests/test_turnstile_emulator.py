"""The Control iD turnstile emulator over real HTTP: sessions and their URL encoding, the object calls with
their SQLite errors and all-or-nothing writes, where/IN/paging, cascades, the per-device concurrency cap,
faults (503s, hangs, writes whose answer is lost), devices going down and back up, and the detached process."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Iterator

import httpx
import pytest

from emulators.controlid import (
    RUNTIME_KNOBS,
    EmulatorConfig,
    EmulatorControl,
    RunningEmulator,
    run_in_thread,
    running_emulator_process,
    start_emulator_process,
    stop_emulator_process,
)

CONFIG = EmulatorConfig(devices=3)
DEFAULT_KNOBS = {name: value for name, value in CONFIG.model_dump(mode="json").items() if name in RUNTIME_KNOBS}
INVALID_SESSION = {"error": "Invalid session"}


@pytest.fixture(scope="module")
def emulator() -> Iterator[RunningEmulator]:
    with run_in_thread(CONFIG) as running:
        yield running


@pytest.fixture
def control(emulator: RunningEmulator) -> Iterator[EmulatorControl]:
    with emulator.control as ctrl:
        yield ctrl
        ctrl.clear_faults()
        ctrl.configure(**DEFAULT_KNOBS)
        for device in ctrl.devices():
            if device["down"]:
                ctrl.set_down(device["index"], False)
        ctrl.wipe()
        ctrl.expire_sessions()
        ctrl.reset_stats()


class Device:
    """A logged-in client of one device: `call("load_objects", object="users")` posts JSON with the session."""

    def __init__(self, base_url: str, timeout: float = 10):
        self.http = httpx.Client(base_url=base_url, timeout=timeout)
        self.session = login(self.http)

    def post(self, name: str, **body: Any) -> httpx.Response:
        return self.http.post(f"/{name}.fcgi", params={"session": self.session}, json=body)

    def call(self, name: str, **body: Any) -> Any:
        response = self.post(name, **body)
        assert response.status_code == 200, response.text
        return response.json()


def login(http: httpx.Client, password: str = "admin") -> str:
    response = http.post("/login.fcgi", json={"login": "admin", "password": password})
    assert response.status_code == 200, response.text
    return response.json()["session"]


@pytest.fixture
def device(emulator: RunningEmulator, control: EmulatorControl) -> Iterator[Device]:
    client = Device(emulator.base_urls[0])
    yield client
    client.http.close()


def users(*ids: int) -> list[dict[str, Any]]:
    return [{"id": i, "registration": f"{i:04d}", "name": f"User {i}"} for i in ids]


# -- sessions ------------------------------------------------------------------------------------------------
def test_login_and_url_encoded_session_tokens(emulator: RunningEmulator, control: EmulatorControl) -> None:
    with httpx.Client(base_url=emulator.base_urls[0], timeout=10) as http:
        wrong = http.post("/login.fcgi", json={"login": "admin", "password": "nope"})
        assert wrong.status_code == 401 and wrong.json() == {"error": "Invalid login or password"}
        token = login(http)
        while not ("+" in token and "/" in token):  # about one token in ten holds both
            token = login(http)
        encoded = http.post("/load_objects.fcgi", params={"session": token}, json={"object": "users"})
        assert encoded.status_code == 200 and encoded.json() == {"users": []}
        raw = http.post(f"/load_objects.fcgi?session={token}", json={"object": "users"})  # '+' arrives as ' '
        assert raw.status_code == 401 and raw.json() == INVALID_SESSION
    with httpx.Client(base_url=emulator.base_urls[1], timeout=10) as other:  # sessions belong to one device
        response = other.post("/load_objects.fcgi", params={"session": token}, json={"object": "users"})
        assert response.status_code == 401


def test_unknown_expired_and_ended_sessions(emulator: RunningEmulator, control: EmulatorControl) -> None:
    client = Device(emulator.base_urls[0])
    http = client.http
    for params in ({}, {"session": "bm90IGEgc2Vzc2lvbg=="}):
        response = http.post("/load_objects.fcgi", params=params, json={"object": "users"})
        assert response.status_code == 401 and response.json() == INVALID_SESSION

    def valid(session: str) -> bool:
        response = http.post("/session_is_valid.fcgi", params={"session": session})  # no body needed
        assert response.status_code == 200
        return response.json()["session_is_valid"]

    assert valid(client.session) and not valid("unknown")
    assert client.call("logout") == {}
    assert not valid(client.session)
    assert client.post("load_objects", object="users").json() == INVALID_SESSION

    control.configure(session_ttl_seconds=0.3)
    client.session = login(http)
    for _ in range(3):  # every use restarts the idle clock
        time.sleep(0.15)
        assert client.post("load_objects", object="users").status_code == 200
    time.sleep(0.4)
    assert client.post("load_objects", object="users").status_code == 401

    control.configure(session_ttl_seconds=600)
    client.session = login(http)
    assert control.expire_sessions(device=0) >= 1
    assert not valid(client.session)
    http.close()


# -- writes --------------------------------------------------------------------------------------------------
def test_create_users_unique_and_field_errors(device: Device, control: EmulatorControl) -> None:
    assert device.call("create_objects", object="users", values=users(5, 3)) == {"ids": [5, 3]}
    again = device.post("create_objects", object="users", values=users(7, 3))
    assert again.status_code == 400
    assert again.json() == {"error": "UNIQUE constraint failed: users.id", "code": 1}

    bad_values = [
        ([{"id": 9, "registration": None, "name": "X"}], "users.registration"),
        ([{"id": 9, "registration": 123, "name": "X"}], "users.registration"),
        ([{"id": 9, "registration": "9"}], "users.name"),
        ([{"id": 0, "registration": "9", "name": "X"}], "users.id"),
        ([{"id": 9, "registration": "9", "name": "X", "color": "red"}], "color"),
    ]
    for values, field in bad_values:
        response = device.post("create_objects", object="users", values=values)
        assert response.status_code == 400 and field in response.json()["error"], (values, response.text)
    extra = {"id": 11, "registration": "", "name": "Y", "begin_time": 1}
    mixed = device.post("create_objects", object="users", values=[*users(10), extra])
    assert mixed.status_code == 400 and "same fields" in mixed.json()["error"]
    assert device.post("create_objects", object="doors", values=[]).json() == {"error": "no such table: doors",
                                                                                "code": 1}
    for value in (-1, 2**64, 1.5, "42"):
        response = device.post("create_objects", object="cards", values=[{"value": value, "user_id": 5}])
        assert response.status_code == 400 and "cards.value" in response.json()["error"], response.text
    assert device.call("create_objects", object="cards", values=[{"value": 2**64 - 1, "user_id": 5}])["ids"] == [1]

    optional = {"id": 12, "registration": "", "name": "Z", "begin_time": 1_700_000_000, "end_time": 1_800_000_000}
    device.call("create_objects", object="users", values=[optional])
    assert [u["id"] for u in control.users(0)] == [3, 5, 12]
    assert control.users(0)[2] == {**optional, "cards": [], "groups": []}
    assert control.users(1) == []  # every device has its own tables


def test_a_refused_batch_writes_nothing(device: Device, control: EmulatorControl) -> None:
    device.call("create_objects", object="users", values=users(1, 2))
    device.call("create_objects", object="cards", values=[{"value": 100, "user_id": 1}])
    duplicate = device.post(
        "create_objects", object="cards", values=[{"value": 101, "user_id": 1}, {"value": 100, "user_id": 2}]
    )
    assert duplicate.json() == {"error": "UNIQUE constraint failed: cards.value", "code": 1}
    in_batch = device.post(
        "create_objects", object="cards", values=[{"value": 102, "user_id": 1}, {"value": 102, "user_id": 2}]
    )
    assert in_batch.json()["error"] == "UNIQUE constraint failed: cards.value"
    orphan = device.post(
        "create_objects", object="cards", values=[{"value": 103, "user_id": 2}, {"value": 104, "user_id": 99}]
    )
    assert orphan.status_code == 400 and orphan.json() == {"error": "FOREIGN KEY constraint failed", "code": 1}
    unknown_group = device.post(
        "create_objects", object="user_groups", values=[{"user_id": 1, "group_id": 2}, {"user_id": 2, "group_id": 9}]
    )
    assert unknown_group.json()["error"] == "FOREIGN KEY constraint failed"
    assert device.post("create_objects", object="cards", values=[{"value": 105}]).json()["error"] == (
        "NOT NULL constraint failed: cards.user_id"
    )
    assert [(u["id"], u["cards"], u["groups"]) for u in control.users(0)] == [(1, [100], []), (2, [], [])]
    stats = control.stats(0)
    assert stats["write_calls"] == 7 and stats["objects_written"] == 3


def test_create_or_modify_is_idempotent(device: Device, control: EmulatorControl) -> None:
    batch = {
        "users": [*users(1, 2), {"id": 3, "registration": "", "name": "No registration"}],
        "cards": [{"value": 10, "user_id": 1}, {"value": 20, "user_id": 2}],
        "user_groups": [{"user_id": 1, "group_id": 2}, {"user_id": 2, "group_id": 3}],
    }
    first = [device.call("create_or_modify_objects", object=obj, values=values) for obj, values in batch.items()]
    state = control.users(0)
    second = [device.call("create_or_modify_objects", object=obj, values=values) for obj, values in batch.items()]
    assert first == [{"changes": 3}, {"changes": 2}, {"changes": 2}]
    assert second == [{"changes": 0}] * 3 and control.users(0) == state

    cards_before = device.call("load_objects", object="cards")["cards"]
    moved = device.call("create_or_modify_objects", object="cards", values=[{"value": 10, "user_id": 3}])
    renamed = device.call("create_or_modify_objects", object="users", values=[{"id": 2, "name": "Renamed"}])
    assert moved == renamed == {"changes": 1}
    cards_after = device.call("load_objects", object="cards")["cards"]
    assert cards_after[0] == {**cards_before[0], "user_id": 3}  # the same card (id), reassigned
    assert device.call("load_objects", object="users", where={"users": {"id": 2}})["users"] == [
        {"id": 2, "registration": "0002", "name": "Renamed"}
    ]
    refused = device.post(
        "create_or_modify_objects", object="cards", values=[{"value": 30, "user_id": 1}, {"value": 20, "user_id": 99}]
    )
    assert refused.json() == {"error": "FOREIGN KEY constraint failed", "code": 1}
    new_user = device.post("create_or_modify_objects", object="users", values=[{"id": 4, "name": "No registration"}])
    assert new_user.json()["error"] == "NOT NULL constraint failed: users.registration"
    assert [(u["id"], u["cards"]) for u in control.users(0)] == [(1, []), (2, [20]), (3, [10])]


# -- reads ---------------------------------------------------------------------------------------------------
def test_load_objects_where_in_lists_and_paging(device: Device) -> None:
    ids = [17, 3, 29, 8, 1, 22, 12, 30, 5, 14]
    device.call("create_objects", object="users", values=users(*ids))
    device.call("create_objects", object="cards", values=[{"value": 1000 + i, "user_id": i} for i in (8, 3)])
    device.call("create_objects", object="user_groups", values=[{"user_id": 8, "group_id": 3}, {"user_id": 3,
                                                                                                "group_id": 1}])
    everyone = device.call("load_objects", object="users")["users"]
    assert [u["id"] for u in everyone] == sorted(ids)  # ordered by id
    wanted = device.call("load_objects", object="users", where={"users": {"registration": ["0029", "0003", "9999"]}})
    assert wanted == {"users": [{"id": 3, "registration": "0003", "name": "User 3"},
                                {"id": 29, "registration": "0029", "name": "User 29"}]}
    assert device.call("load_objects", object="users", where={"users": {"id": 8}})["users"][0]["name"] == "User 8"
    assert device.call("load_objects", object="users", where={"users": {"id": []}}) == {"users": []}

    many = [f"{i:04d}" for i in range(999)]
    assert len(device.call("load_objects", object="users", where={"users": {"registration": many}})["users"]) == 10
    too_many = device.post("load_objects", object="users", where={"users": {"registration": [*many, "x"]}})
    assert too_many.status_code == 400 and too_many.json() == {"error": "too many SQL variables", "code": 1}
    wrong_type = device.post("load_objects", object="users", where={"users": {"id": ["8"]}})
    assert wrong_type.status_code == 400 and "users.id" in wrong_type.json()["error"]

    pages = [device.call("load_objects", object="users", limit=4, offset=offset)["users"] for offset in (0, 4, 8, 12)]
    assert [[u["id"] for u in page] for page in pages] == [[1, 3, 5, 8], [12, 14, 17, 22], [29, 30], []]
    assert device.call("load_objects", object="cards") == {
        "cards": [{"id": 1, "value": 1008, "user_id": 8}, {"id": 2, "value": 1003, "user_id": 3}]
    }
    assert device.call("load_objects", object="user_groups", where={"user_groups": {"user_id": [3, 8]}}) == {
        "user_groups": [{"user_id": 3, "group_id": 1}, {"user_id": 8, "group_id": 3}]
    }
    assert device.call("load_objects", object="groups")["groups"] == [
        {"id": 1, "name": "Default"}, {"id": 2, "name": "Staff"}, {"id": 3, "name": "Visitors"}
    ]


def test_system_information_and_wipes(emulator: RunningEmulator, device: Device, control: EmulatorControl) -> None:
    """A factory reset empties the device and keeps its identity; a replaced unit answers a new serial and device
    id and knows no session; every device has its own identity."""
    info = device.call("system_information")
    assert {"serial", "device_id", "version", "network", "uptime", "time"} <= set(info)
    assert isinstance(info["serial"], str) and isinstance(info["device_id"], int) and info["network"]["mac"]
    assert info == {**device.call("system_information"), "time": info["time"], "uptime": info["uptime"]}
    with httpx.Client(base_url=emulator.base_urls[1], timeout=10) as other:
        second = other.post("/system_information.fcgi", params={"session": login(other)})
        assert second.status_code == 200 and second.json()["serial"] != info["serial"]
    assert device.post("system_information").status_code == 200
    unauthenticated = device.http.post("/system_information.fcgi")
    assert unauthenticated.status_code == 401

    device.call("create_objects", object="users", values=users(1, 2))
    reset = control.wipe(0)["devices"][0]
    assert reset["users"] == 2 and (reset["serial"], reset["device_id"]) == (info["serial"], info["device_id"])
    assert device.call("load_objects", object="users") == {"users": []}
    assert device.call("system_information")["serial"] == info["serial"]

    device.call("create_objects", object="users", values=users(3))
    replaced = control.wipe(0, replace=True)["devices"][0]
    assert replaced["users"] == 1 and replaced["serial"] != info["serial"] and replaced["device_id"] != info["device_id"]
    assert device.post("load_objects", object="users").status_code == 401  # a new unit: the old session is gone
    device.session = login(device.http)
    new = device.call("system_information")
    assert (new["serial"], new["device_id"]) == (replaced["serial"], replaced["device_id"])
    assert device.call("load_objects", object="users") == {"users": []}


def test_modify_and_cascading_destroy(device: Device, control: EmulatorControl) -> None:
    device.call("create_objects", object="users", values=users(1, 2, 3))
    device.call("create_objects", object="cards", values=[{"value": 11, "user_id": 1}, {"value": 12, "user_id": 1},
                                                         {"value": 21, "user_id": 2}])
    device.call("create_objects", object="user_groups", values=[{"user_id": 1, "group_id": 2}, {"user_id": 2,
                                                                                                "group_id": 2}])
    for values, ids, changes in (({"name": "X"}, 2, 1), ({"name": "X"}, 9, 0), ({"begin_time": 10}, [1, 3], 2)):
        answer = device.call("modify_objects", object="users", values=values, where={"users": {"id": ids}})
        assert answer == {"changes": changes}
    taken = device.post("modify_objects", object="cards", values={"value": 11}, where={"cards": {"value": 21}})
    assert taken.json() == {"error": "UNIQUE constraint failed: cards.value", "code": 1}
    assert device.post("modify_objects", object="users", values={"registration": None},
                       where={"users": {"id": 1}}).json()["error"] == "NOT NULL constraint failed: users.registration"

    assert device.call("destroy_objects", object="users", where={"users": {"id": 1}}) == {"changes": 1}
    assert device.call("load_objects", object="cards")["cards"] == [{"id": 3, "value": 21, "user_id": 2}]
    assert device.call("load_objects", object="user_groups")["user_groups"] == [{"user_id": 2, "group_id": 2}]
    assert control.users(0) == [
        {"id": 2, "registration": "0002", "name": "X", "cards": [21], "groups": [2]},
        {"id": 3, "registration": "0003", "name": "User 3", "begin_time": 10, "cards": [], "groups": []},
    ]
    assert device.call("destroy_objects", object="cards", where={"cards": {"value": [21, 99]}}) == {"changes": 1}
    assert device.call("destroy_objects", object="users") == {"changes": 2}  # no where: everything
    assert control.users(0) == [] and device.call("load_objects", object="user_groups") == {"user_groups": []}



def test_links_are_destroyed_by_group_and_users_leaving_the_people(device: Device, control: EmulatorControl) -> None:
    device.call("create_objects", object="users", values=users(1, 2, 3))
    device.call("create_objects", object="user_groups", values=[{"user_id": u, "group_id": g}
                                                                for u in (1, 2, 3) for g in (1, 2)])
    answer = device.call("destroy_objects", object="user_groups",
                         where={"user_groups": {"group_id": 1, "user_id": [1, 3, 9]}})
    assert answer == {"changes": 2}
    assert [(u["id"], u["groups"]) for u in control.users(0)] == [(1, [2]), (2, [1, 2]), (3, [2])]

# -- the device's capacity -----------------------------------------------------------------------------------
def test_concurrency_cap_serializes_calls(emulator: RunningEmulator, control: EmulatorControl) -> None:
    session = Device(emulator.base_urls[0]).session
    control.configure(max_concurrent_requests=2, latency_ms=200)
    control.reset_stats()

    async def burst() -> float:
        async with httpx.AsyncClient(base_url=emulator.base_urls[0], timeout=10) as client:
            started = time.perf_counter()
            answers = await asyncio.gather(
                *[client.post("/load_objects.fcgi", params={"session": session}, json={"object": "users"})
                  for _ in range(6)]
            )
            assert all(a.status_code == 200 for a in answers)
            return time.perf_counter() - started

    elapsed = asyncio.run(burst())
    assert 0.59 <= elapsed < 1.2, elapsed  # three waves of two (one at a time would take 1.2 s)
    stats = control.stats(0)
    assert stats["peak_served"] == 2 and stats["peak_in_flight"] == 6
    assert stats["in_flight"] == 0 and stats["routes"]["/load_objects.fcgi"] == {"200": 6}


# -- faults --------------------------------------------------------------------------------------------------
def test_503_shares_and_status_rules_answer_before_writing(device: Device, control: EmulatorControl) -> None:
    control.configure(error_rate_5xx=1.0)
    busy = device.post("create_objects", object="users", values=users(1))
    assert busy.status_code == 503 and busy.json() == {"error": "busy"}
    assert control.users(0) == []
    control.configure(error_rate_5xx=0.5)
    codes = [device.post("load_objects", object="users").status_code for _ in range(40)]
    assert 5 < codes.count(503) < 35 and codes.count(503) + codes.count(200) == 40
    control.configure(error_rate_5xx=0)

    control.add_fault(path="/create_objects.fcgi", status=500, skip=1, times=2, device=0)
    answers = [device.post("create_objects", object="users", values=users(i)).status_code for i in (1, 2, 3, 4)]
    assert answers == [200, 500, 500, 200]
    assert [u["id"] for u in control.users(0)] == [1, 4]
    assert control.faults()[0]["fired"] == 2 and control.stats(0)["faults_injected"] == 43 - codes.count(200)


def test_a_hang_trips_the_client_timeout_and_ends_with_the_client(device: Device, control: EmulatorControl) -> None:
    control.configure(timeout_hang_seconds=20)
    control.add_fault(kind="hang", path="/load_objects.fcgi")
    with pytest.raises(httpx.ReadTimeout):
        device.http.post("/load_objects.fcgi", params={"session": device.session}, json={"object": "users"},
                         timeout=0.3)
    assert device.call("load_objects", object="users") == {"users": []}  # the device is not held by the hang
    deadline = time.monotonic() + 2
    while control.stats(0)["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = control.stats(0)
    assert stats["in_flight"] == 0 and stats["routes"]["/load_objects.fcgi"] == {"hang": 1, "200": 1}


def test_a_write_applied_then_dropped(device: Device, control: EmulatorControl) -> None:
    control.add_fault(kind="drop_after_commit", device=0)  # no path: the next write call
    assert device.call("load_objects", object="users") == {"users": []}  # reads are not dropped
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        device.post("create_objects", object="users", values=users(7))
    assert [u["id"] for u in control.users(0)] == [7]  # applied all the same
    assert device.post("create_objects", object="users", values=users(7)).json()["error"] == (
        "UNIQUE constraint failed: users.id"
    )
    control.configure(drop_after_commit_rate=1.0)
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        device.post("create_or_modify_objects", object="users", values=users(8))
    assert [u["id"] for u in control.users(0)] == [7, 8]
    stats = control.stats(0)
    assert stats["dropped"] == 2 and stats["by_status"]["dropped"] == 2 and stats["objects_written"] == 2


def test_a_device_down_refuses_connections_and_comes_back(
    emulator: RunningEmulator, control: EmulatorControl
) -> None:
    client = Device(emulator.base_urls[1])
    client.call("create_objects", object="users", values=users(1))
    assert control.set_down(1)["down"] is True
    with pytest.raises(httpx.ConnectError):
        client.post("load_objects", object="users")
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"{emulator.base_urls[1]}/_emulator/health")
    assert [d["down"] for d in control.devices()] == [False, True, False]
    assert control.set_down(1, False)["port"] == emulator.ports[1]
    assert client.call("load_objects", object="users")["users"][0]["id"] == 1  # data and session survived

    with EmulatorControl(emulator.base_urls[2]) as own:  # asked through the device itself
        assert own.set_down(2)["down"] is True
    with pytest.raises(httpx.ConnectError):
        httpx.post(f"{emulator.base_urls[2]}/login.fcgi", json={"login": "admin", "password": "admin"})
    control.set_down(1)
    with pytest.raises(RuntimeError, match="409"):
        control.set_down(0)  # the control API needs one device up
    control.set_down(1, False)
    control.set_down(2, False)
    assert all(httpx.get(f"{url}/_emulator/health").status_code == 200 for url in emulator.base_urls)
    client.http.close()


def test_request_shape_errors(device: Device, control: EmulatorControl) -> None:
    http = device.http
    too_large = http.post("/create_objects.fcgi", params={"session": device.session},
                          content=b'{"object":"users","values":[],"pad":"' + b"x" * 2_000_000 + b'"}',
                          headers={"Content-Type": "application/json"})
    assert too_large.status_code == 413 and too_large.json() == {"error": "request too large"}
    get = http.get("/load_objects.fcgi", params={"session": device.session})
    assert get.status_code == 405 and "error" in get.json()
    form = http.post("/load_objects.fcgi", params={"session": device.session}, data={"object": "users"})
    assert form.status_code == 400 and "application/json" in form.json()["error"]
    broken = http.post("/load_objects.fcgi", params={"session": device.session}, content=b"{",
                       headers={"Content-Type": "application/json"})
    assert broken.status_code == 400 and "invalid JSON" in broken.json()["error"]
    assert http.post("/nothing.fcgi", json={}).status_code == 404


# -- the detached process ------------------------------------------------------------------------------------
def test_detached_process_is_reused_and_stopped(tmp_path) -> None:
    first = start_emulator_process(EmulatorConfig(devices=2, latency_ms=1), tmp_path)
    try:
        assert first.started and len(first.base_urls) == 2
        again = start_emulator_process(EmulatorConfig(devices=4), tmp_path)
        assert not again.started and again.pid == first.pid and again.ports == first.ports
        assert again.config.devices == 2  # a reused process keeps its devices
        with again.control as ctrl:
            assert [d["port"] for d in ctrl.devices()] == first.ports
        with httpx.Client(base_url=first.base_urls[1]) as http:
            assert login(http)
        assert "device 1 on" in (tmp_path / "emulator.log").read_text()
    finally:
        assert stop_emulator_process(tmp_path)
    assert running_emulator_process(tmp_path) is None
    assert not stop_emulator_process(tmp_path)
