"""An emulator of a Mercado-Livre-like marketplace API: a real HTTP server on 127.0.0.1 (Starlette + uvicorn).

It follows the contract `operations/marketplace/client.py` is written for:

- OAuth (`POST /oauth/token`, form body only): authorization codes (single use) and refresh tokens that are
  single use and rotated on every refresh; an access token stays valid until its own expiry.
- `GET /orders/search` (the date filters truncated down to the hour, sorted by `date_closed`, offset cap),
  `GET /users/{id}/items/search` (offset paging capped at 1,000; `search_type=scan` with scroll ids that
  expire), `GET /items` and `GET /items/bulk` (up to 20 ids, one entry per id, 404 entries for unknown ids).
  Items carry `status` and `sub_status`; a deleted item (`closed`, sub_status `["deleted"]`) is no longer listed
  by the seller's items search but is still answered by id.
- Orders search filters: `order.date_last_updated.from/to`, `order.date_created.from/to` (both truncated down to
  the hour), `order.status` (one of the documented statuses), `sort=date_asc|date_desc`.
- Notifications: every order and item change a mutation makes is POSTed to `notification_url` (a runtime knob) as
  the marketplace does, tried again when not answered 200 within `notification_timeout_ms`, then kept for
  `GET /missed_feeds?app_id=...`; `GET /orders/{id}` answers what an orders notification names.
- Faults on demand: fixed latency (awaited, so concurrent clients overlap), random 429/503 shares, targeted
  fault rules, token and scroll expiry, authorization revocation, data mutation between syncs, and hot hours
  (N orders of one seller updated within one hour).

Data are deterministic from the seed (and `start_time`, which anchors the dates; by default the emulator's
start). Everything lives in memory in one event loop: no locks. Items of another seller are answered 404 by
`/items` (the real API shows them; a sync that asks for them has mixed two sellers up).

The control API under `/_emulator/...` needs no token and gets no latency or faults; `EmulatorControl` wraps
it. Run it in a thread (`run_in_thread`, tests), as a detached process reused by later callers
(`start_emulator_process`, demo and benchmark) or from the shell (`python -m emulators.marketplace --help`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import sys
import threading
import time
import unicodedata
from bisect import bisect_left
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http import HTTPStatus
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs, urlencode

import httpx
import uvicorn
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from emulators.common import (
    ControlClient,
    EmulatorService,
    StoppableEmulator,
    add_config_arguments,
    bind,
    config_from_arguments,
    dumps,
    health,
)
from operations.infra.processes import free_port

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STATE_FILE = "marketplace-emulator.json"
SERVICE_NAME = "marketplace-emulator"

SELLER_ID_BASE = 100_000_001
ORDER_ID_BASE = 2_000_000_000_000  # 13 digits; each seller has its own block of 10,000,000
ORDER_ID_BLOCK = 10_000_000
ITEM_NUMBER_BASE = 1_000_000_000  # "MLB" + 10 digits; each seller has its own block of 1,000,000
ITEM_NUMBER_BLOCK = 1_000_000
ORDERS_PAGE_MAX = 50
ITEMS_PAGE_MAX = 100
MULTIGET_MAX = 20
CODE_TTL_SECONDS = 600
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS

BRT = timezone(timedelta(hours=-3))  # the dates the API writes carry the seller's offset
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

INVALID_GRANT_TEXT = (
    "Error validating grant. Your authorization code or refresh token may be expired or it was already used"
)
INVALID_TOKEN_BODY = {"message": "invalid_token", "error": "not_found", "status": 401, "cause": []}
FORBIDDEN_BODY = {"message": "caller.id does not match", "error": "forbidden", "status": 403, "cause": []}
SCROLL_EXPIRED_BODY = {
    "message": "scroll_id expired or invalid", "error": "invalid_scroll_id", "status": 400, "cause": [],
}
FAULT_BODIES: dict[int, dict[str, Any]] = {
    429: {"message": "too_many_requests", "error": "too_many_requests", "status": 429, "cause": []},
    500: {"message": "internal error", "error": "internal_server_error", "status": 500},
    503: {"message": "service unavailable", "error": "service_unavailable", "status": 503},
}
ORDER_SORTS = {"date_asc": "Date ascending", "date_desc": "Date descending"}
# The order statuses the API documents (the `order.status` filter takes one of them).
ORDER_STATUSES = (
    "confirmed", "payment_required", "payment_in_process", "partially_paid", "paid", "partially_refunded",
    "pending_cancel", "cancelled", "invalid",
)

# Knobs POST /_emulator/config may change; the others shape the data and are fixed at start.
RUNTIME_KNOBS = frozenset(
    {
        "latency_ms", "latency_jitter_ms", "rate_429", "rate_503", "retry_after", "token_ttl_seconds",
        "scroll_ttl_seconds", "max_offset", "max_items_offset", "total_underreport", "legacy_error_format",
        "client_id", "client_secret", "redirect_uri", "notification_url", "notification_timeout_ms",
        "notification_attempts", "notification_retry_seconds",
    }
)


# -- configuration -------------------------------------------------------------------------------------------
class SellerSpec(BaseModel):
    """One seller's data, overriding the defaults; unset fields keep them."""

    model_config = ConfigDict(extra="forbid")

    orders: int | None = Field(None, ge=0, le=1_000_000)
    items: int | None = Field(None, ge=0, le=100_000)
    orders_window_hours: float | None = Field(
        None, gt=0, description="the orders' date_last_updated (and every other date) fall in this many hours"
    )
    orders_window_end: datetime | None = Field(None, description="end of that window; default the start time")

    @field_validator("orders_window_end")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("orders_window_end needs an offset")
        return value


