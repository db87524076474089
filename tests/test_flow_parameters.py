"""The generate-games parameter form: every field has a title, a description and, for numbers, bounds."""

from __future__ import annotations

from prefect.utilities.callables import parameter_schema

from flows.generate_games import generate_games


def _fields(schema: dict):
    for name, prop in schema["properties"].items():
        yield "", name, prop
    for model, definition in schema.get("definitions", {}).items():
        for name, prop in definition["properties"].items():
            yield model, name, prop


def test_every_parameter_field_has_title_description_and_bounds():
    schema = parameter_schema(generate_games).model_dump()
    fields = list(_fields(schema))
    assert {"quantity", "numbers_per_game", "rules", "regions", "run_key"} <= {n for m, n, _ in fields if not m}
    for model, name, prop in fields:
        where = f"{model}.{name}" if model else name
        assert prop.get("title") and prop["title"] != name, f"{where} has no human title"
        assert prop.get("description"), f"{where} has no description"
        types = [prop.get("type")] + [alt.get("type") for alt in prop.get("anyOf", [])]
        if "integer" in types or "number" in types:
            bounded = [prop] + [alt for alt in prop.get("anyOf", []) if alt.get("type") in ("integer", "number")]
            assert any("minimum" in b and "maximum" in b for b in bounded), f"{where} has no bounds"
    quantity = schema["properties"]["quantity"]
    assert (quantity["minimum"], quantity["maximum"], quantity["default"]) == (1, 10_000_000, 10_000)
