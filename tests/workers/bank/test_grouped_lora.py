"""Grouped adapter math equals the per-segment loop, in outputs and in every gradient."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import carpool.workers.bank.dropout_masks as dropout_masks
import carpool.workers.bank.grouped_lora as grouped_lora
import pytest
import torch
from carpool.workers.bank.adapter_bank import AdapterBank
from carpool.workers.bank.adapter_math import resolve_adapter_math
from carpool.workers.bank.dropout_masks import dropout_mask, hashed_keep_mask, hashed_segments_mask
from carpool.workers.base.base_model import load_base
from carpool.workers.data.segment import Segment
from carpool.workers.variants.adalora import AdaLoraSchedule, AdaLoraWeights
from carpool.workers.variants.job_adapter import JobAdapter, LoraWeights
from carpool.workers.variants.new_adapters import (
    new_adalora_adapter,
    new_job_adapter,
    new_vera_adapter,
)
from carpool.workers.variants.vera import VeraWeights
from torch.utils._python_dispatch import TorchDispatchMode

from tests.helpers.peft_reference import max_relative_difference

CPU = torch.device("cpu")
GROUPED = ["bmm", "grouped_mm"]
# name: (r, target_modules, lora_dropout, use_rslora, freeze_lora_A)
JOBS = {
    "a": (4, ("q_proj", "v_proj"), 0.3, False, False),
    "b": (8, "all-linear", 0.0, True, False),  # rsLoRA
    "c": (2, ("q_proj", "o_proj"), 0.5, False, True),  # LoRA-FA
    "d": (3, ("k_proj", "down_proj"), 0.0, False, False),  # a rank no stride is aligned to
}
SEGMENTS = [
    Segment("a", 0, 2, (5, 6)),
    Segment("b", 2, 5, (0, 1, 2)),
    Segment("c", 5, 6, (9,)),
    Segment("d", 6, 8, (3, 4)),
]


def bank_with_jobs(base_path: Path, dtype: torch.dtype) -> AdapterBank:
    base = load_base(str(base_path), device=CPU, dtype=dtype)
    bank = AdapterBank(base)
    for seed, (name, (r, targets, dropout, rslora, fa)) in enumerate(JOBS.items()):
        adapter = new_job_adapter(
            base, name, r=r, lora_alpha=2 * r + 1, use_rslora=rslora, dropout=dropout,
            target_modules=targets, seed=seed, freeze_lora_A=fa,
        )  # fmt: skip
        with torch.no_grad():
            for w in adapter.modules.values():  # B non-zero, so every gradient is non-zero
                w.lora_B.normal_(0, 0.1)
        bank.add(adapter)
    return bank


def forward_backward(bank: AdapterBank, path: str, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits and the gradients of the input embeddings and of every adapter parameter."""
    bank.adapter_math = path
    embeds = bank.base.get_input_embeddings()(ids).detach().requires_grad_()
    with bank.route(SEGMENTS):
        logits = bank.base(inputs_embeds=embeds).logits
    upstream = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
    (logits.float() * upstream).sum().backward()
    out = {"logits": logits.detach().float(), "x.grad": embeds.grad.float()}
    for adapter in bank.adapters.values():
        for module, w in adapter.modules.items():
            for kind, p in (("A", w.lora_A), ("B", w.lora_B)):
                if p.requires_grad:
                    out[f"{adapter.name}.{module}.{kind}"] = p.grad.clone()
                    p.grad = None
                else:
                    assert p.grad is None
    return out


@pytest.mark.parametrize("path", GROUPED)
def test_grouped_equals_loop_float32(tiny_base: Path, path: str) -> None:
    bank = bank_with_jobs(tiny_base, torch.float32)
    ids = torch.randint(3, 200, (8, 11), generator=torch.Generator().manual_seed(1))
    loop = forward_backward(bank, "loop", ids)
    # Gradients of LoRA-FA's frozen A are absent; every other parameter has one that moved.
    assert "c.model.layers.0.self_attn.q_proj.A" not in loop
    assert all(g.abs().max() > 0 for g in loop.values())
    # Summation order differs (per row vs per segment): float32 rounding, nothing more.
    assert max_relative_difference(loop, forward_backward(bank, path, ids)) <= 1e-5


