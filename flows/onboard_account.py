"""Flow `onboard-account`: add a seller account from the authorization code its owner's consent produced.

The code is exchanged once for the seller's tokens, which go straight to the project database (never to a
log, an artifact or a result). A re-authorization of a parked account (needs_reauthorization) is the same
flow: the account becomes active again with its new tokens, keeping its data and checkpoints.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import Field
from typing_extensions import Annotated

from blocks.marketplace_app import load_marketplace_app
from flows.forms import form_field
from operations.infra.database import project_engine
from operations.marketplace.onboarding import onboard_from_code
from operations.settings import get_settings


@flow(name="onboard-account", log_prints=False)
def onboard_account(
    authorization_code: Annotated[str, Field(min_length=4, max_length=512, pattern=r"^[A-Za-z0-9_.~+/=-]+$")] = form_field(
        ...,
        "Authorization code",
        "The `code` the marketplace sent to the app's redirect URI after the seller authorized the app. "
        "Single use and short-lived: once exchanged it is worthless.",
    ),
    nickname: Annotated[str, Field(max_length=120)] = form_field(
        "", "Nickname", "How the account is named in runs and reports. Empty: keep the stored one."
    ),
    redirect_uri: Annotated[str, Field(max_length=2000)] = form_field(
        "", "Redirect URI", "The redirect URI the code was issued for. Empty: the app block's."
    ),
    app_block: Annotated[str, Field(max_length=120)] = form_field(
        "", "App block", "Name of the MarketplaceApp block. Empty: MARKETPLACE_APP_BLOCK (marketplace-app)."
    ),
) -> dict:
    """Exchange the authorization code and store the seller account (active) with its tokens."""
    logger = get_run_logger()
    settings = get_settings()
    _, engine = project_engine(settings)
    app = load_marketplace_app(app_block or settings.marketplace_app_block)
    account = onboard_from_code(engine, app.client(), authorization_code, nickname, redirect_uri or None)
    logger.info("seller %s (%s) onboarded: %s", account.seller_id, account.nickname or "no nickname", account.status)
    create_markdown_artifact(
        key="marketplace-onboarded-account",
        markdown=f"# Seller {account.seller_id} onboarded\n\nNickname: `{account.nickname or '-'}`; "
        f"status: **{account.status}**. The next `sync-marketplace` run syncs it.",
        description="Onboarded seller account",
    )
    return {"seller_id": account.seller_id, "nickname": account.nickname, "status": account.status}
