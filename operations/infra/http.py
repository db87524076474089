"""HTTP client defaults shared by every client of an outside system: one `httpx.Client` per process and
base URL (explicit timeouts and connection limits), and one retry policy (exponential backoff with full
jitter, `Retry-After` honoured) for the faults that are transient.

Clients built on this translate HTTP errors into their own exception tree; this module only decides *when*
to retry and *how long* to wait, never what an answer means.
"""

from __future__ import annotations

import email.utils
import functools
import os
import random
import ssl
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Iterator

import httpx

# Answers that mean "try again later" for any well-behaved API. Other 4xx are the caller's fault: never retried.
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Faults where the request may not have reached the server, or its answer was lost.
TRANSIENT_ERRORS = (httpx.TransportError,)

_clients: dict[tuple, httpx.Client] = {}
_clients_lock = threading.Lock()


@dataclass(frozen=True)
class HttpSettings:
    """Timeouts and pool limits of one process-wide client (per base URL)."""

    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    write_timeout: float = 30.0
    pool_timeout: float = 30.0
    max_connections: int = 20
    max_keepalive_connections: int = 20

    def timeout(self) -> httpx.Timeout:
        return httpx.Timeout(
            connect=self.connect_timeout, read=self.read_timeout, write=self.write_timeout, pool=self.pool_timeout
        )

    def limits(self) -> httpx.Limits:
        return httpx.Limits(
            max_connections=self.max_connections, max_keepalive_connections=self.max_keepalive_connections
        )


@functools.lru_cache(maxsize=1)
def default_ssl_context() -> ssl.SSLContext:
    """httpx's default verifying context, built once per process. Every httpx client of the project passes it
    (`verify=`), as do one-off requests (`httpx.get(..., verify=default_ssl_context())`): httpx builds a context
    for each client, even for plain http URLs, loading the CA bundle again (~13-25 ms of CPU each time)."""
    return httpx.create_ssl_context()


def shared_http_client(base_url: str, settings: HttpSettings = HttpSettings(), **client_kwargs) -> httpx.Client:
    """The process's client for `base_url` with these settings: connection pool and keep-alive shared by all
    threads of the process (httpx.Client is thread-safe). A forked or Dask worker process gets its own."""
    key = (os.getpid(), base_url.rstrip("/"), settings, tuple(sorted(client_kwargs.items(), key=str)))
    with _clients_lock:
        client = _clients.get(key)
        if client is None or client.is_closed:
            client = httpx.Client(
                base_url=base_url.rstrip("/"),
                timeout=settings.timeout(),
                limits=settings.limits(),
                follow_redirects=False,
                **{"verify": default_ssl_context(), **client_kwargs},
            )
            _clients[key] = client
    return client


def close_shared_http_clients() -> None:
    """Close this process's clients (tests, shutdown)."""
    with _clients_lock:
        for key, client in list(_clients.items()):
            if key[0] == os.getpid():
                client.close()
            del _clients[key]
        for key, gets in list(_gets.items()):
            if key[0] == os.getpid():
                gets.close()
            del _gets[key]


def retry_after_seconds(response: httpx.Response, now: datetime | None = None) -> float | None:
    """`Retry-After` as seconds (delta-seconds or an HTTP date), None when absent or unreadable."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter: attempt n (0-based) waits uniform(0, min(cap, base * 2**n)),
    or the server's `Retry-After` when it gives one (capped by `max_retry_after`)."""

    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 10.0
    max_retry_after: float = 60.0

    def delay(self, attempt: int, response: httpx.Response | None = None, rng: random.Random | None = None) -> float:
        if response is not None:
            hinted = retry_after_seconds(response)
            if hinted is not None:
                return min(hinted, self.max_retry_after)
        ceiling = min(self.max_delay, self.base_delay * 2**attempt)
        return (rng or random).uniform(0, ceiling)

    def sleep(self, attempt: int, response: httpx.Response | None = None) -> float:
        seconds = self.delay(attempt, response)
        time.sleep(seconds)
        return seconds


def is_transient_status(status_code: int) -> bool:
    return status_code in TRANSIENT_STATUS


class RequestPacer:
    """At most `in_flight` requests at once and `per_second` request starts per second, for the threads of one
    process that share it (a small device's budget). `slot()` wraps one request."""

    def __init__(self, per_second: float, in_flight: int = 1):
        if per_second <= 0 or in_flight < 1:
            raise ValueError("per_second must be > 0 and in_flight >= 1")
        self.interval = 1.0 / per_second
        self._slots = threading.BoundedSemaphore(in_flight)
        self._lock = threading.Lock()
        self._next_start = 0.0

    @contextmanager
    def slot(self) -> Iterator[None]:
        with self._slots:
            with self._lock:
                now = time.monotonic()
                start = max(now, self._next_start)
                self._next_start = start + self.interval
            if start > now:
                time.sleep(start - now)
            yield


