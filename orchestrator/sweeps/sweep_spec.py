"""A hyperparameter sweep, as a user writes it: a template job and a space of changes to it.

`load_sweep_file` checks the sweep file and its template up front and reports
every problem at once, as job-file validation does: a dotted path that names
no field, a value a trial could not accept (each choice, each range's
endpoints, applied to the template and checked as a job), a grid that cannot
be walked, pruner options the pruner refuses. A trial is then an ordinary job:
`trial_spec` is the template with the trial's values set.

Importing this module loads neither torch nor Optuna: the checks that need the
base model (`validation`) or the pruner classes (`pruners`) import them
when they run.
"""

from __future__ import annotations

import copy
import difflib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from carpool.orchestrator.spec_check.parsed_fields import section_models
from carpool.orchestrator.spec_check.spec_paths import resolve_spec_paths
from carpool.orchestrator.spec_check.spec_problems import SpecProblem, SpecValidationError
from carpool.orchestrator.spec_check.yaml_loader import load_yaml
from carpool.workers.spec.job_spec import NAME_PATTERN, JobName, JobSpec
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictInt,
    Tag,
    TypeAdapter,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError
from typing_extensions import Self

TOP_LEVEL = "(top level)"
# The error type of the sweep's rules across fields (load_sweep_file applies them itself).
SWEEP_RULE = "sweep_rule"
Choice = None | bool | int | float | str  # what Optuna's categorical distributions hold
_Found = list[tuple[str, str]]  # (field, message)


def trial_name(sweep_name: str, number: int) -> str:
    """The job name of trial `number` of a sweep."""
    return f"{sweep_name}-t{number:02d}"


def encoded_choice(value: Any) -> Choice:
    """A choice as Optuna can store it: lists and mappings (target module sets) as JSON text."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return json.dumps(value, sort_keys=True)


class _SweepModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RangeSpace(_SweepModel):
    """Numbers from low to high: whole numbers when both ends are, else floats."""

    low: StrictInt | float
    high: StrictInt | float
    log: bool = False
    step: StrictInt | float | None = Field(None, gt=0)

    @property
    def is_int(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        problems = []
        if not self.low < self.high:
            problems.append(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            problems.append(f"log needs low > 0, got {self.low}")
        if self.log and self.step is not None:
            problems.append("log and step cannot be combined")  # Optuna's rule
        if self.is_int and self.step is not None and not isinstance(self.step, int):
            problems.append(f"step of a whole-number range must be whole, got {self.step}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def grid_points(self) -> list[int | float]:
        """The values of a stepped range, low first (in decimal, so 0.1 steps stay exact)."""
        assert self.step is not None
        if self.is_int:
            return list(range(int(self.low), int(self.high) + 1, int(self.step)))
        low, step = Decimal(str(self.low)), Decimal(str(self.step))
        count = int((Decimal(str(self.high)) - low) // step) + 1
        return [float(low + i * step) for i in range(count)]


class ChoiceSpace(_SweepModel):
    """A list of values; a value may itself be a list (a set of target modules)."""

    choices: list[Any] = Field(min_length=1)

    @model_validator(mode="after")
    def _distinct(self) -> Self:
        # Optuna finds a choice by equality: two equal encodings (1 and True, too) are one.
        seen: list[Choice] = []
        for value in self.choices:
            code = encoded_choice(value)
            if code in seen:
                raise ValueError(f"choice {value!r} repeats an earlier one")
            seen.append(code)
        return self


def _space_kind(value: Any) -> str | None:
    if isinstance(value, Mapping):
        return "choices" if "choices" in value else "range"
    if isinstance(value, ChoiceSpace | RangeSpace):
        return "choices" if isinstance(value, ChoiceSpace) else "range"
    return None


ParameterSpace = Annotated[
    Annotated[RangeSpace, Tag("range")] | Annotated[ChoiceSpace, Tag("choices")],
    Discriminator(
        _space_kind,
        custom_error_type="parameter_space",
        custom_error_message="must be {low, high, log?, step?} or {choices: [...]}",
    ),
]
_SPACE = TypeAdapter(ParameterSpace)
_TAGS = ("range", "choices")


def grid_size(space: RangeSpace | ChoiceSpace) -> int | None:
    """Points of the space on a grid; None where it has none (a range without step)."""
    if isinstance(space, ChoiceSpace):
        return len(space.choices)
    return len(space.grid_points()) if space.step is not None else None


def sweep_rule_problems(fields: Mapping[str, Any]) -> _Found:
    """The rules across the sweep's fields, each applied when the fields it reads parsed."""
    found: _Found = []
    name, trials, parameters = fields.get("name"), fields.get("trials"), fields.get("parameters")
    if name is not None and trials is not None:
        last = trial_name(name, trials - 1)
        if not NAME_PATTERN.fullmatch(last):
            found.append(("name", f"too long for its trials' job names (e.g. {last!r}, max 64)"))
    if fields.get("sampler") == "grid" and parameters is not None:
        sizes = {path: grid_size(space) for path, space in parameters.items()}
        for path, size in sizes.items():
            if size is None:
                found.append((f"parameters.{path}", "a grid needs choices or a range with step"))
        if parameters and None not in sizes.values() and trials is not None:
            total = 1
            for size in sizes.values():
                total *= size
            if trials > total:
                found.append(("trials", f"{trials} is more than the grid's {total} points"))
    pruner, options = fields.get("pruner"), fields.get("pruner_options")
    if pruner is not None and options:
        if pruner == "none":
            found.append(("pruner_options", "pruner none takes no options"))
        else:
            from carpool.orchestrator.sweeps.pruners import pruner_option_problems

            found += pruner_option_problems(pruner, options)
    return found


