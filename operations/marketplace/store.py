"""The marketplace sync's storage: accounts and their tokens, serialized refreshes, the per-account sync
lock, idempotent upserts of orders and items, and checkpoints. SQLAlchemy Core on PostgreSQL or SQLite.

Exactly-once comes from keys, not from luck: orders and items are upserted on the API's ids and only
overwritten by a newer `date_last_updated` / `last_updated`, so re-reading a page changes nothing; a
checkpoint moves only after the rows it covers are committed.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from functools import lru_cache
from typing import Any, Callable, Iterator

from pydantic import SecretStr
from sqlalchemy import Connection, Engine, create_engine, delete, func, select, text, update
from sqlalchemy.pool import NullPool

from operations.errors import UserError
from operations.infra.database import json_recordset_sql, json_rows, json_upsert_sql, upsert_rows, upsert_statement
from operations.marketplace.client import InvalidGrant, TokenGrant, parse_time
from operations.marketplace.models import (
    AccountStatus,
    MarketplaceAccount,
    MarketplaceItem,
    MarketplaceOrder,
    MarketplaceOrderLine,
    SyncCheckpoint,
    SyncGap,
)
from operations.marketplace.tokens import is_encrypted, token_cipher

ACCOUNTS = MarketplaceAccount.__table__
ORDERS = MarketplaceOrder.__table__
ORDER_LINES = MarketplaceOrderLine.__table__
ITEMS = MarketplaceItem.__table__
CHECKPOINTS = SyncCheckpoint.__table__
GAPS = SyncGap.__table__

# One lock per account within a process: SQLite has no row locks, and threads of one process share a pool.
_local_locks: dict[int, threading.Lock] = {}
_local_locks_guard = threading.Lock()


class AccountNeedsReauthorization(Exception):
    """The account's refresh token was refused (invalid_grant): its owner must authorize the app again."""


class UnknownAccount(UserError, ValueError):
    """A seller id that is not in the accounts table."""


def utc(value: datetime | None) -> datetime | None:
    """Aware UTC datetimes everywhere (SQLite hands back naive ones, stored in UTC)."""
    if value is None:
        return None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def _local_lock(seller_id: int) -> threading.Lock:
    with _local_locks_guard:
        return _local_locks.setdefault(seller_id, threading.Lock())


# -- one connection per account's sync -----------------------------------------------------------------------
# On PostgreSQL an account's sync runs on one pooled connection, checked out (and pinged) once, in autocommit:
# a read or a one-statement write is one round trip, where a checkout per call cost a ping, a BEGIN and a
# COMMIT around it. Writes of several statements still run as one transaction (`_transaction`). The store
# functions called inside `account_connection(engine)` on the same thread use it; elsewhere they check out
# their own connection as before.
_HELD: ContextVar[tuple[Engine, Connection] | None] = ContextVar("marketplace_account_connection", default=None)


@contextmanager
def account_connection(engine: Engine) -> Iterator[Connection | None]:
    """Run the block's store calls on `engine` over one connection (PostgreSQL; SQLite: nothing changes)."""
    if engine.dialect.name != "postgresql" or _held(engine) is not None:
        yield _held(engine)
        return
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        token = _HELD.set((engine, conn))
        try:
            yield conn
        finally:
            _HELD.reset(token)


class AccountConnectionLost(Exception):
    """The account's connection broke during its sync (the database restarted, the network failed): the sync
    stops rather than carry on without the account's lock, and a retry starts over on a new connection."""


def _held(engine: Engine) -> Connection | None:
    held = _HELD.get()
    if held is None or held[0] is not engine:
        return None
    if held[1].invalidated:
        raise AccountConnectionLost("the database connection of this account's sync was lost; a retry resumes it")
    return held[1]


@contextmanager
def statement(engine: Engine, autocommit: bool = False) -> Iterator[Connection]:
    """A connection for reads and one-statement writes (each committed on its own): the account's connection
    when one is held, else a checkout (in a transaction, or in autocommit)."""
    conn = _held(engine)
    if conn is not None:
        yield conn
    elif autocommit:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            yield conn
    else:
        with engine.begin() as conn:
            yield conn


