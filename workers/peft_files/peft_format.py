"""Reading adapters in PEFT's on-disk format (`peft_export` writes them).

A directory with `adapter_config.json` (written through `peft.LoraConfig`)
and `adapter_model.safetensors` whose keys are PEFT's
`base_model.model.<module>.lora_{A,B}.weight` (and, for DoRA,
`base_model.model.<module>.lora_magnitude_vector`), so
`PeftModel.from_pretrained(base, dir)` loads it with no conversion. Per-module
ranks and alphas travel as PEFT's `rank_pattern` / `alpha_pattern`. A VeRA
adapter is written through `peft.VeraConfig`, with PEFT's
`<module>.vera_lambda_{d,b}` keys and, with `save_projection`, the shared
`base_model.vera_A` / `base_model.vera_B`. An AdaLoRA adapter is written
through `peft.AdaLoraConfig` with its `rank_pattern`, and `<module>.lora_{A,E,B}`
keys cut to the ranks kept, as PEFT saves them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from carpool.workers.base.base_model import features, linear_modules
from carpool.workers.spec.lora_patterns import key_problem, lora_scaling, pattern_value
from carpool.workers.variants.job_adapter import MAGNITUDE, JobAdapter, LoraWeights
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
# DoRA's magnitude: PEFT saves it without `.weight` (older versions with it).
_MAGNITUDE_KEY = re.compile(
    r"^base_model\.model\.(?P<module>.+)\.lora_magnitude_vector(?:\.weight)?$"
)
T = TypeVar("T")


class AdapterFormatError(ValueError):
    """An adapter directory that is not a PEFT LoRA adapter carpool can start from."""


def config_number(
    cfg: Mapping[str, object], key: str, default: object, whole: bool, config_path: Path
) -> object:
    """`cfg[key]` (or `default`), checked to be a whole number (`whole`) or any number."""
    value = cfg.get(key, default)
    kinds = int if whole else int | float
    if not isinstance(value, kinds) or isinstance(value, bool):
        what = "a whole number" if whole else "a number"
        raise AdapterFormatError(f"{config_path}: {key} must be {what}, got {value!r}")
    return value


Shape = tuple[int, ...]


@dataclass(frozen=True)
class AdapterHeader:
    """What a PEFT LoRA adapter declares, and its tensors' shapes, read without its weights."""

    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str
    shapes: dict[str, tuple[Shape, Shape]]  # module -> (lora_A's shape, lora_B's shape)
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    use_dora: bool = False
    magnitude_shapes: dict[str, Shape] = field(default_factory=dict)  # DoRA: module -> shape

    def ranks(self) -> dict[str, int]:
        """The r the config declares for each module the adapter has weights for."""
        return {m: pattern_value(self.rank_pattern, m, self.r) for m in self.shapes}


@dataclass(frozen=True)
class LoadedAdapter:
    """A PEFT LoRA adapter read from disk: what it declares and its weights."""

    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...] | str
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A, B)
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    use_dora: bool = False
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict)  # DoRA: module -> m

    def ranks(self) -> dict[str, int]:
        """The r the config declares for each module the adapter has weights for."""
        return {m: pattern_value(self.rank_pattern, m, self.r) for m in self.weights}


def unsupported_kind(config: dict, kind: str = "LORA") -> str | None:
    """Why a `kind` job cannot start from the adapter `config` describes, or None if it can.

    A LORA job starts from LoRA or DoRA, a VERA job from VeRA: each kind's
    weights mean nothing to another's.
    """
    peft_type = config.get("peft_type", "LORA")
    if peft_type != kind:
        return f"peft_type is {peft_type!r}, not {kind}"
    if config.get("lora_bias"):
        return "a LoRA adapter with biases (lora_bias: true); only plain LoRA is supported yet"
    return None


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _is_positive(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v > 0


def _read_pattern(
    cfg: dict, key: str, valid: Callable[[object], bool], what: str, config_path: Path
) -> dict:
    """The config's `rank_pattern` / `alpha_pattern` (absent or null: none), checked."""
    pattern = cfg.get(key) or {}
    if not isinstance(pattern, dict):
        raise AdapterFormatError(f"{config_path}: {key} must be a mapping, got {pattern!r}")
    for k, v in pattern.items():
        if why := key_problem(k):
            raise AdapterFormatError(f"{config_path}: {key}: {why}")
        if not valid(v):
            raise AdapterFormatError(f"{config_path}: {key}[{k!r}] must be {what}, got {v!r}")
    return pattern


def load_config(config_path: Path, kind: str) -> dict:
    """An adapter's config as a dict, refused unless a `kind` job can start from it."""
    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"{config_path}: cannot read: {e}") from e
    if not isinstance(cfg, dict):
        raise AdapterFormatError(f"{config_path}: not a JSON object")
    if why := unsupported_kind(cfg, kind):
        raise AdapterFormatError(f"{config_path}: {why}")
    return cfg


