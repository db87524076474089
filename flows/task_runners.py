"""Task runners built from settings: a Dask cluster (local or existing) or the in-process thread pool."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterable
from concurrent.futures import Future as ThreadFuture
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from prefect import Task
from prefect.futures import PrefectFuture, wait
from prefect.task_runners import ThreadPoolTaskRunner

from operations.settings import Settings

if TYPE_CHECKING:
    from prefect_dask import DaskTaskRunner

# prefect-dask, distributed and numpy are imported only when a Dask runner is built (flows/dask_runners.py):
# ~0.5 s of CPU that a flow run on threads does not spend at its start.

# Dask's per-worker INFO lines drown the run's own log; worker processes inherit the variable.
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
logging.getLogger("distributed").setLevel(logging.WARNING)


class DaskSchedulerUnreachable(RuntimeError):
    """DASK_SCHEDULER_ADDRESS does not answer."""


def check_scheduler_reachable(address: str, timeout: float) -> None:
    """Fail fast with a clear message instead of letting the Dask client wait forever."""
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    host, port = parsed.hostname, parsed.port or 8786
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:
        raise DaskSchedulerUnreachable(
            f"Dask scheduler {address} (DASK_SCHEDULER_ADDRESS) is unreachable: {exc}. "
            "Start it, fix the address, or unset DASK_SCHEDULER_ADDRESS to use a local cluster."
        ) from exc


def dask_task_runner(settings: Settings) -> DaskTaskRunner:
    """The configured Dask cluster: DASK_SCHEDULER_ADDRESS if set (the flow has checked it is reachable),
    else a LocalCluster of process workers."""
    from prefect_dask import DaskTaskRunner

    from flows.dask_runners import LocalDaskTaskRunner

    if settings.dask.scheduler_address:
        return DaskTaskRunner(address=settings.dask.scheduler_address)
    return LocalDaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": settings.dask.n_workers,
            "threads_per_worker": settings.dask.threads_per_worker,
            "processes": True,
            "dashboard_address": None,
        },
    )


class LocalClusterInBackground:
    """A LocalCluster started in a thread, so its ~2-3 s start-up overlaps the flow's planning."""

    def __init__(self, settings: Settings):
        self._settings = settings
        self._cluster = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._start, name="local-dask-cluster", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        from distributed import LocalCluster

        try:
            self._cluster = LocalCluster(
                n_workers=self._settings.dask.n_workers,
                threads_per_worker=self._settings.dask.threads_per_worker,
                processes=True,
                dashboard_address=None,
            )
        except BaseException as exc:  # re-raised in the flow's thread by task_runner()
            self._error = exc

    def task_runner(self) -> DaskTaskRunner:
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"the local Dask cluster did not start: {self._error}") from self._error
        from flows.dask_runners import LocalDaskTaskRunner

        return LocalDaskTaskRunner(address=self._cluster.scheduler_address)

    def close(self) -> None:
        self._thread.join()
        if self._cluster is not None:
            self._cluster.close()


def in_process_task_runner(settings: Settings) -> ThreadPoolTaskRunner:
    return ThreadPoolTaskRunner(max_workers=settings.dask.n_workers)


def cluster_shape(settings: Settings) -> tuple[int, int]:
    """(worker processes, task slots) of the cluster that will run the work: the existing cluster at
    DASK_SCHEDULER_ADDRESS (asked), else the LocalCluster's workers and workers x threads."""
    if settings.dask.scheduler_address:
        from distributed import Client

        with Client(settings.dask.scheduler_address, timeout=settings.dask.connect_timeout_seconds) as client:
            workers = client.scheduler_info(n_workers=-1)["workers"].values()
            threads = sum(w["nthreads"] for w in workers)
        return max(1, len(workers)), max(1, threads)
    return settings.dask.n_workers, settings.dask.n_workers * settings.dask.threads_per_worker


def worker_count(settings: Settings) -> int:
    """Task slots that will share the work (chunk sizing, spreadsheet files)."""
    return cluster_shape(settings)[1]


def io_task_runner(settings: Settings, concurrency: int, kind: str) -> ThreadPoolTaskRunner | DaskTaskRunner:
    """A runner for I/O-bound tasks (HTTP, database) that keeps `concurrency` of them in flight.

    `threads`: the flow's own thread pool (~5 ms per task run). `dask`: DASK_SCHEDULER_ADDRESS (its threads
    bound the concurrency), else a LocalCluster of DASK_N_WORKERS process workers with enough threads each
    for `concurrency` together (I/O waits, so threads beyond the core count pay off)."""
    if kind == "threads":
        return ThreadPoolTaskRunner(max_workers=concurrency)
    if kind != "dask":
        raise ValueError(f"unknown task runner {kind!r}: use 'threads' or 'dask'")
    from prefect_dask import DaskTaskRunner

    from flows.dask_runners import LocalDaskTaskRunner

    if settings.dask.scheduler_address:
        check_scheduler_reachable(settings.dask.scheduler_address, settings.dask.connect_timeout_seconds)
        return DaskTaskRunner(address=settings.dask.scheduler_address)
    workers = max(1, min(settings.dask.n_workers, concurrency))
    return LocalDaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": workers,
            "threads_per_worker": -(-concurrency // workers),
            "processes": True,
            "dashboard_address": None,
        },
    )


def map_and_wait(runner: ThreadPoolTaskRunner | DaskTaskRunner, task: Task, parameters: dict[str, Any]) -> list[Any]:
    """Run `task` mapped over `parameters` (iterables, and `unmapped(...)` values) on `runner`, started here and
    closed on return, and wait for every run: each one's return value, or the exception it ended with, in order.

    Called in a flow, the task runs belong to that flow run on threads as on Dask (prefect-dask sends the flow
    run's context with each task), so a flow picks a runner per task and needs no subflow to do so."""
    with runner:
        futures = runner.map(task, parameters)
        wait(futures)
        return [future.result(raise_on_failure=False) for future in futures]


def cancel_pending(futures: Iterable[PrefectFuture]) -> None:
    """Cancel the futures not done: on threads those not started; on Dask the scheduler drops them (a task
    already running in a worker finishes, its result unread)."""
    for future in futures:
        wrapped = getattr(future, "wrapped_future", None)
        if wrapped is not None and not wrapped.done():
            wrapped.cancel()


def cancel_not_started(futures: set[PrefectFuture]) -> set[PrefectFuture]:
    """Cancel the futures whose task has not started (queued on the thread pool, or not given to a Dask worker
    yet), leaving those under way to finish; returns the cancelled ones."""
    cancelled = {f for f in futures if isinstance(f.wrapped_future, ThreadFuture) and f.wrapped_future.cancel()}
    on_dask = [f for f in futures
               if f not in cancelled and hasattr(f.wrapped_future, "client") and not f.wrapped_future.done()]
    if on_dask:
        try:
            processing = {key for keys in on_dask[0].wrapped_future.client.processing().values() for key in keys}
        except Exception as exc:  # noqa: BLE001 - the scheduler is gone: the grace wait and close cover it
            logging.getLogger(__name__).debug("could not ask the Dask scheduler what runs: %s", exc)
            return cancelled
        for future in on_dask:
            if future.wrapped_future.key not in processing:
                future.wrapped_future.cancel()
                cancelled.add(future)
    return cancelled
