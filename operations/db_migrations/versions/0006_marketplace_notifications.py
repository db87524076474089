"""marketplace notifications

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-05 15:30:00.000000
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0006'
down_revision: str | Sequence[str] | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'marketplace_notifications',
        sa.Column('id', sa.String(length=64), nullable=False),
        sa.Column('user_id', sa.BigInteger(), nullable=False),
        sa.Column('topic', sa.String(length=40), nullable=False),
        sa.Column('resource', sa.String(length=200), nullable=False),
        sa.Column('application_id', sa.String(length=40), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('stored_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column('processed_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('outcome', sa.String(length=24), nullable=False),
        sa.Column('tries', sa.Integer(), nullable=False),
        sa.Column('detail', sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_marketplace_notifications')),
    )
    op.create_index('ix_marketplace_notifications_processed_at_user_id', 'marketplace_notifications',
                    ['processed_at', 'user_id'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_marketplace_notifications_processed_at_user_id', table_name='marketplace_notifications')
    op.drop_table('marketplace_notifications')