@contextmanager
def transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction: on the account's connection when one is held (out of autocommit for the block; switching is
    client-side), else on a checkout."""
    conn = _held(engine)
    if conn is None:
        with engine.begin() as conn:
            yield conn
        return
    conn.commit()  # ends SQLAlchemy's autobegun (autocommit) transaction; nothing is sent
    conn.execution_options(isolation_level=conn.default_isolation_level)
    try:
        with conn.begin():
            yield conn
    finally:
        conn.execution_options(isolation_level="AUTOCOMMIT")


def account_label(nickname: str | None, seller_id: int) -> str:
    """How an account is named in task runs, logs and reports: `<nickname>-<seller id>`."""
    return f"{nickname or 'seller'}-{seller_id}"


@dataclass(frozen=True)
class AccountView:
    """An account as listed and reported: never its tokens."""

    seller_id: int
    nickname: str
    status: str
    status_reason: str
    last_sync_started_at: datetime | None
    last_sync_finished_at: datetime | None
    last_sync_status: str
    last_sync_error: str
    last_sync_run_id: str = ""  # the flow run that holds (or last held) the account's sync

    @property
    def label(self) -> str:
        return account_label(self.nickname, self.seller_id)


@dataclass(frozen=True)
class TokenState:
    access_token: SecretStr
    expires_at: datetime | None
    refresh_token: SecretStr
    version: int
    status: str

    def valid_for(self, margin: timedelta, now: datetime) -> bool:
        return bool(self.access_token.get_secret_value()) and self.expires_at is not None and (
            self.expires_at - margin > now
        )


def _view(row: Any) -> AccountView:
    return AccountView(
        seller_id=row.seller_id,
        nickname=row.nickname or "",
        status=row.status.value if isinstance(row.status, AccountStatus) else str(row.status),
        status_reason=row.status_reason or "",
        last_sync_started_at=utc(row.last_sync_started_at),
        last_sync_finished_at=utc(row.last_sync_finished_at),
        last_sync_status=row.last_sync_status or "",
        last_sync_error=row.last_sync_error or "",
        last_sync_run_id=row.last_sync_run_id or "",
    )


_VIEW_COLUMNS = [
    ACCOUNTS.c.seller_id, ACCOUNTS.c.nickname, ACCOUNTS.c.status, ACCOUNTS.c.status_reason,
    ACCOUNTS.c.last_sync_started_at, ACCOUNTS.c.last_sync_finished_at, ACCOUNTS.c.last_sync_status,
    ACCOUNTS.c.last_sync_error, ACCOUNTS.c.last_sync_run_id,
]


# -- accounts ----------------------------------------------------------------------------------------------
def save_account(engine: Engine, grant: TokenGrant, nickname: str = "", issued_at: datetime | None = None) -> AccountView:
    """Add a seller from its first tokens (onboarding, or a re-authorization: the account is active again)."""
    issued_at = issued_at or now_utc()
    cipher = token_cipher()
    row = {
        "seller_id": grant.user_id,
        "nickname": nickname,
        "status": AccountStatus.active,
        "status_reason": "",
        "access_token": cipher.encrypt(grant.access_token.get_secret_value()),
        "access_token_expires_at": grant.expires_at(issued_at),
        "refresh_token": cipher.encrypt(grant.refresh_token.get_secret_value()),
        "token_version": 1,
        "scope": grant.scope,
        "updated_at": issued_at,
        "parked_notified_at": None,  # authorized again: a later parking is news
    }
    update_columns = [c for c in row if c not in ("seller_id", "token_version")]
    if not nickname:
        update_columns.remove("nickname")
    with engine.begin() as conn:
        conn.execute(upsert_statement(engine, ACCOUNTS, [row], ["seller_id"], update_columns))
        conn.execute(
            update(ACCOUNTS)
            .where(ACCOUNTS.c.seller_id == grant.user_id)
            .values(token_version=ACCOUNTS.c.token_version + 1)
        )
    return get_account(engine, grant.user_id)


def get_account(engine: Engine, seller_id: int) -> AccountView:
    with statement(engine) as conn:
        row = conn.execute(select(*_VIEW_COLUMNS).where(ACCOUNTS.c.seller_id == seller_id)).first()
    if row is None:
        raise UnknownAccount(f"no marketplace account with seller id {seller_id}")
    return _view(row)


def list_accounts(engine: Engine) -> list[AccountView]:
    with engine.connect() as conn:
        return [_view(r) for r in conn.execute(select(*_VIEW_COLUMNS).order_by(ACCOUNTS.c.seller_id))]


def set_account_status(engine: Engine, seller_id: int, status: AccountStatus, reason: str = "") -> AccountView:
    with engine.begin() as conn:
        done = conn.execute(
            update(ACCOUNTS)
            .where(ACCOUNTS.c.seller_id == seller_id)
            .values(status=status, status_reason=reason, updated_at=now_utc())
        )
    if done.rowcount == 0:
        raise UnknownAccount(f"no marketplace account with seller id {seller_id}")
    return get_account(engine, seller_id)


def select_accounts(
    engine: Engine, seller_ids: list[int] | None
) -> tuple[list[AccountView], list[tuple[AccountView, str]]]:
    """(accounts to sync, [(account, why it is skipped)]). Unknown requested ids raise UnknownAccount, before
    any request is made. No ids: every account, of which the active ones are synced."""
    accounts = {a.seller_id: a for a in list_accounts(engine)}
    if seller_ids:
        unknown = sorted(set(seller_ids) - set(accounts))
        if unknown:
            raise UnknownAccount(
                f"unknown seller id(s) {', '.join(map(str, unknown))}: onboard them first "
                "(onboard-account, or python -m deployments.marketplace_accounts)"
            )
        chosen = [accounts[i] for i in dict.fromkeys(seller_ids)]
    else:
        chosen = list(accounts.values())
    to_sync, skipped = [], []
    for account in chosen:
        if account.status == AccountStatus.active.value:
            to_sync.append(account)
        elif account.status == AccountStatus.needs_reauthorization.value:
            skipped.append((account, f"needs re-authorization by its owner ({account.status_reason})"))
        else:
            skipped.append((account, "deactivated"))
    return to_sync, skipped


def record_sync(
    engine: Engine, seller_id: int, *, started: datetime, finished: datetime | None, status: str, error: str = "",
    run_id: str | None = None,
) -> None:
    """The account's last sync: when, how it ended, and (when given) the flow run that holds it."""
    values = {"last_sync_started_at": started, "last_sync_finished_at": finished, "last_sync_status": status,
              "last_sync_error": error[:2000]}
    if run_id is not None:
        values["last_sync_run_id"] = run_id
    with statement(engine) as conn:
        conn.execute(update(ACCOUNTS).where(ACCOUNTS.c.seller_id == seller_id).values(**values))


