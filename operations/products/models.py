"""Tables of the product files: dealers, the product catalog, each dealer's offer of a product (price and
stock), the integration records staged for every change, and the outbox of messages to publish (a row per
batch of messages).

Every write is an upsert on a natural key (dealer code, SKU, product x dealer, offer x version),
so a retried or re-run chunk changes nothing twice.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Index,
    Integer,
    Numeric,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from operations.infra.database import Base

JSONDocument = JSON().with_variant(JSONB(), "postgresql")
BigId = BigInteger().with_variant(Integer(), "sqlite")  # SQLite autoincrements INTEGER PRIMARY KEY only


class Dealer(Base):
    """A dealer the products files name by code; loaded by `python -m deployments.dealers load FILE`."""

    __tablename__ = "dealers"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    code: Mapped[str] = mapped_column(String(32), unique=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Product(Base):
    """A catalog product, one per SKU whatever the dealers selling it; name and attributes from the last file
    that changed them."""

    __tablename__ = "products"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    sku: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(300))
    attributes: Mapped[dict[str, Any]] = mapped_column(JSONDocument, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ProductDealer(Base):
    """A dealer's offer of a product: its price and stock. `fingerprint` hashes what the file said of it (name,
    price, stock, attributes); `version` grows by one with every change and numbers the staged records."""

    __tablename__ = "product_dealers"
    __table_args__ = (UniqueConstraint("product_id", "dealer_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # The product's id, without a foreign key on PostgreSQL: checked once per statement, and deleting a product
    # deletes its offers (triggers, migration 0011).
    product_id: Mapped[int] = mapped_column(BigInteger)
    # The dealer's id, without a foreign key: a chunk locks the dealers its rows name once, setting aside the rows
    # of a dealer that is gone (store.py), and deleting a dealer deletes its offers (a trigger, migration 0010).
    dealer_id: Mapped[int] = mapped_column(BigInteger, index=True)
    price: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    stock: Mapped[int] = mapped_column(Integer)
    fingerprint: Mapped[str] = mapped_column(String(32))
    version: Mapped[int] = mapped_column(Integer, default=1)
    source_run: Mapped[str] = mapped_column(String(100), default="")
    source_row: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ProductIntegrationStaging(Base):
    """The integration record of one change of an offer (created, or its version-th update): what the
    downstream integration receives, keyed by offer and version so a change is staged once."""

    __tablename__ = "product_integration_staging"
    __table_args__ = (UniqueConstraint("product_dealer_id", "version"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    # The offer's id, without a foreign key: records are inserted only from the RETURNING of their offer's write
    # in the same statement (store.py), and deleting an offer deletes its records (a trigger, migration 0008).
    product_dealer_id: Mapped[int] = mapped_column(BigInteger)
    version: Mapped[int] = mapped_column(Integer)
    change: Mapped[str] = mapped_column(String(16))  # created | updated
    dealer_code: Mapped[str] = mapped_column(String(32))
    sku: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(300))
    price: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    stock: Mapped[int] = mapped_column(Integer)
    attributes: Mapped[dict[str, Any]] = mapped_column(JSONDocument, default=dict)
    source_run: Mapped[str] = mapped_column(String(100), default="")
    source_row: Mapped[int] = mapped_column(Integer, default=0)
    staged_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class OutboxBatch(Base):
    """Messages to publish, up to a batch of them in one row, written in the same transaction as the changes they
    announce and published after the commit (transactional outbox). A chunk's statement writes one row per batch
    of its staged changes (`store.OUTBOX_BATCH_MESSAGES`), with the messages already encoded as the stream
    publisher takes them, so claiming and marking touch one row per batch, not one per message. One message per
    change comes from the staged record's key (offer x version), written once; the publisher's Redis guard
    keyed by each message key makes the publication itself exactly once."""

    __tablename__ = "outbox_batches"
    __table_args__ = (
        Index(
            "ix_outbox_batches_unpublished",
            "id",
            postgresql_where=text("published_at IS NULL"),
            sqlite_where=text("published_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    stream: Mapped[str] = mapped_column(String(200))
    message_type: Mapped[str] = mapped_column(String(100))
    source_run: Mapped[str] = mapped_column(String(100), default="")  # the run key whose chunk queued them
    message_count: Mapped[int] = mapped_column(Integer)
    # the messages' keys joined by ',' (their guards' names); the messages as one JSON array of
    # [key, message_key, type, outbox_id, payload] (operations/infra/redis_stream.py, EncodedMessages)
    message_keys: Mapped[str] = mapped_column(Text)
    messages: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    entry_ids: Mapped[str | None] = mapped_column(Text)  # each message's stream entry id, in order, joined by ','