class EmulatorConfig(BaseModel):
    """Every knob of the emulator. Runtime knobs (RUNTIME_KNOBS) can also be changed over the control API."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(7, description="seed of the data, faults, latency jitter and mutations")
    sellers: int = Field(5, ge=1, le=1000, description="number of sellers (ids 100000001, 100000002, ...)")
    orders_per_seller: int = Field(500, ge=0, le=1_000_000, description="orders of each seller")
    items_per_seller: int = Field(200, ge=0, le=100_000, description="items of each seller")
    history_days: float = Field(60, gt=0, description="dates spread over this many days before the start time")
    start_time: datetime | None = Field(None, description="anchor of the dates (with offset); default now")
    seller_overrides: dict[int, SellerSpec] = Field(default_factory=dict, description="per seller id")
    latency_ms: float = Field(0, ge=0, description="added to every API request (not the control API)")
    latency_jitter_ms: float = Field(0, ge=0, description="plus a uniform random 0..this")
    rate_429: float = Field(0, ge=0, le=1, description="share of API requests answered 429")
    rate_503: float = Field(0, ge=0, le=1, description="share of API requests answered 503")
    retry_after: int | None = Field(None, ge=0, description="Retry-After seconds on every other random 429")
    token_ttl_seconds: int = Field(21600, ge=1, description="access token lifetime (expires_in)")
    scroll_ttl_seconds: float = Field(300, gt=0, description="a scroll_id dies this long after its last use")
    max_offset: int = Field(10000, ge=1, description="orders search: offset + limit above this is a 400")
    max_items_offset: int = Field(1000, ge=1, description="items search: offset + limit above this is a 400")
    total_underreport: float = Field(0, ge=0, le=1, description="orders paging.total reported this much low")
    legacy_error_format: bool = Field(False, description="OAuth errors carry their text under 'message'")
    client_id: str = "emulated-app"
    client_secret: str = "emulated-secret"
    redirect_uri: str = "http://127.0.0.1/marketplace/callback"
    notification_url: str | None = Field(
        None, description="the app's callback URL: every order and item change is POSTed there (None: none sent)"
    )
    notification_timeout_ms: float = Field(500, gt=0, description="an answer later than this counts as not delivered")
    notification_attempts: int = Field(5, ge=1, le=100, description="deliveries tried before it goes to missed feeds")
    notification_retry_seconds: float = Field(2.0, ge=0, description="wait before a delivery is tried again")

    @field_validator("start_time")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("start_time needs an offset")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> EmulatorConfig:
        if self.rate_429 + self.rate_503 > 1:
            raise ValueError("rate_429 + rate_503 must not exceed 1")
        unknown = [sid for sid in self.seller_overrides if not 0 <= sid - SELLER_ID_BASE < self.sellers]
        if unknown:
            raise ValueError(f"seller_overrides for unknown sellers {unknown}")
        return self


# -- time helpers ----------------------------------------------------------------------------------------
def iso_ms(ms: int) -> str:
    """Epoch milliseconds as the API writes them: '2026-11-20T14:03:11.000-03:00'."""
    return (_EPOCH + timedelta(milliseconds=ms)).astimezone(BRT).isoformat(timespec="milliseconds")


def to_ms(value: datetime) -> int:
    return (value - _EPOCH) // timedelta(milliseconds=1)


def _now_ms() -> int:
    return int(time.time() * 1000)


# -- errors ----------------------------------------------------------------------------------------------
class _ApiError(Exception):
    """An error answer of the API; raised inside handlers, rendered by the route wrapper."""

    def __init__(self, status: int, body: Any, headers: dict[str, str] | None = None):
        super().__init__(status)
        self.status, self.body, self.headers = status, body, headers


def _bad_request(message: str) -> _ApiError:
    return _ApiError(400, {"message": message, "error": "bad_request", "status": 400, "cause": []})


def _json(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(content), status_code=status, headers=headers, media_type="application/json")


def _fault_body(status: int) -> dict[str, Any]:
    if status in FAULT_BODIES:
        return dict(FAULT_BODIES[status])
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "server error" if status >= 500 else "client error"
    return {"message": phrase.lower(), "error": phrase.lower().replace(" ", "_").replace("-", "_"), "status": status}


# -- data ------------------------------------------------------------------------------------------------
_NOUNS = (
    "Fone de Ouvido", "Camiseta", "Tênis", "Mochila", "Relógio", "Cabo USB-C", "Carregador", "Garrafa Térmica",
    "Luminária", "Teclado", "Mouse", "Caneca", "Jaqueta", "Panela", "Cadeira",
)
_ADJECTIVES = ("Premium", "Básico", "Esportivo", "Sem Fio", "Infantil", "Profissional", "Compacto", "Original")
_COLORS = ("Preto", "Branco", "Azul", "Vermelho", "Verde", "Cinza")


def _slug(text: str) -> str:
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return "-".join(ascii_text.lower().split())


@dataclass(slots=True)
class _Order:
    id: int
    closed_ms: int
    dlu_ms: int
    body: dict[str, Any]
    created_ms: int = 0


@dataclass
class _Scroll:
    seller_id: int
    ids: list[str]  # the seller's id list when the scan began (lists are replaced, never changed in place)
    position: int
    touched: float  # time.monotonic() of the last use


@dataclass
class _Seller:
    """One seller's data and indexes: orders by date_last_updated (for bisect), item ids sorted."""

    id: int
    index: int
    nickname: str
    window: tuple[int, int] = (0, 0)  # the orders' generated [from, to) in epoch ms
    items: dict[str, dict[str, Any]] = field(default_factory=dict)
    item_ids: list[str] = field(default_factory=list)
    next_item_number: int = 0
    orders: dict[int, _Order] = field(default_factory=dict)
    by_dlu: list[_Order] = field(default_factory=list)
    dlu_keys: list[int] = field(default_factory=list)
    next_order_number: int = 0
    searches: dict[tuple, list[_Order]] = field(default_factory=dict)  # (filters, desc) -> sorted matches

    def reindex_orders(self) -> None:
        self.by_dlu = sorted(self.orders.values(), key=lambda o: (o.dlu_ms, o.id))
        self.dlu_keys = [o.dlu_ms for o in self.by_dlu]
        self.searches.clear()

    def search(
        self, lo: int | None, hi: int | None, desc: bool, created: tuple[int | None, int | None] = (None, None),
        status: str | None = None,
    ) -> list[_Order]:
        """Orders with lo <= date_last_updated < hi (and, when given, created[0] <= date_created < created[1] and
        that status), sorted by date_closed; cached until the data change."""
        key = (lo, hi, desc, created, status)
        found = self.searches.get(key)
        if found is None:
            start = 0 if lo is None else bisect_left(self.dlu_keys, lo)
            stop = len(self.dlu_keys) if hi is None else bisect_left(self.dlu_keys, hi)
            matches = self.by_dlu[start:stop]
            c_lo, c_hi = created
            if c_lo is not None or c_hi is not None or status is not None:
                matches = [
                    o for o in matches
                    if (c_lo is None or o.created_ms >= c_lo) and (c_hi is None or o.created_ms < c_hi)
                    and (status is None or o.body["status"] == status)
                ]
            found = sorted(matches, key=lambda o: (o.closed_ms, o.id), reverse=desc)
            if len(self.searches) >= 512:
                self.searches.clear()
            self.searches[key] = found
        return found

    def item_id(self) -> str:
        self.next_item_number += 1
        if self.next_item_number >= ITEM_NUMBER_BLOCK:
            raise RuntimeError(f"seller {self.id} ran out of item ids")
        return f"MLB{ITEM_NUMBER_BASE + self.index * ITEM_NUMBER_BLOCK + self.next_item_number}"

    def order_id(self, rng: random.Random) -> int:
        self.next_order_number += rng.randint(1, 5)
        if self.next_order_number >= ORDER_ID_BLOCK:
            raise RuntimeError(f"seller {self.id} ran out of order ids")
        return ORDER_ID_BASE + self.index * ORDER_ID_BLOCK + self.next_order_number


def _new_item(seller: _Seller, rng: random.Random, created_ms: int, updated_ms: int) -> dict[str, Any]:
    item_id = seller.item_id()
    title = f"{rng.choice(_NOUNS)} {rng.choice(_ADJECTIVES)} {rng.choice(_COLORS)}"
    number = item_id[3:]
    return {
        "id": item_id,
        "site_id": "MLB",
        "title": title,
        "seller_id": seller.id,
        "category_id": f"MLB{rng.randint(1000, 99999)}",
        "price": round(rng.uniform(9.9, 2500.0), 2),
        "base_price": None,
        "currency_id": "BRL",
        "available_quantity": rng.randint(0, 500),
        "sold_quantity": rng.randint(0, 5000),
        "condition": "new",
        "listing_type_id": rng.choice(("gold_special", "gold_pro")),
        "status": "active" if rng.random() < 0.85 else "paused",
        "sub_status": [],
        "date_created": iso_ms(created_ms),
        "last_updated": iso_ms(updated_ms),
        "permalink": f"https://produto.mercadolivre.com.br/MLB-{number}-{_slug(title)}-_JM",
        "thumbnail": f"http://http2.mlstatic.com/D_{number}-I.jpg",
        "seller_custom_field": f"SKU-{seller.index:03d}-{seller.next_item_number:06d}" if rng.random() < 0.8 else None,
        "attributes": [{"id": "BRAND", "value_name": rng.choice(("Acme", "Genérica", "Nova"))}],
    }


