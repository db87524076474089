"""Adding seller accounts: from an authorization code (the OAuth consent of the account's owner) or from a
refresh token the old system already holds. Tokens go from the API straight into the database."""

from __future__ import annotations

from pydantic import SecretStr
from sqlalchemy import Engine

from operations.errors import UserError
from operations.marketplace.client import InvalidGrant, MarketplaceClient, MarketplaceError
from operations.marketplace.store import AccountView, now_utc, save_account


class AuthorizationRefused(UserError, MarketplaceError):
    """The marketplace refused an authorization code: used already, expired, or issued for another redirect URI."""


def onboard_from_code(
    engine: Engine, client: MarketplaceClient, code: str, nickname: str = "", redirect_uri: str | None = None
) -> AccountView:
    """Exchange the code (single use) for the seller's tokens and store the account, active. Raises
    AuthorizationRefused when the marketplace refuses the code."""
    issued = now_utc()
    try:
        grant = client.exchange_code(SecretStr(code.strip()), redirect_uri)
    except InvalidGrant as exc:
        raise AuthorizationRefused(
            f"the authorization code was refused ({exc.error}: {exc}); codes are single use and short-lived: "
            "have the seller authorize the app again and use the new code at once"
        ) from None
    return save_account(engine, grant, nickname, issued)


def import_refresh_token(
    engine: Engine, client: MarketplaceClient, refresh_token: SecretStr, nickname: str = ""
) -> AccountView:
    """Adopt an account whose refresh token another system holds. The token is refreshed at once (which
    also proves it and names its seller); the old one is dead afterwards, so that system must stop using it."""
    issued = now_utc()
    grant = client.refresh(SecretStr(refresh_token.get_secret_value().strip()))
    return save_account(engine, grant, nickname, issued)
