"""Check job specs in one pass and report every problem at once.

A user fixing a job file should see all of its mistakes in one run, not one
per run: schema errors, the rules across fields, the base model, target
modules, the rank, the dataset and the adapter to start from are all checked.
The schema parses the file; the checks that need the base or the data then
run over the parsed values, field by field (`parsed_fields`), so they still
run on the fields that parsed when others did not.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from carpool.orchestrator.spec_check.init_from import InitFromCheck, check_init_from
from carpool.orchestrator.spec_check.parsed_fields import ParsedFields, parse_fields, section_model
from carpool.orchestrator.spec_check.spec_paths import resolve_spec_paths
from carpool.orchestrator.spec_check.spec_problems import SpecProblem, SpecValidationError
from carpool.orchestrator.spec_check.yaml_loader import load_yaml
from carpool.workers.base.base_facts import BaseFacts, read_base_facts, remember_base_facts
from carpool.workers.base.base_model import (
    linear_module_shapes,
    load_tokenizer,
    match_target_modules,
    tokenizer_class,
    unmatched_targets,
)
from carpool.workers.data.dataset import DatasetError, load_dataset
from carpool.workers.data.dataset_cache import file_version
from carpool.workers.spec.job_spec import CROSS_FIELD, CrossFieldRule, JobSpec
from carpool.workers.spec.lora_patterns import pattern_key, unmatched_keys
from carpool.workers.spec.objective import OBJECTIVE_MODELS, OBJECTIVE_TYPES, format_problem
from pydantic import BaseModel, ValidationError

TOP_LEVEL = "(top level)"
# The model of each section, by its location in the spec: for "did you mean" on unknown fields.
_SECTIONS: dict[tuple[str, ...], type[BaseModel]] = {
    (): JobSpec,
    **{
        (name,): model
        for name, info in JobSpec.model_fields.items()
        if (model := section_model(info.annotation)) is not None
    },
}


@dataclass(frozen=True)
class _DatasetCheck:
    """What reading a dataset file found: a problem, or how many rows and how many cut."""

    problem: str | None = None
    rows: int = 0
    truncated_rows: int = 0
    dropped_rows: int = 0  # preference records whose prompt fills max_seq_length
    format: str | None = None  # as read: the declared one, or what `auto` found


class ValidationCache:
    """What one validation run loads once: each base's shapes and tokenizer, and each
    dataset file's check per base, format and max_seq_length (jobs often share a file).

    A base validated before, in any process, has its shapes and tokenizer class kept
    on disk (`base_facts`): read back, they spare this process the base's model code.
    """

    def __init__(self) -> None:
        self._loaded: dict[tuple[str, str], Any] = {}
        self._datasets: dict[tuple, _DatasetCheck] = {}
        self._facts: dict[str, BaseFacts | None] = {}

    def _get(self, kind: str, name: str, load: Callable[[str], Any]) -> Any:
        if (kind, name) not in self._loaded:
            try:
                self._loaded[kind, name] = load(name)
            except Exception as e:  # remembered: every spec on this base reports it cheaply
                self._loaded[kind, name] = e
        found = self._loaded[kind, name]
        if isinstance(found, Exception):
            raise found
        return found

    def _kept_facts(self, name: str) -> BaseFacts | None:
        if name not in self._facts:
            self._facts[name] = read_base_facts(name)
        return self._facts[name]

    def shapes(self, name: str) -> dict[str, tuple[int, int]]:
        if (facts := self._kept_facts(name)) is not None:
            return facts.linear_shapes
        return self._get("shapes", name, _load_shapes)

    def tokenizer(self, name: str) -> Any:
        facts = self._kept_facts(name)
        class_name = None if facts is None else facts.tokenizer_class
        return self._get("tokenizer", name, lambda n: load_tokenizer(n, class_name=class_name))

    def keep_facts(self, name: str, shapes: dict[str, tuple[int, int]], tokenizer: Any) -> None:
        """Keep what was found of a base for the next validation of it (if not kept yet)."""
        if self._kept_facts(name) is not None:
            return
        class_name = type(tokenizer).__name__
        try:
            reloadable = tokenizer_class(class_name) is type(tokenizer)
        except ValueError:  # a class of the base's own code: AutoTokenizer finds it each time
            reloadable = False
        if reloadable:
            facts = BaseFacts(shapes, class_name)
            remember_base_facts(name, facts)
            self._facts[name] = facts

    def dataset(
        self, base: str, path: Path, data_format: str, max_seq_length: int
    ) -> _DatasetCheck:
        """The check of a dataset file read with `base`'s tokenizer; once per file version."""
        # Only the counts are kept, never the rows: validation holds one file's rows at a time.
        version = file_version(path)
        if version is None:  # gone since it was found: nothing to key it by
            return _read_dataset(path, data_format, self.tokenizer(base), max_seq_length)
        key = (base, version, data_format, max_seq_length)
        if key not in self._datasets:
            self._datasets[key] = _read_dataset(
                path, data_format, self.tokenizer(base), max_seq_length
            )
        return self._datasets[key]