def _order_body(
    seller: _Seller, rng: random.Random, order_id: int, created_ms: int, closed_ms: int, dlu_ms: int
) -> dict[str, Any]:
    lines = []
    for _ in range(rng.randint(1, 3)):
        if seller.item_ids:
            item = seller.items[rng.choice(seller.item_ids)]
        else:  # a seller without items still has orders: their items were deleted
            item = {"id": "MLB0000000000", "title": "Anúncio removido", "price": 10.0, "seller_custom_field": None}
        unit_price = item["price"] if rng.random() < 0.8 else round(item["price"] * rng.uniform(0.7, 0.95), 2)
        lines.append(
            {
                "item": {
                    "id": item["id"],
                    "title": item["title"],
                    "variation_id": rng.randint(170_000_000_000, 179_999_999_999) if rng.random() < 0.35 else None,
                    "seller_sku": item["seller_custom_field"],
                },
                "quantity": rng.randint(1, 3),
                "unit_price": unit_price,
                "sale_fee": round(unit_price * rng.choice((0.11, 0.16, 0.19)), 2),
                "currency_id": "BRL",
            }
        )
    total = round(sum(line["quantity"] * line["unit_price"] for line in lines), 2)
    shipping_cost = rng.choice((0.0, 0.0, 19.9, 24.5))
    roll = rng.random()
    status = "paid" if roll < 0.85 else "cancelled" if roll < 0.97 else "partially_refunded"
    status_detail = None if status == "paid" else rng.choice((None, "pack_splitted", "shipment_cancelled"))
    pack_id = 2_000_000_000_000_000 + rng.randint(0, 999_999_999) if rng.random() < 0.25 else None
    tags = ["paid", "delivered" if rng.random() < 0.7 else "not_delivered"] if status != "cancelled" else [
        "not_delivered"
    ]
    if pack_id is not None:
        tags.append("pack_order")
    buyer_id = rng.randint(100_000_000, 999_999_999)
    return {
        "id": order_id,
        "status": status,
        "status_detail": status_detail,
        "date_created": iso_ms(created_ms),
        "date_closed": iso_ms(closed_ms),
        "last_updated": iso_ms(dlu_ms),
        "date_last_updated": iso_ms(dlu_ms),
        "total_amount": total,
        "paid_amount": round(total + shipping_cost, 2),
        "currency_id": "BRL",
        "order_items": lines,
        "buyer": {"id": buyer_id, "nickname": f"BUYER{buyer_id % 1_000_000}"},
        "shipping": {"id": rng.randint(40_000_000_000, 49_999_999_999) if rng.random() < 0.9 else None},
        "pack_id": pack_id,
        "tags": tags,
        # fields a client should ignore
        "context": {"channel": "marketplace", "site": "MLB", "flows": []},
        "fulfilled": rng.choice((True, None)),
        "comment": None,
        "mediations": [],
    }


def _generate_seller(config: EmulatorConfig, index: int, start_ms: int) -> _Seller:
    """A seller's items and orders, deterministic from (seed, index, spec, start time)."""
    seller_id = SELLER_ID_BASE + index
    spec = config.seller_overrides.get(seller_id, SellerSpec())
    seller = _Seller(seller_id, index, f"SELLER_{index}")
    history_ms = int(config.history_days * DAY_MS)

    rng = random.Random(f"{config.seed}:items:{index}")
    for _ in range(config.items_per_seller if spec.items is None else spec.items):
        updated = start_ms - 1 - int(rng.random() * history_ms)
        item = _new_item(seller, rng, updated - int(rng.random() * 90 * DAY_MS), updated)
        seller.items[item["id"]] = item
    seller.item_ids = sorted(seller.items)

    end = start_ms if spec.orders_window_end is None else to_ms(spec.orders_window_end)
    span = history_ms if spec.orders_window_hours is None else int(spec.orders_window_hours * HOUR_MS)
    begin = end - span
    seller.window = (begin, end)
    rng = random.Random(f"{config.seed}:orders:{index}")
    dates = []
    for _ in range(config.orders_per_seller if spec.orders is None else spec.orders):
        dlu = begin + int(rng.random() * span)
        delay = 0 if rng.random() < 0.35 else int(rng.expovariate(1 / (2 * DAY_MS))) % (dlu - begin + 1)
        closed = dlu - delay  # paid, then updated later (shipping, messages, claims)
        created = closed - int(rng.random() * min(30 * 60_000, closed - begin))
        dates.append((created, closed, dlu))
    _add_orders(seller, rng, dates)
    return seller


def _add_orders(seller: _Seller, rng: random.Random, dates: list[tuple[int, int, int]]) -> None:
    """Orders of `seller` with the given (created, closed, last updated) times in ms, ids growing with
    date_created; the seller's indexes rebuilt."""
    dates.sort()  # order ids grow with date_created
    for created, closed, dlu in dates:
        order_id = seller.order_id(rng)
        body = _order_body(seller, rng, order_id, created, closed, dlu)
        seller.orders[order_id] = _Order(order_id, closed, dlu, body, created)
    seller.reindex_orders()


