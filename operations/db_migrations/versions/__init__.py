"""One module per revision, `<rev>_<slug>.py`, chained by down_revision (Alembic ignores this file)."""