def _read_dataset(
    path: Path, data_format: str, tokenizer: Any, max_seq_length: int
) -> _DatasetCheck:
    try:
        data = load_dataset(path, data_format, tokenizer, max_seq_length)
    except DatasetError as e:
        return _DatasetCheck(problem=str(e))
    except Exception as e:  # a tokenizer or reader failure is still the user's data problem
        return _DatasetCheck(problem=f"{path}: cannot load: {e}")
    return _DatasetCheck(
        rows=len(data.rows),
        truncated_rows=data.truncated_rows,
        dropped_rows=data.dropped_rows,
        format=data.format,
    )


def _load_shapes(name: str) -> dict[str, tuple[int, int]]:
    path = Path(name).expanduser()
    # A hub id is "name" or "org/name"; anything else is a local path, and
    # asking the hub about it would only add a slow network error.
    looks_local = path.is_absolute() or name.startswith((".", "~")) or name.count("/") > 1
    if looks_local and not path.exists():
        raise FileNotFoundError(f"no such directory: {name}")
    return linear_module_shapes(str(path) if path.exists() else name)


# (field, message) pairs; the source is attached once, in _check.
_Found = list[tuple[str, str]]


def _field_name(loc: Sequence[int | str]) -> str:
    if len(loc) > 1 and loc[0] == "objective" and loc[1] in OBJECTIVE_TYPES:
        loc = (loc[0], *loc[2:])  # pydantic names the chosen type; the user wrote no such key
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out or TOP_LEVEL


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _unknown_field_message(loc: Sequence[int | str]) -> str:
    if len(loc) == 3 and loc[0] == "objective" and loc[1] in OBJECTIVE_MODELS:
        options = ", ".join(OBJECTIVE_MODELS[loc[1]].model_fields)
        return f"unknown field; objective {loc[1]} takes: {options}"
    model = _SECTIONS.get(tuple(str(p) for p in loc[:-1]))
    if model is None:
        return "unknown field"
    known = list(model.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    if close:
        return f"unknown field; did you mean {close[0]!r}?"
    return f"unknown field; expected one of: {', '.join(known)}"


def _schema_problems(err: ValidationError) -> _Found:
    problems = []
    for e in err.errors():
        kind = e["type"]
        if kind == CROSS_FIELD:  # reported by _rule_problems, also when other fields fail
            continue
        if kind == "extra_forbidden":
            message = _unknown_field_message(e["loc"])
        elif kind == "missing":
            message = "required field is missing"
        elif kind == "value_error":  # our own validators already quote the value
            message = e["msg"].removeprefix("Value error, ")
        else:
            message = f"{e['msg']} (got {_short(e['input'])})"
        problems.append((_field_name(e["loc"]), message))
    return problems


def _rules(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, CrossFieldRule]]:
    """Every rule across fields of `model`'s sections, then of `model`, with their prefix."""
    for name, info in model.model_fields.items():
        section = section_model(info.annotation)
        if section is not None:
            yield from _rules(section, f"{prefix}{name}.")
    for rule in getattr(model, "cross_field_rules", ()):
        yield prefix, rule


def _rule_problems(fields: ParsedFields) -> _Found:
    """The rules across fields, each applied when the fields it reads have parsed."""
    found = []
    for prefix, rule in _rules(JobSpec):
        inputs = [prefix + name for name in rule.inputs]
        if all(name in fields for name in inputs):
            problem = rule.check(*(fields.get(name) for name in inputs))
            if problem is not None:
                found.append((prefix + rule.field, problem))
    return found


def _suffixes(names: Sequence[str]) -> str:
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    return ", ".join(suffixes[:12]) + (", ..." if len(suffixes) > 12 else "")


