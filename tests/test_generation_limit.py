"""The 'generate-games' global concurrency limit on the session's real Prefect server: created when missing,
slots held, waited for (with a log line), released when the holder fails."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound

from flows.concurrency import GAMES_LIMIT, ensure_games_limit, generation_slot


def _limit():
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(GAMES_LIMIT)


@pytest.fixture
def no_games_limit():
    """No 'generate-games' limit before the test; the flows of later tests create it again from the setting."""
    def delete():
        with get_client(sync_client=True) as client:
            try:
                client.delete_global_concurrency_limit_by_name(GAMES_LIMIT)
            except ObjectNotFound:
                pass

    delete()
    yield
    delete()


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[tuple[float, str]] = []

    def emit(self, record):
        self.lines.append((time.monotonic(), record.getMessage()))


def _logger(name: str) -> tuple[logging.Logger, _Lines]:
    logger, lines = logging.getLogger(f"test.generation-limit.{name}"), _Lines()
    logger.setLevel(logging.INFO)
    logger.addHandler(lines)
    return logger, lines


def test_a_missing_limit_is_created_from_the_setting_and_an_existing_one_is_left_to_the_operator(no_games_limit):
    ensure_games_limit(1, update=False)
    assert (_limit().limit, _limit().active_slots) == (1, 0)
    ensure_games_limit(3, update=False)  # a run: the operator's `prefect gcl update` holds
    assert _limit().limit == 1
    ensure_games_limit(2, update=True)  # `make up`: GAMES_CONCURRENCY_LIMIT
    assert _limit().limit == 2


def test_a_second_generation_waits_for_the_slot_of_the_first_and_says_so(no_games_limit):
    first_logger, first_lines = _logger("first")
    second_logger, second_lines = _logger("second")
    holding, events = threading.Event(), {}

    def first():
        with generation_slot(1, first_logger) as waited:
            events["first waited"] = waited
            holding.set()
            time.sleep(3)
            events["first released"] = time.monotonic()

    thread = threading.Thread(target=first)
    thread.start()
    assert holding.wait(60)
    assert _limit().active_slots == 1
    with generation_slot(1, second_logger) as waited:
        events["second acquired"] = time.monotonic()
        assert _limit().active_slots == 1
    thread.join(60)

    assert events["first waited"] < 1 and not first_lines.lines, "a free slot is taken without a word"
    assert events["second acquired"] >= events["first released"]
    assert waited >= 2, waited
    [(_, waiting), *_, (_, taken)] = second_lines.lines
    assert waiting.startswith("waiting for a generation slot: 1 of 1 taken by other generation runs"), waiting
    assert taken.startswith("generation slot taken after waiting"), taken
    assert _limit().active_slots == 0


def test_a_failing_holder_releases_its_slot(no_games_limit):
    logger, _ = _logger("failing")
    with pytest.raises(RuntimeError, match="chunk failed"):
        with generation_slot(1, logger):
            assert _limit().active_slots == 1
            raise RuntimeError("chunk failed")
    assert _limit().active_slots == 0
    with generation_slot(1, logger) as waited:  # taken at once
        assert waited < 1
