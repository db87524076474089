"""marketplace sync holder and parked notice

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 13:00:00.000000
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0004'
down_revision: str | Sequence[str] | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('marketplace_accounts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('last_sync_run_id', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('parked_notified_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('marketplace_accounts', schema=None) as batch_op:
        batch_op.drop_column('parked_notified_at')
        batch_op.drop_column('last_sync_run_id')