def release_interrupted_syncs(engine: Engine, holder_running: Callable[[str], bool]) -> list[AccountView]:
    """Mark `interrupted` (and return) the accounts left `running` by a sync that is gone: a crashed or killed
    run never wrote how its sync ended. A sync is gone when nobody holds the account's sync lock (PostgreSQL: the
    holder's connection ended with its process; SQLite: no live lease) or, where the lock cannot tell (SQLite),
    when `holder_running(flow run id)` says its flow run is no longer Running. The next sync resumes such an
    account from its checkpoint. Each update is conditional on the row read, so a sync that ends or starts
    meanwhile keeps its own status."""
    released = []
    for account in list_accounts(engine):
        if account.last_sync_status != "running":
            continue
        lock_free = _sync_lock_free(engine, account.seller_id)
        holder = account.last_sync_run_id
        if engine.dialect.name == "postgresql":
            gone = lock_free
        else:
            gone = lock_free or bool(holder) and not holder_running(holder)
        if not gone:
            continue
        error = (f"the sync of flow run {holder or '(unknown)'} ended without finishing (crashed or killed); "
                 "the next sync resumes it from its checkpoint")
        with engine.begin() as conn:
            done = conn.execute(
                update(ACCOUNTS)
                .where(ACCOUNTS.c.seller_id == account.seller_id, ACCOUNTS.c.last_sync_status == "running",
                       func.coalesce(ACCOUNTS.c.last_sync_run_id, "") == holder)
                .values(last_sync_status="interrupted", last_sync_error=error)
            ).rowcount
        if done:
            released.append(get_account(engine, account.seller_id))
    return released


def claim_parked_notices(
    engine: Engine, now: datetime, reminder: timedelta, seller_ids: list[int] | None = None
) -> list[AccountView]:
    """The parked accounts (needs_reauthorization) whose owner is due to be told: never told since it was parked,
    or last told more than `reminder` ago. Each is claimed (its notice time set to `now`) by a conditional update,
    so two overlapping syncs tell it once."""
    due = []
    for account in list_accounts(engine):
        if account.status != AccountStatus.needs_reauthorization.value:
            continue
        if seller_ids is not None and account.seller_id not in seller_ids:
            continue
        with engine.begin() as conn:
            done = conn.execute(
                update(ACCOUNTS)
                .where(
                    ACCOUNTS.c.seller_id == account.seller_id,
                    ACCOUNTS.c.status == AccountStatus.needs_reauthorization,
                    ACCOUNTS.c.parked_notified_at.is_(None) | (ACCOUNTS.c.parked_notified_at <= now - reminder),
                )
                .values(parked_notified_at=now)
            ).rowcount
        if done:
            due.append(account)
    return due


# -- tokens ------------------------------------------------------------------------------------------------
# Tokens are stored encrypted (operations/marketplace/tokens.py); a plain row (stored before encryption) is
# encrypted in place the first time it is read.
def read_tokens(engine: Engine, seller_id: int) -> TokenState:
    with statement(engine) as conn:
        row = conn.execute(select(ACCOUNTS).where(ACCOUNTS.c.seller_id == seller_id)).first()
    if row is None:
        raise UnknownAccount(f"no marketplace account with seller id {seller_id}")
    state = _token_state(row)
    if _plain(row):
        with transaction(engine) as conn:
            _seal(conn, row)
    return state


def _plain(row: Any) -> bool:
    return any(value and not is_encrypted(value) for value in (row.access_token, row.refresh_token))


def _seal(conn, row: Any) -> None:
    """Encrypt a row's plain tokens in place, unless a refresh changed them meanwhile."""
    cipher = token_cipher()
    conn.execute(
        update(ACCOUNTS)
        .where(ACCOUNTS.c.seller_id == row.seller_id, ACCOUNTS.c.token_version == row.token_version,
               ACCOUNTS.c.refresh_token == row.refresh_token)
        .values(access_token=cipher.rotate(row.access_token or ""), refresh_token=cipher.rotate(row.refresh_token or ""))
    )


