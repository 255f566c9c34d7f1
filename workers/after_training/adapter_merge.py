"""Merging finished LoRA adapters with PEFT, and folding an adapter into its base.

The arithmetic is PEFT's `add_weighted_adapter` and `merge_and_unload`; this
module checks up front what PEFT would refuse, or get silently wrong, and
explains it in one line, and writes the results where PEFT and transformers
load them unchanged.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import torch
from carpool.workers.after_training.merge_methods import RANDOM, SAME_RANK
from carpool.workers.base.base_fingerprint import write_provenance
from carpool.workers.base.base_model import features, linear_modules
from carpool.workers.base.unseen_packages import peft_without_bitsandbytes, save_without_deepspeed
from carpool.workers.peft_files.peft_format import (
    CONFIG_FILE,
    AdapterFormatError,
    AdapterHeader,
    base_misfit,
    read_adapter_header,
)
from carpool.workers.spec.lora_patterns import pattern_value
from torch import nn
from transformers import AutoTokenizer

with peft_without_bitsandbytes():  # merging loads full-precision bases only
    from peft import LoraConfig, PeftModel

# PEFT saves an adapter named `default` in the root of its directory, any other
# in a subfolder: the merged adapter takes this name, its sources others.
MERGED = "default"


class MergeRefusedError(ValueError):
    """Adapters that cannot be merged as asked; the message names the argument."""


def _peft_rank(header: AdapterHeader) -> int:
    # What PEFT sizes a merged adapter by: the largest r the config declares.
    return max([header.r, *header.rank_pattern.values()])


def _rank_text(header: AdapterHeader) -> str:
    ranks = sorted(set(header.ranks().values()) | {_peft_rank(header)})
    return f"r={ranks[0]}" if len(ranks) == 1 else f"r={ranks[0]}..{ranks[-1]}"


def _kind_refusal(name: str, path: Path, header: AdapterHeader) -> str | None:
    if header.use_dora:
        return (
            f"adapter {name!r}: a DoRA adapter; PEFT's merge combines lora_A and lora_B "
            "only and would drop its magnitude vectors"
        )
    config = json.loads((path / CONFIG_FILE).read_text())  # read_adapter_header parsed it
    if config.get("target_parameters"):
        return f"adapter {name!r}: targets parameters (target_parameters), which PEFT cannot merge"
    return None


def _as_plain_lora(path: Path, header: AdapterHeader) -> LoraConfig:
    """The adapter's config, an rsLoRA one rewritten as the plain LoRA that acts the same.

    PEFT's merge folds each source's scaling into the merged weights and gives the merged
    adapter its first source's config with lora_alpha = r: scaling 1 for plain LoRA, but
    sqrt(r) for rsLoRA (alpha / sqrt(r)). Loaded as plain LoRA with alpha * sqrt(r) per
    module (the same alpha / sqrt(r) scaling), the sources merge exactly.
    """
    config = LoraConfig.from_pretrained(str(path))
    if not config.use_rslora:
        return config
    default = header.lora_alpha * math.sqrt(header.r)
    alphas = {
        module: pattern_value(header.alpha_pattern, module, header.lora_alpha) * math.sqrt(r)
        for module, r in header.ranks().items()
    }
    return replace(
        config,
        use_rslora=False,
        lora_alpha=default,
        # Each module whose alpha differs gets a key of its own: its escaped full name.
        alpha_pattern={re.escape(m): a for m, a in alphas.items() if a != default},
    )


def check_mergeable(adapters: Mapping[str, Path], method: str) -> dict[str, AdapterHeader]:
    """Each adapter's header, once all are checked to be LoRA adapters PEFT can merge
    with `method`; reads configs and safetensors headers only."""
    headers: dict[str, AdapterHeader] = {}
    for name, path in adapters.items():
        try:
            header = read_adapter_header(path)
        except AdapterFormatError as e:
            raise MergeRefusedError(f"adapter {name!r}: {e}") from e
        if why := _kind_refusal(name, path, header):
            raise MergeRefusedError(why)
        headers[name] = header
    # PEFT merges a single adapter linearly, whatever the method.
    effective = "linear" if len(headers) == 1 else method
    if effective in SAME_RANK:
        ranks = {name: _rank_text(h) for name, h in headers.items()}
        if len(set(ranks.values())) > 1 or any(".." in r for r in ranks.values()):
            listed = ", ".join(f"{n} has {r}" for n, r in ranks.items())
            raise MergeRefusedError(
                f"--method {effective}: needs one rank r for every adapter and module "
                f"(PEFT combines A and B entry by entry); {listed}; cat and svd take any ranks"
            )
    if len({isinstance(h.target_modules, str) for h in headers.values()}) > 1:
        raise MergeRefusedError(
            "adapters: some give target_modules as a regex, others as a list; PEFT cannot "
            "merge a mix"
        )
    return headers


def check_fits_base(base: nn.Module, headers: Mapping[str, AdapterHeader]) -> None:
    """Refuse, in one line, an adapter whose tensors do not fit the base's modules."""
    base_shapes = {name: features(module) for name, module in linear_modules(base).items()}
    for name, h in headers.items():
        if why := base_misfit(h.ranks(), h.shapes, base_shapes, h.magnitude_shapes):
            raise MergeRefusedError(f"adapter {name!r} does not fit --base: {why}")


def merge_adapters(
    base: nn.Module,
    adapters: Mapping[str, Path],
    weights: Sequence[float],
    method: str,
    *,
    density: float | None = None,
    seed: int = 0,
) -> PeftModel:
    """`base` with one adapter, `MERGED`: PEFT's weighted merge of `adapters`.

    DARE draws from torch's global RNG: seeded here, so one seed gives one result.
    """
    sources = [f"source_{i}" for i in range(len(adapters))]
    paths = list(adapters.values())
    configs = [_as_plain_lora(path, read_adapter_header(path)) for path in paths]
    model = PeftModel.from_pretrained(
        base, str(paths[0]), adapter_name=sources[0], config=configs[0]
    )
    for source, path, config in zip(sources[1:], paths[1:], configs[1:], strict=True):
        config.inference_mode = True
        model.add_adapter(source, config)  # load_adapter then loads only its weights
        model.load_adapter(str(path), adapter_name=source)
    if method in RANDOM:
        torch.manual_seed(seed)
    model.add_weighted_adapter(
        sources, list(weights), MERGED, combination_type=method, density=density
    )
    model.set_adapter(MERGED)
    for source in sources:
        model.delete_adapter(source)
    return model


def save_merged_adapter(
    model: PeftModel, out_dir: Path, *, base_model: str, merged_from: Mapping[str, object]
) -> None:
    """The merged adapter in the root of `out_dir`, as `PeftModel.from_pretrained` reads it,
    with carpool's provenance record (its base, and what it was merged from)."""
    model.save_pretrained(str(out_dir), selected_adapters=[MERGED])  # a PeftModel's: no unwrap
    write_provenance(
        out_dir, base_model=base_model, adapter_kind="lora", details={"merged_from": merged_from}
    )


def save_folded_model(model: PeftModel, out_dir: Path, *, base_model: str) -> None:
    """The base with the adapter folded into its weights (`merge_and_unload`), and the
    base's tokenizer: a plain model `AutoModelForCausalLM.from_pretrained` loads."""
    folded = model.merge_and_unload()
    save_without_deepspeed(folded, str(out_dir), safe_serialization=True)
    AutoTokenizer.from_pretrained(base_model).save_pretrained(str(out_dir))
