"""Alembic migrations of the project database (env.py, script.py.mako, versions/); run by
`operations.infra.database.migrate_to_head` and by `.venv/bin/alembic` with the project's alembic.ini."""