# -- stats and fault rules -------------------------------------------------------------------------------
@dataclass
class _Stats:
    routes: dict[str, dict[str, int]] = field(default_factory=dict)
    total: int = 0
    faults_injected: int = 0
    token_grants: dict[str, int] = field(default_factory=lambda: {"authorization_code": 0, "refresh_token": 0})
    invalid_grants: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    last_request_at: float | None = None  # epoch seconds when the latest API request arrived

    def record(self, route: str, status: int) -> None:
        self.total += 1
        by_status = self.routes.setdefault(route, {})
        key = str(status)
        by_status[key] = by_status.get(key, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        by_status: dict[str, int] = {}
        for counts in self.routes.values():
            for status, count in counts.items():
                by_status[status] = by_status.get(status, 0) + count
        return {
            "total": self.total,
            "routes": self.routes,
            "by_status": by_status,
            "faults_injected": self.faults_injected,
            "token_grants": dict(self.token_grants),
            "refreshes": self.token_grants["refresh_token"],
            "invalid_grants": self.invalid_grants,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "last_request_at": self.last_request_at,
        }


class FaultRule(BaseModel):
    """After letting `skip` matching requests through, answer the next `times` ones with `status`."""

    model_config = ConfigDict(extra="forbid")

    path_prefix: str
    seller_id: int | None = None
    skip: int = Field(0, ge=0)
    times: int = Field(1, ge=1)
    status: int = Field(503, ge=400, le=599)
    retry_after: int | None = Field(None, ge=0, description="Retry-After header on this rule's answers")
    skipped: int = 0
    fired: int = 0

    @property
    def exhausted(self) -> bool:
        return self.fired >= self.times


# -- notifications ---------------------------------------------------------------------------------------
class _Notifier:
    """Posts a notification to `notification_url` for every order and item change, as the marketplace does:
    `{"_id", "resource", "user_id", "topic", "application_id", "attempts", "sent", "received"}`, delivered when
    answered 200 within `notification_timeout_ms`, else tried again `notification_retry_seconds` later (the same
    `_id`, `attempts` counting up) until `notification_attempts`; then it is kept for `GET /missed_feeds`."""

    CONCURRENT_POSTS = 10  # httpx pools slow down past ~10 concurrent requests per client

    def __init__(self, emulator: MarketplaceEmulator):
        self.emulator = emulator
        self.missed: list[dict[str, Any]] = []
        self.queued = self.delivered = self.failed_attempts = self.in_flight = 0
        self.last_delivered_at: float | None = None  # epoch seconds of the latest delivery
        self._limit: asyncio.Semaphore | None = None
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task] = set()

    def changed(self, changed: dict[str, list], item_owner: dict[str, int], now_ms: int) -> None:
        """Queue the notifications of what a mutation changed (nothing without a callback URL)."""
        if not self.emulator.config.notification_url:
            return
        for order_id in changed["orders_updated"] + changed["orders_new"]:
            seller = SELLER_ID_BASE + (order_id - ORDER_ID_BASE) // ORDER_ID_BLOCK
            self.send(seller, "orders_v2", f"/orders/{order_id}", now_ms)
        for item_id in (changed["items_updated"] + changed["items_new"] + changed.get("items_closed", [])
                        + changed.get("items_deleted", [])):
            self.send(item_owner[item_id], "items", f"/items/{item_id}", now_ms)

    def send(self, seller_id: int, topic: str, resource: str, now_ms: int) -> None:
        application = self.emulator.config.client_id
        message = {
            "_id": secrets.token_hex(12), "resource": resource, "user_id": seller_id, "topic": topic,
            "application_id": int(application) if application.isdigit() else application, "attempts": 0,
            "sent": iso_ms(now_ms), "received": iso_ms(now_ms),
        }
        self.queued += 1
        task = asyncio.get_running_loop().create_task(self._deliver(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, message: dict[str, Any]) -> None:
        if self._limit is None:
            self._limit = asyncio.Semaphore(self.CONCURRENT_POSTS)
            self._client = httpx.AsyncClient(limits=httpx.Limits(max_connections=self.CONCURRENT_POSTS))
        config = self.emulator.config
        while True:
            message = {**message, "attempts": message["attempts"] + 1, "sent": iso_ms(_now_ms())}
            ok = False
            async with self._limit:
                self.in_flight += 1
                try:
                    url = self.emulator.config.notification_url
                    if url:
                        answer = await self._client.post(url, content=dumps(message),
                                                         headers={"content-type": "application/json"},
                                                         timeout=config.notification_timeout_ms / 1000)
                        ok = answer.status_code == 200
                except httpx.HTTPError:
                    ok = False
                finally:
                    self.in_flight -= 1
            if ok:
                self.delivered += 1
                self.last_delivered_at = time.time()
                return
            self.failed_attempts += 1
            if message["attempts"] >= config.notification_attempts:
                self.missed.append(message)
                return
            await asyncio.sleep(config.notification_retry_seconds)

    def summary(self) -> dict[str, Any]:
        return {
            "queued": self.queued, "delivered": self.delivered, "failed_attempts": self.failed_attempts,
            "missed": len(self.missed), "pending": len(self._tasks), "in_flight": self.in_flight,
            "last_delivered_at": self.last_delivered_at,
        }


# -- the emulator ----------------------------------------------------------------------------------------
class MarketplaceEmulator:
    """The API's state and handlers. One instance per app; used only from the app's event loop."""

    def __init__(self, config: EmulatorConfig):
        self.config = config.model_copy(deep=True)
        self.start_ms = _now_ms() if config.start_time is None else to_ms(config.start_time)
        self.sellers: dict[int, _Seller] = {}
        self.item_owner: dict[str, int] = {}
        for index in range(config.sellers):
            self._install(_generate_seller(self.config, index, self.start_ms))
        self.access_tokens: dict[str, tuple[int, float]] = {}  # token -> (seller id, expires at, epoch s)
        self.refresh_tokens: dict[str, int] = {}
        self.codes: dict[str, tuple[int, float]] = {}
        self.scrolls: dict[str, _Scroll] = {}
        self.rules: list[FaultRule] = []
        self.stats = _Stats()
        self.fault_rng = random.Random(f"{config.seed}:faults")
        self.latency_rng = random.Random(f"{config.seed}:latency")
        self.mutation_rng = random.Random(f"{config.seed}:mutations")
        self.throttled = 0
        self.notifier = _Notifier(self)

    def _install(self, seller: _Seller) -> None:
        old = self.sellers.get(seller.id)
        if old is not None:
            for item_id in old.items:
                self.item_owner.pop(item_id, None)
        self.sellers[seller.id] = seller
        self.item_owner.update((item_id, seller.id) for item_id in seller.items)

    # -- plumbing ------------------------------------------------------------------------------------
    def api_route(self, path: str, handler: Callable[[Request], Awaitable[Response]], methods: list[str]) -> Route:
        """A route of the emulated API: latency, faults, error rendering and stats around the handler."""
        stats_name = path.replace(":int}", "}")

        async def endpoint(request: Request) -> Response:
            stats = self.stats
            stats.last_request_at = time.time()
            stats.in_flight += 1
            stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
            status = 500
            try:
                await self._latency()
                response = await self._fault(request)
                if response is None:
                    try:
                        response = await handler(request)
                    except _ApiError as exc:
                        response = _json(exc.body, exc.status, exc.headers)
                status = response.status_code
                return response
            finally:
                stats.in_flight -= 1
                stats.record(stats_name, status)

        return Route(path, endpoint, methods=methods)

    async def _latency(self) -> None:
        delay = self.config.latency_ms
        if self.config.latency_jitter_ms:
            delay += self.latency_rng.uniform(0, self.config.latency_jitter_ms)
        if delay > 0:
            await asyncio.sleep(delay / 1000)

    async def _fault(self, request: Request) -> Response | None:
        """A fault answer for this request (a targeted rule first, then the random shares), or None."""
        if self.rules:
            path = request.url.path
            seller: int | None = None
            seller_known = False
            for rule in self.rules:
                if rule.exhausted or not path.startswith(rule.path_prefix):
                    continue
                if rule.seller_id is not None:
                    if not seller_known:
                        seller, seller_known = await self._request_seller(request), True
                    if seller != rule.seller_id:
                        continue
                if rule.skipped < rule.skip:
                    rule.skipped += 1
                    return None  # consumed by this rule: the request goes through
                rule.fired += 1
                headers = {"Retry-After": str(rule.retry_after)} if rule.retry_after is not None else None
                self.stats.faults_injected += 1
                return _json(_fault_body(rule.status), rule.status, headers)
        config = self.config
        if config.rate_429 or config.rate_503:
            roll = self.fault_rng.random()
            if roll < config.rate_429:
                self.throttled += 1
                self.stats.faults_injected += 1
                headers = None
                if config.retry_after is not None and self.throttled % 2 == 1:
                    headers = {"Retry-After": str(config.retry_after)}
                return _json(_fault_body(429), 429, headers)
            if roll < config.rate_429 + config.rate_503:
                self.stats.faults_injected += 1
                return _json(_fault_body(503), 503)
        return None

    async def _request_seller(self, request: Request) -> int | None:
        """The seller a request is about, for fault rules: the seller parameter, the path, the token or the grant."""
        seller = request.query_params.get("seller")
        if seller and seller.isdigit():
            return int(seller)
        if "user_id" in request.path_params:
            return int(request.path_params["user_id"])
        token = _bearer(request)
        if token and token in self.access_tokens:
            return self.access_tokens[token][0]
        if request.url.path == "/oauth/token":
            form = _form(await request.body())
            if form.get("refresh_token") in self.refresh_tokens:
                return self.refresh_tokens[form["refresh_token"]]
            if form.get("code") in self.codes:
                return self.codes[form["code"]][0]
        return None

    def _authenticate(self, request: Request) -> int:
        """The seller id of the request's Bearer token, or a 401."""
        if "access_token" in request.query_params:
            raise _ApiError(401, INVALID_TOKEN_BODY)  # tokens in URLs end up in logs: refused
        token = _bearer(request)
        entry = self.access_tokens.get(token) if token else None
        if entry is None:
            raise _ApiError(401, INVALID_TOKEN_BODY)
        if entry[1] <= time.time():
            del self.access_tokens[token]
            raise _ApiError(401, INVALID_TOKEN_BODY)
        return entry[0]

    # -- OAuth ---------------------------------------------------------------------------------------
    def _oauth_error(self, status: int, error: str, text: str) -> _ApiError:
        key = "message" if self.config.legacy_error_format else "error_description"
        body: dict[str, Any] = {"error": error, key: text, "status": status, "cause": []}
        return _ApiError(status, body)

    def _grant(self, seller_id: int, kind: str) -> dict[str, Any]:
        access = "APP_USR-" + secrets.token_urlsafe(32)
        refresh = "TG-" + secrets.token_urlsafe(32)
        ttl = self.config.token_ttl_seconds
        self.access_tokens[access] = (seller_id, time.time() + ttl)
        self.refresh_tokens[refresh] = seller_id
        self.stats.token_grants[kind] += 1
        if len(self.access_tokens) > 10_000:  # a long benchmark: drop the expired ones
            now = time.time()
            self.access_tokens = {t: e for t, e in self.access_tokens.items() if e[1] > now}
        return {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": ttl,
            "scope": "offline_access read write",
            "user_id": seller_id,
            "refresh_token": refresh,
        }

    def _invalid_grant(self) -> _ApiError:
        self.stats.invalid_grants += 1
        return self._oauth_error(400, "invalid_grant", INVALID_GRANT_TEXT)

    async def oauth_token(self, request: Request) -> Response:
        if request.url.query:
            raise self._oauth_error(400, "invalid_request", "parameters must be sent in the body")
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            raise self._oauth_error(400, "invalid_request", "the body must be application/x-www-form-urlencoded")
        form = _form(await request.body())
        grant_type = form.get("grant_type")
        if grant_type not in ("authorization_code", "refresh_token"):
            if not grant_type:
                raise self._oauth_error(400, "invalid_request", "missing required parameter: grant_type")
            raise self._oauth_error(400, "unsupported_grant_type", f"unsupported grant_type {grant_type!r}")
        if form.get("client_id") != self.config.client_id or form.get("client_secret") != self.config.client_secret:
            raise self._oauth_error(401, "invalid_client", "invalid client_id or client_secret")
        if grant_type == "authorization_code":
            for name in ("code", "redirect_uri"):
                if not form.get(name):
                    raise self._oauth_error(400, "invalid_request", f"missing required parameter: {name}")
            entry = self.codes.get(form["code"])
            if entry is None or entry[1] <= time.time():
                self.codes.pop(form["code"], None)
                raise self._invalid_grant()
            if form["redirect_uri"] != self.config.redirect_uri:
                self.stats.invalid_grants += 1
                raise self._oauth_error(
                    400, "invalid_grant", "the redirect_uri does not match the one configured for the application"
                )
            del self.codes[form["code"]]
            return _json(self._grant(entry[0], "authorization_code"))
        if not form.get("refresh_token"):
            raise self._oauth_error(400, "invalid_request", "missing required parameter: refresh_token")
        seller_id = self.refresh_tokens.pop(form["refresh_token"], None)  # single use: dead from now on
        if seller_id is None:
            raise self._invalid_grant()
        return _json(self._grant(seller_id, "refresh_token"))

    async def authorization(self, request: Request) -> Response:
        """The consent page, already consented: redirects to the redirect_uri with a code (emulator-only
        parameter `seller_id` picks who logs in; default the first seller)."""
        params = request.query_params
        if params.get("client_id") != self.config.client_id:
            return _json({"message": "invalid client_id", "error": "bad_request", "status": 400}, 400)
        if params.get("redirect_uri", self.config.redirect_uri) != self.config.redirect_uri:
            return _json({"message": "redirect_uri mismatch", "error": "bad_request", "status": 400}, 400)
        seller_id = int(params.get("seller_id", SELLER_ID_BASE))
        if seller_id not in self.sellers:
            return _json({"message": f"unknown seller {seller_id}", "error": "not_found", "status": 404}, 404)
        query = {"code": self.issue_code(seller_id)}
        if "state" in params:
            query["state"] = params["state"]
        return RedirectResponse(f"{self.config.redirect_uri}?{urlencode(query)}", status_code=302)

    def issue_code(self, seller_id: int) -> str:
        code = f"TG-{secrets.token_urlsafe(18)}-{seller_id}"
        self.codes[code] = (seller_id, time.time() + CODE_TTL_SECONDS)
        return code

    # -- orders --------------------------------------------------------------------------------------
    async def orders_search(self, request: Request) -> Response:
        caller = self._authenticate(request)
        params = request.query_params
        if "seller" not in params:
            raise _bad_request("the seller parameter is required")
        seller_id = _int_param(params, "seller", 0)
        if seller_id != caller:
            raise _ApiError(403, FORBIDDEN_BODY)
        offset = _int_param(params, "offset", 0)
        limit = _int_param(params, "limit", ORDERS_PAGE_MAX)
        if limit > ORDERS_PAGE_MAX:
            raise _bad_request(f"limit must be lower or equal than {ORDERS_PAGE_MAX}")
        max_offset = self.config.max_offset
        if offset + limit > max_offset:
            raise _bad_request(f"offset + limit must be lower than {max_offset}")
        sort = params.get("sort", "date_asc")
        if sort not in ORDER_SORTS:
            raise _bad_request(f"invalid sort {sort!r}; use one of {sorted(ORDER_SORTS)}")
        lo = _hour_param(params, "order.date_last_updated.from")
        hi = _hour_param(params, "order.date_last_updated.to")
        created = (_hour_param(params, "order.date_created.from"), _hour_param(params, "order.date_created.to"))
        status = params.get("order.status") or None
        if status is not None and status not in ORDER_STATUSES:
            raise _bad_request(f"invalid order.status {status!r}; use one of {sorted(ORDER_STATUSES)}")
        matches = self.sellers[seller_id].search(lo, hi, sort == "date_desc", created, status)
        total = len(matches)
        return _json(
            {
                "query": None,
                "results": [order.body for order in matches[offset : offset + limit]],
                "sort": {"id": sort, "name": ORDER_SORTS[sort]},
                "available_sorts": [{"id": key, "name": name} for key, name in ORDER_SORTS.items() if key != sort],
                "filters": [],
                "paging": {
                    "total": int(total * (1 - self.config.total_underreport)),
                    "offset": offset,
                    "limit": limit,
                },
                "display": "complete",
            }
        )

    # -- items ---------------------------------------------------------------------------------------
    async def items_search(self, request: Request) -> Response:
        caller = self._authenticate(request)
        user_id = request.path_params["user_id"]
        if user_id != caller:
            raise _ApiError(403, FORBIDDEN_BODY)
        params = request.query_params
        search_type = params.get("search_type")
        limit = _int_param(params, "limit", 50)
        if limit > ITEMS_PAGE_MAX:
            raise _bad_request(f"limit must be lower or equal than {ITEMS_PAGE_MAX}")
        seller = self.sellers[user_id]
        answer: dict[str, Any] = {"seller_id": str(user_id), "query": None}
        if search_type == "scan":
            answer.update(self._scan(seller, params.get("scroll_id"), max(limit, 1)))
        elif search_type is not None:
            raise _bad_request(f"invalid search_type {search_type!r}")
        elif "scroll_id" in params:
            raise _bad_request("scroll_id needs search_type=scan")
        else:
            offset = _int_param(params, "offset", 0)
            if offset + limit > self.config.max_items_offset:
                raise _bad_request("Invalid limit and offset values")
            answer["results"] = seller.item_ids[offset : offset + limit]
            answer["paging"] = {"total": len(seller.item_ids), "offset": offset, "limit": limit}
        answer["orders"] = [{"id": "id_asc", "name": "Id ascending"}]
        answer["available_orders"] = [{"id": "id_asc", "name": "Id ascending"}]
        return _json(answer)

    def _scan(self, seller: _Seller, scroll_id: str | None, limit: int) -> dict[str, Any]:
        now = time.monotonic()
        if scroll_id:
            scroll = self.scrolls.get(scroll_id)
            if scroll is None or scroll.seller_id != seller.id or now - scroll.touched > self.config.scroll_ttl_seconds:
                self.scrolls.pop(scroll_id, None)
                raise _ApiError(400, SCROLL_EXPIRED_BODY)
        else:
            if len(self.scrolls) > 1000:
                ttl = self.config.scroll_ttl_seconds
                self.scrolls = {k: s for k, s in self.scrolls.items() if now - s.touched <= ttl}
            scroll_id = secrets.token_urlsafe(24)
            scroll = self.scrolls[scroll_id] = _Scroll(seller.id, seller.item_ids, 0, now)
        batch = scroll.ids[scroll.position : scroll.position + limit]
        offset = scroll.position
        scroll.position += len(batch)
        scroll.touched = now
        return {
            "scroll_id": scroll_id,
            "results": batch,
            "paging": {"total": len(scroll.ids), "offset": offset, "limit": limit},
        }

    async def items_multiget(self, request: Request) -> Response:
        caller = self._authenticate(request)
        params = request.query_params
        ids = [part.strip() for part in params.get("ids", "").split(",") if part.strip()]
        if not ids:
            raise _bad_request("the ids parameter is required")
        if len(ids) > MULTIGET_MAX:
            raise _bad_request(f"too many ids: at most {MULTIGET_MAX}")
        attributes = [a.strip() for a in params.get("attributes", "").split(",") if a.strip()]
        code_key = "status_code" if request.url.path.endswith("/bulk") else "code"
        answer = []
        for item_id in ids:
            if self.item_owner.get(item_id) == caller:
                body = self.sellers[caller].items[item_id]
                if attributes:
                    body = {key: body[key] for key in ("id", *attributes) if key in body}
                answer.append({code_key: 200, "body": body})
            else:  # unknown, or another seller's (the real API would show it: see the module docstring)
                answer.append(
                    {
                        code_key: 404,
                        "body": {
                            "message": f"Item with id {item_id} not found",
                            "error": "not_found",
                            "status": 404,
                            "cause": [],
                        },
                    }
                )
        return _json(answer)

    # -- notifications -------------------------------------------------------------------------------
    async def get_order(self, request: Request) -> Response:
        """`GET /orders/{id}`: the order an orders notification names (403 when another seller's)."""
        caller = self._authenticate(request)
        order_id = request.path_params["order_id"]
        owner = SELLER_ID_BASE + (order_id - ORDER_ID_BASE) // ORDER_ID_BLOCK
        seller = self.sellers.get(owner)
        if seller is None or order_id not in seller.orders:
            raise _ApiError(404, {"message": f"Order {order_id} not found", "error": "not_found", "status": 404,
                                  "cause": []})
        if owner != caller:
            raise _ApiError(403, FORBIDDEN_BODY)
        return _json(seller.orders[order_id].body)

    async def missed_feeds(self, request: Request) -> Response:
        """`GET /missed_feeds?app_id=...`: the app's notifications whose every delivery failed (any token of
        the app; `topic`, `offset` and `limit` filter and page them)."""
        self._authenticate(request)
        params = request.query_params
        if params.get("app_id") != self.config.client_id:
            raise _ApiError(403, {"message": "app_id does not match the token's application", "error": "forbidden",
                                  "status": 403, "cause": []})
        offset, limit = _int_param(params, "offset", 0), min(_int_param(params, "limit", 10), 1000)
        topic = params.get("topic")
        found = [m for m in self.notifier.missed if not topic or m["topic"] == topic]
        return _json({"messages": found[offset : offset + limit], "total": len(found), "offset": offset,
                      "limit": limit})

    # -- control API ---------------------------------------------------------------------------------
    def _seller_or_error(self, value: Any) -> _Seller:
        try:
            return self.sellers[int(value)]
        except (KeyError, TypeError, ValueError):
            raise _ApiError(404, {"error": f"unknown seller {value!r}"}) from None

    def _seller_summary(self, seller: _Seller) -> dict[str, Any]:
        return {
            "seller_id": seller.id,
            "nickname": seller.nickname,
            "orders": len(seller.orders),
            "items": len(seller.items),
            "orders_window": {"from": iso_ms(seller.window[0]), "to": iso_ms(seller.window[1])},
            "authorized": seller.id in self.refresh_tokens.values(),
        }

    def control_routes(self) -> list[Route]:
        def route(path: str, handler: Callable[[dict[str, Any], Request], Any], method: str = "POST") -> Route:
            async def endpoint(request: Request) -> Response:
                try:
                    body = {}
                    if method == "POST":
                        raw = await request.body()
                        body = json.loads(raw) if raw.strip() else {}
                        if not isinstance(body, dict):
                            raise _ApiError(400, {"error": "the body must be a JSON object"})
                    return _json(handler(body, request))
                except _ApiError as exc:
                    return _json(exc.body, exc.status)
                except (ValueError, TypeError, ValidationError) as exc:  # bad JSON, fields or values
                    return _json({"error": str(exc)}, 400)

            return Route(f"/_emulator/{path}", endpoint, methods=[method])

        return [
            route("health", lambda b, r: self.health(), "GET"),
            route("config", lambda b, r: self.config.model_dump(mode="json"), "GET"),
            route("config", lambda b, r: self.configure(b)),
            route("sellers", lambda b, r: [self._seller_summary(s) for s in self.sellers.values()], "GET"),
            route("sellers/{seller_id:int}", lambda b, r: self.set_seller(r.path_params["seller_id"], b)),
            route("authorize", lambda b, r: self._authorize(b)),
            route("revoke", lambda b, r: self.revoke(self._seller_or_error(b.get("seller_id")).id)),
            route("expire_tokens", lambda b, r: self.expire_tokens(b.get("seller_id"))),
            route("expire_scrolls", lambda b, r: self.expire_scrolls()),
            route("faults", lambda b, r: [rule.model_dump() for rule in self.rules], "GET"),
            route("faults", lambda b, r: self.add_fault(b)),
            route("faults", lambda b, r: self.clear_faults(), "DELETE"),
            route("mutate", lambda b, r: self.mutate(**b)),
            route("hot_hour", lambda b, r: self.hot_hour(**b)),
            route("notifications", lambda b, r: self.notifier.summary(), "GET"),
            route("stats", lambda b, r: self.stats.as_dict(), "GET"),
            route("stats/reset", lambda b, r: self.reset_stats()),
            route("orders", lambda b, r: self.truth_orders(r.query_params.get("seller_id")), "GET"),
            route("items", lambda b, r: self.truth_items(r.query_params.get("seller_id")), "GET"),
        ]

    def health(self) -> dict[str, Any]:
        return {"service": SERVICE_NAME, "pid": os.getpid(), "start_time": iso_ms(self.start_ms)}

    def configure(self, changes: dict[str, Any]) -> dict[str, Any]:
        fixed = sorted(set(changes) - RUNTIME_KNOBS)
        if fixed:
            raise _ApiError(400, {"error": f"not runtime knobs: {fixed}; runtime knobs: {sorted(RUNTIME_KNOBS)}"})
        self.config = EmulatorConfig.model_validate({**self.config.model_dump(), **changes})
        return self.config.model_dump(mode="json")

    def set_seller(self, seller_id: int, spec_fields: dict[str, Any]) -> dict[str, Any]:
        seller = self._seller_or_error(seller_id)
        spec = SellerSpec.model_validate(spec_fields)
        current = self.config.seller_overrides.get(seller.id, SellerSpec())
        merged = current.model_copy(update=spec.model_dump(exclude_unset=True))
        overrides = {**self.config.seller_overrides, seller.id: merged}
        self.config = self.config.model_copy(update={"seller_overrides": overrides})
        self._install(_generate_seller(self.config, seller.index, self.start_ms))
        return self._seller_summary(self.sellers[seller.id])

    def _authorize(self, body: dict[str, Any]) -> dict[str, Any]:
        seller = self._seller_or_error(body.get("seller_id"))
        return {"code": self.issue_code(seller.id), "seller_id": seller.id, "redirect_uri": self.config.redirect_uri}

    def revoke(self, seller_id: int) -> dict[str, Any]:
        refresh = [t for t, s in self.refresh_tokens.items() if s == seller_id]
        access = [t for t, (s, _) in self.access_tokens.items() if s == seller_id]
        for token in refresh:
            del self.refresh_tokens[token]
        for token in access:
            del self.access_tokens[token]
        return {"seller_id": seller_id, "refresh_tokens": len(refresh), "access_tokens": len(access)}

    def expire_tokens(self, seller_id: Any = None) -> dict[str, Any]:
        if seller_id is not None:
            seller_id = self._seller_or_error(seller_id).id
        expired = [t for t, (s, _) in self.access_tokens.items() if seller_id is None or s == seller_id]
        for token in expired:
            del self.access_tokens[token]
        return {"expired": len(expired)}

    def expire_scrolls(self) -> dict[str, Any]:
        count = len(self.scrolls)
        self.scrolls.clear()
        return {"expired": count}

    def add_fault(self, body: dict[str, Any]) -> dict[str, Any]:
        rule = FaultRule.model_validate({k: v for k, v in body.items() if k not in ("skipped", "fired")})
        self.rules.append(rule)
        return {"index": len(self.rules) - 1, **rule.model_dump()}

    def clear_faults(self) -> dict[str, Any]:
        count = len(self.rules)
        self.rules.clear()
        return {"cleared": count}

    def reset_stats(self) -> dict[str, Any]:
        in_flight = self.stats.in_flight
        self.stats = _Stats(in_flight=in_flight, max_in_flight=in_flight)
        return self.stats.as_dict()

    def _sellers_of(self, seller_id: Any) -> list[_Seller]:
        return list(self.sellers.values()) if seller_id in (None, "") else [self._seller_or_error(seller_id)]

    def truth_orders(self, seller_id: Any = None) -> list[dict[str, Any]]:
        return [seller.orders[oid].body for seller in self._sellers_of(seller_id) for oid in sorted(seller.orders)]

    def truth_items(self, seller_id: Any = None) -> list[dict[str, Any]]:
        return [seller.items[iid] for seller in self._sellers_of(seller_id) for iid in seller.item_ids]

    def mutate(
        self,
        seller_id: Any = None,
        orders_updated: int = 0,
        orders_new: int = 0,
        items_updated: int = 0,
        items_new: int = 0,
        items_closed: int = 0,
        items_deleted: int = 0,
        notify: bool = True,
    ) -> dict[str, Any]:
        """Change data as sellers would between two syncs (for each seller when seller_id is None); dates now.
        Closed items keep being listed by the seller's items search; deleted ones (closed, sub_status ["deleted"],
        as the API's delete does) are no longer listed but are still answered by id. `notify=False` changes data
        without any notification (as when a delivery is lost for good)."""
        counts = (orders_updated, orders_new, items_updated, items_new, items_closed, items_deleted)
        if any(not isinstance(n, int) or n < 0 for n in counts):
            raise _ApiError(400, {"error": "counts must be integers >= 0"})
        rng = self.mutation_rng
        now = max(_now_ms(), self.start_ms + 1)
        changed: dict[str, list] = {"orders_updated": [], "orders_new": [], "items_updated": [], "items_new": [],
                                    "items_closed": [], "items_deleted": []}
        for seller in self._sellers_of(seller_id):
            for order_id in rng.sample(sorted(seller.orders), min(orders_updated, len(seller.orders))):
                order = seller.orders[order_id]
                dlu = max(now, order.dlu_ms + 1)
                body = dict(order.body)
                statuses = [s for s in ("paid", "cancelled", "partially_refunded") if s != body["status"]]
                body["status"] = rng.choice(statuses)
                body["status_detail"] = None if body["status"] == "paid" else rng.choice((None, "refunded"))
                body["paid_amount"] = round(body["total_amount"] * rng.uniform(0.3, 1.0), 2)
                body["last_updated"] = body["date_last_updated"] = iso_ms(dlu)
                seller.orders[order_id] = _Order(order_id, order.closed_ms, dlu, body, order.created_ms)
                changed["orders_updated"].append(order_id)
            for item_id in rng.sample(seller.item_ids, min(items_updated, len(seller.item_ids))):
                item = dict(seller.items[item_id])
                item["price"] = round(item["price"] * rng.uniform(0.8, 1.2), 2)
                item["available_quantity"] = rng.randint(0, 500)
                item["last_updated"] = iso_ms(now)
                seller.items[item_id] = item
                changed["items_updated"].append(item_id)
            if items_closed or items_deleted:
                touched = set(changed["items_updated"])
                open_ids = [i for i in seller.item_ids if i not in touched and seller.items[i]["status"] != "closed"]
                ending = rng.sample(open_ids, min(items_closed + items_deleted, len(open_ids)))
                for n, item_id in enumerate(ending):
                    deleted = n < items_deleted
                    seller.items[item_id] = {**seller.items[item_id], "status": "closed",
                                             "sub_status": ["deleted"] if deleted else [], "last_updated": iso_ms(now)}
                    changed["items_deleted" if deleted else "items_closed"].append(item_id)
                gone = set(changed["items_deleted"])
                seller.item_ids = [i for i in seller.item_ids if i not in gone]  # a new list: scans keep theirs
            if items_new:
                for _ in range(items_new):
                    item = _new_item(seller, rng, now, now)
                    seller.items[item["id"]] = item
                    self.item_owner[item["id"]] = seller.id
                    changed["items_new"].append(item["id"])
                seller.item_ids = sorted(seller.items)  # a new list: running scans keep their snapshot
            for _ in range(orders_new):
                order_id = seller.order_id(rng)
                seller.orders[order_id] = _Order(
                    order_id, now, now, _order_body(seller, rng, order_id, now, now, now), now
                )
                changed["orders_new"].append(order_id)
            if orders_updated or orders_new:
                seller.reindex_orders()
        if notify:
            self.notifier.changed(changed, self.item_owner, now)
        return {**changed, "at": iso_ms(now)}

    def hot_hour(
        self, seller_id: Any = None, orders: int = 0, hour: str | None = None, created_hours: float = 24,
    ) -> dict[str, Any]:
        """A sale-day hour: `orders` new orders of one seller, all last updated within the hour from `hour` (ISO,
        floored to the hour; default the last full hour), created over the `created_hours` before their update."""
        seller = self._seller_or_error(seller_id)
        if not isinstance(orders, int) or not 0 <= orders <= 200_000:
            raise _ApiError(400, {"error": "orders must be an integer from 0 to 200,000"})
        if not isinstance(created_hours, (int, float)) or created_hours <= 0:
            raise _ApiError(400, {"error": "created_hours must be a number > 0"})
        if hour is None:
            start = (max(_now_ms(), self.start_ms) // HOUR_MS - 1) * HOUR_MS
        else:
            parsed = datetime.fromisoformat(hour)
            if parsed.tzinfo is None:
                raise _ApiError(400, {"error": "hour needs an offset"})
            start = to_ms(parsed) // HOUR_MS * HOUR_MS
        rng = self.mutation_rng
        spread = int(created_hours * HOUR_MS)
        dates = []
        for _ in range(orders):
            dlu = start + int(rng.random() * HOUR_MS)
            created = dlu - int(rng.random() * spread)
            dates.append((created, created + int(rng.random() * (dlu - created)), dlu))
        _add_orders(seller, rng, dates)
        return {"seller_id": seller.id, "orders": orders, "from": iso_ms(start), "to": iso_ms(start + HOUR_MS)}


# -- request parsing -------------------------------------------------------------------------------------
def _bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _form(body: bytes) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}


def _int_param(params: Any, name: str, default: int) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _bad_request(f"{name} must be an integer, not {raw!r}") from None
    if value < 0:
        raise _bad_request(f"{name} must not be negative")
    return value


def _hour_param(params: Any, name: str) -> int | None:
    """A date filter in epoch ms, truncated down to the hour (UTC) as the real API does; None when absent."""
    raw = params.get(name)
    if not raw:
        return None
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        hint = " (a '+' in a query string must be sent as %2B)" if " " in raw else ""
        raise _bad_request(f"invalid date in {name}: {raw!r}{hint}") from None
    if value.tzinfo is None:
        raise _bad_request(f"{name} needs an offset: {raw!r}")
    return to_ms(value) // HOUR_MS * HOUR_MS


# -- the app and ways to run it --------------------------------------------------------------------------
def create_app(config: EmulatorConfig | None = None) -> Starlette:
    """The emulator as an ASGI app; its state is `app.state.emulator` (a MarketplaceEmulator)."""
    emulator = MarketplaceEmulator(config or EmulatorConfig())
    api = emulator.api_route
    routes = [
        api("/oauth/token", emulator.oauth_token, ["POST"]),
        api("/orders/search", emulator.orders_search, ["GET"]),
        api("/users/{user_id:int}/items/search", emulator.items_search, ["GET"]),
        api("/items", emulator.items_multiget, ["GET"]),
        api("/items/bulk", emulator.items_multiget, ["GET"]),
        api("/orders/{order_id:int}", emulator.get_order, ["GET"]),
        api("/missed_feeds", emulator.missed_feeds, ["GET"]),
        Route("/authorization", emulator.authorization, methods=["GET"]),
        *emulator.control_routes(),
    ]
    app = Starlette(routes=routes)
    app.state.emulator = emulator
    return app


@dataclass
class RunningEmulator(StoppableEmulator):
    """A live emulator. `stop()` (or leaving the `with` block) stops it, whoever started it."""

    base_url: str
    port: int
    pid: int
    started: bool  # False when an already-running process was reused
    config: EmulatorConfig  # its config when this handle was made (a reused process: as it was started)
    _stop: Callable[[], None] = field(repr=False)

    @property
    def control(self) -> EmulatorControl:
        return EmulatorControl(self.base_url)


def _uvicorn_server(app: Starlette) -> uvicorn.Server:
    return uvicorn.Server(
        uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off", server_header=False,
            timeout_graceful_shutdown=3, backlog=2048,
        )
    )


