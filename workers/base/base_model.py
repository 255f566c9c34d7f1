"""Loading the frozen base, and finding the modules a job's adapter targets."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from carpool.workers.base.quantization import bitsandbytes_config, is_4bit, keep_4bit_kernel_exact
from carpool.workers.spec.job_spec import QuantizationSpec
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

# What a LoRA adapter can target: nn.Linear (bitsandbytes' Linear4bit is one, with
# in/out features as attributes), and GPT-2's Conv1D (a linear with its
# weight stored [in, out]), the two classes PEFT's `all-linear` takes.
TargetModule = nn.Linear | Conv1D


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU (exact comparisons in tests), bfloat16 on accelerators."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_base(
    name_or_path: str,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    quantization: QuantizationSpec | None = None,
) -> nn.Module:
    """Load a causal LM, frozen and in eval mode.

    Eval mode because the base is shared: its own dropout would draw from one
    RNG stream for all jobs and make a job's result depend on its neighbours.
    LoRA dropout is applied per job by the adapter bank instead.

    With `quantization`, its linears load as bitsandbytes 4-bit modules (the
    output head and the rest stay in `dtype`), straight onto `device`, each kept
    on the one kernel PEFT's training loop runs (`keep_4bit_kernel_exact`).
    """
    device = device or default_device()
    dtype = dtype or default_dtype(device)
    if quantization is None:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype, trust_remote_code=trust_remote_code
        )
        model.to(device)
    else:
        # A 4-bit model is placed while it loads: `.to()` after quantizing is refused.
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            dtype=dtype,
            quantization_config=bitsandbytes_config(quantization),
            device_map={"": device},
            trust_remote_code=trust_remote_code,
        )
        keep_4bit_kernel_exact(model)
    model.eval()
    model.requires_grad_(False)
    return model


def load_tokenizer(
    name_or_path: str, *, trust_remote_code: bool = False, class_name: str | None = None
) -> PreTrainedTokenizerBase:
    """The base's tokenizer; one without a pad token pads with EOS (labels mask it anyway).

    `class_name` is the transformers class AutoTokenizer chose for this base before
    (`base_facts`): loading through it skips AutoTokenizer's reading of the base's
    config, which imports the family's configuration code.
    """
    if class_name is None:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    else:
        tokenizer = tokenizer_class(class_name).from_pretrained(name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_class(class_name: str) -> type[PreTrainedTokenizerBase]:
    """The transformers tokenizer class of that name; ValueError for any other name."""
    import transformers

    found = getattr(transformers, class_name, None)
    if not (isinstance(found, type) and issubclass(found, PreTrainedTokenizerBase)):
        raise ValueError(f"{class_name!r} is no tokenizer class of transformers")
    return found


def linear_modules(model: nn.Module) -> dict[str, TargetModule]:
    """Every nn.Linear and Conv1D except the output head, by qualified name."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and module is not head
    }


def features(module: TargetModule) -> tuple[int, int]:
    """(in_features, out_features): what a LoRA pair on `module` maps from and to."""
    if isinstance(module, Conv1D):
        return module.nx, module.nf
    return module.in_features, module.out_features


def weight_dtype(module: TargetModule) -> torch.dtype:
    """The module's weight dtype as its adapters see it: a 4-bit module's weights are
    packed uint8, and the adapters beside them are float32, as PEFT keeps them."""
    if is_4bit(module):
        return torch.float32
    return module.weight.dtype


def is_fan_in_fan_out(module: TargetModule) -> bool:
    """Whether the module stores its weight [in, out] (PEFT's `fan_in_fan_out`)."""
    return isinstance(module, Conv1D)


def linear_module_shapes(
    name_or_path: str, *, trust_remote_code: bool = False
) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each targetable linear, without loading weights."""
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return {name: features(m) for name, m in linear_modules(model).items()}


def module_matches(name: str, key: str) -> bool:
    """PEFT's rule for a list of target names: the key is the name or its dotted suffix."""
    return name == key or name.endswith("." + key)


def match_target_modules(
    module_names: Sequence[str], target_modules: Sequence[str] | str
) -> list[str]:
    """The module names a job's `target_modules` selects, in model order."""
    if target_modules == "all-linear":
        return list(module_names)
    keys = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    return [n for n in module_names if any(module_matches(n, k) for k in keys)]


def unmatched_targets(
    module_names: Sequence[str], target_modules: Sequence[str] | str
) -> list[str]:
    """Entries of `target_modules` that select no module (for error reports)."""
    if target_modules == "all-linear":
        return []
    keys = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    return [k for k in keys if not any(module_matches(n, k) for n in module_names)]