class SweepSpec(_SweepModel):
    name: JobName  # trial jobs are named f"{name}-t{number:02d}"
    template: Path  # a job spec file; relative to the sweep file's folder
    parameters: dict[str, ParameterSpace] = Field(min_length=1)  # dotted paths into the job
    trials: StrictInt = Field(ge=1)
    sampler: Literal["grid", "random", "tpe"] = "tpe"
    seed: StrictInt = 0
    pruner: Literal["successive_halving", "hyperband", "median", "none"] = "none"
    pruner_options: dict[str, Any] = Field(default_factory=dict)
    metric: Literal["eval_loss"] = "eval_loss"  # minimized
    max_concurrent: StrictInt = Field(8, ge=1)  # trials running at once

    @model_validator(mode="after")
    def _rules(self) -> Self:
        problems = sweep_rule_problems(dict(self))
        if problems:
            raise PydanticCustomError(SWEEP_RULE, "; ".join(f"{f}: {m}" for f, m in problems))
        return self


@dataclass(frozen=True)
class LoadedSweep:
    spec: SweepSpec
    path: Path  # the sweep file
    template: dict  # the template job spec as JobSpec.model_dump(mode="json"), paths absolute


# -- trials ----------------------------------------------------------------------------------
def _with_values(template: Mapping[str, Any], values: Mapping[str, Any], base_dir: Path) -> dict:
    """The template with each dotted path set; a section the template leaves out is created."""
    out = copy.deepcopy(dict(template))
    for path, value in values.items():
        *sections, last = path.split(".")
        node = out
        for part in sections:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = copy.deepcopy(value)
    # A value that is a relative path is the sweep file's, as the template's are the template's.
    return resolve_spec_paths(out, base_dir)


def trial_spec(sweep: LoadedSweep, number: int, params: dict[str, Any]) -> dict:
    """The job spec dict of trial `number`: the template with each dotted path set to its
    value, named f"{sweep.spec.name}-t{number:02d}"; validated as a JobSpec (ValueError if not)."""
    raw = _with_values(sweep.template, params, sweep.path.resolve().parent)
    raw["name"] = trial_name(sweep.spec.name, number)
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as e:
        raise ValueError(f"trial {raw['name']}: {e}") from None
    return spec.model_dump(mode="json")