_USER_AGENT = f"python-httpx/{httpx.__version__}"  # what the httpx client says, so the API sees one client


class KeepAliveGets:
    """GETs to one origin over plain keep-alive HTTP/1.1 connections (`http.client`), answered as
    `httpx.Response`s, and failing with httpx's transport errors (TRANSIENT_ERRORS): for a client whose hot path
    is many small GETs (a marketplace sync pages thousands). An httpx.Client spends ~0.5 ms of CPU per request in
    its own layers (request building, pool bookkeeping, h11); this spends ~0.15 ms. Thread-safe; at most
    `max_connections` requests at once (`pool_timeout` to get one), at most `max_keepalive_connections` kept idle.
    No proxy, no redirects, no compression, no cookies: `keepalive_gets` gives one only where none is needed."""

    def __init__(self, base_url: str, settings: HttpSettings = HttpSettings()):
        import http.client
        from urllib.parse import urlsplit

        parts = urlsplit(base_url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.settings = settings
        self._prefix = parts.path
        self._host = parts.netloc
        if parts.scheme == "https":
            self._connect = lambda: http.client.HTTPSConnection(
                parts.hostname, parts.port, timeout=settings.connect_timeout, context=default_ssl_context())
        else:
            self._connect = lambda: http.client.HTTPConnection(parts.hostname, parts.port,
                                                               timeout=settings.connect_timeout)
        self._idle: list = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(settings.max_connections)

    def get(self, path: str, params: dict | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
        """GET `path` (under the base URL) with `params` as its query."""
        from urllib.parse import urlencode

        target = self._prefix + path + (f"?{urlencode(params)}" if params else "")
        sent = {"Host": self._host, "Accept": "*/*", "User-Agent": _USER_AGENT, **(headers or {})}
        if not self._slots.acquire(timeout=self.settings.pool_timeout):
            raise httpx.PoolTimeout(f"no connection free within {self.settings.pool_timeout:.0f} s")
        try:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is not None:
                try:
                    return self._exchange(conn, target, sent)
                except _StaleConnection:
                    pass  # the server closed it while idle, before reading the request: a fresh one
            return self._exchange(self._connect(), target, sent, fresh=True)
        finally:
            self._slots.release()

    def _exchange(self, conn, target: str, headers: dict[str, str], fresh: bool = False) -> httpx.Response:
        import http.client
        import socket

        try:
            if fresh:
                try:
                    conn.connect()
                except socket.timeout as exc:
                    raise httpx.ConnectTimeout(f"connect: {exc}") from None
                except OSError as exc:
                    raise httpx.ConnectError(f"connect: {exc}") from None
                conn.sock.settimeout(self.settings.read_timeout)
            try:
                conn.request("GET", target, headers=headers)
                answer = conn.getresponse()
                content = answer.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                if not fresh:
                    raise _StaleConnection() from exc
                raise httpx.RemoteProtocolError(f"{type(exc).__name__}: {exc}") from None
            except socket.timeout as exc:
                raise httpx.ReadTimeout(f"read: {exc}") from None
            except (OSError, http.client.HTTPException) as exc:
                raise httpx.ReadError(f"{type(exc).__name__}: {exc}") from None
        except BaseException:
            conn.close()
            raise
        if answer.will_close:
            conn.close()
        else:
            with self._lock:
                if len(self._idle) < self.settings.max_keepalive_connections:
                    self._idle.append(conn)
                    conn = None
            if conn is not None:
                conn.close()
        return httpx.Response(answer.status, headers=answer.getheaders(), content=content)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class _StaleConnection(Exception):
    """A kept-alive connection the server had closed: the request was not read; send it on a fresh one."""


_gets: dict[tuple, KeepAliveGets] = {}


def keepalive_gets(base_url: str, settings: HttpSettings = HttpSettings()) -> KeepAliveGets | None:
    """The process's `KeepAliveGets` for `base_url` and `settings`; None when the environment sets a proxy for it
    (then the httpx client, which honours proxies, is the one to use)."""
    import urllib.request
    from urllib.parse import urlsplit

    parts = urlsplit(base_url)
    proxies = urllib.request.getproxies()
    if parts.scheme in proxies or "all" in proxies:
        if not urllib.request.proxy_bypass(parts.hostname or ""):
            return None
    key = (os.getpid(), base_url.rstrip("/"), settings)
    with _clients_lock:
        gets = _gets.get(key)
        if gets is None:
            gets = _gets[key] = KeepAliveGets(base_url, settings)
    return gets
