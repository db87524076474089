"""The LocalCluster runner of flows/task_runners.py, in a module of its own: importing prefect-dask brings
distributed and numpy (~0.5 s of CPU), which a flow run on threads never needs."""

from __future__ import annotations

import logging

from prefect_dask import DaskTaskRunner


class _NoDashboardLine(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("The Dask dashboard is available at")


_NO_DASHBOARD_LINE = _NoDashboardLine()


class LocalDaskTaskRunner(DaskTaskRunner):
    """A DaskTaskRunner on a LocalCluster this project starts with `dashboard_address=None`. prefect-dask
    still logs "The Dask dashboard is available at http://...:8787/status" for it (the scheduler keeps a bare
    HTTP server for /health; bokeh, which serves the dashboard, is not installed), a link to nothing: this
    runner's logger drops that line. Runners on DASK_SCHEDULER_ADDRESS keep it: that cluster may serve one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.logger.addFilter(_NO_DASHBOARD_LINE)  # the logger of this class; added once (addFilter skips it after)

