"""The one place a spec's `adapter.init_from` is checked against the adapter and the base.

The engine starts such a job from the adapter's own weights, rank, alpha,
targets and scaling (`workers.peft_format`), so a spec that says otherwise
would be silently overruled. Here, before anything is queued:

- the adapter must be of the job's kind (a LORA job starts from LoRA or DoRA,
  a VERA job from VeRA, an ADALORA job from AdaLoRA) and its tensors must fit the base's modules, shape
  for shape;
- each field that defines the adapter (`DEFINING_FIELDS`) must agree with the
  adapter's value; a field the spec leaves out takes the adapter's value,
  written into the spec and reported as a note. Training choices such as
  `lora_dropout` or `freeze_lora_A` are the spec's to make. A VERA job's
  defining fields are r, target_modules, projection_prng_key, d_initial and
  save_projection; its vera_dropout is taken from the adapter only when left out.
  An ADALORA job's are init_r, target_r, lora_alpha, target_modules and the
  schedule (tinit, tfinal, deltaT, beta1, beta2, total_step: PEFT's config after
  loading); its lora_dropout and orth_reg_weight are taken only when left out.
  Its ranks stay the saved pattern's (`workers.adalora_format` says why).

`target_modules` agree when they select the same modules of the base: the
adapter's are the modules it has weights for, whatever its config spells
(suffixes, full names, a regex, PEFT's expansion of "all-linear"), and the
spec's are what its names or "all-linear" select in the base. `rank_pattern`
and `alpha_pattern` agree when they give each of the adapter's modules the
same value (an export may spell them out per module); an adapter without them
takes nothing from a spec that leaves them out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from carpool.orchestrator.spec_check.parsed_fields import ParsedFields
from carpool.workers.base.base_model import match_target_modules, unmatched_targets
from carpool.workers.peft_files.adalora_format import (
    AdaLoraHeader,
    adalora_misfit,
    read_adalora_header,
)
from carpool.workers.peft_files.peft_format import (
    AdapterFormatError,
    AdapterHeader,
    base_misfit,
    read_adapter_header,
)
from carpool.workers.peft_files.vera_format import VeraHeader, read_vera_header, vera_misfit
from carpool.workers.spec.job_spec import ADALORA_ONLY, LORA_AND_ADALORA, VERA_ONLY
from carpool.workers.spec.lora_patterns import pattern_value

DEFINING_FIELDS = (
    "r",
    "lora_alpha",
    "target_modules",
    "use_rslora",
    "use_dora",
    "rank_pattern",
    "alpha_pattern",
)
_FIELD = "adapter.init_from"
# Each pattern and the field whose value a module no key matches keeps.
_PATTERN_DEFAULTS = {"rank_pattern": "r", "alpha_pattern": "lora_alpha"}


@dataclass
class InitFromCheck:
    """What was found: the adapter's values for the defining fields the spec leaves out
    (`taken`, as a spec would write them), and (dotted field, message) problems and notes."""

    taken: dict[str, Any] = field(default_factory=dict)
    problems: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)


def check_init_from(
    adapter: ParsedFields, base_shapes: dict[str, tuple[int, int]] | None
) -> InitFromCheck:
    """Check the adapter at the spec's `adapter.init_from` against the rest of that section.

    `adapter` is the spec's adapter section as far as it parsed; its `init_from`
    must have. `base_shapes` is (in_features, out_features) per linear module
    of the base, or None when the base could not be read (a problem reported
    elsewhere); then only what does not need the base is checked.
    """
    if adapter.get("peft_type") == "VERA":
        return _check_vera(adapter, base_shapes)
    if adapter.get("peft_type") == "ADALORA":
        return _check_adalora(adapter, base_shapes)
    check = InitFromCheck()
    try:
        header = read_adapter_header(adapter.get("init_from"))
    except AdapterFormatError as e:
        check.problems.append((_FIELD, str(e)))
        return check
    if (kind := adapter.get("peft_type")) in ("DYLORA", "SORA") and (
        problem := _plain_lora_problem(header)
    ):
        check.problems.append((_FIELD, f"{kind} starts from a plain LoRA adapter: {problem}"))
        return check
    misfit = (
        base_misfit(header.ranks(), header.shapes, base_shapes, header.magnitude_shapes)
        if base_shapes is not None
        else None
    )
    # No pattern, or not DoRA: the spec's default says the same, nothing to note.
    quiet = {"rank_pattern": {}, "alpha_pattern": {}, "use_dora": False}
    defaults = {k: getattr(header, f) for k, f in _PATTERN_DEFAULTS.items()}
    _compare(check, adapter, _declared, header, misfit, base_shapes, quiet, defaults)
    return check


def _plain_lora_problem(header) -> str | None:
    """Why a LoRA adapter is not one rank r on every module without DoRA, or None."""
    if header.use_dora:
        return "this one is DoRA (use_dora)"
    ranks = set(header.ranks().values())
    if len(ranks) > 1:
        return f"this one has ranks {sorted(ranks)} (a rank_pattern); one r on every module"
    return None


def _check_vera(
    adapter: ParsedFields, base_shapes: dict[str, tuple[int, int]] | None
) -> InitFromCheck:
    """As for LoRA, with VeraConfig's fields; vera_dropout is taken when left out, but a
    spec's own is a training choice, as lora_dropout is."""
    check = InitFromCheck()
    try:
        header = read_vera_header(adapter.get("init_from"))
    except AdapterFormatError as e:
        check.problems.append((_FIELD, str(e)))
        return check
    misfit = vera_misfit(header, base_shapes) if base_shapes is not None else None
    _compare(check, adapter, _vera_declared, header, misfit, base_shapes, VERA_ONLY, {})
    if "vera_dropout" not in adapter.given and header.vera_dropout != VERA_ONLY["vera_dropout"]:
        check.taken["vera_dropout"] = header.vera_dropout
        note = f"not in the spec; taken from init_from: {_show(header.vera_dropout)}"
        check.notes.append(("adapter.vera_dropout", note))
    return check


