"""`MarketplaceApp`: a config-only Prefect block with the marketplace application's OAuth credentials and the
API's address, timeouts and retry budget (the last two shared with every `HttpEndpoint`). Tokens of the seller accounts are never here: they live in the
project database.

Register the type with `prefect block register -m blocks.marketplace_app`; `make up` saves `marketplace-app`
(from MARKETPLACE_* settings, or pointing at the local emulator when MARKETPLACE_API_URL is unset).
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, SecretStr

from blocks.http_endpoint import HttpEndpoint
from operations.infra.http import keepalive_gets, shared_http_client
from operations.marketplace.client import AppCredentials, MarketplaceClient, RequestStats


class MarketplaceApp(HttpEndpoint):
    """The marketplace application: where its API is and how the app authenticates.

    Configuration only: each process builds its `httpx.Client` on demand (one per process and base URL), so
    the block travels to Dask workers without a live connection.
    """

    _block_type_name: ClassVar[str] = "Marketplace App"
    _block_type_slug: ClassVar[str] = "marketplace-app"
    _description: ClassVar[str] = (
        "OAuth application credentials and API address used by the sync-marketplace and onboard-account flows."
    )
    _documentation_url: ClassVar[str] = "https://developers.mercadolivre.com.br/en_us/authentication-and-authorization"
    url_field: ClassVar[str] = "api_base_url"
    _code_example: ClassVar[str] = """
```python
from blocks.marketplace_app import MarketplaceApp

app = MarketplaceApp.load("BLOCK_NAME")
client = app.client()  # a MarketplaceClient over this process's shared httpx.Client
```
"""

    api_base_url: str = Field(
        default="https://api.mercadolibre.com",
        description="Base URL of the marketplace API (no trailing path), e.g. https://api.mercadolibre.com.",
    )
    client_id: str = Field(default="", max_length=200, description="The application's client id (APP ID).")
    client_secret: SecretStr = Field(default=SecretStr(""), description="The application's client secret.")
    redirect_uri: str = Field(
        default="", max_length=2000, description="Redirect URI registered for the app (used to exchange codes)."
    )
    max_connections: int = Field(
        default=20, ge=1, le=500, description="Connections of the process-wide HTTP pool to this API."
    )
    # connect_timeout_seconds, read_timeout_seconds, max_attempts, backoff_*: HttpEndpoint's

    def connection_limit(self) -> int:
        return self.max_connections

    def credentials(self) -> AppCredentials:
        return AppCredentials(self.client_id, self.client_secret, self.redirect_uri)

    def client(self, stats: RequestStats | None = None) -> MarketplaceClient:
        """A client (cheap; counters of its own) over this process's shared HTTP pool for the API."""
        if not self.client_id or not self.client_secret.get_secret_value():
            raise ValueError("the MarketplaceApp block has no client_id/client_secret: fill them in and save it")
        settings = self.http_settings()
        http = shared_http_client(self.api_base_url, settings)
        return MarketplaceClient(http, self.credentials(), self.retry_policy(), stats or RequestStats(),
                                 gets=keepalive_gets(self.api_base_url, settings))


def load_marketplace_app(name: str) -> MarketplaceApp:
    """The saved block `name`, or an error saying how to create it."""
    try:
        return MarketplaceApp.load(name)
    except ValueError:
        raise ValueError(
            f"no MarketplaceApp block named {name!r}: `make up` saves one (from MARKETPLACE_* settings, or for "
            "the local emulator), or create it in the UI (Blocks -> Marketplace App)"
        ) from None
