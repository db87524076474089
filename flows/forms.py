"""Flow parameters as the Prefect UI shows them: every field with a title, a description and its bounds."""

from __future__ import annotations

from pydantic import Field


def form_field(default, title: str, description: str, **schema):
    """A flow parameter's default with the title and description the UI form shows (Prefect titles
    parameters by their names unless the schema says otherwise); `schema` adds JSON-schema keywords that
    the server checks before a run exists (it checks `pattern`, not `format`)."""
    return Field(default=default, description=description, json_schema_extra={"title": title, **schema})
