from flows.concurrency import upsert_concurrency_limit  # noqa: F401  (old path, removed when the branches merge)
