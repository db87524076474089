"""Tables of the marketplace sync: seller accounts (with their tokens), orders and their lines, items, and
one checkpoint per account and resource. Every write is an upsert on the natural key the API gives."""

from __future__ import annotations

import enum
from datetime import datetime
from decimal import Decimal

from sqlalchemy import JSON, BigInteger, DateTime, Enum, ForeignKey, Integer, Numeric, String, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from operations.infra.database import Base


class AccountStatus(str, enum.Enum):
    active = "active"
    needs_reauthorization = "needs_reauthorization"  # the refresh token was refused: the owner must authorize
    inactive = "inactive"  # deactivated by an operator


class MarketplaceAccount(Base):
    """A seller account. Its tokens live only here; `token_version` grows with every refresh, so a writer
    that read an older version knows another refresh won."""

    __tablename__ = "marketplace_accounts"

    seller_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    nickname: Mapped[str] = mapped_column(String(120), default="")
    status: Mapped[AccountStatus] = mapped_column(
        Enum(AccountStatus, name="marketplace_account_status", native_enum=False, length=32),
        default=AccountStatus.active,
    )
    status_reason: Mapped[str] = mapped_column(Text, default="")
    # Both tokens are stored encrypted (Fernet, "fernet:" + token) with MARKETPLACE_TOKEN_KEY, which is never in
    # the database; a value without the prefix is a plain token of before encryption, encrypted when next met.
    access_token: Mapped[str] = mapped_column(Text, default="")
    access_token_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    refresh_token: Mapped[str] = mapped_column(Text, default="")
    token_version: Mapped[int] = mapped_column(Integer, default=0)
    scope: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_sync_started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_sync_finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_sync_status: Mapped[str] = mapped_column(String(32), default="")
    last_sync_error: Mapped[str] = mapped_column(Text, default="")
    # The flow run that holds (or last held) the account's sync: a `running` account whose holder is gone
    # (crashed, killed) is shown as `interrupted` and resumed by the next sync.
    last_sync_run_id: Mapped[str | None] = mapped_column(String(64))
    # When the owner was last told the account needs re-authorization (cleared when it is authorized again).
    parked_notified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A lease on the account's sync, for databases without advisory locks (SQLite, a single process).
    sync_lease_owner: Mapped[str | None] = mapped_column(String(64))
    sync_lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class SyncCheckpoint(Base):
    """How far a resource of an account is synced: everything last updated before `watermark` is stored.
    Advanced only after the upserts it covers are committed."""

    __tablename__ = "marketplace_sync_checkpoints"

    seller_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("marketplace_accounts.seller_id", ondelete="CASCADE"), primary_key=True
    )
    resource: Mapped[str] = mapped_column(String(16), primary_key=True)
    watermark: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class SyncGap(Base):
    """An hour of a resource that a sync could not read whole (more orders than the API's filters and offset cap
    reach). The checkpoint passes it, so the account goes on; every later sync reads it again first, and a read
    that gets it whole deletes the row."""

    __tablename__ = "marketplace_sync_gaps"

    seller_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("marketplace_accounts.seller_id", ondelete="CASCADE"), primary_key=True
    )
    resource: Mapped[str] = mapped_column(String(16), primary_key=True)
    start: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    stop: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    reason: Mapped[str] = mapped_column(Text, default="")
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    found_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    tried_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class MarketplaceOrder(Base):
    __tablename__ = "marketplace_orders"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    seller_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("marketplace_accounts.seller_id", ondelete="CASCADE"), index=True
    )
    status: Mapped[str] = mapped_column(String(40), default="")
    status_detail: Mapped[str | None] = mapped_column(Text)
    date_created: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    date_closed: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_updated: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    date_last_updated: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    total_amount: Mapped[Decimal | None] = mapped_column(Numeric(16, 2))
    paid_amount: Mapped[Decimal | None] = mapped_column(Numeric(16, 2))
    currency_id: Mapped[str] = mapped_column(String(8), default="")
    buyer_id: Mapped[int | None] = mapped_column(BigInteger)
    buyer_nickname: Mapped[str | None] = mapped_column(String(120))
    shipping_id: Mapped[int | None] = mapped_column(BigInteger)
    pack_id: Mapped[int | None] = mapped_column(BigInteger)
    tags: Mapped[list] = mapped_column(JSON, default=list)
    synced_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class MarketplaceOrderLine(Base):
    """One line of an order's `order_items`, keyed by its position in the order."""

    __tablename__ = "marketplace_order_lines"

    order_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("marketplace_orders.id", ondelete="CASCADE"), primary_key=True
    )
    line: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_id: Mapped[str] = mapped_column(String(40), index=True)
    title: Mapped[str] = mapped_column(Text, default="")
    variation_id: Mapped[int | None] = mapped_column(BigInteger)
    seller_sku: Mapped[str | None] = mapped_column(String(120))
    quantity: Mapped[int] = mapped_column(Integer, default=0)
    unit_price: Mapped[Decimal | None] = mapped_column(Numeric(16, 2))
    sale_fee: Mapped[Decimal | None] = mapped_column(Numeric(16, 2))


class MarketplaceItem(Base):
    __tablename__ = "marketplace_items"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    seller_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("marketplace_accounts.seller_id", ondelete="CASCADE"), index=True
    )
    title: Mapped[str] = mapped_column(Text, default="")
    price: Mapped[Decimal | None] = mapped_column(Numeric(16, 2))
    currency_id: Mapped[str] = mapped_column(String(8), default="")
    available_quantity: Mapped[int | None] = mapped_column(Integer)
    sold_quantity: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(40), default="")
    # the API's `sub_status` list: an item the seller deleted is `closed` with sub_status ["deleted"] (kept here,
    # never deleted: its orders still name it)
    sub_status: Mapped[list | None] = mapped_column(JSON, default=list)
    last_updated: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    permalink: Mapped[str | None] = mapped_column(Text)
    seller_custom_field: Mapped[str | None] = mapped_column(String(120))
    synced_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
