"""Client of a Control iD access-control device (a turnstile): the `.fcgi` JSON API. Written for the real
devices; the emulator in `emulators/controlid.py` follows the same contract.

- Every call is a POST with a JSON body; the session token travels in the `session` query parameter,
  URL-encoded (tokens contain `/` and `+`). A 401 means the session expired: log in again once and repeat.
- Connection errors, timeouts and 5xx are retried with backoff and full jitter; 400s are the request's fault
  and are raised at once (`DeviceRefused`, with the device's own error text), never retried.
- The password is a `SecretStr`: never in a URL, a log line or an exception message.
- One `httpx.Client` per process and device (`operations.infra.http.shared_http_client`); `limiter` wraps every
  request (the caller bounds the requests in flight and per second on the device).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterable

import httpx
import orjson
from pydantic import SecretStr

from operations.infra.http import TRANSIENT_ERRORS, HttpSettings, RetryPolicy, is_transient_status, shared_http_client

MAX_IN_LIST = 999  # values in one `where` list (the device's SQLite limit of variables)


class DeviceError(Exception):
    """Base of the client's errors; `transient`: worth retrying later. Messages never contain the password."""

    transient = False


class DeviceRefused(DeviceError):
    """400 (or another 4xx): the device refused the request as such; its error text is kept."""

    def __init__(self, device: str, path: str, status: int, error: str):
        self.device, self.path, self.status, self.error = device, path, status, error
        super().__init__(f"{device} {path}: {status} {error}")


class DeviceUnavailable(DeviceError):
    """Unreachable, timing out or answering 5xx past the client's retries."""

    transient = True


class LoginRefused(DeviceError):
    """The device refused the login and password."""


@dataclass
class RequestStats:
    """What a client did, for the run's report."""

    requests: int = 0
    retries: int = 0
    logins: int = 0
    writes: int = 0
    objects_written: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)


class ControlIdClient:
    """One device. Thread-safe: concurrent calls share the session (a re-login is done once for all)."""

    def __init__(
        self,
        base_url: str,
        login: str,
        password: SecretStr,
        *,
        name: str = "",
        http: HttpSettings = HttpSettings(connect_timeout=5.0, read_timeout=30.0),
        retry: RetryPolicy = RetryPolicy(attempts=5, base_delay=0.2, max_delay=10.0),
        limiter: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
        stats: RequestStats | None = None,
    ):
        self.name = name or base_url
        self._http = shared_http_client(base_url, http)
        self._login, self._password = login, password
        self._retry, self._limiter = retry, limiter
        self.stats = stats or RequestStats()
        self._session: str | None = None
        self._session_lock = threading.Lock()

    # -- session ---------------------------------------------------------------------------------------
    def login(self) -> None:
        """Open a session (a new one, replacing the current)."""
        body = {"login": self._login, "password": self._password.get_secret_value()}
        answer = self._post("/login.fcgi", body, session=None)
        self.stats.count(logins=1)
        self._session = answer["session"]

    def logout(self) -> None:
        """End the session, if any (best effort: an expired session is no error)."""
        session, self._session = self._session, None
        if session is not None:
            with contextlib.suppress(DeviceError):
                self._post("/logout.fcgi", {}, session=session)

    def _current_session(self) -> str:
        with self._session_lock:
            if self._session is None:
                self.login()
            return self._session

    def _renew_session(self, expired: str) -> str:
        """After a 401: log in again, unless another thread already did since `expired` was used."""
        with self._session_lock:
            if self._session == expired:
                self.login()
            return self._session

    # -- calls -----------------------------------------------------------------------------------------
    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST `path` with the session; on a 401, one new login and one repeat."""
        session = self._current_session()
        try:
            return self._post(path, body, session)
        except _SessionExpired:
            return self._post(path, body, self._renew_session(session))

    def _post(self, path: str, body: dict[str, Any], session: str | None) -> dict[str, Any]:
        params = {"session": session} if session is not None else None
        content = orjson.dumps(body)  # compact UTF-8, as json.dumps(ensure_ascii=False) but ~10x faster
        headers = {"Content-Type": "application/json"}
        for attempt in range(self._retry.attempts):
            last = attempt == self._retry.attempts - 1
            try:
                with self._limiter():
                    self.stats.count(requests=1)
                    response = self._http.post(path, params=params, content=content, headers=headers)
            except TRANSIENT_ERRORS as exc:
                if last:
                    raise DeviceUnavailable(f"{self.name} {path}: {type(exc).__name__}: {exc}") from None
                self.stats.count(retries=1)
                self._retry.sleep(attempt)
                continue
            if response.status_code < 400:
                return _decoded(response)
            if response.status_code == 401:
                if session is None:
                    raise LoginRefused(f"{self.name}: login refused ({_error_text(response)})")
                raise _SessionExpired()
            if is_transient_status(response.status_code):
                if last:
                    raise DeviceUnavailable(f"{self.name} {path}: {response.status_code} {_error_text(response)}")
                self.stats.count(retries=1)
                self._retry.sleep(attempt, response)
                continue
            raise DeviceRefused(self.name, path, response.status_code, _error_text(response))
        raise AssertionError("unreachable")  # the loop returns or raises

    # -- objects ---------------------------------------------------------------------------------------
    def load(self, object_name: str, field_name: str, values: Iterable[Any]) -> list[dict[str, Any]]:
        """Objects whose `field_name` is one of `values`, in lists of at most 999 per call."""
        values = list(dict.fromkeys(values))
        found: list[dict[str, Any]] = []
        for start in range(0, len(values), MAX_IN_LIST):
            part = values[start:start + MAX_IN_LIST]
            answer = self.call(
                "/load_objects.fcgi", {"object": object_name, "where": {object_name: {field_name: part}}}
            )
            found += answer.get(object_name, [])
        return found

    def write(self, object_name: str, values: list[dict[str, Any]], *, create_only: bool = False) -> None:
        """Write one batch: `create_or_modify_objects` (idempotent), or `create_objects` (`create_only`: a value
        that exists is refused with 400 instead of being changed)."""
        self.write_json(object_name, orjson.dumps(values), len(values), create_only=create_only)

    def write_json(self, object_name: str, values: bytes, count: int, *, create_only: bool = False) -> None:
        """`write` of `count` objects already encoded as one JSON list (sent as is, not decoded again)."""
        path = "/create_objects.fcgi" if create_only else "/create_or_modify_objects.fcgi"
        self.call(path, {"object": object_name, "values": orjson.Fragment(values)})
        self.stats.count(writes=1, objects_written=count)


def _decoded(response: httpx.Response) -> dict[str, Any]:
    """A 2xx answer's JSON ({} when empty), decoded with orjson (999-user pages ~5x faster than the json module);
    a body that is not JSON raises the json module's ValueError."""
    if not response.content:
        return {}
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return response.json()


class _SessionExpired(Exception):
    """401 on a call with a session."""


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict) and "error" in body:
        return str(body["error"])[:500]
    return str(body)[:200]
