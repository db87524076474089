"""The one retry mechanism of the tasks: what is retried, and counts from settings."""

from __future__ import annotations

import errno

from prefect import flow

from operations.errors import UserError
from operations.settings import ProductsSettings, Settings
from tasks.lottery import generate_games_chunk, rank_games_of_run
from tasks.marketplace import sync_marketplace_account
from tasks.products import load_products_chunk, publish_pending_messages
from tasks.retention import remove_expired_runs
import logging

import pytest

from tasks.retries import is_transient, retrying_step, retrying_task, with_retries
from tasks.registration import register_on_turnstile


class _Healing(Exception):
    transient = True


def test_what_may_heal_is_retried_and_what_cannot_is_not():
    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    assert is_transient(OSError(errno.EAGAIN, "busy")) and is_transient(RuntimeError("worker lost"))
    assert is_transient(_Healing())
    for permanent in (FileNotFoundError(errno.ENOENT, "gone"), PermissionError(errno.EACCES, "no"),
                      OSError(errno.ENOSPC, "disk full"), OSError("no errno"), UserError("bad input")):
        assert not is_transient(permanent), permanent


def test_every_task_of_every_flow_uses_the_one_rule():
    for task_ in (generate_games_chunk, rank_games_of_run, load_products_chunk, publish_pending_messages,
                  remove_expired_runs, sync_marketplace_account, register_on_turnstile):
        assert task_.retries >= 1 and task_.retry_jitter_factor == 0.5 and task_.retry_condition_fn is not None


def test_the_products_chunk_retries_come_from_the_setting():
    retries = Settings(products=ProductsSettings(task_retries=5)).products.task_retries
    chunk = with_retries(load_products_chunk, retries)
    assert chunk.retries == 5 and chunk.retry_delay_seconds == load_products_chunk.retry_delay_seconds
    assert chunk.retry_condition_fn is load_products_chunk.retry_condition_fn
    assert with_retries(load_products_chunk, load_products_chunk.retries) is load_products_chunk


def test_a_permanent_os_error_runs_once_and_a_transient_one_is_retried():
    calls: list[str] = []

    @retrying_task(retries=2, delays=[0])
    def fails(kind: str) -> None:
        calls.append(kind)
        if kind == "reset" and calls.count(kind) < 3:
            raise ConnectionResetError("reset by peer")
        if kind == "missing":
            raise FileNotFoundError(errno.ENOENT, "no such file", "chunk-00001.npz")

    @flow
    def probe(kind: str) -> str:
        return fails(kind, return_state=True).type.value

    assert probe("missing") == "FAILED" and calls.count("missing") == 1
    assert probe("reset") == "COMPLETED" and calls.count("reset") == 3


def test_delays_from_settings_replace_the_declared_ones_and_keep_the_rule():
    task_ = with_retries(sync_marketplace_account, 4, [10.0])
    assert (task_.retries, task_.retry_delay_seconds) == (4, [10.0])
    assert task_.retry_condition_fn is sync_marketplace_account.retry_condition_fn
    assert with_retries(sync_marketplace_account, sync_marketplace_account.retries) is sync_marketplace_account


def test_a_step_of_a_flow_body_is_retried_by_the_same_rule():
    """`retrying_step`: a healing failure tried again until the retries run out, a permanent one raised at once."""
    logger = logging.getLogger("test-retrying-step")
    calls = []

    def heals_on_second():
        calls.append(1)
        if len(calls) < 2:
            raise _Healing("busy")
        return "done"

    assert retrying_step(heals_on_second, retries=1, delays=[0], what="a step", logger=logger) == "done"
    assert len(calls) == 2

    calls.clear()

    def never_heals():
        calls.append(1)
        raise _Healing("still busy")

    with pytest.raises(_Healing):
        retrying_step(never_heals, retries=2, delays=[0], what="a step", logger=logger)
    assert len(calls) == 3

    calls.clear()

    def refused():
        calls.append(1)
        raise UserError("bad input")

    with pytest.raises(UserError):
        retrying_step(refused, retries=2, delays=[0], what="a step", logger=logger)
    assert len(calls) == 1
