"""Reading a PEFT VeRA adapter directory, to start a VERA job from it.

Its config carries VeraConfig's r, projection_prng_key, d_initial,
save_projection, target_modules and vera_dropout; its safetensors each
module's `vera_lambda_d` [r] and `vera_lambda_b` [out] and, when saved, the
shared `base_model.vera_A` [r, max_in] / `base_model.vera_B` [max_out, r].
Saved projections equal to those the key regenerates are replaced by the
shared cached copy, so such a job shares memory with its key's other jobs;
others (another generator, another base) are the job's own, as PEFT loads them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from carpool.workers.base.base_model import (
    features,
    is_fan_in_fan_out,
    linear_modules,
    weight_dtype,
)
from carpool.workers.peft_files.peft_format import (
    WEIGHTS_FILE,
    AdapterFormatError,
    Shape,
    adapter_files,
    config_number,
    dims,
    first_misfit,
    load_config,
    tensor_shapes,
)
from carpool.workers.variants.job_adapter import JobAdapter, adapter_dtype
from carpool.workers.variants.vera import (
    LAMBDA_B,
    LAMBDA_D,
    Projections,
    VeraSettings,
    projections,
    vera_weights,
)
from safetensors.torch import load_file
from torch import nn

_LAMBDA_KEY = re.compile(rf"^base_model\.model\.(?P<module>.+)\.(?P<kind>{LAMBDA_D}|{LAMBDA_B})$")
_PROJECTIONS = ("base_model.vera_A", "base_model.vera_B")


@dataclass(frozen=True)
class VeraHeader:
    """What a PEFT VeRA adapter declares, and its tensors' shapes, read without its weights."""

    r: int
    projection_prng_key: int
    d_initial: float
    save_projection: bool
    target_modules: tuple[str, ...] | str
    vera_dropout: float
    shapes: dict[str, tuple[Shape, Shape]]  # module -> (lambda_d's shape, lambda_b's shape)
    projection_shapes: tuple[Shape, Shape] | None  # saved (vera_A, vera_B), if any


@dataclass(frozen=True)
class LoadedVera:
    header: VeraHeader
    lambdas: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (lambda_d, lambda_b)
    projections: tuple[torch.Tensor, torch.Tensor] | None  # saved (vera_A, vera_B)


def _by_module(items: list[tuple[str, object]], weights_path: Path) -> tuple[dict, dict]:
    """(module -> (lambda_d, lambda_b), {projection key: value}) from PEFT's keys."""
    found: dict[str, dict[str, object]] = {}
    saved = {}
    for key, value in items:
        if key in _PROJECTIONS:
            saved[key] = value
        elif match := _LAMBDA_KEY.match(key):
            found.setdefault(match["module"], {})[match["kind"]] = value
        else:
            raise AdapterFormatError(f"{weights_path}: unexpected tensor {key!r}")
    if not found:
        raise AdapterFormatError(f"{weights_path}: holds no VeRA vectors")
    for module, pair in found.items():
        if set(pair) != {LAMBDA_D, LAMBDA_B}:
            raise AdapterFormatError(f"{weights_path}: {module} lacks {LAMBDA_D} or {LAMBDA_B}")
    if saved and len(saved) != 2:
        raise AdapterFormatError(f"{weights_path}: saves one of vera_A and vera_B, not both")
    lambdas = {m: (p[LAMBDA_D], p[LAMBDA_B]) for m, p in found.items()}
    return lambdas, saved


def read_vera_header(path: str | Path) -> VeraHeader:
    """Check a PEFT VeRA adapter directory and read its config and tensor shapes."""
    config_path, weights_path = adapter_files(path)
    cfg = load_config(config_path, "VERA")
    r = config_number(cfg, "r", 256, True, config_path)
    if r < 1:
        raise AdapterFormatError(f"{config_path}: r must be a whole number >= 1, got {r!r}")
    dropout = config_number(cfg, "vera_dropout", 0.0, False, config_path)
    if not 0 <= dropout < 1:
        raise AdapterFormatError(f"{config_path}: vera_dropout must be in [0, 1), got {dropout}")
    shapes, saved = _by_module(tensor_shapes(weights_path), weights_path)
    targets = cfg.get("target_modules") or sorted({m.rsplit(".", 1)[-1] for m in shapes})
    return VeraHeader(
        r=r,
        projection_prng_key=config_number(cfg, "projection_prng_key", 0, True, config_path),
        d_initial=float(config_number(cfg, "d_initial", 0.1, False, config_path)),
        save_projection=bool(cfg.get("save_projection", True)),
        target_modules=targets if isinstance(targets, str) else tuple(targets),
        vera_dropout=float(dropout),
        shapes=shapes,
        projection_shapes=(saved[_PROJECTIONS[0]], saved[_PROJECTIONS[1]]) if saved else None,
    )