def encrypt_stored_tokens(engine: Engine) -> int:
    """Encrypt every account's tokens with the first key (plain ones, and those of an older key after a
    rotation); returns the accounts rewritten. Each row is locked while it is rewritten, so a refresh is never lost."""
    cipher, done = token_cipher(), 0
    with engine.connect() as conn:
        sellers = list(conn.scalars(select(ACCOUNTS.c.seller_id)))
    for seller_id in sellers:
        with engine.begin() as conn:
            row = _account_for_update(conn, seller_id)
            if row is None:
                continue
            values = {"access_token": cipher.rotate(row.access_token or ""),
                      "refresh_token": cipher.rotate(row.refresh_token or "")}
            if values != {"access_token": row.access_token or "", "refresh_token": row.refresh_token or ""}:
                conn.execute(update(ACCOUNTS).where(ACCOUNTS.c.seller_id == seller_id).values(**values))
                done += 1
    return done


def _account_for_update(conn: Any, seller_id: int) -> Any:
    """The account's row, locked until the transaction ends (`SELECT ... FOR UPDATE` on PostgreSQL; SQLite
    serializes writers itself); None when there is no such account."""
    query = select(ACCOUNTS).where(ACCOUNTS.c.seller_id == seller_id)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()
    return conn.execute(query).first()


def _token_state(row: Any) -> TokenState:
    status = row.status.value if isinstance(row.status, AccountStatus) else str(row.status)
    cipher = token_cipher()
    what = f"the tokens of seller {row.seller_id}"
    return TokenState(
        access_token=SecretStr(cipher.decrypt(row.access_token, what)),
        expires_at=utc(row.access_token_expires_at),
        refresh_token=SecretStr(cipher.decrypt(row.refresh_token, what)),
        version=row.token_version,
        status=status,
    )


def refresh_tokens(
    engine: Engine, seller_id: int, seen_version: int, refresh: Callable[[SecretStr], TokenGrant]
) -> TokenState:
    """Refresh the account's tokens, serialized across threads, processes and machines.

    The account row is locked (`SELECT ... FOR UPDATE` on PostgreSQL; a process lock on SQLite, which allows
    one process) while the single-use refresh token is traded, and the new pair is committed before it is
    returned. A caller whose `seen_version` is stale gets the tokens another refresh already stored, without
    a second refresh. `invalid_grant` parks the account (needs re-authorization) and raises
    AccountNeedsReauthorization; other failures keep the old tokens and propagate (the caller retries)."""
    with _local_lock(seller_id):
        dead_reason = None
        with transaction(engine) as conn:
            row = _account_for_update(conn, seller_id)
            if row is None:
                raise UnknownAccount(f"no marketplace account with seller id {seller_id}")
            state = _token_state(row)
            if state.status != AccountStatus.active.value:
                raise AccountNeedsReauthorization(
                    f"seller {seller_id} is {state.status}: {row.status_reason or 'authorize the app again'}"
                )
            if state.version != seen_version:
                return state  # another task, run or machine refreshed first: use its tokens
            issued = now_utc()
            try:
                grant = refresh(state.refresh_token)
            except InvalidGrant as exc:
                dead_reason = f"refresh token refused ({exc.error}) at {issued:%Y-%m-%d %H:%M} UTC"
                conn.execute(
                    update(ACCOUNTS)
                    .where(ACCOUNTS.c.seller_id == seller_id, ACCOUNTS.c.token_version == state.version)
                    .values(
                        status=AccountStatus.needs_reauthorization, status_reason=dead_reason, updated_at=issued
                    )
                )
            else:
                done = conn.execute(
                    update(ACCOUNTS)
                    .where(ACCOUNTS.c.seller_id == seller_id, ACCOUNTS.c.token_version == state.version)
                    .values(
                        access_token=token_cipher().encrypt(grant.access_token.get_secret_value()),
                        access_token_expires_at=grant.expires_at(issued),
                        refresh_token=token_cipher().encrypt(grant.refresh_token.get_secret_value()),
                        token_version=state.version + 1,
                        scope=grant.scope or row.scope,
                        updated_at=issued,
                    )
                )
                if done.rowcount != 1:  # cannot happen under the row lock; never lose the new token silently
                    raise RuntimeError(f"seller {seller_id}: token version moved during a locked refresh")
                return TokenState(
                    grant.access_token, grant.expires_at(issued), grant.refresh_token, state.version + 1, "active"
                )
        raise AccountNeedsReauthorization(f"seller {seller_id}: {dead_reason}; the owner must authorize again")


# -- the per-account sync lock -----------------------------------------------------------------------------
_lock_engines: dict[tuple[int, str], Engine] = {}


def _lock_engine(engine: Engine) -> Engine:
    """Advisory locks live as long as their connection: one unpooled connection per held lock, so a killed
    process releases its locks at once and the work pool is never held by a lock."""
    key = (os.getpid(), engine.url.render_as_string(hide_password=False))
    if key not in _lock_engines:
        _lock_engines[key] = create_engine(engine.url, poolclass=NullPool)
    return _lock_engines[key]


