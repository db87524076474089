"""`make onboard`: a seller of the marketplace emulator onboarded in one command, through the emulator's OAuth
consent page (the redirect's `code`), as the app block of the Prefect server names it."""

from __future__ import annotations

import re
import shlex
import uuid

import pytest
from pydantic import SecretStr

from blocks.marketplace_app import MarketplaceApp
from deployments.marketplace_accounts import authorization_code, main
from deployments.start_run import parse_parameters
from operations.marketplace.onboarding import onboard_from_code
from operations.marketplace.store import list_accounts


@pytest.fixture
def app_block(pg_engine, emulator_factory):
    """A MarketplaceApp block of a fresh 3-seller emulator, saved on the session's Prefect server."""
    market = emulator_factory(pg_engine)
    app = MarketplaceApp(api_base_url=market.base_url, client_id=market.config.client_id,
                         client_secret=SecretStr(market.config.client_secret), redirect_uri=market.config.redirect_uri)
    name = f"onboard-test-{uuid.uuid4().hex[:6]}"
    app.save(name, overwrite=True)
    return name, app, market


def test_make_onboard_adds_the_next_emulated_seller_each_time_until_all_are(app_block, capsys):
    name, _, market = app_block
    sellers = market.seller_ids()
    for seller in sellers:
        assert main(["--app-block", name, "emulated"]) == 0
        assert f"seller {seller} (" in capsys.readouterr().out
    accounts = list_accounts(market.engine)
    assert [(a.seller_id, a.status) for a in accounts] == [(s, "active") for s in sellers]
    assert {a.nickname for a in accounts} == {s["nickname"] for s in market.control.sellers()}
    assert all(s["authorized"] for s in market.control.sellers())

    assert main(["--app-block", name, "emulated"]) == 0
    assert "every emulated seller (3) is onboarded already" in capsys.readouterr().out


def test_code_only_prints_a_code_and_the_onboard_account_run_that_exchanges_it(app_block, capsys):
    name, app, market = app_block
    seller = market.seller_ids()[1]
    assert main(["--app-block", name, "emulated", "--seller", str(seller), "--code-only", "--nickname", "loja x"]) == 0
    out = capsys.readouterr().out
    assert list_accounts(market.engine) == []  # nothing exchanged yet
    params = re.search(r'make run DEPLOYMENT=onboard-account/on-demand PARAMS="(.+)"', out).group(1)
    parameters = parse_parameters(shlex.split(params), None)
    assert parameters["nickname"] == "loja x" and parameters["authorization_code"] in out
    account = onboard_from_code(market.engine, app.client(), parameters["authorization_code"], parameters["nickname"])
    assert (account.seller_id, account.status) == (seller, "active")


def test_the_consent_page_refuses_another_app_and_unknown_sellers_are_refused(app_block, capsys):
    name, app, market = app_block
    other = app.model_copy(update={"client_id": "another-app"})
    with pytest.raises(ValueError, match="gave no code \\(400\\)"):
        authorization_code(other, market.seller_ids()[0])
    assert main(["--app-block", name, "emulated", "--seller", "42"]) == 2
    assert "no emulated seller 42" in capsys.readouterr().err
