"""marketplace sync gaps, seller tokens encrypted at rest

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 15:40:00.000000

The gaps table holds the hours a sync could not read whole. Existing plain tokens are encrypted here when a
token key is at hand (MARKETPLACE_TOKEN_KEY, or the key generated under DATA_DIR); without one they stay as
they are and the store encrypts each the first time it reads it. The migration never generates a key: one
made on the machine that happens to run it would lock every other machine out of the tokens.
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0005'
down_revision: str | Sequence[str] | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('marketplace_sync_gaps',
    sa.Column('seller_id', sa.BigInteger(), nullable=False),
    sa.Column('resource', sa.String(length=16), nullable=False),
    sa.Column('start', sa.DateTime(timezone=True), nullable=False),
    sa.Column('stop', sa.DateTime(timezone=True), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('found_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('tried_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.ForeignKeyConstraint(['seller_id'], ['marketplace_accounts.seller_id'], name=op.f('fk_marketplace_sync_gaps_seller_id_marketplace_accounts'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('seller_id', 'resource', 'start', name=op.f('pk_marketplace_sync_gaps'))
    )
    _encrypt_plain_tokens()


def _encrypt_plain_tokens() -> None:
    from operations.marketplace.tokens import TokenCipher, configured_keys, is_encrypted
    from operations.settings import get_settings

    settings = get_settings()
    secret = settings.marketplace.token_key
    keys = configured_keys(settings.stack.data_dir, secret.get_secret_value() if secret else None, generate=False)
    if not keys:
        return
    cipher = TokenCipher(keys)
    conn = op.get_bind()
    rows = conn.execute(sa.text("SELECT seller_id, access_token, refresh_token FROM marketplace_accounts")).all()
    for seller_id, access, refresh in rows:
        if (not access or is_encrypted(access)) and (not refresh or is_encrypted(refresh)):
            continue
        conn.execute(
            sa.text("UPDATE marketplace_accounts SET access_token = :a, refresh_token = :r WHERE seller_id = :s"),
            {"a": access if is_encrypted(access) else cipher.encrypt(access or ""),
             "r": refresh if is_encrypted(refresh) else cipher.encrypt(refresh or ""), "s": seller_id},
        )


def downgrade() -> None:
    # Tokens stay encrypted: the store of revision 0004 cannot read them (re-onboard the accounts, or decrypt
    # them with `python -m deployments.marketplace_accounts` of this revision before downgrading).
    op.drop_table('marketplace_sync_gaps')
