"""The generate-games parameter form: every field has a title, a description and, for numbers, bounds."""

from __future__ import annotations

from prefect.utilities.callables import parameter_schema

from flows.generate_games import generate_games
from run_checks import assert_operator_form


def test_every_parameter_field_has_title_description_and_bounds():
    schema = parameter_schema(generate_games).model_dump()
    names = assert_operator_form(schema)
    assert {"quantity", "numbers_per_game", "rules", "regions", "run_key"} <= set(names)
    quantity = schema["properties"]["quantity"]
    assert (quantity["minimum"], quantity["maximum"], quantity["default"]) == (1, 10_000_000, 10_000)
