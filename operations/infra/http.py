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
def _default_ssl_context() -> ssl.SSLContext:
    """httpx's default verifying context, built once per process: each client would otherwise load the CA bundle
    again (~25 ms of CPU per client)."""
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
                **{"verify": _default_ssl_context(), **client_kwargs},
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
