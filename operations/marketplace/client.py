"""Client of the marketplace API (Mercado Livre's contract): OAuth token grants, order search, item scan and
item details. Written for the real API; the emulator in `emulators/marketplace.py` follows the same contract.

- Tokens travel only in the `Authorization` header or a form body, never in a URL (URLs end up in logs), and
  never in an exception message.
- 429 (honouring `Retry-After`), 5xx and transport errors are retried with backoff and jitter; other 4xx are
  raised at once as permanent errors.
- One `httpx.Client` per process and base URL (`operations.infra.http.shared_http_client`); a
  `MarketplaceClient` is cheap and is made per account, so its counters belong to that account's sync. Given
  `gets` (`operations.infra.http.keepalive_gets`, as the app block does), its GETs (every page, batch and order
  read) go over plain keep-alive connections instead: a third of the client's CPU per request, same answers,
  same errors, same retries.
- Requests in flight: clients given the same `request_slots(n)` share n slots; a request holds one only while
  it is on the wire (never during a backoff), so more accounts than slots may sync at once and one account's
  database work overlaps another's requests.
"""

from __future__ import annotations

import os
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable

import httpx
import orjson
from pydantic import SecretStr

from operations.infra.http import KeepAliveGets, RetryPolicy, is_transient_status, TRANSIENT_ERRORS

ORDERS_PAGE_LIMIT = 50  # the API's largest page of orders
ORDERS_OFFSET_CAP = 10_000  # offset + limit above this is answered 400
ITEMS_PAGE_LIMIT = 100
ITEMS_OFFSET_CAP = 1_000  # offset paging of item ids stops here; beyond it, search_type=scan
ITEMS_DETAIL_BATCH = 20  # ids per GET /items
ORDER_SORTS = ("date_asc", "date_desc")  # both by date_closed
# The order statuses the API documents, one per `order.status` filter.
ORDER_STATUSES = (
    "confirmed", "payment_required", "payment_in_process", "partially_paid", "paid", "partially_refunded",
    "pending_cancel", "cancelled", "invalid",
)


class MarketplaceError(Exception):
    """Base of the client's errors. Messages never contain tokens."""


class PermanentAPIError(MarketplaceError):
    """A 4xx other than 401/429: the request itself is wrong; retrying cannot help."""

    def __init__(self, status: int, error: str, message: str, path: str):
        self.status, self.error, self.path = status, error, path
        super().__init__(f"{path}: {status} {error}: {message}")


class InvalidGrant(PermanentAPIError):
    """The refresh token (or authorization code) is dead: the account needs its owner to authorize again."""


class ScrollExpired(PermanentAPIError):
    """The items scan's scroll_id expired: the scan must start over."""


class InvalidAccessToken(MarketplaceError):
    """401: the access token expired or is unknown. Refresh once and retry once."""

    def __init__(self, path: str):
        self.path = path
        super().__init__(f"{path}: 401 invalid_token (the access token expired or was revoked)")


class TransientAPIError(MarketplaceError):
    """429/5xx/timeouts that outlived the client's retries: the task may retry later."""


@dataclass(frozen=True)
class AppCredentials:
    """The application's OAuth credentials (from the MarketplaceApp block)."""

    client_id: str
    client_secret: SecretStr
    redirect_uri: str = ""


@dataclass(frozen=True)
class TokenGrant:
    access_token: SecretStr
    refresh_token: SecretStr
    expires_in: int
    user_id: int
    scope: str

    def expires_at(self, issued: datetime) -> datetime:
        return issued + timedelta(seconds=self.expires_in)


@dataclass
class RequestStats:
    """What one account's sync asked of the API (thread-safe: an account's calls may overlap)."""

    requests: int = 0
    retries: int = 0
    throttled: int = 0  # 429 answers
    server_errors: int = 0  # 5xx answers and transport errors
    refreshes: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, status: int | None) -> None:
        with self._lock:
            self.requests += 1
            if status is not None:
                self.by_status[status] = self.by_status.get(status, 0) + 1
            if status == 429:
                self.throttled += 1
            elif status is None or status >= 500:
                self.server_errors += 1

    def retried(self) -> None:
        with self._lock:
            self.retries += 1

    def refreshed(self) -> None:
        with self._lock:
            self.refreshes += 1


_slots: dict[tuple[int, int], threading.BoundedSemaphore] = {}
_slots_lock = threading.Lock()


def request_slots(size: int) -> threading.BoundedSemaphore | None:
    """This process's `size` request slots, shared by every client given them (None for size 0: no limit)."""
    if size <= 0:
        return None
    key = (os.getpid(), size)
    with _slots_lock:
        return _slots.setdefault(key, threading.BoundedSemaphore(size))


