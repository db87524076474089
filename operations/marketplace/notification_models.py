"""The table of the marketplace's notifications: each one the receiver accepted, stored before it answered 200,
keyed by the marketplace's own `_id` (a redelivery inserts nothing), pending until the consumer applies it."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Index, Integer, String, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from operations.infra.database import Base


class MarketplaceNotification(Base):
    """One notification as the marketplace sent it. `processed_at` NULL: pending; else `outcome` says what the
    consumer did (synced, unknown_seller, account_inactive, ignored_topic, bad_resource)."""

    __tablename__ = "marketplace_notifications"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the marketplace's `_id`
    user_id: Mapped[int] = mapped_column(BigInteger)  # the seller; no foreign key: unknown sellers are kept too
    topic: Mapped[str] = mapped_column(String(40))
    resource: Mapped[str] = mapped_column(String(200))
    application_id: Mapped[str] = mapped_column(String(40))
    attempts: Mapped[int] = mapped_column(Integer, default=1)  # the marketplace's delivery attempt
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    stored_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    processed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    outcome: Mapped[str] = mapped_column(String(24), default="")
    tries: Mapped[int] = mapped_column(Integer, default=0)  # consumer passes that failed on it
    detail: Mapped[str] = mapped_column(Text, default="")

    __table_args__ = (Index("ix_marketplace_notifications_processed_at_user_id", "processed_at", "user_id"),)