@pytest.mark.parametrize("path", GROUPED)
def test_grouped_equals_loop_with_float32_adapters_beside_bf16(tiny_base: Path, path: str) -> None:
    bank = bank_with_jobs(tiny_base, torch.bfloat16)
    assert {p.dtype for a in bank.adapters.values() for p in a.parameters()} == {torch.float32}
    ids = torch.randint(3, 200, (8, 11), generator=torch.Generator().manual_seed(1))
    loop = forward_backward(bank, "loop", ids)
    got = forward_backward(bank, path, ids)
    # Both add the same float32 deltas (up to summation order) to bf16 outputs: equal in
    # bf16 but where a rounding tie flips one bf16 step, then carried through the base.
    activations = ("logits", "x.grad")
    expected = {key: loop.pop(key) for key in activations}
    assert max_relative_difference(expected, {key: got.pop(key) for key in activations}) <= 1e-2
    assert max_relative_difference(loop, got) <= 1e-5  # the float32 parameters' gradients


def test_rows_of_a_job_without_the_module_get_no_delta(tiny_base: Path) -> None:
    bank = bank_with_jobs(tiny_base, torch.float32)
    linear = bank.base.get_submodule("model.layers.0.self_attn.k_proj")  # only b and d
    x = torch.randn(8, 5, linear.in_features)
    plain = linear(x)
    for path in GROUPED:
        bank.adapter_math = path
        with torch.no_grad(), bank.route(SEGMENTS):
            delta = linear(x) - plain
        assert torch.equal(delta[0:2], torch.zeros_like(delta[0:2])), path  # a
        assert torch.equal(delta[5:6], torch.zeros_like(delta[5:6])), path  # c
        assert delta[2:5].abs().min() > 0 and delta[6:8].abs().min() > 0, path


def test_grouped_mm_takes_a_broadcast_gradient(tiny_base: Path) -> None:
    """`.sum()` sends a stride-0 gradient, which `_grouped_mm`'s backward refuses as it is."""
    bank = bank_with_jobs(tiny_base, torch.float32)
    module = "model.layers.0.self_attn.q_proj"
    linear = bank.base.get_submodule(module)
    a = bank.adapters["b"].modules[module].lora_A
    grads = {}
    for path in ("loop", "grouped_mm"):
        bank.adapter_math = path
        x = torch.randn(8, 5, linear.in_features, generator=torch.Generator().manual_seed(2))
        x.requires_grad_()
        with bank.route(SEGMENTS):
            linear(x).sum().backward()
        grads[path] = {"x": x.grad, "b.A": a.grad}
        a.grad = None
    assert max_relative_difference(grads["loop"], grads["grouped_mm"]) <= 1e-5


def test_one_hashed_mask_for_all_segments_equals_per_segment_masks() -> None:
    """The accelerator's single mask: each segment's rows as `dropout_mask` makes them."""
    a = JobAdapter("a", 4, 8, False, ("q_proj",), dropout=0.3, seed=5)
    b = JobAdapter("b", 4, 8, False, ("q_proj",), dropout=0.6, seed=6)
    segments = [Segment("a", 0, 2, (4, 9)), Segment("x", 2, 3, (0,)), Segment("b", 3, 6, (1, 2, 3))]
    shape = torch.Size([6, 7, 32])
    like = torch.empty(0)
    mask = hashed_segments_mask([(a, 3), None, (b, 3)], segments, shape, like)
    keep_a, keep_b = 1 - a.dropout, 1 - b.dropout
    seeds_a = [dropout_masks.row_seed(a, row, 3) for row in (4, 9)]
    seeds_b = [dropout_masks.row_seed(b, row, 3) for row in (1, 2, 3)]
    expected_a = hashed_keep_mask(seeds_a, torch.Size([2, 7, 32]), keep_a, CPU).float() / keep_a
    expected_b = hashed_keep_mask(seeds_b, torch.Size([3, 7, 32]), keep_b, CPU).float() / keep_b
    assert torch.equal(mask[0:2], expected_a)
    assert torch.equal(mask[2:3], torch.ones(1, 7, 32))
    assert torch.equal(mask[3:6], expected_b)
    assert 0.5 < (mask[3:6] == 0).float().mean() < 0.7  # b's own rate, not a's


