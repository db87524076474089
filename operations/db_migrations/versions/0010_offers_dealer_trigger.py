"""offers without a foreign key check per row on their dealer: the chunk locks its dealers once, a trigger cascades

The chunk's transaction (operations/products/store.py, _LOCK_DEALERS) locks the dealers its rows name once
(`FOR KEY SHARE`, as the key's check did for every row) and sets aside the rows of a dealer that is gone, which
fail as "dealer removed": a dealer cannot be deleted under a chunk that writes its offers, and no offer is
written for a deleted dealer. The per-row check cost a lock of one of a few dealer rows per offer, shared by
every concurrent chunk (a multixact each). What the key also did, deleting a dealer's offers with the dealer,
is an AFTER DELETE trigger on dealers (whose delete of offers fires the trigger of migration 0008 in turn).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 08:40:00.000000
"""

from __future__ import annotations

from typing import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0010'
down_revision: str | Sequence[str] | None = '0009'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FOREIGN_KEY = 'fk_product_dealers_dealer_id_dealers'
TRIGGER = 'dealers_delete_offers'

_POSTGRESQL_UP = (
    f"""
    CREATE FUNCTION {TRIGGER}() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM product_dealers o USING deleted d WHERE o.dealer_id = d.id;
        RETURN NULL;
    END $$
    """,
    f"""
    CREATE TRIGGER {TRIGGER} AFTER DELETE ON dealers REFERENCING OLD TABLE AS deleted
    FOR EACH STATEMENT EXECUTE FUNCTION {TRIGGER}()
    """,
)
_SQLITE_UP = (
    f"""
    CREATE TRIGGER {TRIGGER} AFTER DELETE ON dealers FOR EACH ROW
    BEGIN DELETE FROM product_dealers WHERE dealer_id = OLD.id; END
    """,
)


def upgrade() -> None:
    postgresql = op.get_bind().dialect.name == 'postgresql'
    if postgresql:
        op.drop_constraint(FOREIGN_KEY, 'product_dealers', type_='foreignkey')
    else:
        with op.batch_alter_table('product_dealers') as batch:
            batch.drop_constraint(FOREIGN_KEY, type_='foreignkey')
    for statement in _POSTGRESQL_UP if postgresql else _SQLITE_UP:
        op.execute(statement)


def downgrade() -> None:
    postgresql = op.get_bind().dialect.name == 'postgresql'
    op.execute(f"DROP TRIGGER IF EXISTS {TRIGGER}" + (" ON dealers" if postgresql else ""))
    if postgresql:
        op.execute(f"DROP FUNCTION IF EXISTS {TRIGGER}()")
    # offers whose dealer is gone (none, unless one was deleted with the trigger disabled) would refuse the key
    op.execute("DELETE FROM product_dealers WHERE NOT EXISTS "
               "(SELECT 1 FROM dealers d WHERE d.id = product_dealers.dealer_id)")
    if postgresql:
        op.create_foreign_key(FOREIGN_KEY, 'product_dealers', 'dealers', ['dealer_id'], ['id'], ondelete='CASCADE')
    else:
        with op.batch_alter_table('product_dealers') as batch:
            batch.create_foreign_key(FOREIGN_KEY, 'dealers', ['dealer_id'], ['id'], ondelete='CASCADE')