def run_in_thread(config: EmulatorConfig | None = None, port: int = 0, start_timeout: float = 10.0) -> RunningEmulator:
    """Serve the emulator from a daemon thread of this process on 127.0.0.1 (port 0: a free port)."""
    config = config or EmulatorConfig()
    app = create_app(config)
    sock = bind("127.0.0.1", port)  # bound here, so port 0 cannot race with another process
    port = sock.getsockname()[1]
    server = _uvicorn_server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"emulator-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError(f"the marketplace emulator did not start on 127.0.0.1:{port}")
        time.sleep(0.01)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()

    return RunningEmulator(f"http://127.0.0.1:{port}", port, os.getpid(), True, app.state.emulator.config, stop)


def _health(port: int) -> dict[str, Any] | None:
    return health(port, SERVICE_NAME)


def _remote_config(base_url: str) -> EmulatorConfig:
    return EmulatorConfig.model_validate(httpx.get(f"{base_url}/_emulator/config", timeout=5).json())


class MarketplaceEmulatorService(EmulatorService[RunningEmulator]):
    """The emulator as a detached service (the stack's, the demo's, the benchmark's): a free port on 127.0.0.1.
    A reused process keeps the config it was started with (`RunningEmulator.config` tells which); stop it
    first to change the data knobs, or use the control API for the runtime ones."""

    name = "marketplace emulator"
    state_file = STATE_FILE
    module = "emulators.marketplace"

    def __init__(self, folder: Path, config: EmulatorConfig | None = None, start_timeout: float = 30.0):
        super().__init__(folder, config or EmulatorConfig(), start_timeout)

    def _handle(self, port: int, pid: int, started: bool) -> RunningEmulator:
        base_url = f"http://127.0.0.1:{port}"
        return RunningEmulator(base_url, port, pid, started, _remote_config(base_url), self.stop)

    def find(self) -> RunningEmulator | None:
        state = self.state()
        pid = self.current_pid(state)
        if not state or pid is None or _health(state["port"]) is None:
            return None
        return self._handle(state["port"], pid, False)

    def start(self) -> RunningEmulator:
        port = free_port()
        pid = self.spawn_emulator(
            ["--port", str(port)], lambda: _health(port) is not None, {"port": port},
            f"the marketplace emulator did not start on 127.0.0.1:{port}",
        )
        return self._handle(port, pid, True)

    def address(self, running: RunningEmulator) -> str:
        return running.base_url


