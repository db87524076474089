"""marketplace items keep the API's sub_status (a deleted item is closed with sub_status ["deleted"])

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-05 18:30:00.000000
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0007'
down_revision: str | Sequence[str] | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('marketplace_items') as batch:
        batch.add_column(sa.Column('sub_status', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('marketplace_items') as batch:
        batch.drop_column('sub_status')
