"""offers without a foreign key check per row on their product: checked once per statement, cascaded by a trigger

The foreign key checked every offer written with a query of its own on its product (an index probe and a row lock
with its WAL record per offer): 89 ms of a 20,000-row chunk's 489 ms offers statement under EXPLAIN ANALYZE. On
PostgreSQL, what it ensured is now three statement-level triggers (SQLite keeps the key, below):
- offers inserted or updated: every product they name exists, checked once per statement over the statement's
  rows (a refusal is a foreign key violation, as the key's was);
- products deleted: their offers are deleted (the key's ON DELETE CASCADE; their integration records follow by
  the trigger of migration 0008). The deleting transaction first takes a SHARE ROW EXCLUSIVE lock on the offers,
  so it waits for the chunks writing offers at that moment and then deletes theirs too, and a chunk that starts
  writing meanwhile waits for its commit (and no longer sees the deleted products). A chunk's offers statement
  takes its products from a join with the products, so it never names a product deleted before it started.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 14:15:00.000000
"""

from __future__ import annotations

from typing import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = '0011'
down_revision: str | Sequence[str] | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FOREIGN_KEY = 'fk_product_dealers_product_id_products'
CASCADE = 'products_delete_offers'
CHECK = 'product_dealers_check_product'
_EVENTS = ('insert', 'update')  # a trigger with a transition table has one event

_POSTGRESQL_UP = (
    f"""
    CREATE FUNCTION {CASCADE}() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        LOCK TABLE product_dealers IN SHARE ROW EXCLUSIVE MODE;
        DELETE FROM product_dealers o USING deleted d WHERE o.product_id = d.id;
        RETURN NULL;
    END $$
    """,
    f"""
    CREATE TRIGGER {CASCADE} AFTER DELETE ON products REFERENCING OLD TABLE AS deleted
    FOR EACH STATEMENT EXECUTE FUNCTION {CASCADE}()
    """,
    f"""
    CREATE FUNCTION {CHECK}() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE missing bigint;
    BEGIN
        SELECT w.product_id INTO missing FROM written w
        WHERE NOT EXISTS (SELECT 1 FROM products p WHERE p.id = w.product_id) LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'insert or update on table "product_dealers" violates the check of its product'
                USING ERRCODE = 'foreign_key_violation', COLUMN = 'product_id', TABLE = 'product_dealers',
                      DETAIL = format('Key (product_id)=(%s) is not present in table "products".', missing);
        END IF;
        RETURN NULL;
    END $$
    """,
    *(f"""
    CREATE TRIGGER {CHECK}_{event} AFTER {event.upper()} ON product_dealers REFERENCING NEW TABLE AS written
    FOR EACH STATEMENT EXECUTE FUNCTION {CHECK}()
    """ for event in _EVENTS),
)
# SQLite keeps the key: its check costs little there, and rebuilding the table to drop it would drop the triggers
# on it. Migration 0010's rebuild of the table did drop the trigger of migration 0008 there: it is created again.
_SQLITE_UP = (
    """
    CREATE TRIGGER IF NOT EXISTS product_dealers_delete_staging AFTER DELETE ON product_dealers FOR EACH ROW
    BEGIN DELETE FROM product_integration_staging WHERE product_dealer_id = OLD.id; END
    """,
)


def upgrade() -> None:
    postgresql = op.get_bind().dialect.name == 'postgresql'
    if postgresql:
        op.drop_constraint(FOREIGN_KEY, 'product_dealers', type_='foreignkey')
    for statement in _POSTGRESQL_UP if postgresql else _SQLITE_UP:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name != 'postgresql':
        return  # SQLite kept its key; the restored trigger of migration 0008 stays
    op.execute(f"DROP TRIGGER IF EXISTS {CASCADE} ON products")
    for event in _EVENTS:
        op.execute(f"DROP TRIGGER IF EXISTS {CHECK}_{event} ON product_dealers")
    op.execute(f"DROP FUNCTION IF EXISTS {CASCADE}()")
    op.execute(f"DROP FUNCTION IF EXISTS {CHECK}()")
    # offers whose product is gone (none, unless one was deleted with the triggers disabled) would refuse the key
    op.execute("DELETE FROM product_dealers WHERE NOT EXISTS "
               "(SELECT 1 FROM products p WHERE p.id = product_dealers.product_id)")
    op.create_foreign_key(FOREIGN_KEY, 'product_dealers', 'products', ['product_id'], ['id'], ondelete='CASCADE')