@contextmanager
def account_sync_lock(
    engine: Engine, seller_id: int, wait_seconds: float, lease_seconds: float,
    should_stop: Callable[[], bool] = lambda: False,
) -> Iterator[bool]:
    """Hold the account's sync lock while the block runs; yields False if another run still held it after
    `wait_seconds`, or once `should_stop()` while waiting (a cancelled run waits no longer). PostgreSQL: a session advisory lock (released when the holder's connection ends, even if
    its process is killed). SQLite: a lease in the account row that expires after `lease_seconds`."""
    deadline = time.monotonic() + wait_seconds
    if engine.dialect.name == "postgresql":
        held = _held(engine)  # the account's connection (`account_connection`), else an unpooled one
        conn = held if held is not None else _lock_engine(engine).connect()
        try:
            key = text("SELECT pg_try_advisory_lock(hashtextextended(:k, 0))")
            name = f"marketplace-sync:{seller_id}"
            while not conn.execute(key, {"k": name}).scalar():
                conn.rollback()
                if time.monotonic() >= deadline or should_stop():
                    yield False
                    return
                time.sleep(0.25)
            conn.commit()
            try:
                yield True
            finally:
                _unlock(conn, name, pooled=held is not None)
        finally:
            if held is None:
                conn.close()
        return
    owner = uuid.uuid4().hex
    while True:
        now = now_utc()
        with engine.begin() as conn:
            taken = conn.execute(
                update(ACCOUNTS)
                .where(
                    ACCOUNTS.c.seller_id == seller_id,
                    (ACCOUNTS.c.sync_lease_until.is_(None)) | (ACCOUNTS.c.sync_lease_until < now),
                )
                .values(sync_lease_owner=owner, sync_lease_until=now + timedelta(seconds=lease_seconds))
            ).rowcount
        if taken:
            break
        if time.monotonic() >= deadline or should_stop():
            yield False
            return
        time.sleep(0.25)
    try:
        yield True
    finally:
        with engine.begin() as conn:
            conn.execute(
                update(ACCOUNTS)
                .where(ACCOUNTS.c.seller_id == seller_id, ACCOUNTS.c.sync_lease_owner == owner)
                .values(sync_lease_owner=None, sync_lease_until=None)
            )


def _unlock(conn: Connection, name: str, pooled: bool) -> None:
    """Give the advisory lock back; a pooled connection that could not is discarded (its lock ends with it)
    rather than returned to the pool holding the lock."""
    try:
        conn.execute(text("SELECT pg_advisory_unlock(hashtextextended(:k, 0))"), {"k": name})
        conn.commit()
    except Exception:
        if not pooled:
            raise
        conn.invalidate()


def _sync_lock_free(engine: Engine, seller_id: int) -> bool:
    """Whether nobody holds the account's sync lock right now (taken and given back at once if free)."""
    if engine.dialect.name == "postgresql":
        name = f"marketplace-sync:{seller_id}"
        with _lock_engine(engine).connect() as conn:
            free = bool(conn.execute(text("SELECT pg_try_advisory_lock(hashtextextended(:k, 0))"), {"k": name}).scalar())
            if free:
                conn.execute(text("SELECT pg_advisory_unlock(hashtextextended(:k, 0))"), {"k": name})
            conn.commit()
        return free
    with engine.connect() as conn:
        until = conn.execute(select(ACCOUNTS.c.sync_lease_until).where(ACCOUNTS.c.seller_id == seller_id)).scalar()
    return until is None or utc(until) < now_utc()


# -- checkpoints -------------------------------------------------------------------------------------------
def get_checkpoint(engine: Engine, seller_id: int, resource: str) -> datetime | None:
    with statement(engine) as conn:
        value = conn.execute(
            select(CHECKPOINTS.c.watermark).where(
                CHECKPOINTS.c.seller_id == seller_id, CHECKPOINTS.c.resource == resource
            )
        ).scalar()
    return utc(value)


def checkpoints(engine: Engine, seller_ids: list[int], resource: str) -> dict[int, datetime]:
    """{seller id: checkpoint of `resource`} of the given accounts that have one (one query)."""
    if not seller_ids:
        return {}
    with statement(engine) as conn:
        rows = conn.execute(select(CHECKPOINTS.c.seller_id, CHECKPOINTS.c.watermark).where(
            CHECKPOINTS.c.resource == resource, CHECKPOINTS.c.seller_id.in_(seller_ids)))
        return {seller_id: utc(watermark) for seller_id, watermark in rows if watermark is not None}


def advance_checkpoint(engine: Engine, seller_id: int, resource: str, watermark: datetime) -> None:
    """Move the checkpoint forward (never back): called after the rows it covers are committed."""
    row = {"seller_id": seller_id, "resource": resource, "watermark": utc(watermark), "updated_at": now_utc()}
    with statement(engine) as conn:
        upsert_rows(conn, CHECKPOINTS, [row], ["seller_id", "resource"], ["watermark", "updated_at"], "watermark")


# -- gaps --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Gap:
    """A window of a resource a sync could not read whole; later syncs read it again first."""

    seller_id: int
    resource: str
    start: datetime
    stop: datetime
    reason: str
    attempts: int
    found_at: datetime | None


