"""The parameter forms: every field has a title, a description and, for numbers, bounds; no field shows a
type switch."""

from __future__ import annotations

import re

from prefect.utilities.callables import parameter_schema

from flows.generate_games import generate_games
from run_checks import assert_operator_form


def test_every_parameter_field_has_title_description_and_bounds():
    schema = parameter_schema(generate_games).model_dump()
    names = assert_operator_form(schema)
    assert {"quantity", "numbers_per_game", "rules", "regions", "run_key"} <= set(names)
    quantity = schema["properties"]["quantity"]
    assert (quantity["minimum"], quantity["maximum"], quantity["default"]) == (1, 10_000_000, 10_000)


def test_marketplace_forms_have_titles_descriptions_bounds_and_a_choice_of_resources():
    from flows.onboard_account import onboard_account
    from flows.sync_marketplace import sync_marketplace

    schema = parameter_schema(sync_marketplace).model_dump()
    assert set(assert_operator_form(schema)) == {"accounts", "resources", "full_resync_from", "app_block"}
    assert schema["definitions"]["SyncResources"]["enum"] == ["orders", "items", "both"]
    assert schema["properties"]["accounts"]["items"]["minimum"] == 1
    resync = schema["properties"]["full_resync_from"]  # a plain text field: no date/None type switch
    assert (resync["type"], resync["default"], "anyOf" in resync) == ("string", "", False), resync
    pattern = re.compile(resync["pattern"])
    assert pattern.fullmatch("") and pattern.fullmatch("2026-10-01") and not pattern.fullmatch("yesterday")
    onboarding = parameter_schema(onboard_account).model_dump()
    assert_operator_form(onboarding)
    assert onboarding["required"] == ["authorization_code"]