def _target_problems(shapes: dict[str, tuple[int, int]], adapter: ParsedFields) -> _Found:
    """What the base's linear modules say about the adapter's targets, ranks and patterns."""
    names = list(shapes)
    targets = adapter.get("target_modules")
    problems = []
    missing = ", ".join(map(repr, unmatched_targets(names, targets)))
    if missing:
        shown = _suffixes(names)
        message = f"the base model has no module {missing} (its linear modules end in: {shown})"
        problems.append(("adapter.target_modules", message))
    targeted = match_target_modules(names, targets)
    for field in ("rank_pattern", "alpha_pattern"):
        # PEFT ignores such a key silently; here it is most likely a typo.
        for key in unmatched_keys(adapter.get(field) or {}, targeted):
            message = f"key {key!r} matches no targeted module (they end in: {_suffixes(targeted)})"
            problems.append((f"adapter.{field}", message))
    problems += _rank_problems(shapes, targeted, adapter.get("r"), adapter.get("rank_pattern"))
    return problems


def _rank_problems(
    shapes: dict[str, tuple[int, int]],
    targeted: Sequence[str],
    r: int | None,
    rank_pattern: dict[str, int] | None,
) -> _Found:
    """Ranks above min(in, out) of their module: parameters that add no expressiveness."""
    too_big: dict[str, dict[str, tuple[int, int, int]]] = {"r": {}, "rank_pattern": {}}
    for name in targeted:
        key = pattern_key(rank_pattern or {}, name)
        rank = r if key is None else (rank_pattern or {})[key]
        if rank is not None and rank > min(shapes[name]):
            field = "r" if key is None else "rank_pattern"
            too_big[field].setdefault(name.rsplit(".", 1)[-1], (rank, *shapes[name]))
    problems = []
    if too_big["r"]:
        listed = ", ".join(f"{k} ({i}x{o})" for k, (_, i, o) in too_big["r"].items())
        message = f"r={r} exceeds min(in_features, out_features) of targeted modules: {listed}"
        problems.append(("adapter.r", message))
    if too_big["rank_pattern"]:
        listed = ", ".join(
            f"{k} (r={n}, {i}x{o})" for k, (n, i, o) in too_big["rank_pattern"].items()
        )
        message = f"ranks exceed min(in_features, out_features) of targeted modules: {listed}"
        problems.append(("adapter.rank_pattern", message))
    return problems


def _dataset_problems(
    field: str,
    path: Path,
    data_format: str | None,
    max_seq_length: int | None,
    base: _Base,
    cache: ValidationCache,
    notes: _Found,
    objective: Any = None,
) -> _Found:
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "file not found"
        return [(field, f"{what}: {path}")]
    if base.tokenizer is None or data_format is None or max_seq_length is None:
        return []  # reading the rows needs the tokenizer and valid settings
    check = cache.dataset(base.name, path, data_format, max_seq_length)
    if check.problem is not None:
        return [(field, check.problem)]
    if objective is not None and (problem := format_problem(objective, check.format)):
        return [(field, f"{path}: {problem}")]
    if check.truncated_rows:
        message = (
            f"{check.truncated_rows} of {check.rows} rows are longer than "
            f"max_seq_length={max_seq_length} and will be truncated"
        )
        notes.append((field, message))
    if check.dropped_rows:
        message = (
            f"{check.dropped_rows} records are dropped: their prompt leaves no room for a "
            f"completion at max_seq_length={max_seq_length}"
        )
        notes.append((field, message))
    return []


@dataclass(frozen=True)
class _Base:
    """A base model's linear shapes and tokenizer, each None where it could not be loaded."""

    shapes: dict[str, tuple[int, int]] | None = None
    tokenizer: Any = None
    problems: tuple[tuple[str, str], ...] = ()
    name: str | None = None


def _load_base(name: str | None, cache: ValidationCache) -> _Base:
    if name is None:
        return _Base()  # none that parsed: the schema reports it
    shapes = None
    try:
        shapes = cache.shapes(name)
        tokenizer = cache.tokenizer(name)
        cache.keep_facts(name, shapes, tokenizer)
        return _Base(shapes, tokenizer, name=name)
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        what = "tokenizer" if shapes is not None else "model"
        return _Base(shapes, None, (("base_model", f"cannot load {what}: {first_line}"),), name)


def _resource_problems(
    fields: ParsedFields, base: _Base, cache: ValidationCache, notes: _Found
) -> _Found:
    """What the base model and the data say about the fields that parsed."""
    problems = list(base.problems)
    if base.shapes is not None and fields.get("adapter.target_modules") is not None:
        problems += _target_problems(base.shapes, fields.get("adapter"))
    for section in ("dataset", "eval_dataset"):
        path = fields.get(f"{section}.path")
        if path is not None:
            data_format = fields.get(f"{section}.format")
            max_seq_length = fields.get("training.max_seq_length")
            problems += _dataset_problems(
                f"{section}.path",
                path,
                data_format,
                max_seq_length,
                base,
                cache,
                notes,
                objective=fields.get("objective"),
            )
    return problems