def record_gap(engine: Engine, seller_id: int, resource: str, start: datetime, stop: datetime, reason: str) -> None:
    """Record a gap (a window read again and still not whole counts one more attempt)."""
    now = now_utc()
    where = (GAPS.c.seller_id == seller_id, GAPS.c.resource == resource, GAPS.c.start == utc(start))
    with transaction(engine) as conn:
        done = conn.execute(
            update(GAPS).where(*where)
            .values(stop=utc(stop), reason=reason[:4000], tried_at=now, attempts=GAPS.c.attempts + 1)
        ).rowcount
        if not done:
            row = {"seller_id": seller_id, "resource": resource, "start": utc(start), "stop": utc(stop),
                   "reason": reason[:4000], "attempts": 1, "found_at": now, "tried_at": now}
            conn.execute(upsert_statement(engine, GAPS, [row], ["seller_id", "resource", "start"], []))


def close_gap(engine: Engine, seller_id: int, resource: str, start: datetime) -> None:
    with statement(engine) as conn:
        conn.execute(delete(GAPS).where(GAPS.c.seller_id == seller_id, GAPS.c.resource == resource,
                                        GAPS.c.start == utc(start)))


def open_gaps(engine: Engine, seller_id: int | None, resource: str | None = None) -> list[Gap]:
    """The gaps not yet read whole (of one seller, or all), oldest first."""
    query = select(GAPS).order_by(GAPS.c.seller_id, GAPS.c.start)
    if seller_id is not None:
        query = query.where(GAPS.c.seller_id == seller_id)
    if resource is not None:
        query = query.where(GAPS.c.resource == resource)
    with statement(engine) as conn:
        return [Gap(r.seller_id, r.resource, utc(r.start), utc(r.stop), r.reason, r.attempts, utc(r.found_at))
                for r in conn.execute(query)]


# -- orders and items --------------------------------------------------------------------------------------
@dataclass
class UpsertCounts:
    new: int = 0
    updated: int = 0
    unchanged: int = 0

    def add(self, other: UpsertCounts) -> None:
        self.new += other.new
        self.updated += other.updated
        self.unchanged += other.unchanged


_CENT = Decimal("0.01")  # built once: building it in every call cost as much as the rest of `_money`


def _money(value: Any) -> Decimal | None:
    if value is None:
        return None
    try:
        return _cents(value)
    except TypeError:  # unhashable: not a number, and Decimal says so
        return Decimal(str(value)).quantize(_CENT)


# Prices repeat (an item's unit price and fee in each of its orders, a seller's usual totals): a page's amounts
# are mostly found here, at a fifth of the cost of building them. Typed: 1, 1.0 and True are different keys.
@lru_cache(maxsize=8192, typed=True)
def _cents(value: Any) -> Decimal:
    return Decimal(str(value)).quantize(_CENT)


def _int(value: Any) -> int | None:
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def order_row(seller_id: int, order: dict[str, Any], synced_at: datetime) -> dict[str, Any]:
    buyer = order.get("buyer") or {}
    shipping = order.get("shipping") or {}
    detail = order.get("status_detail")
    return {
        "id": int(order["id"]),
        "seller_id": seller_id,
        "status": str(order.get("status") or ""),
        "status_detail": None if detail is None else (detail if isinstance(detail, str) else str(detail)),
        "date_created": parse_time(order.get("date_created")),
        "date_closed": parse_time(order.get("date_closed")),
        "last_updated": parse_time(order.get("last_updated")),
        "date_last_updated": parse_time(order.get("date_last_updated") or order.get("last_updated")) or synced_at,
        "total_amount": _money(order.get("total_amount")),
        "paid_amount": _money(order.get("paid_amount")),
        "currency_id": str(order.get("currency_id") or ""),
        "buyer_id": _int(buyer.get("id")),
        "buyer_nickname": buyer.get("nickname"),
        "shipping_id": _int(shipping.get("id")),
        "pack_id": _int(order.get("pack_id")),
        "tags": list(order.get("tags") or []),
        "synced_at": synced_at,
    }


