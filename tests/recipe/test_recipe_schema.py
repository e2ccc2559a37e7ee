"""The schema is the single source of truth: the typed view cannot drift from it."""

from __future__ import annotations

import dataclasses
import typing

from jsonschema import Draft202012Validator

from loraforge.recipe import load_schema
from loraforge.recipe import types as recipe_types
from loraforge.recipe.schema import subschema


def _object_schemas(schema: dict, path: tuple = ()):
    if schema.get("type") == "object" and "properties" in schema:
        yield path, schema
        for name, prop in schema["properties"].items():
            yield from _object_schemas(prop, (*path, name))
    items = schema.get("items")
    if isinstance(items, dict):
        yield from _object_schemas(items, (*path, 0))


def test_schema_is_valid_2020_12() -> None:
    Draft202012Validator.check_schema(load_schema())


def test_every_property_has_description_and_objects_are_closed() -> None:
    for path, obj in _object_schemas(load_schema()):
        assert obj.get("additionalProperties") is False, path
        for name, prop in obj["properties"].items():
            assert prop.get("description"), (*path, name)
            assert "type" in prop or "oneOf" in prop, (*path, name)


def _dataclass_for(hint):
    for arg in (hint, *typing.get_args(hint)):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def test_dataclasses_match_schema_properties() -> None:
    def check(cls, path):
        schema = subschema(path)
        fields = {f.name for f in dataclasses.fields(cls)} - {"source", "base_dir"}
        assert fields == set(schema["properties"]) - {"$schema"}, (cls.__name__, path)
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            assert field.default is dataclasses.MISSING, (
                f"{cls.__name__}.{field.name} has a default"
            )
            hint = hints[field.name]
            if typing.get_origin(hint) is tuple:
                nested = _dataclass_for(typing.get_args(hint)[0])
                if nested:
                    check(nested, (*path, field.name, 0))
                continue
            nested = _dataclass_for(hint)
            if nested is not None:
                check(nested, (*path, field.name))

    check(recipe_types.Recipe, ())


def test_nullable_schema_properties_are_optional_in_the_typed_view() -> None:
    for path, obj in _object_schemas(load_schema()):
        if not path or path[-1] == "args":
            continue
        cls = None
        for name, c in recipe_types.SECTIONS.items():
            if path[0] == name:
                cls = c
        if cls is None or len(path) > 1:
            continue
        hints = typing.get_type_hints(cls)
        for name, prop in obj["properties"].items():
            types_ = prop.get("type")
            nullable = isinstance(types_, list) and "null" in types_
            assert nullable == (type(None) in typing.get_args(hints[name])), (path, name)
