"""SoRA jobs: each equals the published algorithm, fused with every other kind.

The reference below is SoRA as the paper states it, written here on a plain HF model: the
gated forward B (g ⊙ A x) alpha/r, the loss plus sparse_lambda · mean|g|, AdamW on A and B,
and on the gates AdamW followed by the proximal soft-threshold by sparse_lambda_2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from carpool.workers.spec.job_spec import AdapterSpec, JobSpec
from carpool.workers.training.engine import Engine
from carpool.workers.variants.sora import SoraWeights, soft_threshold
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from tests.helpers.jobs import changed, job, randomize_b
from tests.helpers.peft_reference import max_relative_difference, pad_rows, save_peft_adapter
from tests.helpers.variants import train_one_way

STEPS = 8
R = 4
XI = 0.02


def sora_job(base: Path, data: Path, name: str = "sora", **adapter: object) -> JobSpec:
    spec = AdapterSpec(
        peft_type="SORA",
        r=R,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        sparse_lambda=1.0,
        sparse_lambda_2=XI,
        sparse_lr=0.05,
        **adapter,
    )
    return job(name, base, data, spec, max_steps=STEPS, batch_size=3, learning_rate=5e-3)


class Reference:
    """One SoRA job alone, one step at a time: hooks on the HF model's targets."""

    def __init__(self, base: Path, config: JobSpec, start: dict, dtype: torch.dtype) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        self.model.requires_grad_(False)
        a, t = config.adapter, config.training
        self.config = config
        self.w = {k: v.detach().clone().to(dtype).requires_grad_(True) for k, v in start.items()}
        scaling = a.lora_alpha / a.r
        for name, module in self.model.named_modules():
            if f"{name}.lora_A" in self.w:

                def add(module, inputs, output, n=name):
                    low = F.linear(inputs[0], self.w[f"{n}.lora_A"]) * self.w[f"{n}.lora_gate"]
                    return output + F.linear(low * scaling, self.w[f"{n}.lora_B"])

                module.register_forward_hook(add)
        self.gates = [v for k, v in self.w.items() if k.endswith("lora_gate")]
        factors = [v for k, v in self.w.items() if not k.endswith("lora_gate")]
        adam = {"betas": (t.adam_beta1, t.adam_beta2), "eps": t.adam_epsilon}
        self.opt = torch.optim.AdamW(
            factors, lr=t.learning_rate, weight_decay=t.weight_decay, **adam
        )
        self.gate_opt = torch.optim.AdamW(self.gates, lr=a.sparse_lr, weight_decay=0.0, **adam)
        assert t.lr_scheduler_type == "constant" and t.warmup_steps == 0 and t.max_grad_norm is None

    def step(self, rows: list, pad_id: int) -> None:
        inputs = pad_rows(rows, pad_id)
        labels = inputs.pop("labels")
        logits = self.model(**inputs).logits  # HF's own loss is float32 whatever the dtype
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        penalty = torch.cat([g.view(-1) for g in self.gates]).abs().mean()
        (loss + self.config.adapter.sparse_lambda * penalty).backward()
        self.opt.step()
        self.gate_opt.step()
        with torch.no_grad():
            xi = self.config.adapter.sparse_lambda_2
            for g in self.gates:
                g.copy_(g.sign() * (g.abs() - xi).clamp(min=0))
        self.opt.zero_grad()
        self.gate_opt.zero_grad()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.w.items()}


