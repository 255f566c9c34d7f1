"""DyLoRA jobs: each equals the published algorithm, fused with every other kind.

The reference below is DyLoRA as its official code trains it (`DyLoRA/loralib`), written
here on a plain HF model: each step's rank b, the forward B[:, :b] A[:b] x · alpha/b with
the lower ranks detached in frozen mode, AdamW over the whole tensors. It takes b from
`drawn_rank`, whose own test checks the draw.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from carpool.workers.spec.job_spec import AdapterSpec, JobInputError, JobSpec
from carpool.workers.training.engine import Engine
from carpool.workers.variants.dylora import drawn_rank
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from tests.helpers.jobs import changed, job, randomize_b
from tests.helpers.peft_reference import max_relative_difference, pad_rows, save_peft_adapter
from tests.helpers.round_driver import train_to_end
from tests.helpers.two_ranks import train_on_one_rank, train_on_two_ranks
from tests.helpers.variants import train_one_way

STEPS = 8
R = 4


def dylora_job(base: Path, data: Path, name: str = "dylora", **adapter: object) -> JobSpec:
    spec = AdapterSpec(
        peft_type="DYLORA", r=R, lora_alpha=8, target_modules=["q_proj", "v_proj"], **adapter
    )
    return job(name, base, data, spec, max_steps=STEPS, batch_size=3, learning_rate=5e-3)


def reference(
    base: Path, config: JobSpec, rows: list, start: dict, pad_id: int, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The published algorithm, alone: hooks on the HF model's targets, rows in file order."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    model.requires_grad_(False)
    a_cfg, t = config.adapter, config.training
    weights = {k: v.detach().clone().to(dtype).requires_grad_(True) for k, v in start.items()}
    rank = [R]

    def hook(name: str):
        def add_term(module, inputs, output):
            b = rank[0]
            a, up = weights[f"{name}.lora_A"][:b], weights[f"{name}.lora_B"][:, :b]
            if a_cfg.dylora_frozen and b > 1:
                a = torch.cat([a[: b - 1].detach(), a[b - 1 :]])
                up = torch.cat([up[:, : b - 1].detach(), up[:, b - 1 :]], dim=1)
            # In the bank's order: the base's RMSNorm rounds to float32, so a float64 term
            # summed in another order can move a rounding across its boundary (1e-7).
            term = F.linear(F.linear(inputs[0], a) * (a_cfg.lora_alpha / b), up)
            return output + term

        return add_term

    for name, module in model.named_modules():
        if f"{name}.lora_A" in weights:
            module.register_forward_hook(hook(name))
    assert t.lr_scheduler_type == "constant" and t.warmup_steps == 0
    opt = torch.optim.AdamW(
        list(weights.values()),
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        eps=t.adam_epsilon,
        weight_decay=t.weight_decay,
    )
    for step in range(STEPS):
        rank[0] = drawn_rank(t.seed, step, R)
        batch = [rows[(step * t.batch_size + i) % len(rows)] for i in range(t.batch_size)]
        inputs = pad_rows(batch, pad_id)
        labels = inputs.pop("labels")
        logits = model(**inputs).logits  # HF's own loss is float32 whatever the model's dtype
        torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
        ).backward()
        if t.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(weights.values()), t.max_grad_norm)
        opt.step()  # the job's learning rate is constant
        opt.zero_grad()
    return {k: v.detach() for k, v in weights.items()}


def test_the_draw_is_uniform_over_1_to_r_and_depends_on_seed_and_step_alone() -> None:
    draws = [drawn_rank(7, step, R) for step in range(400)]
    assert draws == [drawn_rank(7, step, R) for step in range(400)]
    assert set(draws) == set(range(1, R + 1))
    assert min(Counter(draws).values()) > 400 / R * 0.7
    assert draws != [drawn_rank(8, step, R) for step in range(400)]


@pytest.mark.parametrize(
    ("math", "dtype", "within"),
    [
        ("loop", torch.float64, 1e-9),
        ("bmm", torch.float64, 1e-9),
        ("grouped_mm", torch.float32, 1e-5),  # no float64 _grouped_mm kernel on the CPU
    ],
)
@pytest.mark.parametrize("frozen", [True, False])
def test_a_dylora_job_beside_others_equals_the_published_algorithm(
    math: str,
    dtype: torch.dtype,
    within: float,
    frozen: bool,
    tiny_base: Path,
    datasets: dict[str, Path],
) -> None:
    config = dylora_job(tiny_base, datasets["text"], dylora_frozen=frozen)
    adalora = AdapterSpec(peft_type="ADALORA", init_r=4, target_r=2, total_step=STEPS)
    others = [
        job("lora", tiny_base, datasets["prompt_completion"], AdapterSpec(r=8)),
        job("dora", tiny_base, datasets["text"], AdapterSpec(r=2, use_dora=True)),
        job("vera", tiny_base, datasets["text"], AdapterSpec(peft_type="VERA", r=8)),
        job("adalora", tiny_base, datasets["prompt_completion"], adalora),
        job("sora", tiny_base, datasets["text"], AdapterSpec(peft_type="SORA", r=2)),
    ]
    engine = Engine(str(tiny_base), device="cpu", dtype=dtype, adapter_math=math)
    engine.add_job(config)
    start = randomize_b(engine, config.name, seed=0)  # B off zero: every rank in play
    for other in others:
        engine.add_job(other)
    finished = train_to_end(engine)
    got = finished[config.name].adapter.named_tensors()
    rows = list(finished[config.name].dataset.rows)
    pad = engine.tokenizer.pad_token_id
    # Against the exact (float64) reference. In float32 the bar is float32's own: in frozen
    # mode AdamW keeps moving rows whose gradients were tiny, and the plain loop in float32
    # is itself off the exact one by 8e-6 on an AVX2 CPU and 2.2e-5 on an AVX512 one, where
    # carpool's float32 run was 2.8e-5 off (6e-6 from the float32 loop).
    want = reference(tiny_base, config, rows, start, pad, torch.float64)
    if dtype == torch.float32:
        plain = reference(tiny_base, config, rows, start, pad, torch.float32)
        noise = max_relative_difference(want, {k: v.double() for k, v in plain.items()})
        assert noise <= 1e-4  # rounding, not a different algorithm
        within = max(within, 2 * noise)
    assert max_relative_difference(want, {k: v.double() for k, v in got.items()}) <= within
    assert max_relative_difference(start, got) > 1e-3
    ranks = [e["dylora_rank"] for e in finished[config.name].history.entries if "loss" in e]
    assert ranks and all(1 <= b <= R for b in ranks)


def test_the_first_step_changes_only_column_b_minus_1_of_b(
    tiny_base: Path, datasets: dict[str, Path]
) -> None:
    """From B = 0 A gets no gradient, and in frozen mode B only in the drawn rank's column."""
    config = dylora_job(tiny_base, datasets["text"])
    engine = Engine(str(tiny_base), device="cpu", dtype=torch.float64)
    job_ = engine.add_job(config)
    start = {k: v.clone() for k, v in job_.adapter.named_tensors().items()}
    b = engine.train_round()[config.name].metrics["dylora_rank"]
    assert b == drawn_rank(config.training.seed, 0, R)
    # Outside the step, evaluation and export see the full rank r.
    assert all(
        w.rank is None and w.factors()[0].shape[0] == R for w in job_.adapter.modules.values()
    )
    for name, now in job_.adapter.named_tensors().items():
        moved = (now != start[name]).any(dim=0 if name.endswith("lora_A") else 0)
        if name.endswith("lora_A"):
            assert torch.equal(now, start[name]), name
        else:
            assert moved.nonzero().flatten().tolist() == [b - 1], name


