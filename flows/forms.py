"""Flow parameters as the Prefect UI shows them: every field with a title, a description and its bounds."""

from __future__ import annotations

from pydantic import BaseModel, Field


def form_field(default, title: str, description: str, **schema):
    """A flow parameter's default with the title and description the UI form shows (Prefect titles
    parameters by their names unless the schema says otherwise); `schema` adds JSON-schema keywords that
    the server checks before a run exists (it checks `pattern`, not `format`)."""
    return Field(default=default, description=description, json_schema_extra={"title": title, **schema})


def model_form_field(model: type[BaseModel], name: str):
    """The form field of a flow parameter that stands for the field `name` of `model`: the model field's
    default, title and description, so the form and the model say the same (the bounds come with the shared
    type the parameter is annotated with)."""
    field = model.model_fields[name]
    return form_field(field.get_default(call_default_factory=True), field.title, field.description)
