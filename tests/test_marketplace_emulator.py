"""The marketplace API emulator over real HTTP: OAuth, resource auth, order and item searches with their caps,
scans and scroll expiry, multigets, faults, latency, data mutation, determinism and the detached process."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

import httpx
import pytest

from emulators.marketplace import (
    INVALID_GRANT_TEXT,
    RUNTIME_KNOBS,
    EmulatorConfig,
    EmulatorControl,
    RunningEmulator,
    SellerSpec,
    run_in_thread,
    running_emulator_process,
    start_emulator_process,
    stop_emulator_process,
)

SELLER_A, SELLER_DENSE, SELLER_BIG, SELLER_SPARE = 100000001, 100000002, 100000003, 100000004
CONFIG = EmulatorConfig(
    sellers=4,
    orders_per_seller=400,
    items_per_seller=150,
    seller_overrides={
        SELLER_DENSE: SellerSpec(orders=600, orders_window_hours=48),  # ~12 orders an hour
        SELLER_BIG: SellerSpec(items=1200),
    },
)
DEFAULT_KNOBS = {name: getattr(CONFIG, name) for name in RUNTIME_KNOBS}
INVALID_TOKEN = {"message": "invalid_token", "error": "not_found", "status": 401, "cause": []}
FORBIDDEN = {"message": "caller.id does not match", "error": "forbidden", "status": 403, "cause": []}
INVALID_GRANT = {"error": "invalid_grant", "error_description": INVALID_GRANT_TEXT, "status": 400, "cause": []}
SCROLL_EXPIRED = {"message": "scroll_id expired or invalid", "error": "invalid_scroll_id", "status": 400, "cause": []}
EVERYTHING = {"order.date_last_updated.from": "2000-01-01T00:00:00.000-03:00"}


@pytest.fixture(scope="module")
def emulator() -> Iterator[RunningEmulator]:
    with run_in_thread(CONFIG) as running:
        yield running


@pytest.fixture
def control(emulator: RunningEmulator) -> Iterator[EmulatorControl]:
    with EmulatorControl(emulator.base_url) as ctrl:
        ctrl.reset_stats()
        yield ctrl
        ctrl.clear_faults()
        ctrl.configure(**DEFAULT_KNOBS)


@pytest.fixture
def http(emulator: RunningEmulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=emulator.base_url, timeout=10) as client:
        yield client


def token_request(http: httpx.Client, **form: str) -> httpx.Response:
    return http.post(
        "/oauth/token", data={"client_id": CONFIG.client_id, "client_secret": CONFIG.client_secret, **form}
    )


def login(control: EmulatorControl, http: httpx.Client, seller_id: int) -> dict[str, Any]:
    response = token_request(
        http, grant_type="authorization_code", code=control.authorize(seller_id), redirect_uri=CONFIG.redirect_uri
    )
    assert response.status_code == 200, response.text
    return response.json()


def auth(grant: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {grant['access_token']}"}


def search_orders(http: httpx.Client, grant: dict[str, Any], **params: Any) -> httpx.Response:
    return http.get("/orders/search", params={"seller": grant["user_id"], **params}, headers=auth(grant))


def parse(value: str) -> datetime:
    return datetime.fromisoformat(value)


def hour_floor(value: datetime) -> datetime:
    utc = value.astimezone(timezone.utc)
    return utc.replace(minute=0, second=0, microsecond=0)


# -- OAuth -----------------------------------------------------------------------------------------------
def test_code_exchange_and_single_use_rotating_refresh_tokens(control: EmulatorControl, http: httpx.Client) -> None:
    code = control.authorize(SELLER_A)
    first = token_request(http, grant_type="authorization_code", code=code, redirect_uri=CONFIG.redirect_uri)
    assert first.status_code == 200
    grant = first.json()
    assert grant["token_type"] == "Bearer" and grant["expires_in"] == 21600 and grant["user_id"] == SELLER_A
    assert grant["scope"] == "offline_access read write" and grant["access_token"].startswith("APP_USR-")
    again = token_request(http, grant_type="authorization_code", code=code, redirect_uri=CONFIG.redirect_uri)
    assert (again.status_code, again.json()) == (400, INVALID_GRANT)  # codes are single use

    refreshed = token_request(http, grant_type="refresh_token", refresh_token=grant["refresh_token"])
    assert refreshed.status_code == 200
    new = refreshed.json()
    assert new["refresh_token"] != grant["refresh_token"] and new["access_token"] != grant["access_token"]
    reused = token_request(http, grant_type="refresh_token", refresh_token=grant["refresh_token"])
    assert (reused.status_code, reused.json()) == (400, INVALID_GRANT)
    # the previous access token lives until its own expiry; the new refresh token works once
    assert search_orders(http, grant, limit=1).status_code == 200
    assert token_request(http, grant_type="refresh_token", refresh_token=new["refresh_token"]).status_code == 200

    stats = control.stats()
    assert stats["refreshes"] == 2 and stats["token_grants"]["authorization_code"] == 1
    assert stats["invalid_grants"] == 2 and stats["routes"]["/oauth/token"] == {"200": 3, "400": 2}


def test_legacy_error_format_puts_the_text_under_message(control: EmulatorControl, http: httpx.Client) -> None:
    grant = login(control, http, SELLER_A)
    assert token_request(http, grant_type="refresh_token", refresh_token=grant["refresh_token"]).status_code == 200
    control.configure(legacy_error_format=True)
    reused = token_request(http, grant_type="refresh_token", refresh_token=grant["refresh_token"])
    assert reused.json() == {"message": INVALID_GRANT_TEXT, "error": "invalid_grant", "status": 400, "cause": []}


def test_oauth_refuses_query_parameters_wrong_clients_and_other_bodies(
    control: EmulatorControl, http: httpx.Client
) -> None:
    grant = login(control, http, SELLER_A)
    in_url = http.post(
        "/oauth/token",
        params={
            "grant_type": "refresh_token", "client_id": CONFIG.client_id, "client_secret": CONFIG.client_secret,
            "refresh_token": grant["refresh_token"],
        },
    )
    assert in_url.status_code == 400
    assert in_url.json() == {
        "error": "invalid_request", "error_description": "parameters must be sent in the body", "status": 400,
        "cause": [],
    }
    wrong = http.post(
        "/oauth/token",
        data={"grant_type": "refresh_token", "client_id": CONFIG.client_id, "client_secret": "nope",
              "refresh_token": grant["refresh_token"]},
    )
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid_client"
    as_json = http.post(
        "/oauth/token",
        json={"grant_type": "refresh_token", "client_id": CONFIG.client_id, "client_secret": CONFIG.client_secret,
              "refresh_token": grant["refresh_token"]},
    )
    assert as_json.status_code == 400 and as_json.json()["error"] == "invalid_request"
    other_uri = token_request(
        http, grant_type="authorization_code", code=control.authorize(SELLER_A), redirect_uri="http://evil/cb"
    )
    assert other_uri.status_code == 400 and other_uri.json()["error"] == "invalid_grant"
    # none of the refusals consumed the refresh token
    assert token_request(http, grant_type="refresh_token", refresh_token=grant["refresh_token"]).status_code == 200


def test_revoked_authorization_kills_the_refresh_token(control: EmulatorControl, http: httpx.Client) -> None:
    grant = login(control, http, SELLER_SPARE)
    assert control.revoke(SELLER_SPARE)["refresh_tokens"] == 1
    refused = token_request(http, grant_type="refresh_token", refresh_token=grant["refresh_token"])
    assert (refused.status_code, refused.json()) == (400, INVALID_GRANT)
    assert search_orders(http, grant, limit=1).status_code == 401
    assert login(control, http, SELLER_SPARE)["user_id"] == SELLER_SPARE  # the owner can authorize again


def test_authorization_page_redirects_with_a_code(control: EmulatorControl, http: httpx.Client) -> None:
    response = http.get(
        "/authorization",
        params={"response_type": "code", "client_id": CONFIG.client_id, "redirect_uri": CONFIG.redirect_uri,
                "state": "xyz", "seller_id": SELLER_SPARE},
    )
    assert response.status_code == 302
    location = httpx.URL(response.headers["location"])
    assert str(location).startswith(CONFIG.redirect_uri) and location.params["state"] == "xyz"
    grant = token_request(
        http, grant_type="authorization_code", code=location.params["code"], redirect_uri=CONFIG.redirect_uri
    ).json()
    assert grant["user_id"] == SELLER_SPARE


# -- resource auth ---------------------------------------------------------------------------------------
def test_resource_auth_401_and_403(control: EmulatorControl, http: httpx.Client) -> None:
    grant = login(control, http, SELLER_A)
    missing = http.get("/orders/search", params={"seller": SELLER_A})
    assert (missing.status_code, missing.json()) == (401, INVALID_TOKEN)
    unknown = http.get("/orders/search", params={"seller": SELLER_A}, headers={"Authorization": "Bearer APP_USR-x"})
    assert (unknown.status_code, unknown.json()) == (401, INVALID_TOKEN)
    in_url = http.get("/orders/search", params={"seller": SELLER_A, "access_token": grant["access_token"]})
    assert (in_url.status_code, in_url.json()) == (401, INVALID_TOKEN)
    assert http.get("/items", params={"ids": "MLB1", "access_token": grant["access_token"]}).status_code == 401

    foreign = http.get("/orders/search", params={"seller": SELLER_BIG}, headers=auth(grant))
    assert (foreign.status_code, foreign.json()) == (403, FORBIDDEN)
    foreign_items = http.get(f"/users/{SELLER_BIG}/items/search", headers=auth(grant))
    assert (foreign_items.status_code, foreign_items.json()) == (403, FORBIDDEN)

    other = login(control, http, SELLER_BIG)
    assert control.expire_tokens(SELLER_A) >= 1
    expired = search_orders(http, grant, limit=1)
    assert (expired.status_code, expired.json()) == (401, INVALID_TOKEN)
    assert search_orders(http, other, limit=1).status_code == 200  # only that seller's tokens expired


def test_access_tokens_expire_after_their_ttl(control: EmulatorControl, http: httpx.Client) -> None:
    control.configure(token_ttl_seconds=1)
    grant = login(control, http, SELLER_A)
    assert grant["expires_in"] == 1
    assert search_orders(http, grant, limit=1).status_code == 200
    time.sleep(1.1)
    assert search_orders(http, grant, limit=1).status_code == 401
    refreshed = token_request(http, grant_type="refresh_token", refresh_token=grant["refresh_token"]).json()
    assert search_orders(http, refreshed, limit=1).status_code == 200


# -- orders ----------------------------------------------------------------------------------------------
def test_order_search_truncates_to_the_hour_and_sorts_by_date_closed(
    control: EmulatorControl, http: httpx.Client
) -> None:
    grant = login(control, http, SELLER_DENSE)
    window_start = parse(next(s for s in control.sellers() if s["seller_id"] == SELLER_DENSE)["orders_window"]["from"])
    since = hour_floor(window_start) + timedelta(hours=10, minutes=37)
    until = since + timedelta(hours=6, minutes=20)
    lo, hi = hour_floor(since), hour_floor(until)
    truth = control.orders(SELLER_DENSE)
    expected = sorted(
        (o for o in truth if lo <= parse(o["date_last_updated"]) < hi),
        key=lambda o: (parse(o["date_closed"]), o["id"]),
    )
    # the truncation matters on both sides for this data
    assert any(parse(o["date_last_updated"]) < since for o in expected)
    assert any(hi <= parse(o["date_last_updated"]) < until for o in truth)
    assert len(expected) > 50

    got: list[dict] = []
    for offset in (0, 50):
        page = search_orders(
            http, grant, sort="date_asc", offset=offset, limit=50,
            **{"order.date_last_updated.from": since.astimezone(timezone(timedelta(hours=-3))).isoformat(),
               "order.date_last_updated.to": until.isoformat()},  # offsets are free: -03:00 and +00:00
        ).json()
        assert page["paging"] == {"total": len(expected), "offset": offset, "limit": 50}
        assert page["sort"] == {"id": "date_asc", "name": "Date ascending"}
        got += page["results"]
    assert [o["id"] for o in got] == [o["id"] for o in expected]
    by_update = sorted(got, key=lambda o: parse(o["date_last_updated"]))
    assert [o["id"] for o in by_update] != [o["id"] for o in got]  # date_asc is not by date_last_updated

    descending = search_orders(
        http, grant, sort="date_desc", limit=50,
        **{"order.date_last_updated.from": since.isoformat(), "order.date_last_updated.to": until.isoformat()},
    ).json()["results"]
    assert [o["id"] for o in descending] == [o["id"] for o in reversed(expected)][:50]

    order = got[0]
    assert {"id", "status", "status_detail", "date_created", "date_closed", "last_updated", "date_last_updated",
            "total_amount", "paid_amount", "currency_id", "order_items", "buyer", "shipping", "pack_id",
            "tags"} <= set(order)
    assert len(str(order["id"])) == 13 and order["currency_id"] == "BRL"
    assert parse(order["date_created"]) <= parse(order["date_closed"]) <= parse(order["date_last_updated"])
    assert order["order_items"][0]["item"]["id"].startswith("MLB")


def test_a_hot_hour_and_the_created_and_status_filters(control: EmulatorControl, http: httpx.Client) -> None:
    hot = control.hot_hour(SELLER_SPARE, 300, created_hours=5)
    try:
        grant = login(control, http, SELLER_SPARE)
        lo, hi = parse(hot["from"]), parse(hot["to"])
        in_hour = [o for o in control.orders(SELLER_SPARE) if lo <= parse(o["date_last_updated"]) < hi]
        assert len(in_hour) >= 300 and hi - lo == timedelta(hours=1)
        assert {hour_floor(parse(o["date_created"])) for o in in_hour} >= {lo - timedelta(hours=h) for h in (1, 2, 3)}
        window = {"order.date_last_updated.from": hot["from"], "order.date_last_updated.to": hot["to"], "limit": 1}
        cut = lo - timedelta(hours=2)
        created_since = (cut + timedelta(minutes=41)).isoformat()  # truncated down to the hour, like the other filter
        page = search_orders(http, grant, **window, **{"order.date_created.from": created_since}).json()
        assert page["paging"]["total"] == sum(parse(o["date_created"]) >= cut for o in in_hour)
        page = search_orders(http, grant, **window, **{"order.date_created.to": cut.isoformat()}).json()
        assert page["paging"]["total"] == sum(parse(o["date_created"]) < cut for o in in_hour)
        for status in ("paid", "cancelled"):
            page = search_orders(http, grant, **window, **{"order.status": status}).json()
            assert page["paging"]["total"] == sum(o["status"] == status for o in in_hour) > 0
        assert search_orders(http, grant, **window, **{"order.status": "shipped"}).status_code == 400
    finally:
        control.set_seller(SELLER_SPARE)  # the seller's own data again


def test_order_search_limits_offset_cap_and_empty_tail(control: EmulatorControl, http: httpx.Client) -> None:
    grant = login(control, http, SELLER_A)
    too_big = search_orders(http, grant, limit=51)
    assert too_big.status_code == 400 and too_big.json()["error"] == "bad_request"
    control.configure(max_offset=120)
    assert search_orders(http, grant, offset=70, limit=50, **EVERYTHING).status_code == 200
    capped = search_orders(http, grant, offset=71, limit=50, **EVERYTHING)
    assert capped.status_code == 400
    assert capped.json() == {
        "message": "offset + limit must be lower than 120", "error": "bad_request", "status": 400, "cause": []
    }
    control.configure(max_offset=10000)
    tail = search_orders(http, grant, offset=9950, limit=50, **EVERYTHING)
    assert tail.status_code == 200 and tail.json()["results"] == []
    assert search_orders(http, grant, **{"order.date_last_updated.from": "2026-01-01T00:00:00"}).status_code == 400


def test_total_underreport_lowers_paging_total_only(control: EmulatorControl, http: httpx.Client) -> None:
    grant = login(control, http, SELLER_A)
    real = len(control.orders(SELLER_A))
    control.configure(total_underreport=0.5)
    page = search_orders(http, grant, **EVERYTHING).json()
    assert page["paging"]["total"] == int(real * 0.5)
    beyond = search_orders(http, grant, offset=int(real * 0.5) + 10, limit=50, **EVERYTHING).json()
    assert len(beyond["results"]) == min(50, real - int(real * 0.5) - 10)


# -- items -----------------------------------------------------------------------------------------------
def test_item_offset_paging_stops_at_1000_and_scan_goes_beyond(control: EmulatorControl, http: httpx.Client) -> None:
    grant = login(control, http, SELLER_BIG)
    path = f"/users/{SELLER_BIG}/items/search"
    page = http.get(path, params={"offset": 900, "limit": 100}, headers=auth(grant)).json()
    assert page["seller_id"] == str(SELLER_BIG) and len(page["results"]) == 100
    assert page["paging"] == {"total": 1200, "offset": 900, "limit": 100}
    capped = http.get(path, params={"offset": 950, "limit": 100}, headers=auth(grant))
    assert capped.status_code == 400
    assert capped.json() == {"message": "Invalid limit and offset values", "error": "bad_request", "status": 400,
                             "cause": []}
    assert http.get(path, params={"limit": 101}, headers=auth(grant)).status_code == 400

    ids: list[str] = []
    params: dict[str, Any] = {"search_type": "scan", "limit": 100}
    calls = 0
    while True:
        batch = http.get(path, params=params, headers=auth(grant)).json()
        calls += 1
        if not batch["results"]:
            break
        ids += batch["results"]
        params["scroll_id"] = batch["scroll_id"]
    assert calls == 13 and ids == [item["id"] for item in control.items(SELLER_BIG)] and len(set(ids)) == 1200


def test_scroll_ids_expire_after_their_last_use_or_on_demand(control: EmulatorControl, http: httpx.Client) -> None:
    grant = login(control, http, SELLER_BIG)
    path = f"/users/{SELLER_BIG}/items/search"

    def scan(scroll_id: str | None = None) -> httpx.Response:
        params = {"search_type": "scan", "limit": 10, **({"scroll_id": scroll_id} if scroll_id else {})}
        return http.get(path, params=params, headers=auth(grant))

    scroll_id = scan().json()["scroll_id"]
    assert control.expire_scrolls() >= 1
    expired = scan(scroll_id)
    assert (expired.status_code, expired.json()) == (400, SCROLL_EXPIRED)

    control.configure(scroll_ttl_seconds=0.8)
    scroll_id = scan().json()["scroll_id"]
    for _ in range(3):  # 1.35 s after it was issued, alive: each use restarts the clock
        time.sleep(0.45)
        assert scan(scroll_id).status_code == 200
    time.sleep(1.0)
    expired = scan(scroll_id)
    assert (expired.status_code, expired.json()) == (400, SCROLL_EXPIRED)


def test_items_multiget_shapes(control: EmulatorControl, http: httpx.Client) -> None:
    grant = login(control, http, SELLER_A)
    own = control.items(SELLER_A)[:2]
    foreign = control.items(SELLER_BIG)[0]["id"]
    ids = [own[0]["id"], "MLB9999999999", own[1]["id"], foreign]
    answer = http.get("/items", params={"ids": ",".join(ids)}, headers=auth(grant)).json()
    assert [entry["code"] for entry in answer] == [200, 404, 200, 404]
    assert answer[0]["body"] == own[0] and answer[2]["body"] == own[1]
    assert answer[1]["body"] == {
        "message": "Item with id MLB9999999999 not found", "error": "not_found", "status": 404, "cause": []
    }
    assert {"id", "title", "price", "currency_id", "available_quantity", "sold_quantity", "status", "last_updated",
            "permalink", "seller_custom_field"} <= set(own[0])
    bulk = http.get("/items/bulk", params={"ids": ",".join(ids)}, headers=auth(grant)).json()
    assert [entry["status_code"] for entry in bulk] == [200, 404, 200, 404] and "code" not in bulk[0]
    too_many = http.get("/items", params={"ids": ",".join([own[0]["id"]] * 21)}, headers=auth(grant))
    assert too_many.status_code == 400
    picked = http.get("/items", params={"ids": own[0]["id"], "attributes": "price"}, headers=auth(grant)).json()
    assert picked[0]["body"] == {"id": own[0]["id"], "price": own[0]["price"]}


# -- faults and latency ----------------------------------------------------------------------------------
def test_fault_rules_skip_then_fail_then_pass(control: EmulatorControl, http: httpx.Client) -> None:
    grant_a, grant_big = login(control, http, SELLER_A), login(control, http, SELLER_BIG)
    control.add_fault("/orders/search", status=503, skip=2, times=3, seller_id=SELLER_A)
    statuses = []
    for _ in range(6):
        statuses.append(search_orders(http, grant_a, limit=1).status_code)
        assert search_orders(http, grant_big, limit=1).status_code == 200  # another seller: untouched
    assert statuses == [200, 200, 503, 503, 503, 200]
    rule = control.faults()[0]
    assert (rule["skipped"], rule["fired"]) == (2, 3)

    control.add_fault("/items", status=500)
    failed = http.get("/items", params={"ids": "MLB1"}, headers=auth(grant_a))
    assert (failed.status_code, failed.json()) == (
        500, {"message": "internal error", "error": "internal_server_error", "status": 500}
    )
    control.add_fault("/oauth/token", status=503, seller_id=SELLER_A)
    down = token_request(http, grant_type="refresh_token", refresh_token=grant_a["refresh_token"])
    assert (down.status_code, down.json()) == (
        503, {"message": "service unavailable", "error": "service_unavailable", "status": 503}
    )
    # the failed refresh did not consume the refresh token
    assert token_request(http, grant_type="refresh_token", refresh_token=grant_a["refresh_token"]).status_code == 200
    assert control.stats()["faults_injected"] == 5
    assert control.clear_faults() == 3 and control.faults() == []


def test_random_429_with_retry_after_on_half_and_503(control: EmulatorControl, http: httpx.Client) -> None:
    grant = login(control, http, SELLER_A)
    control.configure(rate_429=1.0, retry_after=3)
    answers = [search_orders(http, grant, limit=1) for _ in range(4)]
    assert [a.status_code for a in answers] == [429] * 4
    assert answers[0].json() == {"message": "too_many_requests", "error": "too_many_requests", "status": 429,
                                 "cause": []}
    assert [a.headers.get("retry-after") for a in answers].count("3") == 2
    control.configure(rate_429=0, rate_503=1.0)
    unavailable = token_request(http, grant_type="refresh_token", refresh_token=grant["refresh_token"])
    assert unavailable.status_code == 503 and unavailable.json()["error"] == "service_unavailable"
    control.configure(rate_503=0)
    assert search_orders(http, grant, limit=1).status_code == 200
    stats = control.stats()
    assert stats["routes"]["/orders/search"] == {"429": 4, "200": 1}
    assert stats["by_status"] == {"200": 2, "429": 4, "503": 1} and stats["total"] == 7


def test_latency_is_awaited_so_concurrent_requests_overlap(control: EmulatorControl, emulator: RunningEmulator) -> None:
    with httpx.Client(base_url=emulator.base_url) as http:
        grant = login(control, http, SELLER_A)
    control.configure(latency_ms=200)

    async def burst() -> float:
        async with httpx.AsyncClient(base_url=emulator.base_url, timeout=10) as client:
            started = time.perf_counter()
            answers = await asyncio.gather(
                *[client.get("/orders/search", params={"seller": SELLER_A, "limit": 5}, headers=auth(grant))
                  for _ in range(10)]
            )
            assert all(a.status_code == 200 for a in answers)
            return time.perf_counter() - started

    elapsed = asyncio.run(burst())
    assert 0.2 <= elapsed < 1.0  # 10 x 200 ms one after another would take 2 s
    assert control.stats()["max_in_flight"] >= 5


# -- changing data ---------------------------------------------------------------------------------------
def test_mutate_moves_date_last_updated_to_now(control: EmulatorControl, http: httpx.Client) -> None:
    grant = login(control, http, SELLER_SPARE)
    before = {o["id"]: o for o in control.orders(SELLER_SPARE)}
    items_before = {i["id"]: i for i in control.items(SELLER_SPARE)}
    since = datetime.now(timezone.utc) - timedelta(seconds=1)
    changed = control.mutate(SELLER_SPARE, orders_updated=3, orders_new=2, items_updated=2, items_new=1)
    assert len(changed["orders_updated"]) == 3 and len(changed["orders_new"]) == 2
    assert len(changed["items_updated"]) == 2 and len(changed["items_new"]) == 1
    assert not set(changed["orders_new"]) & set(before)

    recent = search_orders(http, grant, limit=50, **{"order.date_last_updated.from": since.isoformat()}).json()
    assert {o["id"] for o in recent["results"]} == set(changed["orders_updated"]) | set(changed["orders_new"])
    for order in recent["results"]:
        assert parse(order["date_last_updated"]) >= since
        if order["id"] in before:
            old = before[order["id"]]
            assert parse(order["date_last_updated"]) > parse(old["date_last_updated"])
            assert order["date_closed"] == old["date_closed"] and order["status"] != old["status"]

    listing = http.get(f"/users/{SELLER_SPARE}/items/search", headers=auth(grant)).json()
    assert listing["paging"]["total"] == len(items_before) + 1
    details = http.get("/items", params={"ids": ",".join(changed["items_updated"])}, headers=auth(grant)).json()
    for entry in details:
        assert parse(entry["body"]["last_updated"]) > parse(items_before[entry["body"]["id"]]["last_updated"])


def test_one_seller_can_get_600_orders_in_one_hour(control: EmulatorControl, http: httpx.Client) -> None:
    hour = datetime(2026, 3, 2, 15, tzinfo=timezone.utc)
    summary = control.set_seller(SELLER_SPARE, orders=600, orders_window_hours=1, orders_window_end=hour)
    assert summary["orders"] == 600 and parse(summary["orders_window"]["from"]) == hour - timedelta(hours=1)
    grant = login(control, http, SELLER_SPARE)
    page = search_orders(
        http, grant, **{"order.date_last_updated.from": (hour - timedelta(minutes=59)).isoformat(),
                        "order.date_last_updated.to": hour.isoformat()},
    ).json()
    assert page["paging"]["total"] == 600


def test_data_are_deterministic_from_the_seed() -> None:
    start = datetime(2026, 11, 20, 12, tzinfo=timezone.utc)
    small = {"sellers": 2, "orders_per_seller": 40, "items_per_seller": 15, "start_time": start}
    truths = []
    for seed in (11, 11, 12):
        with run_in_thread(EmulatorConfig(seed=seed, **small)) as running, running.control as ctrl:
            truths.append((ctrl.orders(), ctrl.items()))
    assert truths[0] == truths[1]
    assert truths[0] != truths[2]
    orders, items = truths[0]
    assert len(orders) == 80 and len(items) == 30 and len({o["id"] for o in orders}) == 80
    assert all(parse(o["date_last_updated"]) < start for o in orders)
    assert all(start - timedelta(days=60) <= parse(o["date_created"]) for o in orders)


# -- the detached process --------------------------------------------------------------------------------
def test_detached_process_is_reused_and_stopped(tmp_path) -> None:
    config = EmulatorConfig(seed=3, sellers=1, orders_per_seller=10, items_per_seller=5)
    first = start_emulator_process(config, tmp_path)
    try:
        assert first.started and os.getpgid(first.pid) == first.pid  # leads its own session
        again = start_emulator_process(EmulatorConfig(sellers=2), tmp_path)
        assert not again.started and again.pid == first.pid
        assert again.config.sellers == 1  # a reused process keeps the config it was started with
        with again.control as ctrl:
            assert [s["seller_id"] for s in ctrl.sellers()] == [100000001]
        assert running_emulator_process(tmp_path) is not None
        assert "client_id=emulated-app" in (tmp_path / "emulator.log").read_text()
    finally:
        assert stop_emulator_process(tmp_path)
    assert running_emulator_process(tmp_path) is None
    assert not stop_emulator_process(tmp_path)
