from flows.concurrency import upsert_concurrency_limit  # noqa: F401  (import path kept for branches not merged
# yet; the lead deletes this file: import flows.concurrency)
