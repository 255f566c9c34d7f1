"""Finished adapters on one base, used together: eval losses and generation.

This is the training bank in no-grad mode. For eval, every adapter's rows share
micro-batches, as a training round's do. For generation, rows of different
adapters share one decoding batch and its KV cache, each row through its own
adapter at every step (Punica's and S-LoRA's "batching by LoRA").

A sampled completion depends only on the seed, the prompt and the adapter:
each row draws from a generator of its own, never from one shared by the batch.
"""

from __future__ import annotations

import math
import zlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from carpool.workers.bank.adapter_bank import AdapterBank
from carpool.workers.base.base_model import default_device, default_dtype, load_base, load_tokenizer
from carpool.workers.data.dataset import TokenizedDataset
from carpool.workers.data.fused_batch import (
    collate,
    plan_micro_batches,
    step_rows,
    trainable_tokens,
)
from carpool.workers.data.segment import Segment
from carpool.workers.losses.position_losses import add_segment_losses, position_losses
from carpool.workers.peft_files.finished_adapters import load_finished_adapter
from carpool.workers.peft_files.peft_format import AdapterFormatError
from carpool.workers.spec.job_spec import QuantizationSpec
from carpool.workers.variants.job_adapter import JobAdapter

BASE = "base"  # the name the bare base rides under (`--include-base`)


@dataclass(frozen=True)
class EvalResult:
    name: str
    loss: float  # mean cross-entropy over the trainable tokens
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf


@dataclass(frozen=True)
class GenerationRequest:
    adapter: str
    prompt_ids: tuple[int, ...]
    key: str  # seeds this row's sampling: the same prompt and adapter draw the same


