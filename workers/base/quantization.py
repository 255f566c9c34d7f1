"""QLoRA's frozen base: the bitsandbytes config a job's `base_quantization` asks for.

bitsandbytes is an optional extra (`carpool[quantization]`): nothing here imports
it until a quantized base is loaded, so a full-precision install never needs it.
On a CPU with AVX512-BF16, importing bitsandbytes 0.50 tries the optional `kernels`
package (a hub download); without that package it falls back to its own kernels.
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


def describe(spec: QuantizationSpec | None) -> str:
    """A short label for logs and errors: "none" or e.g. "4-bit nf4 (double quant), bfloat16"."""
    if spec is None:
        return "none"
    double = " (double quant)" if spec.bnb_4bit_use_double_quant else ""
    return f"4-bit {spec.bnb_4bit_quant_type}{double}, {spec.bnb_4bit_compute_dtype}"