def order_line_rows(order: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for line, entry in enumerate(order.get("order_items") or []):
        item = entry.get("item") or {}
        rows.append(
            {
                "order_id": int(order["id"]),
                "line": line,
                "item_id": str(item.get("id") or ""),
                "title": str(item.get("title") or ""),
                "variation_id": _int(item.get("variation_id")),
                "seller_sku": item.get("seller_sku"),
                "quantity": _int(entry.get("quantity")) or 0,
                "unit_price": _money(entry.get("unit_price")),
                "sale_fee": _money(entry.get("sale_fee")),
            }
        )
    return rows


def item_row(seller_id: int, item: dict[str, Any], synced_at: datetime) -> dict[str, Any]:
    return {
        "id": str(item["id"]),
        "seller_id": seller_id,
        "title": str(item.get("title") or ""),
        "price": _money(item.get("price")),
        "currency_id": str(item.get("currency_id") or ""),
        "available_quantity": _int(item.get("available_quantity")),
        "sold_quantity": _int(item.get("sold_quantity")),
        "status": str(item.get("status") or ""),
        "sub_status": [str(part) for part in item.get("sub_status") or []],
        "last_updated": parse_time(item.get("last_updated")) or synced_at,
        "permalink": item.get("permalink"),
        "seller_custom_field": item.get("seller_custom_field"),
        "synced_at": synced_at,
    }


def _newest_by_key(rows: list[dict[str, Any]], key: str, stamp: str) -> list[dict[str, Any]]:
    """One row per key (a page may repeat a record that changed while it was read): the newest wins."""
    best: dict[Any, dict[str, Any]] = {}
    for row in rows:
        current = best.get(row[key])
        if current is None or row[stamp] > current[stamp]:
            best[row[key]] = row
    return list(best.values())


def _classify(conn, table, key: str, stamp: str, rows: list[dict[str, Any]]) -> tuple[UpsertCounts, set]:
    """Counts of new / newer / unchanged rows against what is stored, and the keys that will be written."""
    ids = [r[key] for r in rows]
    stored = {k: utc(v) for k, v in conn.execute(select(table.c[key], table.c[stamp]).where(table.c[key].in_(ids)))}
    counts, changed = UpsertCounts(), set()
    for row in rows:
        old = stored.get(row[key], "missing")
        if old == "missing":
            counts.new += 1
            changed.add(row[key])
        elif old is None or row[stamp] > old:
            counts.updated += 1
            changed.add(row[key])
        else:
            counts.unchanged += 1
    return counts, changed


_ORDER_UPDATE = [c.name for c in ORDERS.columns if c.name not in ("id",)]
_LINE_UPDATE = [c.name for c in ORDER_LINES.columns if c.name not in ("order_id", "line")]
_ITEM_UPDATE = [c.name for c in ITEMS.columns if c.name not in ("id",)]


def _upsert_classified(
    conn, table, key: str, stamp: str, rows: list[dict[str, Any]], update_columns: list[str]
) -> tuple[UpsertCounts, set]:
    """Upsert the rows that are new or newer than what is stored (the statement itself also refuses to
    overwrite with an older `stamp`); (new / updated / unchanged counts, changed keys). Reading the stored
    stamps first costs one indexed SELECT; asking the INSERT itself (RETURNING xmax) was measured slower: its
    statement text changes with every batch, and psycopg parses it again each time."""
    counts, changed = _classify(conn, table, key, stamp, rows)
    upsert_rows(conn, table, [r for r in rows if r[key] in changed], [key], update_columns, only_if_newer=stamp)
    return counts, changed


_ORDER_COLUMNS = tuple(c.name for c in ORDERS.columns)
_LINE_COLUMNS = tuple(c.name for c in ORDER_LINES.columns)
_ITEM_COLUMNS = tuple(c.name for c in ITEMS.columns)
# Every page is one statement in a transaction of its own (autocommit), committed without waiting for the WAL
# flush (synchronous_commit off, set for that transaction only): a crash of the database can lose the last
# pages committed (never part of one), and those only. `advance_checkpoint` commits synchronously, which
# flushes every page before it, so a checkpoint never covers a lost page; the next sync reads it again.
_ASYNC_COMMIT = "settings AS (SELECT set_config('synchronous_commit', 'off', true))"
# A page of orders and their lines. The lines of a new or newer order are upserted and the lines it lost
# deleted; an order refused as older keeps its lines. (Lines reference orders inserted by the same statement:
# foreign keys are checked at its end.)
_ORDERS_PAGE = (
    f"WITH {_ASYNC_COMMIT}, "
    f"up AS ({json_upsert_sql(ORDERS, _ORDER_COLUMNS, ('id',), tuple(_ORDER_UPDATE), 'date_last_updated', ('id',))}), "
    f"incoming AS (SELECT * FROM {json_recordset_sql(ORDER_LINES, _LINE_COLUMNS, 'incoming')}), "
    f"lines AS ({json_upsert_sql(ORDER_LINES, _LINE_COLUMNS, ('order_id', 'line'), tuple(_LINE_UPDATE), source='incoming', where='r.order_id IN (SELECT id FROM up)')}), "
    f"lost AS (DELETE FROM {ORDER_LINES.name} AS old USING up WHERE old.order_id = up.id AND NOT up.inserted "
    "AND old.line >= (SELECT count(*) FROM incoming WHERE incoming.order_id = up.id)) "
    "SELECT up.id, up.inserted FROM up, settings"
)
_ITEMS_PAGE = (
    f"WITH {_ASYNC_COMMIT}, "
    f"up AS ({json_upsert_sql(ITEMS, _ITEM_COLUMNS, ('id',), tuple(_ITEM_UPDATE), 'last_updated', ('id',))}) "
    "SELECT up.id, up.inserted FROM up, settings"
)


def _page_counts(rows: list[dict[str, Any]], returned: list) -> UpsertCounts:
    """New / updated / unchanged from a page statement's (key, inserted) rows (an unchanged row is not returned)."""
    new = sum(1 for _, inserted in returned if inserted)
    return UpsertCounts(new, len(returned) - new, len(rows) - len(returned))


@dataclass(frozen=True)
class _PageWriter:
    """How one kind of page is stored: its table, key and update stamp (a row is overwritten only by a newer
    one), the columns an update sets, and its PostgreSQL statement."""

    table: Any
    key: str
    stamp: str
    update_columns: list[str]
    statement: str


_ORDER_WRITER = _PageWriter(ORDERS, "id", "date_last_updated", _ORDER_UPDATE, _ORDERS_PAGE)
_ITEM_WRITER = _PageWriter(ITEMS, "id", "last_updated", _ITEM_UPDATE, _ITEMS_PAGE)


def _write_page(
    engine: Engine, writer: _PageWriter, rows: list[dict[str, Any]],
    lines_of: Callable[[list[Any]], list[dict[str, Any]]] | None = None,
) -> UpsertCounts:
    """Store a page of rows (distinct keys) in one transaction, each overwriting only an older stored row; with
    `lines_of` (the order lines of some keys), the lines of every new or newer row replace its stored ones. On
    PostgreSQL the page is one statement (`writer.statement`, rows and lines as JSON parameters)."""
    if not rows:
        return UpsertCounts()
    if engine.dialect.name == "postgresql":
        params = [json_rows(rows)]
        if lines_of is not None:
            params.append(json_rows(lines_of([row[writer.key] for row in rows])))
        with statement(engine, autocommit=True) as conn:
            return _page_counts(rows, conn.exec_driver_sql(writer.statement, tuple(params)).all())
    with engine.begin() as conn:
        counts, changed = _upsert_classified(conn, writer.table, writer.key, writer.stamp, rows,
                                             writer.update_columns)
        if lines_of is not None and changed:
            # the lines of a new or newer order are replaced whole (an order may lose lines)
            if counts.updated:
                conn.execute(delete(ORDER_LINES).where(ORDER_LINES.c.order_id.in_(sorted(changed))))
            upsert_rows(conn, ORDER_LINES, lines_of(sorted(changed)), ["order_id", "line"], _LINE_UPDATE)
    return counts


def upsert_orders(engine: Engine, seller_id: int, orders: list[dict[str, Any]]) -> UpsertCounts:
    """Upsert one page of orders and their lines in one transaction; an order is only overwritten by a newer
    `date_last_updated`, so the same page twice changes nothing. On PostgreSQL the page is one statement."""
    rows, source = _newest_orders(seller_id, orders, now_utc())
    return _write_page(engine, _ORDER_WRITER, rows,
                       lambda ids: [line for order_id in ids for line in order_line_rows(source[order_id])])


def upsert_items(engine: Engine, seller_id: int, items: list[dict[str, Any]]) -> UpsertCounts:
    """Upsert item details in one transaction (one statement on PostgreSQL), overwriting only by a newer
    `last_updated`."""
    synced_at = now_utc()
    rows = _newest_by_key([item_row(seller_id, i, synced_at) for i in items], "id", "last_updated")
    return _write_page(engine, _ITEM_WRITER, rows)


def _newest_orders(
    seller_id: int, orders: list[dict[str, Any]], synced_at: datetime
) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]]]:
    """(one row per order id, the newest of the page; {id: the API's order that row came from}): a page may
    repeat an order that changed while it was read, and its lines are those of the copy kept."""
    newest: dict[int, tuple[dict[str, Any], dict[str, Any]]] = {}
    for order in orders:
        row = order_row(seller_id, order, synced_at)
        seen = newest.get(row["id"])
        if seen is None or row["date_last_updated"] > seen[0]["date_last_updated"]:
            newest[row["id"]] = (row, order)
    return [row for row, _ in newest.values()], {key: order for key, (_, order) in newest.items()}