def test_cpu_masks_are_the_loops_masks(tiny_base: Path) -> None:
    """Under grouped math on CPU each segment's mask comes from `dropout_mask` itself."""
    bank = bank_with_jobs(tiny_base, torch.float32)
    module = "model.layers.0.self_attn.q_proj"
    linear = bank.base.get_submodule(module)
    x = torch.randn(8, 5, linear.in_features)
    c = bank.adapters["c"]
    w = c.modules[module]
    shape = torch.Size([1, 5, linear.in_features])
    mask = dropout_mask(c, w.module_index, SEGMENTS[2].row_ids, shape, x)
    # Row 5 through c alone, by hand, against the grouped hook's value for that row.
    by_hand = linear(x[5:6]) + ((x[5:6] * mask) @ w.lora_A.T @ w.lora_B.T) * w.scaling
    bank.adapter_math = "bmm"
    with torch.enable_grad(), bank.route(SEGMENTS):
        got = linear(x)[5:6]
    torch.testing.assert_close(got, by_hand)


class CountOps(TorchDispatchMode):
    """Counts the aten operators that compute (not views), forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not any(r.alias_info for r in func._schema.returns):
            self.counts[func.__name__] += 1
        return func(*args, **(kwargs or {}))


def ops_for_jobs(base_path: Path, jobs: int, path: str, vera: bool = False) -> Counter[str]:
    """Operators one hooked module runs, forward and backward, for `jobs` jobs of 2 rows
    (`vera`: every other one a VeRA job)."""
    base = load_base(str(base_path), device=CPU)
    bank = AdapterBank(base, adapter_math=path)
    for i in range(jobs):
        if vera and i % 2:
            bank.add(new_vera_adapter(
                base, f"j{i}", r=4, dropout=0.0, target_modules=("q_proj",), seed=i,
                d_initial=0.1, projection_prng_key=i, save_projection=False,
            ))  # fmt: skip
            continue
        bank.add(new_job_adapter(
            base, f"j{i}", r=4, lora_alpha=8, use_rslora=False, dropout=0.0,
            target_modules=("q_proj",), seed=i,
        ))  # fmt: skip
    linear = base.get_submodule("model.layers.0.self_attn.q_proj")
    x = torch.randn(jobs * 2, 5, linear.in_features, requires_grad=True)
    segments = [Segment(f"j{i}", 2 * i, 2 * i + 2, (0, 1)) for i in range(jobs)]
    with CountOps() as mode, bank.route(segments):
        linear(x).square().sum().backward()
    return mode.counts


@pytest.mark.parametrize("path", GROUPED)
def test_grouped_operation_count_does_not_grow_with_jobs(tiny_base: Path, path: str) -> None:
    loop_2, loop_8 = ops_for_jobs(tiny_base, 2, "loop"), ops_for_jobs(tiny_base, 8, "loop")
    assert loop_8.total() > loop_2.total() + 6 * 6  # the loop: matmuls per job, both ways
    # Measured: 26 (bmm) and 20 (grouped_mm) operators for 2 jobs and for 8 alike.
    assert ops_for_jobs(tiny_base, 8, path) == ops_for_jobs(tiny_base, 2, path)
    # VeRA jobs among them too: their vectors scale rank-r activations and outputs. (Ranks
    # alike: with mixed ranks each job's gradient is copied out, LoRA's as VeRA's.)
    assert ops_for_jobs(tiny_base, 8, path, vera=True) == ops_for_jobs(
        tiny_base, 2, path, vera=True
    )


def test_grouped_mm_falls_back_to_bmm_with_one_warning(
    tiny_base: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(grouped_lora, "_warned", set())
    bank = bank_with_jobs(tiny_base, torch.float64)  # no float64 _grouped_mm kernel
    ids = torch.randint(3, 200, (8, 11), generator=torch.Generator().manual_seed(1))
    loop = forward_backward(bank, "loop", ids)
    with caplog.at_level(logging.WARNING, logger="carpool.adapter_math"):
        got = forward_backward(bank, "grouped_mm", ids)
        forward_backward(bank, "grouped_mm", ids)
    warnings = [r.getMessage() for r in caplog.records if r.name == "carpool.adapter_math"]
    assert len(warnings) == 1 and "falls back to bmm" in warnings[0] and "float64" in warnings[0]
    assert max_relative_difference(loop, got) <= 1e-12


def test_adapter_math_setting_is_checked_and_auto_resolves_per_device(tiny_base: Path) -> None:
    base = load_base(str(tiny_base), device=CPU)
    with pytest.raises(ValueError, match="adapter_math must be one of auto, loop, bmm"):
        AdapterBank(base, adapter_math="grouped")
    assert resolve_adapter_math("auto", "cpu") == "loop"  # see the note in adapter_math
    assert resolve_adapter_math("auto", "cuda") == "bmm"
    assert resolve_adapter_math("grouped_mm", "cpu") == "grouped_mm"


def bank_of_kinds(base_path: Path, dtype: torch.dtype) -> AdapterBank:
    """LoRA, VeRA and AdaLoRA jobs of different ranks and targets, most with dropout,
    every trained tensor random so every gradient is non-zero."""
    base = load_base(str(base_path), device=CPU, dtype=dtype)
    bank = AdapterBank(base)
    bank.add(new_job_adapter(
        base, "lora", r=4, lora_alpha=9, use_rslora=False, dropout=0.3,
        target_modules=("q_proj", "v_proj"), seed=0,
    ))  # fmt: skip
    bank.add(new_job_adapter(
        base, "lora_fa", r=8, lora_alpha=17, use_rslora=True, dropout=0.0,
        target_modules="all-linear", seed=1, freeze_lora_A=True,
    ))  # fmt: skip
    bank.add(new_vera_adapter(
        base, "vera", r=16, dropout=0.2, target_modules=("q_proj", "v_proj", "down_proj"),
        seed=2, d_initial=0.1, projection_prng_key=7, save_projection=False,
    ))  # fmt: skip
    schedule = AdaLoraSchedule(6, 2, 0, 0, 1, 0.85, 0.85, 0.5, 10)
    bank.add(new_adalora_adapter(
        base, "ada", lora_alpha=12, dropout=0.25, target_modules=("q_proj", "k_proj", "up_proj"),
        seed=3, schedule=schedule,
    ))  # fmt: skip
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for adapter in bank.adapters.values():
            for p in adapter.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
        bank.adapters["ada"].modules["model.layers.0.self_attn.q_proj"].lora_E[1] = 0.0  # pruned
    return bank


KINDS_SEGMENTS = [
    Segment("ada", 0, 2, (5, 6), (6, 4)),
    Segment("lora", 2, 3, (0,), (7,)),
    Segment("vera", 3, 6, (1, 2, 9), (3, 7, 5)),
    Segment("lora_fa", 6, 7, (4,), (2,)),
    Segment("vera", 7, 8, (3,), (7,)),
]


def kinds_forward_backward(bank: AdapterBank, path: str, packed: bool) -> dict[str, torch.Tensor]:
    """Logits and the gradients of the input embeddings and of every trained tensor, from
    8 rows of 7 positions, or their real tokens end to end (`packed`)."""
    bank.adapter_math = path
    ids = torch.randint(3, 200, (8, 7), generator=torch.Generator().manual_seed(1))
    if packed:
        ids = torch.cat(
            [ids[s.start + i, :n] for s in KINDS_SEGMENTS for i, n in enumerate(s.lengths)]
        ).view(1, -1)
    embeds = bank.base.get_input_embeddings()(ids).detach().requires_grad_()
    with bank.route(KINDS_SEGMENTS, packed=packed):
        logits = bank.base(inputs_embeds=embeds).logits
    upstream = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
    (logits * upstream).sum().backward()
    out = {"logits": logits.detach(), "x.grad": embeds.grad}
    for adapter in bank.adapters.values():
        for module, w in adapter.modules.items():
            for i, p in enumerate(trained(w)):
                out[f"{adapter.name}.{module}.{i}"] = p.grad.clone()
                p.grad = None
    return out


def trained(w: LoraWeights | VeraWeights | AdaLoraWeights) -> list[torch.nn.Parameter]:
    """The module's trained tensors, whatever its kind (LoRA-FA's frozen A left out)."""
    if isinstance(w, LoraWeights):
        return [p for p in (w.lora_A, w.lora_B, w.magnitude) if p is not None and p.requires_grad]
    return w.parameters()


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(torch.float64, 1e-9), (torch.float32, 1e-5)], ids=["f64", "f32"]
)
def test_lora_vera_and_adalora_group_together_as_the_loop(
    tiny_base: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    packed: bool,
    dtype: torch.dtype,
    tolerance: float,
) -> None:
    """One grouped computation per module covers every kind but DoRA: the same outputs and
    gradients as the loop, dropout included, and no fallback. (float32 is where CPU's
    `_grouped_mm` runs; float64 falls back to bmm, the one warning allowed.)"""
    monkeypatch.setattr(grouped_lora, "_warned", set())
    bank = bank_of_kinds(tiny_base, dtype)
    loop = kinds_forward_backward(bank, "loop", packed)
    assert {k.split(".")[0] for k in loop} >= {"lora", "lora_fa", "vera", "ada"}
    nonzero = [k for k, g in loop.items() if g.abs().max() > 0]
    assert len(nonzero) == len(loop)
    for path in GROUPED:
        with caplog.at_level(logging.WARNING, logger="carpool.adapter_math"):
            got = kinds_forward_backward(bank, path, packed)
        assert max_relative_difference(loop, got) <= tolerance, path
    warnings = [r.getMessage() for r in caplog.records if r.name == "carpool.adapter_math"]
    assert all("falls back to bmm" in w for w in warnings), warnings


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_dora_beside_vera_and_adalora_as_the_loop(
    tiny_base: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    dropout: float,
) -> None:
    """A DoRA job keeps its own path (rescaled grouped terms; with dropout, its segments
    by the loop) while VeRA and AdaLoRA segments group with the rest."""
    monkeypatch.setattr(grouped_lora, "_warned", set())
    bank = bank_of_kinds(tiny_base, torch.float64)
    bank.remove("lora")
    dora = new_job_adapter(
        bank.base, "lora", r=4, lora_alpha=9, use_rslora=False, dropout=dropout,
        target_modules=("q_proj", "v_proj", "up_proj"), seed=9, use_dora=True,
    )  # fmt: skip
    with torch.no_grad():
        for w in dora.modules.values():
            w.lora_B.normal_(0, 0.1, generator=torch.Generator().manual_seed(w.module_index))
    bank.add(dora)
    loop = kinds_forward_backward(bank, "loop", packed=False)
    with caplog.at_level(logging.WARNING, logger="carpool.adapter_math"):
        got = kinds_forward_backward(bank, "bmm", packed=False)
    assert max_relative_difference(loop, got) <= 1e-9
    warnings = [r.getMessage() for r in caplog.records if r.name == "carpool.adapter_math"]
    assert warnings == (
        ["adapter_math bmm: DoRA jobs with lora_dropout go through the loop"] * (dropout > 0)
    )
