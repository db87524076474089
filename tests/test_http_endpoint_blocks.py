"""The HTTP endpoint blocks (MarketplaceApp, TurnstileDevice) on their shared base: Prefect's standard block
checks, one URL check, client settings from the fields, each block's own defaults and form order, and blocks
saved by a class of the same type without the base still load."""

from __future__ import annotations

import uuid
import warnings
from typing import ClassVar

import pytest
from prefect.blocks.core import Block
from prefect.testing.standard_test_suites import BlockStandardTestSuite
from prefect.utilities.dispatch import get_registry_for_type
from pydantic import Field, SecretStr, ValidationError

from blocks.http_endpoint import HttpEndpoint
from blocks.marketplace_app import MarketplaceApp
from blocks.turnstile_device import TurnstileDevice
from operations.infra.http import HttpSettings, RetryPolicy

SHARED = ["connect_timeout_seconds", "read_timeout_seconds", "max_attempts", "backoff_base_seconds",
          "backoff_max_seconds"]


class TestHttpEndpointBlockStandards(BlockStandardTestSuite):
    @pytest.fixture(params=[MarketplaceApp, TurnstileDevice])
    def block(self, request):
        return request.param

    def test_has_a_valid_image(self, block):  # no logo: the suite would download it and there is no internet
        pytest.skip("no logo URL for this block")


@pytest.mark.parametrize(("block", "field"), [(MarketplaceApp, "api_base_url"), (TurnstileDevice, "base_url")])
def test_the_url_is_checked_and_trimmed_by_the_shared_base(block, field):
    assert block.url_field == field
    made = block(**{field: "https://api.example.com/"})
    assert getattr(made, field) == made.endpoint_url() == "https://api.example.com"
    for bad in ("ftp://api.example.com", "api.example.com", ""):
        with pytest.raises(ValidationError, match=f"{field} must start with http:// or https://"):
            block(**{field: bad})
    other = "base_url" if field == "api_base_url" else "api_base_url"
    assert other not in block.model_fields  # the check names the block's own field only


def test_client_settings_come_from_the_fields():
    app = MarketplaceApp(max_connections=7, connect_timeout_seconds=2, read_timeout_seconds=9, max_attempts=3,
                         backoff_base_seconds=0.1, backoff_max_seconds=1)
    assert app.http_settings() == HttpSettings(connect_timeout=2, read_timeout=9, max_connections=7,
                                               max_keepalive_connections=7)
    assert app.retry_policy() == RetryPolicy(attempts=3, base_delay=0.1, max_delay=1)
    device = TurnstileDevice(max_concurrent_requests=2, read_timeout_seconds=4, password=SecretStr("pw"))
    assert device.http_settings() == HttpSettings(connect_timeout=5, read_timeout=4, max_connections=2,
                                                  max_keepalive_connections=2)
    assert device.retry_policy() == RetryPolicy(attempts=4, base_delay=0.5, max_delay=10)
    client = device.client("gate-1")
    assert client._retry == device.retry_policy()  # the client is built with the block's policy


def test_each_block_keeps_its_defaults_fields_and_form_order():
    assert (MarketplaceApp().max_attempts, MarketplaceApp().backoff_base_seconds) == (5, 0.25)
    assert (TurnstileDevice().max_attempts, TurnstileDevice().backoff_base_seconds) == (4, 0.5)
    for block, own in ((MarketplaceApp, ["api_base_url", "client_id", "client_secret", "redirect_uri",
                                          "max_connections"]),
                       (TurnstileDevice, ["base_url", "login", "password", "max_concurrent_requests",
                                          "requests_per_second", "managed_groups"])):
        assert issubclass(block, HttpEndpoint)
        properties = block.model_json_schema()["properties"]
        assert list(properties) == own + SHARED
        assert [p["position"] for p in properties.values()] == list(range(len(own + SHARED)))
    assert (MarketplaceApp.get_block_type_slug(), TurnstileDevice.get_block_type_slug()) == (
        "marketplace-app", "turnstile-device")


def test_the_base_is_an_interface_prefect_does_not_register():
    from prefect.blocks.core import InvalidBlockRegistration

    with pytest.raises(InvalidBlockRegistration):
        HttpEndpoint.register_type_and_schema()
    with pytest.raises(TypeError):
        HttpEndpoint()


def _class_without_the_base(slug: str) -> type[Block]:
    """A block class of `slug` declared field by field, without HttpEndpoint: the shape of blocks saved without it."""
    common = {
        "connect_timeout_seconds": (float, Field(default=5.0)), "read_timeout_seconds": (float, Field(default=30.0)),
        "max_attempts": (int, Field(default=5)), "backoff_base_seconds": (float, Field(default=0.25)),
        "backoff_max_seconds": (float, Field(default=10.0)),
    }
    own = {
        "marketplace-app": {"api_base_url": (str, Field(default="")), "client_id": (str, Field(default="")),
                            "client_secret": (SecretStr, Field(default=SecretStr(""))),
                            "redirect_uri": (str, Field(default="")), "max_connections": (int, Field(default=20))},
        "turnstile-device": {"base_url": (str, Field(default="")), "login": (str, Field(default="admin")),
                             "password": (SecretStr, Field(default=SecretStr(""))),
                             "max_concurrent_requests": (int, Field(default=1)),
                             "requests_per_second": (float, Field(default=20.0))},
    }[slug]
    annotations = {name: kind for name, (kind, _) in {**own, **common}.items()}
    namespace = {name: field for name, (_, field) in {**own, **common}.items()}
    namespace.update({"__annotations__": {**annotations, "_block_type_slug": ClassVar[str]},
                      "_block_type_slug": slug, "__module__": __name__})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Prefect warns that the slug's registered class is replaced
        return type(f"FieldByField{slug.title().replace('-', '')}", (Block,), namespace)


@pytest.mark.parametrize(
    ("block", "values"),
    [
        (MarketplaceApp, {"api_base_url": "http://127.0.0.1:9/api", "client_id": "app", "client_secret": "s3cret",
                          "redirect_uri": "https://ops.example.com/cb", "max_connections": 3, "max_attempts": 2,
                          "backoff_base_seconds": 0.1, "read_timeout_seconds": 7}),
        (TurnstileDevice, {"base_url": "http://127.0.0.1:9", "login": "ops", "password": "pw",
                           "max_concurrent_requests": 2, "requests_per_second": 5, "max_attempts": 3,
                           "connect_timeout_seconds": 1}),
    ],
)
def test_a_block_saved_by_a_class_without_the_base_loads(block, values, prefect_api_url):
    registry = get_registry_for_type(Block)
    slug = block.get_block_type_slug()
    try:
        field_by_field = _class_without_the_base(slug)
        name = f"field-by-field-{uuid.uuid4().hex[:8]}"
        field_by_field(**values).save(name, overwrite=True)
    finally:
        registry[slug] = block
    loaded = block.load(name)
    assert type(loaded) is block
    for field, value in values.items():
        got = getattr(loaded, field)
        assert (got.get_secret_value() if isinstance(got, SecretStr) else got) == value, field
    block.delete(name)