@pytest.mark.parametrize(
    ("math", "dtype", "within"),
    [
        ("loop", torch.float64, 1e-9),
        ("bmm", torch.float64, 1e-9),
        ("grouped_mm", torch.float32, 1e-5),  # no float64 _grouped_mm kernel on the CPU
    ],
)
def test_a_sora_job_beside_others_equals_the_published_algorithm_step_by_step(
    math: str, dtype: torch.dtype, within: float, tiny_base: Path, datasets: dict[str, Path]
) -> None:
    """Beside DoRA, DyLoRA, VeRA and AdaLoRA jobs: the adapter within the bar and the same
    gates at exact zero after every step."""
    config = sora_job(tiny_base, datasets["text"])
    engine = Engine(str(tiny_base), device="cpu", dtype=dtype, adapter_math=math)
    job_ = engine.add_job(config)
    start = randomize_b(engine, config.name, seed=0)
    adalora = AdapterSpec(peft_type="ADALORA", init_r=4, target_r=2, total_step=STEPS)
    for other in (
        job("lora", tiny_base, datasets["prompt_completion"], AdapterSpec(r=8, use_dora=True)),
        job("dylora", tiny_base, datasets["text"], AdapterSpec(peft_type="DYLORA", r=2)),
        job("vera", tiny_base, datasets["text"], AdapterSpec(peft_type="VERA", r=8)),
        job("adalora", tiny_base, datasets["prompt_completion"], adalora),
    ):
        engine.add_job(other)
    reference = Reference(tiny_base, config, start, torch.float64)
    pad = engine.tokenizer.pad_token_id
    zeros_seen = 0
    for _ in range(STEPS):
        rows, _ = job_.next_rows()
        engine.train_round()
        reference.step(rows, pad)
        ours, theirs = job_.adapter.named_tensors(), reference.tensors()
        for name in (k for k in ours if k.endswith("lora_gate")):
            assert torch.equal(ours[name] == 0, theirs[name] == 0), name
            zeros_seen += int((ours[name] == 0).sum())
    got = {k: v.double() for k, v in job_.adapter.named_tensors().items()}
    assert max_relative_difference(reference.tensors(), got) <= within
    assert max_relative_difference(start, got) > 1e-3
    assert zeros_seen > 0  # the proximal step did zero some components
    kept = job_.history.entries[-1]["sora_kept_rank"]
    assert 0 < kept < 1


def test_gates_in_xi_to_2xi_shrink_by_xi_and_do_not_vanish(
    tiny_base: Path, datasets: dict[str, Path]
) -> None:
    engine = Engine(str(tiny_base), device="cpu", dtype=torch.float64)
    adapter = engine.add_job(sora_job(tiny_base, datasets["text"])).adapter
    planted = torch.tensor([1.5 * XI, -1.2 * XI, 0.5 * XI, -3 * XI], dtype=torch.float64)
    for w in adapter.modules.values():
        assert isinstance(w, SoraWeights)
        with torch.no_grad():
            w.gate.copy_(planted)
    soft_threshold(adapter, XI)  # the proximal step alone
    for w in adapter.modules.values():
        want = torch.tensor([0.5 * XI, -0.2 * XI, 0.0, -2 * XI], dtype=torch.float64)
        torch.testing.assert_close(w.gate.detach(), want, rtol=0, atol=1e-15)