def _check_adalora(
    adapter: ParsedFields, base_shapes: dict[str, tuple[int, int]] | None
) -> InitFromCheck:
    """As for VeRA, with AdaLoraConfig's fields; lora_dropout and orth_reg_weight are the
    spec's training choices, taken from the adapter only when left out."""
    check = InitFromCheck()
    try:
        header = read_adalora_header(adapter.get("init_from"))
    except AdapterFormatError as e:
        check.problems.append((_FIELD, str(e)))
        return check
    misfit = adalora_misfit(header, base_shapes) if base_shapes is not None else None
    quiet = {**ADALORA_ONLY, **LORA_AND_ADALORA}
    _compare(check, adapter, _adalora_declared, header, misfit, base_shapes, quiet, {})
    chosen = {
        "lora_dropout": header.lora_dropout,
        "orth_reg_weight": header.schedule.orth_reg_weight,
    }
    for key, value in chosen.items():
        if key not in adapter.given and value != quiet[key]:
            check.taken[key] = value
            note = f"not in the spec; taken from init_from: {_show(value)}"
            check.notes.append((f"adapter.{key}", note))
    return check


def _compare(
    check: InitFromCheck,
    adapter: ParsedFields,
    declare: Callable[[Any, Sequence[str]], dict[str, Any]],
    header: AdapterHeader | VeraHeader | AdaLoraHeader,
    misfit: str | None,
    base_shapes: dict[str, tuple[int, int]] | None,
    quiet: dict[str, Any],
    pattern_defaults: dict[str, Any],
) -> None:
    """Take the adapter's defining values the spec leaves out (but those equal to `quiet`'s
    defaults) and report the spec's that disagree, each on its field."""
    if misfit:
        check.problems.append((_FIELD, misfit))
    # Without the base, the adapter's own modules are all there is to select from.
    universe = list(base_shapes) if base_shapes is not None else list(header.shapes)
    declared = declare(header, universe)
    if misfit:  # its modules are not the base's; as targets they would only repeat that
        del declared["target_modules"]
    for key, value in declared.items():
        if key not in adapter.given:
            if key in quiet and value == quiet[key]:
                continue
            check.taken[key] = value
            note = f"not in the spec; taken from init_from: {_show(value)}"
            check.notes.append((f"adapter.{key}", note))
            continue
        if key not in adapter:
            continue  # the spec's value did not parse: the schema reports it
        given = adapter.get(key)
        if key == "target_modules":
            agree = _same_modules(given, list(header.shapes), universe, base_shapes is not None)
        elif key in pattern_defaults:
            default = pattern_defaults[key]
            agree = all(
                pattern_value(given, m, default) == pattern_value(value, m, default)
                for m in header.shapes
            )
        else:
            agree = given == value
        if not agree:
            message = f"{_show(given)} conflicts with init_from's {key} {_show(value)}"
            check.problems.append((f"adapter.{key}", message))


def _vera_declared(header: VeraHeader, universe: Sequence[str]) -> dict[str, Any]:
    """A VeRA adapter's defining fields, as a spec would write them."""
    return {
        "r": header.r,
        "target_modules": _target_names(list(header.shapes), universe),
        "projection_prng_key": header.projection_prng_key,
        "d_initial": header.d_initial,
        "save_projection": header.save_projection,
    }


def _adalora_declared(header: AdaLoraHeader, universe: Sequence[str]) -> dict[str, Any]:
    """An AdaLoRA adapter's defining fields, as a spec would write them."""
    s = header.schedule
    return {
        "init_r": s.init_r,
        "target_r": s.target_r,
        "lora_alpha": header.lora_alpha,
        "target_modules": _target_names(list(header.shapes), universe),
        "tinit": s.tinit,
        "tfinal": s.tfinal,
        "deltaT": s.deltaT,
        "beta1": s.beta1,
        "beta2": s.beta2,
        "total_step": s.total_step,
    }


def _declared(header: AdapterHeader, universe: Sequence[str]) -> dict[str, Any]:
    """The adapter's defining fields, as a spec would write them."""
    return {
        "r": header.r,
        "lora_alpha": header.lora_alpha,
        "target_modules": _target_names(list(header.shapes), universe),
        "use_rslora": header.use_rslora,
        "use_dora": header.use_dora,
        "rank_pattern": header.rank_pattern,
        "alpha_pattern": header.alpha_pattern,
    }


def _target_names(modules: list[str], universe: Sequence[str]) -> list[str]:
    """Short names selecting exactly `modules` in `universe`: suffixes where they do."""
    suffixes = sorted({m.rsplit(".", 1)[-1] for m in modules})
    if set(match_target_modules(universe, suffixes)) == set(modules):
        return suffixes
    return sorted(modules)  # e.g. only some layers' q_proj


def _same_modules(
    targets: list[str] | str, modules: list[str], universe: Sequence[str], base_known: bool
) -> bool:
    if targets == "all-linear" and not base_known:
        return True  # cannot be resolved without the base, whose problem is reported
    if unmatched_targets(universe, targets):
        return False
    return set(match_target_modules(universe, targets)) == set(modules)


def _show(value: Any) -> str:
    """A value as a user would write it in YAML."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(map(str, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return str(value)
