"""Flow `onboard-account`: add a seller account from the authorization code its owner's consent produced.

The code is exchanged once for the seller's tokens, which go straight to the project database (never to a
log, an artifact or a result). A re-authorization of a parked account (needs_reauthorization) is the same
flow: the account becomes active again with its new tokens, keeping its data and checkpoints. A refused code
(used, expired, issued for another redirect URI) or a missing app block ends the run Failed with one line.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import Field
from typing_extensions import Annotated

from flows.forms import form_field
from flows.outcomes import ends_failed_on_user_error
from flows.sync_marketplace import checked_app
from operations.infra.database import project_engine
from operations.marketplace.models import AccountStatus
from operations.marketplace.onboarding import onboard_from_code
from operations.marketplace.report import onboarded_markdown
from operations.marketplace.store import list_accounts
from operations.settings import get_settings


AuthorizationCode = Annotated[str, Field(min_length=4, max_length=512, pattern=r"^[A-Za-z0-9_.~+/=-]+$")]
Text = Annotated[str, Field(max_length=120)]
Uri = Annotated[str, Field(max_length=2000)]
# The form: each parameter's default, title and help text.
AUTHORIZATION_CODE = form_field(
    ..., "Authorization code",
    "The `code` the marketplace sent to the app's redirect URI after the seller authorized the app. "
    "Single use and short-lived: once exchanged it is worthless.",
)
NICKNAME = form_field("", "Nickname", "How the account is named in runs and reports. Empty: keep the stored one.")
REDIRECT_URI = form_field("", "Redirect URI", "The redirect URI the code was issued for. Empty: the app block's.")
APP_BLOCK = form_field(
    "", "App block", "Name of the MarketplaceApp block. Empty: MARKETPLACE_APP_BLOCK (marketplace-app)."
)


@flow(name="onboard-account", log_prints=False)
@ends_failed_on_user_error
def onboard_account(
    authorization_code: AuthorizationCode = AUTHORIZATION_CODE, nickname: Text = NICKNAME,
    redirect_uri: Uri = REDIRECT_URI, app_block: Text = APP_BLOCK,
) -> dict:
    """Exchange the authorization code and store the seller account (active) with its tokens."""
    settings = get_settings()
    _, engine = project_engine(settings)
    app = checked_app(app_block or settings.marketplace.app_block)
    parked = {a.seller_id: a.status_reason for a in list_accounts(engine)
              if a.status == AccountStatus.needs_reauthorization.value}
    account = onboard_from_code(engine, app.client(), authorization_code, nickname, redirect_uri or None)
    get_run_logger().info("seller %s (%s) onboarded: %s%s", account.seller_id, account.nickname or "no nickname",
                          account.status, " (it was parked: re-authorized)" if account.seller_id in parked else "")
    create_markdown_artifact(key="marketplace-onboarded-account",
                             markdown=onboarded_markdown(account, parked.get(account.seller_id)),
                             description="Onboarded seller account")
    return {"seller_id": account.seller_id, "nickname": account.nickname, "status": account.status}