def _check_init_from(fields: ParsedFields, base: _Base) -> InitFromCheck | None:
    if fields.get("adapter.init_from") is None:
        return None  # no init_from, or one the schema reports
    return check_init_from(fields.get("adapter"), base.shapes)


def _check(
    raw: Any, source: str, cache: ValidationCache, notes: list[SpecProblem] | None = None
) -> tuple[JobSpec | None, ParsedFields | None, list[SpecProblem]]:
    """(spec or None, what parsed, problems); what is worth knowing but no problem goes to `notes`."""
    if isinstance(raw, JobSpec):  # re-checked through the same path as YAML
        raw = raw.model_dump(mode="json")
    if raw is None:
        return None, None, [SpecProblem(source, TOP_LEVEL, "the spec is empty")]
    if not isinstance(raw, Mapping):
        got = type(raw).__name__
        problem = SpecProblem(source, TOP_LEVEL, f"expected a mapping of fields, got {got}")
        return None, None, [problem]
    fields = parse_fields(JobSpec, raw)
    base = _load_base(fields.get("base_model"), cache)
    init = _check_init_from(fields, base)
    if init is not None and init.taken:
        # The adapter's values stand where the spec leaves a defining field out, as if written.
        raw = {**raw, "adapter": {**raw["adapter"], **init.taken}}
        fields = parse_fields(JobSpec, raw)
    spec: JobSpec | None = None
    found: _Found = []
    try:
        spec = JobSpec.model_validate(dict(raw))
    except ValidationError as err:
        found = _schema_problems(err)
    found += _rule_problems(fields)
    noted: _Found = []
    found += _resource_problems(fields, base, cache, noted)
    if init is not None:
        found += init.problems
        noted += init.notes
    if notes is not None:
        notes += [SpecProblem(source, field, message) for field, message in noted]
    return spec, fields, [SpecProblem(source, field, message) for field, message in found]


def check_spec(
    spec_or_raw: JobSpec | Mapping[str, Any] | Any,
    source: str,
    *,
    cache: ValidationCache | None = None,
) -> list[SpecProblem]:
    """Every problem of one spec (a JobSpec or raw parsed YAML); empty when it is valid."""
    return _check(spec_or_raw, source, cache or ValidationCache())[2]


def _load_file(
    path: Path, cache: ValidationCache, notes: list[SpecProblem] | None = None
) -> tuple[JobSpec | None, ParsedFields | None, list[SpecProblem]]:
    """(spec or None, what parsed, problems) of one YAML file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        return None, None, [SpecProblem(str(path), TOP_LEVEL, f"cannot read file: {reason}")]
    try:
        raw, duplicates = load_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else TOP_LEVEL
        reason = getattr(e, "problem", None) or str(e)
        return None, None, [SpecProblem(str(path), where, f"invalid YAML: {reason}")]
    # A repeated key is refused, but the rest of the file is still checked.
    repeats = [SpecProblem(str(path), f"line {d.line}", d.message) for d in duplicates]
    if isinstance(raw, Mapping):
        raw = resolve_spec_paths(raw, Path(path).resolve().parent)
    spec, fields, problems = _check(raw, str(path), cache, notes)
    return spec, fields, repeats + problems


def load_spec_file(path: Path, *, cache: ValidationCache | None = None) -> JobSpec:
    """Read, resolve and check one job file; raise SpecValidationError with all its problems."""
    spec, _, problems = _load_file(Path(path), cache or ValidationCache())
    if problems or spec is None:
        raise SpecValidationError(problems)
    return spec


def validate_files(paths: Sequence[Path], notes: list[SpecProblem] | None = None) -> list[JobSpec]:
    """Check several job files together; also rejects one job name used twice.

    Findings that are no error (rows to be truncated, values taken from init_from) go to `notes`.
    """
    cache = ValidationCache()
    specs: list[JobSpec] = []
    problems: list[SpecProblem] = []
    first_source: dict[str, str] = {}
    for path in paths:
        spec, fields, file_problems = _load_file(Path(path), cache, notes)
        problems += file_problems
        if spec is not None:
            specs.append(spec)
        name = fields.get("name") if fields is not None else None
        if name is not None:
            if name in first_source:
                message = f"job name {name!r} is also used by {first_source[name]}"
                problems.append(SpecProblem(str(path), "name", message))
            else:
                first_source[name] = str(path)
    if problems:
        raise SpecValidationError(problems)
    return specs
