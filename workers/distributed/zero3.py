"""ZeRO-3: the frozen base partitioned across the ranks of a data-parallel group.

Each rank keeps only its 1/world slice of every base parameter; DeepSpeed's
parameter coordinator all-gathers a module's weights just before its forward
(and again before its backward) and frees them after. The adapters are not
part of this: the bank creates them after loading, outside `deepspeed.zero.Init`,
as plain replicated parameters whose gradients `DataParallel` all-reduces.

Because every gather is a collective, every rank must run the same modules,
forward and backward, the same number of times each round:

- the engine pads each rank's round to the group's largest micro-batch count
  with dummy micro-batches whose loss is zero (`pad_micro_batches`);
- the input embeddings' output is made to require grad, so the backward pass
  runs through every module on every rank. Otherwise which modules a backward
  reaches (and gathers) depends on which jobs' adapters a rank's rows touch.

DeepSpeed's `zero.Init` takes only float32, bfloat16 and float16 parameters.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from carpool.workers.data.dataset import IGNORE_INDEX, TokenizedRow
from carpool.workers.data.fused_batch import StepRow
from carpool.workers.distributed.data_parallel import DataParallel
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def choose_zero_stage(param_bytes: int, device_memory_bytes: int, headroom: float = 0.6) -> int:
    """3 when the base alone would take more than `headroom` of one device's memory, else 0.

    The rest of the memory goes to activations, adapters and optimizer state.
    """
    if param_bytes < 0 or device_memory_bytes <= 0:
        raise ValueError(
            f"need param_bytes >= 0 and device_memory_bytes > 0, "
            f"got {param_bytes} and {device_memory_bytes}"
        )
    if not 0.0 < headroom <= 1.0:
        raise ValueError(f"headroom must be in (0, 1], got {headroom}")
    return 3 if param_bytes > headroom * device_memory_bytes else 0


def base_parameter_bytes(
    name_or_path: str, *, dtype: torch.dtype, trust_remote_code: bool = False
) -> int:
    """Bytes of the base's parameters in `dtype`, from its config alone (no weights loaded).

    For `choose_zero_stage`, before any ZeRO-3 load in this process (after one,
    transformers builds every model inside `zero.Init`).
    """
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    size = torch.empty((), dtype=dtype).element_size()
    return sum(p.numel() for p in model.parameters()) * size


def deepspeed_zero3_config(
    dtype: torch.dtype,
    *,
    offload_params: bool = False,
    zero_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A DeepSpeed config for a frozen ZeRO-3 base with no DeepSpeed optimizer.

    `zero_options` adds to or overrides `zero_optimization` (e.g.
    `{"stage3_param_persistence_threshold": 0}`: by default DeepSpeed keeps
    parameters under 1e5 elements gathered for good once first used).
    """
    if dtype not in _DTYPES:
        raise ValueError(
            f"ZeRO-3 holds the base in float32 or bfloat16, got {dtype} "
            "(deepspeed.zero.Init converts parameters to one of its own dtypes)"
        )
    zero: dict[str, Any] = {"stage": 3}
    if offload_params:
        zero["offload_param"] = {"device": "cpu"}
    zero.update(zero_options or {})
    return {
        # Required by DeepSpeed's config check; no DeepSpeed data loader or step uses it.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
    }


@dataclass
class Zero3Handles:
    """What must outlive loading: transformers reads the HF config through a weak reference."""

    hf_config: Any  # transformers.integrations.HfDeepSpeedConfig
    ds_engine: Any  # deepspeed.DeepSpeedEngine; owns the hooks that gather and release
    ds_config: dict[str, Any]


def load_base_zero3(
    name_or_path: str,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    offload_params: bool = False,
    trust_remote_code: bool = False,
    zero_options: Mapping[str, Any] | None = None,
    group: dist.ProcessGroup | None = None,
) -> tuple[nn.Module, Zero3Handles]:
    """Load a causal LM partitioned across the default process group; frozen, eval mode.

    torch.distributed must already be initialized (gloo on CPU, NCCL on GPUs).
    transformers builds the model inside `deepspeed.zero.Init`, so no rank ever
    holds all of it on the device (rank 0 reads the checkpoint on the host and
    scatters it). `deepspeed.initialize` with no optimizer then installs the
    gather/release hooks (DeepSpeed's `DeepSpeedZeRoOffload`).

    `group`, the data-parallel group, must span the whole world: transformers
    enters `zero.Init` without a group, so DeepSpeed partitions over all ranks.
    """
    if not dist.is_initialized():
        raise RuntimeError("ZeRO-3 needs torch.distributed initialized before loading the base")
    if group is not None and dist.get_world_size(group) != dist.get_world_size():
        raise ValueError(
            f"ZeRO-3 partitions over the whole world ({dist.get_world_size()} ranks); "
            f"the data-parallel group has {dist.get_world_size(group)}"
        )
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    device = torch.device(device)
    # zero.Init picks its device from LOCAL_RANK, which launchers like torchrun set.
    # Without one, take the engine's own device index (each Ray actor sees its GPU as 0).
    os.environ.setdefault("LOCAL_RANK", str(device.index or 0))
    ds_config = deepspeed_zero3_config(
        dtype, offload_params=offload_params, zero_options=zero_options
    )
    # Must exist before from_pretrained: transformers sees ZeRO-3 through it.
    hf_config = HfDeepSpeedConfig(ds_config)
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=dtype, trust_remote_code=trust_remote_code
    )
    model.requires_grad_(False)
    model.eval()  # see base_model.load_base: the shared base must not draw dropout
    ds_engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    model.eval()
    # Registered after DeepSpeed's hooks, so the embedding weight is not gathered again
    # in backward; see the module docstring for why every rank needs this.
    model.enable_input_require_grads()
    return model, Zero3Handles(hf_config, ds_engine, ds_config)


def is_zero3_parameter(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_tensor")


def parameter_bytes_on_this_rank(model: nn.Module) -> int:
    """Bytes of `model`'s parameters this rank holds now.

    For a ZeRO-3 parameter: its partition (`ds_tensor`, on the device or, with
    offload, on the host) plus the full tensor while it is gathered, which
    DeepSpeed does for good with small "persistent" parameters. Otherwise the
    whole parameter.
    """
    total = 0
    for p in model.parameters():
        if is_zero3_parameter(p):
            total += p.ds_tensor.numel() * p.ds_tensor.element_size()
            if p.ds_status.name != "NOT_AVAILABLE":  # gathered: the full tensor is here too
                total += p.numel() * p.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def dummy_row(job: str, pad_token_id: int) -> StepRow:
    """A two-token row of padding with nothing to learn and loss scale 0: zero gradients."""
    row = TokenizedRow((pad_token_id, pad_token_id), (IGNORE_INDEX, IGNORE_INDEX))
    return StepRow(job, row, row_id=-1, loss_scale=0.0)


def pad_micro_batches(
    micro_batches: Sequence[list[StepRow]], dp: DataParallel, filler: StepRow
) -> list[list[StepRow]]:
    """This rank's micro-batches, padded with `[filler]` to the group's largest count.

    A rank with fewer forward/backward passes than the others would leave their
    parameter gathers waiting. One small all-reduce per round settles the count.
    """
    count = torch.tensor([len(micro_batches)], dtype=torch.int64, device=dp.device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX, group=dp.group)
    dp.collective_bytes["micro_batch_count"] += count.numel() * count.element_size()
    return list(micro_batches) + [[filler]] * (int(count.item()) - len(micro_batches))