def clear_marketplace_data(engine: Engine, accounts: bool = False, truncate: bool = False) -> None:
    """Delete every synced order, line, item and checkpoint (and, with `accounts`, the accounts): for
    benchmarks and tests that start from nothing.

    `truncate` (PostgreSQL): empty the tables by TRUNCATE, which leaves no dead rows behind (DELETE leaves every
    deleted row in the tables and their indexes until a vacuum, so a run after many runs writes into bloated
    tables and measures slower); it takes an exclusive lock on the tables, so it is for a database no other
    session is using (the benchmark's)."""
    tables = [ORDER_LINES, ORDERS, ITEMS, CHECKPOINTS, GAPS] + ([ACCOUNTS] if accounts else [])
    with engine.begin() as conn:
        if truncate and engine.dialect.name == "postgresql":
            conn.exec_driver_sql(f"TRUNCATE {', '.join(t.name for t in tables)}")
            return
        for table in tables:
            conn.execute(delete(table))


def count_rows(engine: Engine, seller_id: int | None = None) -> dict[str, int]:
    """Stored orders, order lines and items (of one seller, or all)."""
    with engine.connect() as conn:
        def n(table, column) -> int:
            query = select(func.count()).select_from(table)
            if seller_id is not None and column is not None:
                query = query.where(column == seller_id)
            return int(conn.execute(query).scalar() or 0)

        lines = select(func.count()).select_from(ORDER_LINES.join(ORDERS, ORDER_LINES.c.order_id == ORDERS.c.id))
        if seller_id is not None:
            lines = lines.where(ORDERS.c.seller_id == seller_id)
        return {
            "orders": n(ORDERS, ORDERS.c.seller_id),
            "order_lines": int(conn.execute(lines).scalar() or 0),
            "items": n(ITEMS, ITEMS.c.seller_id),
        }