# -- checking a sweep file -------------------------------------------------------------------
def _field_name(loc: Sequence[int | str]) -> str:
    return ".".join(str(p) for p in loc if p not in _TAGS) or TOP_LEVEL


def _error_problems(err: ValidationError, prefix: Sequence[str], known: Sequence[str]) -> _Found:
    found = []
    for e in err.errors():
        loc = (*prefix, *e["loc"])
        if e["type"] == SWEEP_RULE:
            continue  # applied by sweep_rule_problems on what parsed
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            message = f"unknown field; did you mean {close[0]!r}?" if close else "unknown field"
        elif e["type"] == "missing":
            message = "required field is missing"
        elif e["type"] in ("value_error", "parameter_space"):
            message = e["msg"].removeprefix("Value error, ")
        else:
            message = f"{e['msg']} (got {e['input']!r})"
        found.append((_field_name(loc), message))
    return found


def _parse_sweep(raw: Mapping[str, Any]) -> tuple[dict[str, Any], _Found]:
    """Each field of the sweep that parses on its own, and the problems of the rest."""
    fields: dict[str, Any] = {}
    found: _Found = []
    known = list(SweepSpec.model_fields)
    for key in raw:
        if key not in SweepSpec.model_fields:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = (
                f"did you mean {close[0]!r}?" if close else f"expected one of: {', '.join(known)}"
            )
            found.append((str(key), f"unknown field; {hint}"))
    for name, info in SweepSpec.model_fields.items():
        if name not in raw:
            if info.is_required():
                found.append((name, "required field is missing"))
            else:
                fields[name] = info.get_default(call_default_factory=True)
        elif name == "parameters":
            fields[name], problems = _parse_parameters(raw[name])
            found += problems
        else:
            annotated = Annotated[(info.annotation, *info.metadata)] if info.metadata else None
            adapter = TypeAdapter(annotated or info.annotation)
            try:
                fields[name] = adapter.validate_python(raw[name])
            except ValidationError as e:
                found += _error_problems(e, (name,), known)
    return fields, found


def _parse_parameters(raw: Any) -> tuple[dict[str, Any] | None, _Found]:
    """Each parameter parsed on its own, so one bad space leaves the others checked."""
    if not isinstance(raw, Mapping):
        return None, [("parameters", "must be a mapping of dotted field paths to spaces")]
    if not raw:
        return None, [("parameters", "must name at least one field to vary")]
    spaces, found = {}, []
    for path, space in raw.items():
        try:
            spaces[str(path)] = _SPACE.validate_python(space)
        except ValidationError as e:
            found += _error_problems(e, ("parameters", str(path)), ["low", "high", "log", "step"])
    return spaces, found


