"""A spec parsed field by field: what validation checks when other fields fail."""

from __future__ import annotations

from pathlib import Path

import pytest
from carpool.orchestrator.spec_check.parsed_fields import ParsedFields, parse_fields
from carpool.workers.spec.job_spec import AdapterSpec, DatasetSpec, JobSpec, TrainingSpec
from pydantic import BaseModel, ValidationError


def full_spec() -> dict:
    return {
        "name": "job-1",
        "base_model": "org/model",
        "dataset": {"path": "d.jsonl", "format": "text"},
        "adapter": {"r": 4, "lora_alpha": "8", "target_modules": "all-linear", "init_from": "a"},
        "training": {"num_epochs": 2, "learning_rate": "1e-4", "eval_steps": 3},
        "priority": 2,
        "eval_dataset": {"path": "e.parquet"},
    }


def same_values(model: BaseModel, fields: ParsedFields) -> None:
    for name, value in model:
        if isinstance(value, BaseModel) and isinstance(fields.get(name), ParsedFields):
            same_values(value, fields.get(name))  # a section, parsed field by field
        else:
            assert fields.get(name) == value and type(fields.get(name)) is type(value), name


def test_a_valid_spec_parses_to_the_schemas_values() -> None:
    raw = full_spec()
    same_values(JobSpec.model_validate(raw), parse_fields(JobSpec, raw))


def test_failed_fields_are_left_out_and_the_rest_parse() -> None:
    raw = {
        "name": "Bad Name!",
        "base_model": "b",
        "dataset": {"path": "d.jsonl", "fromat": "text"},
        "adapter": {"r": 0, "lora_alpha": "8"},
        "training": {"max_steps": 5, "batch_size": 0},
    }
    fields = parse_fields(JobSpec, raw)
    for failed in ("name", "adapter.r", "training.batch_size"):
        assert failed not in fields
    assert fields.get("base_model") == "b" and fields.get("priority") == 0
    assert fields.get("dataset.path") == Path("d.jsonl") and fields.get("dataset.format") == "auto"
    assert fields.get("adapter.lora_alpha") == 8.0
    assert fields.get("adapter.target_modules") == ["q_proj", "v_proj"]  # the default
    assert fields.get("adapter").given == {"r", "lora_alpha"}  # set, parsed or not
    assert fields.get("training.max_steps") == 5 and fields.get("training.num_epochs") is None
    assert "eval_dataset" in fields and fields.get("eval_dataset") is None
    assert "eval_dataset.path" not in fields


def test_a_section_that_is_not_a_mapping_is_left_out() -> None:
    fields = parse_fields(JobSpec, {"adapter": 5, "training": None})
    assert "adapter" not in fields and "adapter.r" not in fields
    assert "training" not in fields and "dataset" not in fields  # required, so no default
    assert fields.given == {"adapter", "training"}


@pytest.mark.parametrize("model", [JobSpec, DatasetSpec, AdapterSpec, TrainingSpec])
def test_single_field_checks_live_in_the_fields_types(model: type[BaseModel]) -> None:
    """A `@field_validator` would be invisible to parsing field by field: validation would
    then check, against the base and the data, a value the schema refuses."""
    assert not model.__pydantic_decorators__.field_validators


@pytest.mark.parametrize(
    ("dotted", "value"),
    [
        ("name", "Bad Name!"),
        ("base_model", ""),
        ("priority", "high"),
        ("dataset.path", "data.csv"),
        ("dataset.format", "csv"),
        ("adapter.r", True),
        ("adapter.r", 8.5),
        ("adapter.target_modules", []),
        ("adapter.target_modules", "q_proj"),
        ("adapter.lora_dropout", 1.0),
        ("training.learning_rate", "fast"),
        ("training.max_seq_length", 1),
    ],
)
def test_a_value_the_schema_refuses_does_not_parse(dotted: str, value: object) -> None:
    raw = full_spec()
    *section, key = dotted.split(".")
    (raw[section[0]] if section else raw)[key] = value
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(raw)
    assert [".".join(map(str, e["loc"])) for e in caught.value.errors()] == [dotted]
    fields = parse_fields(JobSpec, raw)
    assert dotted not in fields
    assert fields.get("training.eval_steps") == 3  # the rest still parses


def test_the_objective_parses_whole_as_its_own_type() -> None:
    """A choice of models (told apart by `type`) is no section: it parses as a whole."""
    raw = {**full_spec(), "objective": {"type": "dpo", "beta": 0.2}}
    raw["dataset"] = {"path": "pairs.jsonl", "format": "preference"}
    raw.pop("eval_dataset")
    raw["adapter"] = {"r": 4}
    raw["training"] = {"max_steps": 3}
    parsed = parse_fields(JobSpec, raw).get("objective")
    assert parsed == JobSpec.model_validate(raw).objective and parsed.beta == 0.2
    assert "objective" not in parse_fields(
        JobSpec, {**raw, "objective": {"type": "dpo", "beta": 0}}
    )