def _read_config(config_path: Path) -> dict:
    cfg = load_config(config_path, "LORA")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise AdapterFormatError(f"{config_path}: r must be a whole number >= 1, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise AdapterFormatError(f"{config_path}: lora_alpha must be a number > 0, got {alpha!r}")
    cfg["rank_pattern"] = _read_pattern(
        cfg, "rank_pattern", _is_count, "a whole number >= 1", config_path
    )
    alphas = _read_pattern(cfg, "alpha_pattern", _is_positive, "a number > 0", config_path)
    cfg["alpha_pattern"] = {k: float(v) for k, v in alphas.items()}
    return cfg


def _by_module(
    items: Iterable[tuple[str, T]], weights_path: Path, use_dora: bool
) -> tuple[dict[str, tuple[T, T]], dict[str, T]]:
    """PEFT's `...<module>.lora_A.weight` / `lora_B.weight` entries as module -> (A, B),
    and with `use_dora` its `lora_magnitude_vector` entries as module -> m."""
    pairs: dict[str, dict[str, T]] = {}
    magnitudes: dict[str, T] = {}
    for key, value in items:
        if use_dora and (found := _MAGNITUDE_KEY.match(key)):
            magnitudes[found["module"]] = value
            continue
        match = _KEY.match(key)
        if match is None:
            raise AdapterFormatError(f"{weights_path}: unexpected tensor {key!r}")
        pairs.setdefault(match["module"], {})[match["ab"]] = value
    out = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise AdapterFormatError(f"{weights_path}: {module} lacks lora_A or lora_B")
        out[module] = (ab["A"], ab["B"])
    if not out:
        raise AdapterFormatError(f"{weights_path}: holds no LoRA weights")
    if use_dora and set(magnitudes) != set(out):
        lacking = sorted(set(out) - set(magnitudes)) or sorted(set(magnitudes) - set(out))
        raise AdapterFormatError(
            f"{weights_path}: a DoRA adapter needs lora_A, lora_B and {MAGNITUDE} for each "
            f"module; {lacking[0]} has not all three"
        )
    return out, magnitudes


def adapter_files(path: str | Path) -> tuple[Path, Path]:
    """An adapter directory's config and safetensors weights, checked to be there."""
    root = Path(path)
    if not root.is_dir():
        raise AdapterFormatError(f"not a directory: {root}")
    config_path, weights_path = root / CONFIG_FILE, root / WEIGHTS_FILE
    if not config_path.is_file():
        raise AdapterFormatError(f"no {CONFIG_FILE} in {root} (not a PEFT adapter)")
    if not weights_path.is_file():
        raise AdapterFormatError(f"{root}: no {WEIGHTS_FILE} (only safetensors adapters are read)")
    return config_path, weights_path


def tensor_shapes(weights_path: Path) -> list[tuple[str, Shape]]:
    """Each tensor's key and shape, from the safetensors header alone."""
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            keys = f.keys()  # safe_open is not iterable itself
            return [(key, tuple(f.get_slice(key).get_shape())) for key in keys]
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise AdapterFormatError(f"{weights_path}: cannot read: {e}") from e


def read_adapter_header(path: str | Path) -> AdapterHeader:
    """Check a PEFT LoRA adapter directory and read its config and tensor shapes.

    Only the safetensors header is read, so checking a large adapter is cheap.
    The engine's `read_adapter` applies the same checks.
    """
    config_path, weights_path = adapter_files(path)
    cfg = _read_config(config_path)
    shapes = tensor_shapes(weights_path)
    use_dora = bool(cfg.get("use_dora", False))
    by_module, magnitude_shapes = _by_module(shapes, weights_path, use_dora)
    targets = cfg.get("target_modules") or sorted({m.rsplit(".", 1)[-1] for m in by_module})
    return AdapterHeader(
        r=cfg["r"],
        lora_alpha=float(cfg["lora_alpha"]),
        use_rslora=bool(cfg.get("use_rslora", False)),
        target_modules=targets if isinstance(targets, str) else tuple(targets),
        shapes=by_module,
        rank_pattern=cfg["rank_pattern"],
        alpha_pattern=cfg["alpha_pattern"],
        use_dora=use_dora,
        magnitude_shapes=magnitude_shapes,
    )


def read_adapter(path: str | Path) -> LoadedAdapter:
    """Read a PEFT LoRA adapter directory (safetensors only: no pickles)."""
    header = read_adapter_header(path)
    weights_path = Path(path) / WEIGHTS_FILE
    weights, magnitudes = _by_module(
        load_file(str(weights_path)).items(), weights_path, header.use_dora
    )
    return LoadedAdapter(
        r=header.r,
        lora_alpha=header.lora_alpha,
        use_rslora=header.use_rslora,
        target_modules=header.target_modules,
        weights=weights,
        rank_pattern=header.rank_pattern,
        alpha_pattern=header.alpha_pattern,
        use_dora=header.use_dora,
        magnitudes=magnitudes,
    )


def dims(shape: Shape) -> str:
    """A tensor's shape as the messages write it: `4x128`."""
    return "x".join(map(str, shape))


def first_misfit(misfits: list[str], counted: str = "") -> str | None:
    """One line for an adapter that does not fit: the first misfit and how many more
    (`counted` names them: " modules"), or None when the list is empty."""
    if not misfits:
        return None
    more = len(misfits) - 1
    return misfits[0] + (f" (and {more} more{counted} do not fit)" if more else "")


def _module_misfit(
    r: int, a: Shape, b: Shape, base: tuple[int, int], magnitude: Shape | None
) -> str | None:
    in_features, out_features = base
    if magnitude is not None and magnitude != (out_features,):
        return (
            f"{MAGNITUDE} is {dims(magnitude)} but the base's module gives {out_features} outputs"
        )
    if len(a) != 2 or len(b) != 2:
        return f"lora_A is {dims(a)} and lora_B is {dims(b)}, not matrices"
    if a[0] != r or b[1] != r:
        return f"lora_A is {dims(a)} and lora_B is {dims(b)} but its config gives it r={r}"
    if a[1] != in_features:
        return f"lora_A is {dims(a)} but the base's module takes {in_features} inputs"
    if b[0] != out_features:
        return f"lora_B is {dims(b)} but the base's module gives {out_features} outputs"
    return None


def base_misfit(
    ranks: Mapping[str, int],
    shapes: dict[str, tuple[Shape, Shape]],
    base_shapes: dict[str, tuple[int, int]],
    magnitude_shapes: Mapping[str, Shape] | None = None,
) -> str | None:
    """Why an adapter's tensors do not fit a base's linear modules, or None when they do.

    `ranks` is the r its config declares per module (`AdapterHeader.ranks`);
    `base_shapes` maps each linear module to (in_features, out_features);
    `magnitude_shapes` a DoRA adapter's magnitude shape per module. One
    line: the first module that does not fit, in model order, and how many more.
    """
    order = {name: i for i, name in enumerate(base_shapes)}
    misfits = []
    for module in sorted(shapes, key=lambda m: (order.get(m, len(order)), m)):
        if module not in base_shapes:
            misfits.append(f"{module}: the base has no such linear module")
        elif why := _module_misfit(
            ranks[module],
            *shapes[module],
            base_shapes[module],
            (magnitude_shapes or {}).get(module),
        ):
            misfits.append(f"{module}: {why}")
    return first_misfit(misfits, " modules")


def adapter_from_loaded(
    base: nn.Module,
    name: str,
    loaded: LoadedAdapter,
    *,
    dropout: float,
    seed: int,
    freeze_lora_A: bool = False,
) -> JobAdapter:
    """A JobAdapter on `base` starting from a loaded PEFT adapter's weights.

    Each module's r is its tensors' (checked against the config's) and its
    scaling uses the lora_alpha the config's alpha_pattern gives it.
    """
    linears = linear_modules(base)
    index = {n: i for i, n in enumerate(linears)}
    adapter = JobAdapter(
        name=name,
        r=loaded.r,
        lora_alpha=loaded.lora_alpha,
        use_rslora=loaded.use_rslora,
        target_modules=loaded.target_modules,
        dropout=dropout,
        seed=seed,
        rank_pattern=dict(loaded.rank_pattern),
        alpha_pattern=dict(loaded.alpha_pattern),
        use_dora=loaded.use_dora,
    )
    base_shapes = {n: features(m) for n, m in linears.items()}
    shapes = {m: (tuple(a.shape), tuple(b.shape)) for m, (a, b) in loaded.weights.items()}
    magnitude_shapes = {m: tuple(v.shape) for m, v in loaded.magnitudes.items()}
    if why := base_misfit(loaded.ranks(), shapes, base_shapes, magnitude_shapes):
        raise AdapterFormatError(f"adapter does not fit the base: {why}")
    for module in sorted(loaded.weights, key=index.__getitem__):
        a, b = loaded.weights[module]
        alpha = pattern_value(loaded.alpha_pattern, module, loaded.lora_alpha)
        scaling = lora_scaling(alpha, a.shape[0], loaded.use_rslora)
        adapter.modules[module] = LoraWeights.beside(
            linears[module],
            a,
            b,
            index[module],
            scaling,
            freeze_lora_A,
            loaded.magnitudes.get(module),
        )
    return adapter
