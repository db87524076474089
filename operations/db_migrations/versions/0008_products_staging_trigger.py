"""integration records without a foreign key check per staged row: their cascade from offers is a trigger

The chunk statement (operations/products/store.py, _WRITE_OFFERS) inserts each integration record from the
RETURNING of the offer it just inserted or updated in the same statement, so the offer exists and stays locked
by the chunk's transaction until its commit: the per-row foreign key check (an index probe and a row lock with
its WAL record per staged row) proves nothing more. What the foreign key also did, deleting an offer's records
with the offer, is an AFTER DELETE trigger on product_dealers.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 00:10:00.000000
"""

from __future__ import annotations

from typing import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0008'
down_revision: str | Sequence[str] | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FOREIGN_KEY = 'fk_product_staging_product_dealer'
TRIGGER = 'product_dealers_delete_staging'

_POSTGRESQL_UP = (
    f"""
    CREATE FUNCTION {TRIGGER}() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM product_integration_staging s USING deleted d WHERE s.product_dealer_id = d.id;
        RETURN NULL;
    END $$
    """,
    f"""
    CREATE TRIGGER {TRIGGER} AFTER DELETE ON product_dealers REFERENCING OLD TABLE AS deleted
    FOR EACH STATEMENT EXECUTE FUNCTION {TRIGGER}()
    """,
)
_SQLITE_UP = (
    f"""
    CREATE TRIGGER {TRIGGER} AFTER DELETE ON product_dealers FOR EACH ROW
    BEGIN DELETE FROM product_integration_staging WHERE product_dealer_id = OLD.id; END
    """,
)


def upgrade() -> None:
    postgresql = op.get_bind().dialect.name == 'postgresql'
    if postgresql:
        op.drop_constraint(FOREIGN_KEY, 'product_integration_staging', type_='foreignkey')
    else:
        with op.batch_alter_table('product_integration_staging') as batch:
            batch.drop_constraint(FOREIGN_KEY, type_='foreignkey')
    for statement in _POSTGRESQL_UP if postgresql else _SQLITE_UP:
        op.execute(statement)


def downgrade() -> None:
    postgresql = op.get_bind().dialect.name == 'postgresql'
    op.execute(f"DROP TRIGGER IF EXISTS {TRIGGER}" + (" ON product_dealers" if postgresql else ""))
    if postgresql:
        op.execute(f"DROP FUNCTION IF EXISTS {TRIGGER}()")
    # records whose offer is gone (none, unless one was deleted with the trigger disabled) would refuse the key
    op.execute("DELETE FROM product_integration_staging WHERE NOT EXISTS "
               "(SELECT 1 FROM product_dealers d WHERE d.id = product_integration_staging.product_dealer_id)")
    if postgresql:
        op.create_foreign_key(FOREIGN_KEY, 'product_integration_staging', 'product_dealers',
                              ['product_dealer_id'], ['id'], ondelete='CASCADE')
    else:
        with op.batch_alter_table('product_integration_staging') as batch:
            batch.create_foreign_key(FOREIGN_KEY, 'product_dealers', ['product_dealer_id'], ['id'],
                                     ondelete='CASCADE')