def _iso(value: datetime) -> str:
    if value.tzinfo is None:
        raise ValueError("naive datetime: give the API a time with its offset")
    return value.isoformat(timespec="milliseconds")


def parse_time(value: str | None) -> datetime | None:
    """The API's ISO-8601 times (with offset) as aware datetimes in UTC."""
    if not value:
        return None
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)


def _json(response: httpx.Response, path: str) -> Any:
    """The body as JSON (orjson: pages of orders decode ~5x faster than with the json module)."""
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError:
        raise MarketplaceError(
            f"{path}: {response.status_code} answer is not JSON: {response.text[:200]!r}"
        ) from None


def _error_fields(response: httpx.Response) -> tuple[str, str]:
    """(error code, human message) from an error body; older answers put the text under `message`."""
    try:
        body = response.json()
    except ValueError:
        return "http_error", response.text[:200]
    if not isinstance(body, dict):
        return "http_error", str(body)[:200]
    error = str(body.get("error") or "http_error")
    message = str(body.get("error_description") or body.get("message") or "")
    return error, message


class MarketplaceClient:
    """The API calls one account's sync (or onboarding) makes, over the process's shared `httpx.Client`."""

    def __init__(
        self,
        http: httpx.Client,
        credentials: AppCredentials,
        retry: RetryPolicy = RetryPolicy(),
        stats: RequestStats | None = None,
        orders_offset_cap: int = ORDERS_OFFSET_CAP,
        slots: threading.BoundedSemaphore | None = None,
        gets: KeepAliveGets | None = None,
    ):
        self.http = http
        self.gets = gets  # the GETs' leaner path (see the module's note); None: every request through `http`
        self.credentials = credentials
        self.retry = retry
        self.stats = stats or RequestStats()
        self.orders_offset_cap = orders_offset_cap
        self.slots = slots  # shared with other clients: see `request_slots`

    def sharing(self, slots: threading.BoundedSemaphore | None) -> MarketplaceClient:
        """This client, its requests limited by `slots` (shared with other clients; None: no limit)."""
        self.slots = slots
        return self

    # -- transport -------------------------------------------------------------------------------------
    def _send(self, method: str, path: str, *, token: SecretStr | None = None, **kwargs) -> httpx.Response:
        """One logical call with retries of transient faults; raises the client's errors for the rest."""
        headers = kwargs.pop("headers", {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token.get_secret_value()}"
        last: str = ""
        for attempt in range(self.retry.attempts):
            response = None
            try:
                with self.slots or nullcontext():
                    if self.gets is not None and method == "GET":
                        response = self.gets.get(path, kwargs.get("params"), headers)
                    else:
                        response = self.http.request(method, path, headers=headers, **kwargs)
            except TRANSIENT_ERRORS as exc:
                self.stats.record(None)
                last = f"{type(exc).__name__}"
            else:
                self.stats.record(response.status_code)
                if response.status_code < 400:
                    return response
                if response.status_code == 401 and token is not None:
                    raise InvalidAccessToken(path)
                if not is_transient_status(response.status_code):
                    error, message = _error_fields(response)
                    raise self._permanent(response.status_code, error, message, path)
                last = f"{response.status_code} {_error_fields(response)[0]}"
            if attempt + 1 < self.retry.attempts:
                self.stats.retried()
                self.retry.sleep(attempt, response)
        raise TransientAPIError(f"{path}: still failing after {self.retry.attempts} attempts ({last})")

    @staticmethod
    def _permanent(status: int, error: str, message: str, path: str) -> PermanentAPIError:
        if error == "invalid_grant":
            return InvalidGrant(status, error, message, path)
        if "scroll" in error or "scroll" in message.lower():
            return ScrollExpired(status, error, message, path)
        return PermanentAPIError(status, error, message, path)

    # -- OAuth -----------------------------------------------------------------------------------------
    def _grant(self, form: dict[str, str]) -> TokenGrant:
        creds = self.credentials
        body = {"client_id": creds.client_id, "client_secret": creds.client_secret.get_secret_value(), **form}
        response = self._send(
            "POST", "/oauth/token", data=body, headers={"Accept": "application/json"}
        )
        data = _json(response, "/oauth/token")
        try:
            return TokenGrant(
                access_token=SecretStr(data["access_token"]),
                refresh_token=SecretStr(data["refresh_token"]),
                expires_in=int(data.get("expires_in") or 21_600),
                user_id=int(data["user_id"]),
                scope=str(data.get("scope") or ""),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MarketplaceError(f"/oauth/token: unexpected answer (missing {exc})") from None

    def refresh(self, refresh_token: SecretStr) -> TokenGrant:
        """Trade the (single-use) refresh token for a new access token and a new refresh token.

        Raises InvalidGrant when the refresh token is dead; TransientAPIError when the server never answered
        (then the old refresh token may still be valid: keep it)."""
        self.stats.refreshed()
        return self._grant({"grant_type": "refresh_token", "refresh_token": refresh_token.get_secret_value()})

    def exchange_code(self, code: SecretStr, redirect_uri: str | None = None) -> TokenGrant:
        """Onboarding: trade an authorization code for the seller's first tokens."""
        return self._grant(
            {
                "grant_type": "authorization_code",
                "code": code.get_secret_value(),
                "redirect_uri": redirect_uri or self.credentials.redirect_uri,
            }
        )

    # -- resources -------------------------------------------------------------------------------------
    def search_orders(
        self, token: SecretStr, seller_id: int, updated_from: datetime, updated_to: datetime, offset: int,
        limit: int = ORDERS_PAGE_LIMIT, *, created_from: datetime | None = None, created_to: datetime | None = None,
        status: str | None = None, sort: str = "date_asc",
    ) -> dict[str, Any]:
        """One page of the seller's orders last updated in [from, to) (the API truncates both to the hour),
        optionally also created in [created_from, created_to) (truncated alike) and of one status, sorted by
        `date_closed` (`date_asc` or `date_desc`)."""
        if sort not in ORDER_SORTS:
            raise ValueError(f"sort must be one of {ORDER_SORTS}, not {sort!r}")
        params: dict[str, Any] = {
            "seller": seller_id,
            "order.date_last_updated.from": _iso(updated_from),
            "order.date_last_updated.to": _iso(updated_to),
            "sort": sort,
            "offset": offset,
            "limit": limit,
        }
        if created_from is not None:
            params["order.date_created.from"] = _iso(created_from)
        if created_to is not None:
            params["order.date_created.to"] = _iso(created_to)
        if status is not None:
            params["order.status"] = status
        response = self._send("GET", "/orders/search", token=token, params=params)
        return _json(response, "/orders/search")

    def search_item_ids(
        self, token: SecretStr, seller_id: int, offset: int = 0, limit: int = ITEMS_PAGE_LIMIT
    ) -> dict[str, Any]:
        """Offset paging of the seller's item ids (stops at ITEMS_OFFSET_CAP)."""
        response = self._send(
            "GET", f"/users/{seller_id}/items/search", token=token, params={"offset": offset, "limit": limit}
        )
        return _json(response, f"/users/{seller_id}/items/search")

    def scan_item_ids(
        self, token: SecretStr, seller_id: int, scroll_id: str | None, limit: int = ITEMS_PAGE_LIMIT
    ) -> dict[str, Any]:
        """One batch of a `search_type=scan` of the seller's item ids; pass back the returned scroll_id."""
        params: dict[str, Any] = {"search_type": "scan", "limit": limit}
        if scroll_id:
            params["scroll_id"] = scroll_id
        response = self._send("GET", f"/users/{seller_id}/items/search", token=token, params=params)
        return _json(response, f"/users/{seller_id}/items/search")

    def get_items(self, token: SecretStr, ids: Iterable[str]) -> tuple[list[dict[str, Any]], list[str]]:
        """Details of up to 20 items: (found items, ids answered 404). Accepts `code` (/items) and
        `status_code` (/items/bulk) entries."""
        ids = list(ids)
        if not 0 < len(ids) <= ITEMS_DETAIL_BATCH:
            raise ValueError(f"get_items takes 1 to {ITEMS_DETAIL_BATCH} ids, not {len(ids)}")
        response = self._send("GET", "/items", token=token, params={"ids": ",".join(ids)})
        found, missing = [], []
        for requested, entry in zip(ids, _json(response, "/items")):
            code = entry.get("code", entry.get("status_code"))
            if code == 200 and isinstance(entry.get("body"), dict):
                found.append(entry["body"])
            else:
                missing.append(requested)
        return found, missing

    def get_order(self, token: SecretStr, order_id: int) -> dict[str, Any] | None:
        """One order (`GET /orders/{id}`, what an orders notification's resource names); None when the API
        answers 404 (or 403: not this seller's)."""
        try:
            return _json(self._send("GET", f"/orders/{int(order_id)}", token=token), f"/orders/{int(order_id)}")
        except PermanentAPIError as exc:
            if exc.status in (403, 404):
                return None
            raise

    def missed_feeds(self, token: SecretStr, app_id: str, offset: int = 0, limit: int = 50) -> dict[str, Any]:
        """One page of the notifications the marketplace could not deliver to the app's callback URL
        (`GET /missed_feeds?app_id=...`): `{"messages": [...], "total", "offset", "limit"}`."""
        response = self._send("GET", "/missed_feeds", token=token,
                              params={"app_id": app_id, "offset": offset, "limit": limit})
        return _json(response, "/missed_feeds")