def read_vera_adapter(path: str | Path) -> LoadedVera:
    """Read a PEFT VeRA adapter directory (safetensors only: no pickles)."""
    header = read_vera_header(path)
    weights_path = Path(path) / WEIGHTS_FILE
    lambdas, saved = _by_module(list(load_file(str(weights_path)).items()), weights_path)
    pair = (saved[_PROJECTIONS[0]], saved[_PROJECTIONS[1]]) if saved else None
    return LoadedVera(header, lambdas, pair)


def vera_misfit(header: VeraHeader, base_shapes: Mapping[str, tuple[int, int]]) -> str | None:
    """Why a VeRA adapter's tensors do not fit a base's linear modules, or None when they do.

    One line: the first module that does not fit, in model order, and how many more."""
    order = {name: i for i, name in enumerate(base_shapes)}
    misfits = []
    r = header.r
    for module in sorted(header.shapes, key=lambda m: (order.get(m, len(order)), m)):
        d, b = header.shapes[module]
        if module not in base_shapes:
            misfits.append(f"{module}: the base has no such linear module")
        elif d != (r,):
            misfits.append(f"{module}: {LAMBDA_D} is {dims(d)} but its config gives it r={r}")
        elif b != (base_shapes[module][1],):
            out = base_shapes[module][1]
            misfits.append(f"{module}: {LAMBDA_B} is {dims(b)} but the base gives {out} outputs")
    if not misfits and header.projection_shapes is not None:
        a, b = header.projection_shapes
        max_in = max(base_shapes[m][0] for m in header.shapes)
        max_out = max(base_shapes[m][1] for m in header.shapes)
        if len(a) != 2 or len(b) != 2 or a[0] != r or b[1] != r or a[1] < max_in or b[0] < max_out:
            misfits.append(
                f"vera_A is {dims(a)} and vera_B is {dims(b)}; its modules need "
                f"at least {r}x{max_in} and {max_out}x{r}"
            )
    return first_misfit(misfits)


def _shared(loaded: LoadedVera, max_out: int, max_in: int, device, dtype) -> Projections:
    """The key's cached projections when the saved ones are those, else the saved ones."""
    h = loaded.header
    regenerated = projections(h.projection_prng_key, h.r, max_out, max_in, device, dtype)
    if loaded.projections is None:
        return regenerated
    a, b = (t.to(device=device, dtype=dtype) for t in loaded.projections)
    if torch.equal(a, regenerated.vera_A) and torch.equal(b, regenerated.vera_B):
        return regenerated
    return Projections(a, b)


def vera_adapter_from_loaded(
    base: nn.Module, name: str, loaded: LoadedVera, *, dropout: float, seed: int
) -> JobAdapter:
    """A VeRA JobAdapter on `base` starting from a loaded PEFT VeRA adapter's tensors."""
    h = loaded.header
    linears = linear_modules(base)
    index = {n: i for i, n in enumerate(linears)}
    base_shapes = {n: features(m) for n, m in linears.items()}
    if why := vera_misfit(h, base_shapes):
        raise AdapterFormatError(f"adapter does not fit the base: {why}")
    modules = sorted(loaded.lambdas, key=index.__getitem__)
    first = linears[modules[0]]
    dtype = adapter_dtype(weight_dtype(first))
    max_in = max(base_shapes[m][0] for m in modules)
    max_out = max(base_shapes[m][1] for m in modules)
    shared = _shared(loaded, max_out, max_in, first.weight.device, dtype)
    adapter = JobAdapter(
        name=name,
        r=h.r,
        lora_alpha=1.0,  # unused by VeRA: its scale is in lambda_b and lambda_d
        use_rslora=False,
        target_modules=h.target_modules,
        dropout=dropout,
        seed=seed,
        peft_type="VERA",
        vera=VeraSettings(h.d_initial, h.projection_prng_key, h.save_projection, shared),
    )
    for module in modules:
        in_f, out_f = base_shapes[module]
        w = vera_weights(
            shared, in_f, out_f, h.d_initial, index[module], is_fan_in_fan_out(linears[module])
        )
        lambda_d, lambda_b = loaded.lambdas[module]
        with torch.no_grad():
            w.lambda_d.copy_(lambda_d)
            w.lambda_b.copy_(lambda_b)
        adapter.modules[module] = w
    return adapter
