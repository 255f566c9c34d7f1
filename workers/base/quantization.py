"""QLoRA's frozen base: the bitsandbytes config a job's `base_quantization` asks for.

bitsandbytes is an optional extra (`carpool[quantization]`): nothing here imports
it until a quantized base is loaded, so a full-precision install never needs it.

One kernel, whatever the CPU: on a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a
4-bit module's weight for a faster inference kernel, for good, the first time the
module runs in eval mode on an input that needs no gradient. carpool keeps its shared
base in eval mode (its own dropout would mix jobs), so its modules would switch kernels
mid-training and after every no-grad evaluation, while PEFT's train-mode loop never
does (measured: 3.5e-2 relative apart after 6 steps, against 1.9e-7 without the
repack). `keep_4bit_kernel_exact` turns the repack off on every 4-bit module of a
loaded base: training, its evaluations, `carpool eval` and `generate` all run the
kernel PEFT trains with, so their numbers match PEFT's training. Measured on such a CPU
(benchmarks/qlora_cpu_kernel.py): the inference kernel is 2-6x slower over whole rows,
as evaluation runs, and up to 3.4x faster for a decoding step of one or a few rows.
"""

from __future__ import annotations

import importlib.util
import sys

import torch
from carpool.workers.spec.job_spec import QuantizationSpec
from torch import nn
from transformers import BitsAndBytesConfig


class QuantizationUnavailableError(ImportError):
    """A job asks for a quantized base where bitsandbytes is not installed."""


def bitsandbytes_config(spec: QuantizationSpec) -> BitsAndBytesConfig:
    """transformers' config for loading the base as `spec` says (raises if bnb is missing)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QuantizationUnavailableError(
            "base_quantization needs bitsandbytes, which is not installed: "
            "pip install 'carpool[quantization]'"
        )
    return BitsAndBytesConfig(
        load_in_4bit=spec.load_in_4bit,
        bnb_4bit_quant_type=spec.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=spec.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=getattr(torch, spec.bnb_4bit_compute_dtype),
    )


def is_4bit(module: nn.Module) -> bool:
    """Whether `module` is a bitsandbytes 4-bit linear (its weight is packed uint8)."""
    # Only a loaded quantized base has imported bitsandbytes; never import it for the check.
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def keep_4bit_kernel_exact(model: nn.Module) -> int:
    """Turn off bitsandbytes' CPU repacking on every 4-bit module of `model`; returns how
    many there are. A module already repacked is refused: its kernel has switched."""
    count = 0
    for name, module in model.named_modules():
        if not is_4bit(module):
            continue
        state = getattr(module.weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            raise RuntimeError(f"{name}: its 4-bit weight is already repacked for the CPU kernel")
        module.support_avx512bf16_for_cpu = False  # read by Linear4bit.forward each call
        count += 1
    return count


def describe(spec: QuantizationSpec | None) -> str:
    """A short label for logs and errors: "none" or e.g. "4-bit nf4 (double quant), bfloat16"."""
    if spec is None:
        return "none"
    double = " (double quant)" if spec.bnb_4bit_use_double_quant else ""
    return f"4-bit {spec.bnb_4bit_quant_type}{double}, {spec.bnb_4bit_compute_dtype}"
