"""The flows' parameter forms: every field has a title, a description and, for numbers, bounds; no field shows a
type switch; the generate-games form says what GenerationRequest says, in the order the fields are declared."""

from __future__ import annotations

import re

from prefect.utilities.callables import parameter_schema

from flows.generate_games import generate_games
from operations.lottery.parameters import GenerationRequest
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


def test_the_generation_form_and_the_request_share_bounds_texts_and_defaults():
    form = parameter_schema(generate_games).model_dump()
    request = GenerationRequest.model_json_schema()
    keys = ("title", "description", "minimum", "maximum", "minItems", "maxItems", "default")
    for name in GenerationRequest.model_fields:
        in_form, in_request = form["properties"][name], request["properties"][name]
        assert {k: in_form.get(k) for k in keys if k != "default"} == {
            k: in_request.get(k) for k in keys if k != "default"}, name
        default = GenerationRequest.model_fields[name].get_default(call_default_factory=True)
        expected = [r.model_dump() for r in default] if name == "regions" else (
            default.model_dump() if hasattr(default, "model_dump") else default)
        assert in_form["default"] == expected, name


def test_sub_forms_keep_their_field_order_and_the_rule_hint_points_at_the_switch():
    """The UI orders a form by `position` (the server's JSONB storage reorders the keys, "last" before "first")."""
    definitions = parameter_schema(generate_games).model_dump()["definitions"]
    region = definitions["FirstNumberRegion"]["properties"]
    assert [region[name]["title"] for name in sorted(region, key=lambda n: region[n]["position"])] == [
        "From", "To", "Target share"]
    rules = definitions["GameRules"]["properties"]
    order = sorted(rules, key=lambda n: rules[n]["position"])
    assert order[0] == "historical_defaults"
    switch = rules["historical_defaults"]["title"]
    for name in ("sum_min", "max_per_row", "min_rows"):
        assert f"'{switch}' is on" in rules[name]["description"] and "above" not in rules[name]["description"]


def test_the_process_products_and_cleanup_forms():
    from flows.cleanup_runs import cleanup_runs
    from flows.process_products import process_products

    products = parameter_schema(process_products).model_dump()
    assert set(assert_operator_form(products)) == {"file_path", "run_key", "chunk_rows", "queue_block"}
    assert products["required"] == ["file_path"]
    assert set(assert_operator_form(parameter_schema(cleanup_runs).model_dump())) == {
        "retention_days", "dry_run", "counter_block"}