def test_alone_split_packed_and_resumed_agree(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    config = sora_job(tiny_base, datasets["text"])
    f64 = {"perturb": randomize_b, "dtype": torch.float64, "batch_layout": "padded"}
    alone = train_one_way(tiny_base, config, **f64).tensors
    split = train_one_way(tiny_base, config, micro_batch_tokens=24, **f64)
    resumed = train_one_way(tiny_base, config, resume_after=3, checkpoint=tmp_path / "ckpt", **f64)
    for way, trained in (("split", split), ("resumed", resumed)):
        assert max_relative_difference(alone, trained.tensors) < 1e-9, way
    f32 = {"perturb": randomize_b, "dtype": torch.float32}
    padded = train_one_way(tiny_base, config, batch_layout="padded", **f32).tensors
    packed = train_one_way(tiny_base, config, batch_layout="packed", micro_batch_tokens=40, **f32)
    assert max_relative_difference(padded, packed.tensors) < 1e-5


def test_the_export_keeps_the_live_components_and_loads_in_peft_with_the_same_logits(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    import json

    from peft import PeftModel

    config = sora_job(tiny_base, datasets["text"])
    engine = Engine(str(tiny_base), device="cpu")
    job_ = engine.add_job(config)
    randomize_b(engine, config.name, seed=0)
    while engine.active_jobs():
        engine.train_round()
    kept = {n: int((w.gate != 0).sum()) for n, w in job_.adapter.modules.items()}
    assert min(kept.values()) < R  # some component is gone
    out = engine.export(config.name, tmp_path / "sora")
    assert json.loads((out / "carpool_adapter.json").read_text())["sora_kept_ranks"] == kept
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        ours = engine.logits(config.name, ids)
        base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
        theirs = PeftModel.from_pretrained(base, str(out)).eval()(input_ids=ids).logits
    assert (ours - theirs).abs().max() <= 1e-6 * theirs.abs().max()


def test_every_gate_at_zero_fails_the_job_at_export_naming_sparse_lambda_2(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    """The job fails alone, its last checkpoint kept; the job beside it finishes."""
    from carpool.workers.training.rounds import LocalOutputs, run_round

    engine = Engine(str(tiny_base), device="cpu")
    config = changed(
        sora_job(tiny_base, datasets["text"]),
        adapter={"sparse_lambda_2": 10.0},
        training={"max_steps": 2},
    )
    engine.add_job(config)
    engine.add_job(job("lora", tiny_base, datasets["text"], AdapterSpec(r=2), max_steps=2))
    outputs = LocalOutputs(tmp_path / "adapters", tmp_path / "checkpoints")
    results = [r for _ in range(2) for r in run_round(engine, outputs)]
    last = {r.job: r for r in results}
    assert "sparse_lambda_2" in last["sora"].error and not last["sora"].done
    assert last["sora"].checkpoint is not None and Path(last["sora"].checkpoint).exists()
    assert not (tmp_path / "adapters" / "sora").exists()
    assert last["lora"].done and last["lora"].adapter is not None
    assert not engine.jobs


def test_init_from_a_peft_lora_starts_as_exactly_that_adapter(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    from peft import PeftModel

    lora = {"r": R, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    start = save_peft_adapter(tiny_base, tmp_path / "lora", init_lora_weights=False, **lora)
    config = changed(sora_job(tiny_base, datasets["text"]), adapter={"init_from": start})
    engine = Engine(str(tiny_base), device="cpu")
    adapter = engine.add_job(config).adapter
    assert all(torch.equal(w.gate, torch.ones(R)) for w in adapter.modules.values())
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        ours = engine.logits(config.name, ids)
        base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
        theirs = PeftModel.from_pretrained(base, str(start)).eval()(input_ids=ids).logits
    assert (ours - theirs).abs().max() <= 1e-6 * theirs.abs().max()


def test_a_sora_spec_refuses_options_of_other_kinds() -> None:
    with pytest.raises(ValidationError, match="use_dora is a LORA option"):
        AdapterSpec(peft_type="SORA", use_dora=True)
    with pytest.raises(ValidationError, match="sparse_lambda is a SORA option"):
        AdapterSpec(sparse_lambda=1.0)
    assert AdapterSpec(peft_type="SORA").variant == "sora"


@pytest.mark.integration  # two processes
def test_two_ranks_equal_one(tiny_base: Path, datasets: dict[str, Path], tmp_path: Path) -> None:
    """The gates' gradients are reduced with the rest; the penalty is added once, after."""
    from tests.helpers.two_ranks import train_on_one_rank, train_on_two_ranks

    configs = [
        sora_job(tiny_base, datasets["text"]),
        job("lora", tiny_base, datasets["prompt_completion"], AdapterSpec(r=2)),
    ]
    one = train_on_one_rank(tiny_base, configs)
    for rank in train_on_two_ranks(tiny_base, configs, tmp_path):
        for name in one:
            assert max_relative_difference(one[name], rank[name]) < 1e-9, name
