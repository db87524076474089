"""The Redis blocks (RedisGameCounter, ProductsQueue): Prefect's standard block checks, secrets kept out of
dumps, clients on demand."""

from __future__ import annotations

import pickle

import pytest
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from pydantic import ValidationError

from blocks.products_queue import ProductsQueue
from blocks.redis_game_counter import RedisGameCounter
from operations.infra.redis_stream import StreamMessage


class TestRedisBlockStandards(BlockStandardTestSuite):
    @pytest.fixture(params=[RedisGameCounter, ProductsQueue])
    def block(self, request):
        return request.param

    def test_has_a_valid_image(self, block):  # no logo: the suite would download it and there is no internet
        pytest.skip("no logo URL for this block")


def test_password_moves_out_of_the_url_and_stays_secret():
    block = RedisGameCounter.from_url("redis://:hunter2@127.0.0.1:6390/1")
    assert block.url == "redis://127.0.0.1:6390/1"
    assert "hunter2" not in repr(block) and "hunter2" not in block.model_dump_json()
    assert block.password.get_secret_value() == "hunter2"


def test_a_password_written_in_the_url_field_is_refused():
    with pytest.raises(ValidationError, match="password"):
        RedisGameCounter(url="redis://:hunter2@127.0.0.1:6390/1")


def test_block_pickles_without_a_live_client(redis_url):
    block = RedisGameCounter.from_url(redis_url)
    block.ping()  # builds and caches a client in this process
    clone = pickle.loads(pickle.dumps(block))
    assert clone.url == block.url
    clone.ping()


def test_saved_block_loads_by_name_with_its_secret(redis_url):
    RedisGameCounter.from_url(redis_url, password=None, key_prefix="saved").save("saved-counter", overwrite=True)
    loaded = RedisGameCounter.load("saved-counter")
    assert loaded.key_prefix == "saved" and loaded.url == redis_url
    loaded.ping()


def test_block_type_registers_through_the_prefect_cli():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "prefect", "block", "register", "-m", "blocks.redis_game_counter"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "redis-game-counter" in done.stdout.lower().replace(" ", "-") or "Redis Game Counter" in done.stdout


def test_products_queue_block_publishes_through_its_own_client(redis_url, redis_client):
    queue = ProductsQueue.from_url(redis_url, stream="test.queue-block", max_length=50)
    queue.save("test-products-queue", overwrite=True)
    loaded = ProductsQueue.load("test-products-queue")
    publisher = pickle.loads(pickle.dumps(loaded)).publisher()
    redis_client.delete(publisher.stream)
    first = publisher.publish([StreamMessage(f"k{i}", {"n": str(i)}) for i in range(3)])
    again = publisher.publish([StreamMessage("k1", {"n": "1"})])
    assert [p.added for p in first] == [True] * 3 and again[0].added is False
    assert again[0].entry_id == first[1].entry_id and publisher.length() == 3
    assert publisher.forget(f"k{i}" for i in range(3)) == 3 and publisher.guards() == 0
    redis_client.delete(publisher.stream)
