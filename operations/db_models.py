"""Every table of the project database, for Alembic (operations/db_migrations/env.py imports this module).

Each domain's models module is imported here so Alembic sees every table; a new domain adds its line.
"""

from __future__ import annotations

from operations.infra.database import Base
from operations.marketplace import models as marketplace_models  # noqa: F401 - registers the tables
from operations.marketplace import notification_models  # noqa: F401 - registers the table
from operations.products import models as products_models  # noqa: F401 - registers the tables

__all__ = ["Base"]