def running_emulator_process(state_dir: Path) -> RunningEmulator | None:
    """This folder's emulator process if it is running and answers, without starting one."""
    return MarketplaceEmulatorService(state_dir).find()


def start_emulator_process(
    config: EmulatorConfig | None, state_dir: Path, start_timeout: float = 30.0
) -> RunningEmulator:
    """Reuse this folder's running emulator process, or start a detached one that outlives the caller."""
    return MarketplaceEmulatorService(state_dir, config, start_timeout).ensure()


def stop_emulator_process(state_dir: Path, timeout: float = 10.0) -> bool:
    """Stop this folder's emulator process. True if one was running."""
    return MarketplaceEmulatorService(state_dir).stop(timeout)


# -- control client --------------------------------------------------------------------------------------
class EmulatorControl(ControlClient):
    """The control API (`/_emulator/...`) over httpx, for tests, the demo and the benchmark."""

    def __init__(self, base_url: str, timeout: float = 30.0):
        self.base_url = base_url.rstrip("/")
        super().__init__(timeout, self.base_url)

    def health(self) -> dict[str, Any]:
        return self._call("GET", "health")

    def authorize(self, seller_id: int) -> str:
        """A fresh single-use authorization code for the seller."""
        return self._call("POST", "authorize", {"seller_id": seller_id})["code"]

    def sellers(self) -> list[dict[str, Any]]:
        return self._call("GET", "sellers")

    def set_seller(
        self,
        seller_id: int,
        orders: int | None = None,
        items: int | None = None,
        orders_window_hours: float | None = None,
        orders_window_end: datetime | str | None = None,
    ) -> dict[str, Any]:
        """Regenerate one seller's data with other counts (and optionally all its orders in one window)."""
        if isinstance(orders_window_end, datetime):
            orders_window_end = orders_window_end.isoformat()
        fields = {
            "orders": orders, "items": items, "orders_window_hours": orders_window_hours,
            "orders_window_end": orders_window_end,
        }
        return self._call("POST", f"sellers/{seller_id}", {k: v for k, v in fields.items() if v is not None})

    def add_fault(
        self,
        path_prefix: str,
        status: int = 503,
        times: int = 1,
        skip: int = 0,
        seller_id: int | None = None,
        retry_after: int | None = None,
    ) -> dict[str, Any]:
        rule = {"path_prefix": path_prefix, "status": status, "times": times, "skip": skip}
        if seller_id is not None:
            rule["seller_id"] = seller_id
        if retry_after is not None:
            rule["retry_after"] = retry_after
        return self._call("POST", "faults", rule)

    def faults(self) -> list[dict[str, Any]]:
        return self._call("GET", "faults")

    def clear_faults(self) -> int:
        return self._call("DELETE", "faults")["cleared"]

    def config(self) -> dict[str, Any]:
        return self._call("GET", "config")

    def configure(self, **knobs: Any) -> dict[str, Any]:
        """Change runtime knobs (RUNTIME_KNOBS); answers the whole config."""
        return self._call("POST", "config", knobs)

    def expire_tokens(self, seller_id: int | None = None) -> int:
        return self._call("POST", "expire_tokens", {"seller_id": seller_id})["expired"]

    def expire_scrolls(self) -> int:
        return self._call("POST", "expire_scrolls")["expired"]

    def mutate(
        self,
        seller_id: int | None = None,
        orders_updated: int = 0,
        orders_new: int = 0,
        items_updated: int = 0,
        items_new: int = 0,
        items_closed: int = 0,
        items_deleted: int = 0,
        notify: bool = True,
    ) -> dict[str, Any]:
        return self._call(
            "POST",
            "mutate",
            {
                "seller_id": seller_id, "orders_updated": orders_updated, "orders_new": orders_new,
                "items_updated": items_updated, "items_new": items_new, "items_closed": items_closed,
                "items_deleted": items_deleted, "notify": notify,
            },
        )

    def hot_hour(
        self, seller_id: int, orders: int, hour: datetime | str | None = None, created_hours: float = 24
    ) -> dict[str, Any]:
        """Add `orders` orders of one seller all last updated in one hour (default the last full hour), created
        over the `created_hours` before; answers the hour's bounds."""
        body: dict[str, Any] = {"seller_id": seller_id, "orders": orders, "created_hours": created_hours}
        if hour is not None:
            body["hour"] = hour.isoformat() if isinstance(hour, datetime) else hour
        return self._call("POST", "hot_hour", body)

    def revoke(self, seller_id: int) -> dict[str, Any]:
        return self._call("POST", "revoke", {"seller_id": seller_id})

    def notifications(self) -> dict[str, Any]:
        """Notifications queued, delivered, failed attempts, missed (in missed feeds), pending, last delivery."""
        return self._call("GET", "notifications")

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "stats")

    def reset_stats(self) -> dict[str, Any]:
        return self._call("POST", "stats/reset")

    def orders(self, seller_id: int | None = None) -> list[dict[str, Any]]:
        return self._call("GET", "orders", seller_id=seller_id)

    def items(self, seller_id: int | None = None) -> list[dict[str, Any]]:
        return self._call("GET", "items", seller_id=seller_id)


# -- command line ----------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m emulators.marketplace",
        description="Serve the marketplace API emulator on 127.0.0.1 until SIGTERM or Ctrl-C.",
    )
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port (default 8765)")
    add_config_arguments(parser, EmulatorConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(_parser().parse_args(argv))
    port = args.pop("port")
    try:
        config = config_from_arguments(args, EmulatorConfig)
    except (ValueError, ValidationError) as exc:
        print(f"invalid configuration: {exc}", file=sys.stderr)
        return 2
    app = create_app(config)
    sock = bind("127.0.0.1", port)
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    emulator: MarketplaceEmulator = app.state.emulator
    print(f"marketplace emulator on {base_url} ({len(emulator.sellers)} sellers, seed {config.seed})", flush=True)
    print(
        f"client_id={config.client_id} client_secret={config.client_secret} redirect_uri={config.redirect_uri}",
        flush=True,
    )
    _uvicorn_server(app).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