def test_alone_split_packed_and_resumed_agree(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    config = dylora_job(tiny_base, datasets["text"])
    f64 = {"dtype": torch.float64, "batch_layout": "padded"}
    alone = train_one_way(tiny_base, config, perturb=randomize_b, **f64).tensors
    ways = {
        "split": train_one_way(
            tiny_base, config, perturb=randomize_b, micro_batch_tokens=24, **f64
        ),
        "resumed": train_one_way(
            tiny_base,
            config,
            perturb=randomize_b,
            resume_after=3,
            checkpoint=tmp_path / "ckpt",
            **f64,
        ),
    }
    for way, trained in ways.items():
        assert max_relative_difference(alone, trained.tensors) < 1e-9, way
    f32 = {"perturb": randomize_b, "dtype": torch.float32}
    padded = train_one_way(tiny_base, config, batch_layout="padded", **f32).tensors
    packed = train_one_way(tiny_base, config, batch_layout="packed", micro_batch_tokens=40, **f32)
    assert max_relative_difference(padded, packed.tensors) < 1e-5


def test_init_from_a_peft_lora_of_rank_r_starts_as_that_adapter(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    lora = {"r": R, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    start = save_peft_adapter(tiny_base, tmp_path / "lora", init_lora_weights=False, **lora)
    config = changed(dylora_job(tiny_base, datasets["text"]), adapter={"init_from": start})
    engine = Engine(str(tiny_base), device="cpu")
    adapter = engine.add_job(config).adapter
    with torch.no_grad():  # at full rank it is the PEFT adapter: the same logits
        ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
        ours = engine.logits(config.name, ids)
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    theirs = PeftModel.from_pretrained(base, str(start)).eval()(input_ids=ids).logits
    assert (ours - theirs).abs().max() <= 1e-6 * theirs.abs().max()
    assert adapter.peft_type == "DYLORA" and engine.train_round()[config.name].metrics
    dora = save_peft_adapter(tiny_base, tmp_path / "dora", use_dora=True, **lora)
    refused = changed(config, name="dora", adapter={"init_from": dora})
    with pytest.raises(JobInputError, match="init_from: .*DyLoRA trains plain LoRA modules only"):
        engine.add_job(refused)


@pytest.mark.integration  # two processes
def test_two_ranks_draw_alike_and_equal_one(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    configs = [
        dylora_job(tiny_base, datasets["text"]),
        job("lora", tiny_base, datasets["prompt_completion"], AdapterSpec(r=2)),
    ]
    one = train_on_one_rank(tiny_base, configs)
    for rank in train_on_two_ranks(tiny_base, configs, tmp_path):
        for name in one:
            assert max_relative_difference(one[name], rank[name]) < 1e-9, name


def test_each_exported_rank_loads_in_peft_with_the_trained_models_logits(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    from peft import PeftModel

    config = dylora_job(tiny_base, datasets["text"], export_ranks=[1, 3, R])
    engine = Engine(str(tiny_base), device="cpu")
    engine.add_job(config)
    randomize_b(engine, config.name, seed=0)
    while engine.active_jobs():
        engine.train_round()
    out = engine.export(config.name, tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    adapter = engine.jobs[config.name].adapter
    for b, where in ((R, out), (3, out / "rank-3"), (1, out / "rank-1")):
        for w in adapter.modules.values():
            w.rank = b  # the trained model at rank b
        with torch.no_grad():
            ours = engine.logits(config.name, ids)
        base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
        peft = PeftModel.from_pretrained(base, str(where)).eval()
        assert peft.peft_config["default"].r == b
        with torch.no_grad():
            theirs = peft(input_ids=ids).logits
        assert (ours - theirs).abs().max() <= 1e-6 * theirs.abs().max(), b
    assert not (out / "rank-2").exists()


@pytest.mark.parametrize(
    ("adapter", "message"),
    [
        ({"use_dora": True}, "use_dora is a LORA option; this job's adapter.peft_type is DYLORA"),
        ({"rank_pattern": {"q_proj": 2}}, "rank_pattern is a LORA option"),
        ({"export_ranks": [2, 9]}, "each rank must be in 1..r (r is 4); got [9]"),
        ({"export_ranks": []}, "at least 1 item"),
    ],
)
def test_a_dylora_spec_refuses_what_it_cannot_do(
    adapter: dict, message: str, tiny_base: Path, datasets: dict[str, Path]
) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        dylora_job(tiny_base, datasets["text"], **adapter)
    with pytest.raises(ValidationError, match="dylora_frozen is a DYLORA option"):
        AdapterSpec(dylora_frozen=False)
    assert changed(dylora_job(tiny_base, datasets["text"])).adapter.variant == "dylora"