def _path_problem(path: str) -> str | None:
    """Why a dotted path names no field of a job spec, or None.

    Into a choice of models (the objective, by its `type`), a field of any of them will
    do here; the template's own type is checked when each trial value is (`check_spec`).
    """
    if path == "name":
        return "trials are named by the sweep (name-tNN)"
    models: list[type[BaseModel]] = [JobSpec]
    walked: list[str] = []
    for part in path.split("."):
        if not models:
            return f"names no field of the job spec ({'.'.join(walked)} is not a section)"
        holder = next((m for m in models if part in m.model_fields), None)
        if holder is None:
            where = ".".join(walked) or "the job spec"
            known = [name for m in models for name in m.model_fields]
            close = difflib.get_close_matches(part, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            return f"names no field of the job spec ({where} has no field {part!r}{hint})"
        models = section_models(holder.model_fields[part].annotation)
        walked.append(part)
    return None


def _trial_values(space: RangeSpace | ChoiceSpace) -> list[tuple[str, Any]]:
    """The values of a space that stand for all of it: each choice, or a range's two ends."""
    if isinstance(space, ChoiceSpace):
        return [(f"choice {v!r}", v) for v in space.choices]
    return [(f"low {space.low!r}", space.low), (f"high {space.high!r}", space.high)]


def value_specs(sweep: LoadedSweep) -> list[tuple[str, dict]]:
    """The template with each parameter's representative values (each choice, a range's
    ends) applied one at a time, labelled by the field and value: what the operator's
    limits are checked against when the sweep is submitted."""
    out = []
    for path, space in sweep.spec.parameters.items():
        for label, value in _trial_values(space):
            raw = _with_values(sweep.template, {path: value}, sweep.path.resolve().parent)
            out.append((f"parameters.{path} {label}", raw))
    return out


def _template_problems(
    spec_fields: Mapping[str, Any], template_path: Path, source: str, sweep_dir: Path
) -> tuple[dict | None, list[SpecProblem]]:
    """The template as a dict (None when invalid), and the problems of it and of each value."""
    # Lazy: job validation loads the base model (torch, transformers).
    from carpool.orchestrator.spec_check.validation import (
        ValidationCache,
        check_spec,
        load_spec_file,
    )

    if not template_path.is_file():
        what = "is a directory, not a file" if template_path.is_dir() else "file not found"
        return None, [SpecProblem(source, "template", f"{what}: {template_path}")]
    cache = ValidationCache()
    try:
        template = load_spec_file(template_path, cache=cache).model_dump(mode="json")
    except SpecValidationError as e:
        return None, list(e.problems)
    found: _Found = []
    if spec_fields.get("metric") == "eval_loss":
        if template.get("eval_dataset") is None:
            found.append(("template", "metric eval_loss needs an eval_dataset in the template"))
        if template["training"].get("eval_steps") is None:
            found.append(("template", "metric eval_loss needs training.eval_steps in the template"))
    for path, space in (spec_fields.get("parameters") or {}).items():
        if _path_problem(path) is not None:
            continue  # reported on its own
        for label, value in _trial_values(space):
            raw = _with_values(template, {path: value}, sweep_dir)
            for p in check_spec(raw, source, cache=cache):
                where = "" if p.field == path else f"{p.field}: "
                found.append((f"parameters.{path}", f"{label}: {where}{p.message}"))
    return template, [SpecProblem(source, field, message) for field, message in found]


def _read(path: Path) -> tuple[Any, list[SpecProblem]]:
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        return None, [SpecProblem(source, TOP_LEVEL, f"cannot read file: {reason}")]
    try:
        raw, duplicates = load_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else TOP_LEVEL
        reason = getattr(e, "problem", None) or str(e)
        return None, [SpecProblem(source, where, f"invalid YAML: {reason}")]
    problems = [SpecProblem(source, f"line {d.line}", d.message) for d in duplicates]
    if not isinstance(raw, Mapping):
        got = "nothing" if raw is None else type(raw).__name__
        problems.append(SpecProblem(source, TOP_LEVEL, f"expected a mapping of fields, got {got}"))
        return None, problems
    return raw, problems


def load_sweep_file(path: Path) -> LoadedSweep:
    """Parse and check a sweep file and its template; raise SpecValidationError listing every
    problem (source: the sweep file or the template; field: e.g. "parameters.adapter.rr")."""
    path = Path(path)
    source = str(path)
    raw, problems = _read(path)
    if raw is None:
        raise SpecValidationError(problems)
    fields, found = _parse_sweep(raw)
    for dotted in fields.get("parameters") or {}:
        if (problem := _path_problem(dotted)) is not None:
            found.append((f"parameters.{dotted}", problem))
    found += sweep_rule_problems(fields)
    problems += [SpecProblem(source, field, message) for field, message in found]
    template = None
    if "template" in fields:
        sweep_dir = path.resolve().parent
        template_path = sweep_dir / fields["template"].expanduser()
        template, template_problems = _template_problems(fields, template_path, source, sweep_dir)
        problems += template_problems
    if problems or template is None:
        raise SpecValidationError(problems)
    return LoadedSweep(SweepSpec.model_validate(dict(raw)), path, template)
