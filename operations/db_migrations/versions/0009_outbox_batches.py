"""the products outbox as one row per batch of messages

A chunk's statement writes its staged changes' messages as rows of up to a batch of messages each
(operations/products/store.py), encoded as the stream publisher takes them, so that publishing claims and marks
one row per batch rather than one per message. Every message of `outbox_messages` moves to `outbox_batches`:
the unpublished ones in batches of up to 2,000 per stream, message type and run (in id order, keeping their
message keys, so the Redis guards of messages a crashed publisher added but did not mark still stop a second
entry), the published ones likewise with their stream entry ids. Their `outbox_id` field keeps the old row id.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 08:20:00.000000
"""

from __future__ import annotations

from typing import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0009'
down_revision: str | Sequence[str] | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH = 2000
_COLUMNS = "stream, message_type, source_run, message_count, message_keys, messages, created_at, published_at, entry_ids"

_POSTGRESQL_MOVE = f"""
INSERT INTO outbox_batches ({_COLUMNS})
SELECT stream, message_type, source_run, count(*), string_agg(message_key, ',' ORDER BY id),
       json_agg(json_build_array(message_key, message_key, message_type, id::text, payload::text) ORDER BY id)::text,
       min(created_at), max(published_at), string_agg(stream_entry_id, ',' ORDER BY id)
FROM (
    SELECT o.*, coalesce(o.payload ->> 'source_run', '') AS source_run,
           (row_number() OVER (PARTITION BY o.stream, o.message_type, coalesce(o.payload ->> 'source_run', ''),
                                            o.published_at IS NULL ORDER BY o.id) - 1) / {BATCH} AS n
    FROM outbox_messages o
) m
GROUP BY stream, message_type, source_run, published_at IS NULL, n
ORDER BY min(id)
"""
# SQLite holds no products data (product files need PostgreSQL): one row per message, for completeness
_SQLITE_MOVE = f"""
INSERT INTO outbox_batches ({_COLUMNS})
SELECT stream, message_type, coalesce(json_extract(payload, '$.source_run'), ''), 1, message_key,
       json_array(json_array(message_key, message_key, message_type, CAST(id AS TEXT), payload)),
       created_at, published_at, stream_entry_id
FROM outbox_messages ORDER BY id
"""
_POSTGRESQL_BACK = """
INSERT INTO outbox_messages (stream, message_key, message_type, payload, created_at, published_at, stream_entry_id)
SELECT b.stream, m.message ->> 1, m.message ->> 2, CAST(m.message ->> 4 AS jsonb), b.created_at, b.published_at,
       (string_to_array(b.entry_ids, ','))[m.position]
FROM outbox_batches b CROSS JOIN LATERAL json_array_elements(CAST(b.messages AS json)) WITH ORDINALITY AS m(message, position)
ORDER BY b.id, m.position
"""
_SQLITE_BACK = """
INSERT INTO outbox_messages (stream, message_key, message_type, payload, created_at, published_at, stream_entry_id)
SELECT b.stream, json_extract(m.value, '$[1]'), json_extract(m.value, '$[2]'), json_extract(m.value, '$[4]'),
       b.created_at, b.published_at, NULL
FROM outbox_batches b, json_each(b.messages) m ORDER BY b.id, m.key
"""


def upgrade() -> None:
    postgresql = op.get_bind().dialect.name == 'postgresql'
    op.create_table('outbox_batches',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('stream', sa.String(length=200), nullable=False),
    sa.Column('message_type', sa.String(length=100), nullable=False),
    sa.Column('source_run', sa.String(length=100), nullable=False),
    sa.Column('message_count', sa.Integer(), nullable=False),
    sa.Column('message_keys', sa.Text(), nullable=False),
    sa.Column('messages', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('published_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('entry_ids', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_outbox_batches')),
    )
    with op.batch_alter_table('outbox_batches', schema=None) as batch_op:
        batch_op.create_index('ix_outbox_batches_unpublished', ['id'], unique=False,
                              postgresql_where=sa.text('published_at IS NULL'), sqlite_where=sa.text('published_at IS NULL'))
    if postgresql:
        # stored out of line, not compressed: ~1 MB a row, written once and read once by its publisher
        op.execute("ALTER TABLE outbox_batches ALTER COLUMN messages SET STORAGE EXTERNAL, "
                   "ALTER COLUMN message_keys SET STORAGE EXTERNAL, ALTER COLUMN entry_ids SET STORAGE EXTERNAL")
        op.execute("LOCK TABLE outbox_messages IN EXCLUSIVE MODE")  # no publisher marks a row while it moves
    op.execute(_POSTGRESQL_MOVE if postgresql else _SQLITE_MOVE)
    with op.batch_alter_table('outbox_messages', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_messages_unpublished', postgresql_where=sa.text('published_at IS NULL'),
                            sqlite_where=sa.text('published_at IS NULL'))
    op.drop_table('outbox_messages')


def downgrade() -> None:
    postgresql = op.get_bind().dialect.name == 'postgresql'
    op.create_table('outbox_messages',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('stream', sa.String(length=200), nullable=False),
    sa.Column('message_key', sa.String(length=200), nullable=False),
    sa.Column('message_type', sa.String(length=100), nullable=False),
    sa.Column('payload', sa.JSON().with_variant(sa.dialects.postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
    sa.Column('published_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('stream_entry_id', sa.String(length=40), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_outbox_messages')),
    sa.UniqueConstraint('message_key', name=op.f('uq_outbox_messages_message_key'))
    )
    with op.batch_alter_table('outbox_messages', schema=None) as batch_op:
        batch_op.create_index('ix_outbox_messages_unpublished', ['id'], unique=False,
                              postgresql_where=sa.text('published_at IS NULL'), sqlite_where=sa.text('published_at IS NULL'))
    op.execute(_POSTGRESQL_BACK if postgresql else _SQLITE_BACK)
    with op.batch_alter_table('outbox_batches', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_batches_unpublished', postgresql_where=sa.text('published_at IS NULL'),
                            sqlite_where=sa.text('published_at IS NULL'))
    op.drop_table('outbox_batches')
