"""The one place a spec's `adapter.init_from` is checked against the adapter and the base.

The engine starts such a job from the adapter's own weights, rank, alpha,
targets and scaling (`workers.peft_format`), so a spec that says otherwise
would be silently overruled. Here, before anything is queued:

- the adapter must be a kind the bank can start from (LoRA or DoRA) and its
  tensors must fit the base's modules, shape for shape;
- each field that defines the adapter (`DEFINING_FIELDS`) must agree with the
  adapter's value; a field the spec leaves out takes the adapter's value,
  written into the spec and reported as a note. Training choices such as
  `lora_dropout` or `freeze_lora_A` are the spec's to make.

`target_modules` agree when they select the same modules of the base: the
adapter's are the modules it has weights for, whatever its config spells
(suffixes, full names, a regex, PEFT's expansion of "all-linear"), and the
spec's are what its names or "all-linear" select in the base. `rank_pattern`
and `alpha_pattern` agree when they give each of the adapter's modules the
same value (an export may spell them out per module); an adapter without them
takes nothing from a spec that leaves them out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from carpool.orchestrator.parsed_fields import ParsedFields
from carpool.workers.base_model import match_target_modules, unmatched_targets
from carpool.workers.lora_patterns import pattern_value
from carpool.workers.peft_format import (
    AdapterFormatError,
    AdapterHeader,
    base_misfit,
    read_adapter_header,
)

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
    check = InitFromCheck()
    try:
        header = read_adapter_header(adapter.get("init_from"))
    except AdapterFormatError as e:
        check.problems.append((_FIELD, str(e)))
        return check
    misfit = (
        base_misfit(header.ranks(), header.shapes, base_shapes, header.magnitude_shapes)
        if base_shapes is not None
        else None
    )
    if misfit:
        check.problems.append((_FIELD, misfit))
    # Without the base, the adapter's own modules are all there is to select from.
    universe = list(base_shapes) if base_shapes is not None else list(header.shapes)
    declared = _declared(header, universe)
    if misfit:  # its modules are not the base's; as targets they would only repeat that
        del declared["target_modules"]
    for key, value in declared.items():
        if key not in adapter.given:
            # No pattern, or not DoRA: the spec's default says the same, nothing to note.
            if value == {} or (key == "use_dora" and value is False):
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
        elif key in _PATTERN_DEFAULTS:
            default = getattr(header, _PATTERN_DEFAULTS[key])
            agree = all(
                pattern_value(given, m, default) == pattern_value(value, m, default)
                for m in header.shapes
            )
        else:
            agree = given == value
        if not agree:
            message = f"{_show(given)} conflicts with init_from's {key} {_show(value)}"
            check.problems.append((f"adapter.{key}", message))
    return check


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
