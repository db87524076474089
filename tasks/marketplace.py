"""Tasks of the marketplace flows: thin wrappers that add retries, names and tags to domain code."""

from __future__ import annotations

from prefect.cache_policies import NO_CACHE

from blocks.marketplace_app import MarketplaceApp
from operations.infra.database import get_engine
from operations.marketplace.store import AccountView
from operations.marketplace.sync import SyncRun, sync_account
from tasks.retries import retrying_task


# Re-running an account is harmless by design (upserts keyed by the API's ids, checkpoints after commits), so
# Dask recomputing a finished task needs no cache; NO_CACHE also keeps the block out of cache keys.
@retrying_task(
    name="sync-account",
    task_run_name="sync-{account.label}",
    retries=2,
    delays=[5, 20],  # AccountSyncFailed says whether a retry helps
    cache_policy=NO_CACHE,
    tags=["marketplace", "http"],
)
def sync_marketplace_account(account: AccountView, app: MarketplaceApp, run: SyncRun) -> dict:
    """Sync one seller account (orders and/or items, as `run` says) into the project database; returns its
    report."""
    result = sync_account(get_engine(run.database_url), app.client(), account, run.resources, run.options,
                          full_resync_from=run.full_resync_from)
    return result.to_json()