@dataclass(frozen=True)
class Sampling:
    """Greedy when `temperature` is 0; else temperature and nucleus (top-p) sampling."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


class FusedAdapters:
    """One base loaded once, with finished adapters (any kind carpool trains) beside it."""

    def __init__(
        self,
        base_model: str,
        adapters: Mapping[str, Path],
        *,
        include_base: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        adapter_math: str = "auto",
        micro_batch_tokens: int | None = 4096,
        trust_remote_code: bool = False,
        quantization: QuantizationSpec | None = None,
    ) -> None:
        """`include_base` adds the bare base as one more adapter, named `base`.

        `quantization` loads the base in 4 bits, as a QLoRA adapter was trained on it.

        `micro_batch_tokens` caps an eval micro-batch's padded tokens (None: one).
        """
        if include_base and BASE in adapters:
            raise ValueError(
                f"an adapter is named {BASE!r}, the name --include-base gives the base"
            )
        self.device = torch.device(device) if device is not None else default_device()
        self.base = load_base(
            base_model,
            device=self.device,
            dtype=dtype or default_dtype(self.device),
            trust_remote_code=trust_remote_code,
            quantization=quantization,
        )
        self.tokenizer = load_tokenizer(base_model, trust_remote_code=trust_remote_code)
        self.micro_batch_tokens = micro_batch_tokens
        self.bank = AdapterBank(self.base, adapter_math=adapter_math)
        for name, path in adapters.items():
            try:
                self.bank.add(load_finished_adapter(self.base, name, path))
            except AdapterFormatError as e:
                raise AdapterFormatError(f"adapter {name!r} ({path}): {e}") from e
        if include_base:  # an adapter with no modules: its rows see the base alone
            self.bank.add(JobAdapter.without_modules(BASE))

    @property
    def names(self) -> list[str]:
        return list(self.bank.adapters)

    # -- eval ------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, dataset: TokenizedDataset) -> list[EvalResult]:
        """Every adapter's eval loss on `dataset`, all adapters' rows fused; sorted by loss."""
        names = self.names
        rows = [r for n in names for r in step_rows(n, dataset.rows, range(len(dataset.rows)))]
        losses: dict[str, float] = defaultdict(float)
        pad = self.tokenizer.pad_token_id
        for micro in plan_micro_batches(rows, self.micro_batch_tokens):
            batch = collate(micro, pad, self.device)
            with self.bank.route(batch.segments):
                add_segment_losses(losses, batch, position_losses(self.base, batch))
        tokens = sum(trainable_tokens(r) for r in dataset.rows)
        results = [EvalResult(n, losses[n], tokens) for n in names]
        return sorted(results, key=lambda r: (r.loss, r.name))

    # -- generation ------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, requests: Sequence[GenerationRequest], sampling: Sampling, batch_rows: int = 32
    ) -> list[list[int]]:
        """Each request's completion tokens (EOS excluded), in the requests' order.

        Requests are grouped by adapter into batches of at most `batch_rows`.
        """
        for r in requests:
            if r.adapter not in self.bank.adapters:
                raise KeyError(f"no adapter named {r.adapter!r}")
        order = sorted(range(len(requests)), key=lambda i: requests[i].adapter)
        out: list[list[int]] = [[] for _ in requests]
        for start in range(0, len(order), batch_rows):
            chosen = order[start : start + batch_rows]
            decoded = self._decode([requests[i] for i in chosen], sampling)
            for i, tokens in zip(chosen, decoded, strict=True):
                out[i] = tokens
        return out

    def stop_ids(self) -> set[int]:
        """The tokens that end a completion: the tokenizer's EOS and the base's."""
        ids = {self.tokenizer.eos_token_id}
        config_eos = getattr(getattr(self.base, "generation_config", None), "eos_token_id", None)
        ids |= set(config_eos) if isinstance(config_eos, list) else {config_eos}
        return {i for i in ids if i is not None}

    def _decode(self, rows: Sequence[GenerationRequest], sampling: Sampling) -> list[list[int]]:
        """Decode one batch of rows sorted by adapter, sharing one KV cache."""
        n, longest = len(rows), max(len(r.prompt_ids) for r in rows)
        input_ids = torch.full((n, longest), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((n, longest), dtype=torch.long)
        for i, r in enumerate(rows):  # left-padded: every row's next token is the last column
            input_ids[i, longest - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, longest - len(r.prompt_ids) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        segments = segments_by_adapter(rows)
        pickers = [TokenPicker(sampling, r.adapter, r.key, self.device) for r in rows]
        stop = self.stop_ids()
        done = [False] * n
        generated: list[list[int]] = [[] for _ in rows]
        with self.bank.route(segments):
            out = self.base(
                input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True
            )
            next_position = positions[:, -1:] + 1
            for step in range(sampling.max_new_tokens):
                logits = out.logits[:, -1].float()
                tokens = [pick(logits[i]) for i, pick in enumerate(pickers)]
                for i, token in enumerate(tokens):
                    if done[i]:
                        continue
                    if token in stop:
                        done[i] = True
                    else:
                        generated[i].append(token)
                if all(done) or step + 1 == sampling.max_new_tokens:
                    break
                mask = torch.cat([mask, mask.new_ones((n, 1))], dim=1)
                out = self.base(
                    input_ids=torch.tensor(tokens, device=self.device).view(n, 1),
                    attention_mask=mask,
                    position_ids=next_position,
                    use_cache=True,
                    **_kv_cache(out),
                )
                next_position = next_position + 1
        return generated


def _kv_cache(out) -> dict:
    """The cache a forward returned, as the next forward takes it (transformers 5 renamed
    `past_key_values` to `cache`; both spellings are supported)."""
    if getattr(out, "cache", None) is not None:
        return {"cache": out.cache}
    return {"past_key_values": out.past_key_values}


class _HasAdapter(Protocol):
    @property
    def adapter(self) -> str: ...


def segments_by_adapter(rows: Sequence[_HasAdapter]) -> list[Segment]:
    """The bank's segments for decoding rows already grouped by adapter: one per run."""
    segments, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i].adapter != rows[start].adapter:
            segments.append(Segment(rows[start].adapter, start, i, tuple(range(start, i))))
            start = i
    return segments


class TokenPicker:
    """One row's next-token choice: argmax, or a draw from its own generator, seeded by
    the sampling seed, the row's adapter and its key (so never by its batch neighbours)."""

    def __init__(self, sampling: Sampling, adapter: str, key: str, device: torch.device):
        self.sampling = sampling
        self.generator = None
        if sampling.temperature > 0:
            row_seed = zlib.crc32(f"{sampling.seed}\0{adapter}\0{key}".encode())
            self.generator = torch.Generator(device=device).manual_seed(row_seed)

    def __call__(self, logits: torch.Tensor) -> int:
        if self.generator is None:
            return int(logits.argmax())
        probs = torch.softmax(logits / self.sampling.temperature, dim=-1)
        sorted_probs, order = probs.sort(descending=True)
        # Nucleus: the most likely tokens until their mass reaches top_p (the first always).
        keep = (sorted_probs.cumsum(-1) - sorted_probs) < self.sampling.top_p
        kept = sorted_probs * keep
        choice = torch.multinomial(kept / kept.sum(), 1, generator=self.generator)
        return int(order[choice])
