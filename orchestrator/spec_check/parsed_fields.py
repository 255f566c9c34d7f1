"""A spec parsed field by field: every value that parses, even where other fields fail.

pydantic validates a model whole and keeps none of its values when any field
fails. Validation wants the rest anyway, to report every problem of a file at
once: the base model, the data and `init_from` are checked, and the rules
across fields applied, on whatever parsed. So each field is parsed here on its
own, by its own type; the schema (`workers.job_spec`) keeps each single-field
check in the field's type for this.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, TypeAdapter, ValidationError

_ABSENT = object()


@dataclass(frozen=True)
class ParsedFields:
    """The fields of one model (a spec, or one of its sections) that parsed on their own.

    `values` holds each field that parsed, with its default where the spec
    leaves it out; a section given as a mapping is itself a ParsedFields. A field
    that failed is absent. `given` names the fields the spec sets, parsed or not.
    """

    values: dict[str, Any]
    given: frozenset[str]

    def get(self, dotted: str, default: Any = None) -> Any:
        """The value at `dotted` ("training.max_steps"), or `default` where it did not parse."""
        node: Any = self
        for part in dotted.split("."):
            if not isinstance(node, ParsedFields):
                return default
            node = node.values.get(part, _ABSENT)
            if node is _ABSENT:
                return default
        return node

    def __contains__(self, dotted: str) -> bool:
        return self.get(dotted, _ABSENT) is not _ABSENT


def parse_fields(model: type[BaseModel], raw: Mapping[str, Any]) -> ParsedFields:
    """What of `raw` parses as fields of `model`, field by field; unknown keys are ignored."""
    values: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        section = section_model(info.annotation)
        if name not in raw:
            if not info.is_required():
                default = info.get_default(call_default_factory=True)
                is_section = section is not None and isinstance(default, BaseModel)
                values[name] = _of_model(default) if is_section else default
        elif section is not None and isinstance(raw[name], Mapping):
            values[name] = parse_fields(section, raw[name])
        else:
            with contextlib.suppress(ValidationError):  # the schema reports it
                values[name] = _field_type(model, name).validate_python(raw[name])
    return ParsedFields(values, frozenset(k for k in raw if k in model.model_fields))


def section_model(annotation: Any) -> type[BaseModel] | None:
    """The model of a section field (`DatasetSpec` of `DatasetSpec | None`), else None.

    A choice between models (the objective's types, told apart by `type`) is no section:
    it parses as a whole, its own type's fields checked by its own model."""
    models = section_models(annotation)
    return models[0] if len(models) == 1 else None


def section_models(annotation: Any) -> list[type[BaseModel]]:
    """The models a field's value may be: one for a section, several for a choice."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if get_origin(annotation) in (Union, types.UnionType):
        return [m for arg in get_args(annotation) for m in section_models(arg)]
    return []


def _of_model(instance: BaseModel) -> ParsedFields:
    values = {k: _of_model(v) if isinstance(v, BaseModel) else v for k, v in instance}
    return ParsedFields(values, frozenset())


@functools.cache
def _field_type(model: type[BaseModel], name: str) -> TypeAdapter:
    """The field's type with its bounds and validators, as the model applies them."""
    info = model.model_fields[name]
    if not info.metadata:
        return TypeAdapter(info.annotation)
    return TypeAdapter(Annotated[(info.annotation, *info.metadata)])
