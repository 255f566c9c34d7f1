"""QLoRA: jobs on a 4-bit base train as PEFT trains them on that base, end the same
resumed from a checkpoint and split across two ranks, and never share a base with jobs
of another quantization."""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
from carpool.orchestrator.after_training import adapter_args
from carpool.orchestrator.after_training.adapter_args import AdapterArgumentError, base_quantization
from carpool.orchestrator.cli.local_train import group_by_base
from carpool.orchestrator.control.admission import admission_problems
from carpool.orchestrator.control.operator_config import OperatorConfig
from carpool.orchestrator.control.scheduler import (
    AdmitJob,
    Capacity,
    ClusterView,
    JobDemand,
    StartGroup,
    schedule,
)
from carpool.orchestrator.spec_check.validation import check_spec
from carpool.workers.after_training.fused_inference import FusedAdapters
from carpool.workers.base import quantization
from carpool.workers.base.base_fingerprint import PROVENANCE_FILE, read_provenance
from carpool.workers.data.dataset import load_dataset
from carpool.workers.spec.job_spec import AdapterSpec, JobSpec, QuantizationSpec
from carpool.workers.training.engine import Engine
from carpool.workers.training.rounds import export_job
from carpool.workers.training.training_job import TrainingJob
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.helpers.finished_adapters import reference_eval_loss
from tests.helpers.jobs import changed, job, randomize_b
from tests.helpers.peft_reference import (
    four_bit_in_train_mode,
    max_relative_difference,
    norm_relative_difference,
)
from tests.helpers.two_ranks import train_on_one_rank, train_on_two_ranks
from tests.helpers.variants import assert_each_matches_peft, train_fused, train_one_way

# float32 compute keeps the comparison exact on CPU; the 4-bit weights are what is tested.
NF4 = QuantizationSpec(
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype="float32"
)
STEPS = 4


def two_4bit_jobs(base: Path, datasets: dict[str, Path]) -> list[JobSpec]:
    text = job(
        "text",
        base,
        datasets["text"],
        AdapterSpec(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        batch_size=4,
        learning_rate=1e-2,
        max_seq_length=12,
        max_steps=STEPS,
    )
    qa = job(
        "qa",
        base,
        datasets["prompt_completion"],
        AdapterSpec(r=8, lora_alpha=16, target_modules="all-linear"),
        batch_size=3,
        learning_rate=5e-3,
        max_grad_norm=0.5,
        max_seq_length=32,
        max_steps=STEPS,
    )
    return [changed(c, base_quantization=NF4) for c in (text, qa)]


def test_4bit_jobs_fused_match_peft_on_the_same_4bit_base(
    tiny_base: Path, datasets: dict[str, Path]
) -> None:
    pytest.importorskip("bitsandbytes")

    configs = two_4bit_jobs(tiny_base, datasets)
    fused = train_fused(tiny_base, configs, quantization=NF4)
    for config in configs:
        got = fused.finished[config.name].adapter.named_tensors()
        assert all(t.dtype.is_floating_point and t.dtype.itemsize == 4 for t in got.values())
    assert_each_matches_peft(fused, STEPS)


def test_no_4bit_module_can_repack_while_jobs_train_and_evaluate(
    tiny_base: Path, datasets: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """bitsandbytes repacks a 4-bit weight for its CPU inference kernel, for good, on an
    eval-mode forward without grad where the CPU has AVX512-BF16 (carpool's base is always
    in eval mode); PEFT's train-mode loop never does. Every module is built here as on
    such a CPU, whatever this one is: carpool must turn the repack off before training."""
    modules_of_bnb = pytest.importorskip("bitsandbytes.nn.modules")
    monkeypatch.setattr(modules_of_bnb, "has_avx512bf16", lambda: True)
    configs = [
        changed(c, eval_dataset=c.dataset, training={"eval_steps": 1})
        for c in two_4bit_jobs(tiny_base, datasets)
    ]
    engine = Engine(str(tiny_base), device="cpu", quantization=NF4)
    four_bit = [m for m in engine.base.modules() if quantization.is_4bit(m)]
    assert four_bit and not any(m.support_avx512bf16_for_cpu for m in four_bit)
    for config in configs:
        engine.add_job(config)
    engine.train_round()
    engine.evaluate()  # no grad, eval mode: where the repack would happen
    engine.train_round()
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in four_bit)


def test_bf16_compute_4bit_job_matches_peft_on_the_same_4bit_base(
    tiny_base: Path, datasets: dict[str, Path]
) -> None:
    """bf16 compute, the usual QLoRA setting, on a bf16 base: activations round to bf16
    (relative step 2**-8 ~ 4e-3) inside both carpool's and PEFT's forward, in different op
    orders, so their gradients differ by bf16 roundings. Adam's first steps are about
    +-lr per element whatever a gradient's size, so an element whose gradient is within
    that noise of zero may step either way: per element the runs then differ by whole steps
    (how often depends on the CPU's bf16 kernels; measured 5e-3 to 0.16 of the largest
    element on two machines), which says nothing of the match. Per tensor they differ by
    the share of such elements: measured 0.03 of the adapter's norm after 4 steps on an
    AVX2 machine, while training moved it by 0.65; the bar is 0.1, 6x under the movement
    and 3x under what a LoRA term scaled 2x off gives (measured 0.33)."""
    pytest.importorskip("bitsandbytes")
    bf16 = NF4.model_copy(update={"bnb_4bit_compute_dtype": "bfloat16"})
    [config, _] = two_4bit_jobs(tiny_base, datasets)
    config = changed(config, base_quantization=bf16)
    fused = train_fused(tiny_base, [config], dtype=torch.bfloat16, quantization=bf16)
    got = fused.finished[config.name].adapter.named_tensors()
    assert all(t.dtype == torch.float32 for t in got.values())  # as PEFT keeps its adapter
    assert_each_matches_peft(fused, STEPS, within=0.1, moved=0.5, measure=norm_relative_difference)


def test_an_engine_refuses_a_job_of_another_quantization(
    tiny_base: Path, datasets: dict[str, Path]
) -> None:
    full_precision = Engine(str(tiny_base), device="cpu")
    with pytest.raises(
        ValueError, match="base_quantization 4-bit nf4.*this engine's base has none"
    ):
        full_precision.add_job(two_4bit_jobs(tiny_base, datasets)[0])
    assert not full_precision.jobs


def test_4bit_and_full_precision_jobs_of_one_base_never_share_a_group(
    tiny_base: Path, datasets: dict[str, Path]
) -> None:
    four_bit = two_4bit_jobs(tiny_base, datasets)
    plain = [changed(c, name=f"{c.name}-fp", base_quantization=None) for c in four_bit]
    bf16 = changed(
        four_bit[0],
        name="bf16",
        base_quantization=NF4.model_copy(update={"bnb_4bit_compute_dtype": "bfloat16"}),
    )
    groups = group_by_base([four_bit[0], plain[0], four_bit[1], plain[1], bf16])
    assert {k: [c.name for c in v] for k, v in groups.items()} == {
        (str(tiny_base), NF4): ["text", "qa"],
        (str(tiny_base), None): ["text-fp", "qa-fp"],
        (str(tiny_base), bf16.base_quantization): ["bf16"],
    }

    def demand(id: str, seq: int, q: QuantizationSpec | None) -> JobDemand:
        return JobDemand(id, "base", 0, seq, 10, 10, quantization=q)

    queued = [demand("q1", 0, NF4), demand("f1", 1, None), demand("q2", 2, NF4)]
    ids = iter(["g1", "g2"])
    out = schedule(queued, [], ClusterView(2), Capacity(1000, 8, 1000), lambda base: next(ids))
    assert out == [
        StartGroup("g1", "base", NF4),
        AdmitJob("q1", "g1"),
        StartGroup("g2", "base", None),
        AdmitJob("f1", "g2"),
        AdmitJob("q2", "g1"),
    ]


def raw_spec(base: Path, data: Path, quantization: object) -> dict:
    return {
        "name": "q",
        "base_model": str(base),
        "dataset": {"path": str(data)},
        "training": {"max_steps": 1},
        "base_quantization": quantization,
    }


def test_validation_names_the_quantization_field(
    tiny_base: Path, datasets: dict[str, Path]
) -> None:
    bad = {
        "load_in_4bit": False,
        "bnb_4bit_quant_type": "int3",
        "bnb_4bit_compute_dtype": "float64",
        "bnb_4bit_use_double_qant": True,
    }
    problems = check_spec(raw_spec(tiny_base, datasets["text"], bad), "q.yaml")
    assert sorted(p.field for p in problems) == [
        f"base_quantization.{name}"
        for name in (
            "bnb_4bit_compute_dtype",
            "bnb_4bit_quant_type",
            "bnb_4bit_use_double_qant",
            "load_in_4bit",
        )
    ]
    good = {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}
    assert check_spec(raw_spec(tiny_base, datasets["text"], good), "q.yaml") == []


def test_a_missing_bitsandbytes_is_named_by_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quantization.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(quantization.QuantizationUnavailableError, match="base_quantization"):
        quantization.bitsandbytes_config(NF4)


def test_zero3_refuses_a_4bit_base(tiny_base: Path, datasets: dict[str, Path]) -> None:
    config = two_4bit_jobs(tiny_base, datasets)[0]
    problems = admission_problems(config, OperatorConfig(zero_stage=3), "q.yaml")
    assert [p.field for p in problems] == ["base_quantization"]
    assert "ZeRO-3" in problems[0].message
    assert admission_problems(config, OperatorConfig(zero_stage=0), "q.yaml") == []
    with pytest.raises(ValueError, match="base_quantization cannot run with zero_stage=3"):
        Engine(str(tiny_base), device="cpu", zero_stage=3, quantization=NF4, data_parallel=None)


def test_a_4bit_job_resumed_from_a_checkpoint_ends_as_the_straight_run(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    pytest.importorskip("bitsandbytes")

    config = changed(two_4bit_jobs(tiny_base, datasets)[1], adapter=dict(lora_dropout=0.1))

    def check_resumed(job: TrainingJob) -> None:
        assert job.step == 2

    train = partial(
        train_one_way,
        tiny_base,
        config,
        perturb=randomize_b,
        checkpoint=tmp_path / "ckpt",
        check_resumed=check_resumed,
        quantization=NF4,
    )
    straight = train()
    assert max_relative_difference(straight.start, straight.tensors) > 1e-3
    assert max_relative_difference(straight.tensors, train(resume_after=2).tensors) <= 1e-6


@pytest.mark.integration
def test_4bit_two_ranks_equal_one(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    """Each rank quantizes the same base to the same 4-bit weights. bitsandbytes quantizes
    only 16/32-bit floats, so this runs in float32, not float64 as the other two-rank
    tests: the split's other summation order then moves these jobs by about 1e-6 (and by
    1e-5 on the same base unquantized), so the bar is 1e-5, not float64's 1e-9."""
    pytest.importorskip("bitsandbytes")

    configs = [
        changed(c, training=dict(max_steps=3, batch_size=5))
        for c in two_4bit_jobs(tiny_base, datasets)
    ]
    configs[1] = changed(configs[1], adapter=dict(lora_dropout=0.1))
    prepare = partial(randomize_b, name="qa", seed=0)
    kwargs = dict(dtype=torch.float32, quantization=NF4)
    ranks = [r["qa"] for r in train_on_two_ranks(tiny_base, configs, tmp_path, prepare, **kwargs)]
    expected = train_on_one_rank(tiny_base, configs, prepare, **kwargs)["qa"]
    assert max_relative_difference(expected, ranks[0]) <= 1e-5
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in expected)


def test_a_4bit_adapter_is_evaluated_on_the_4bit_base_it_was_trained_on(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    """The exported record names the base's 4-bit loading; `eval` (base_quantization
    auto) loads the base so, and its loss equals PEFT's on the same 4-bit base, computed
    on the kernel PEFT trains with (`carpool eval` keeps to it). PEFT's own eval mode on a
    CPU with AVX512-BF16 switches to bitsandbytes' bf16 inference kernel instead: measured
    1.6e-5 relative off on such a CPU, over this bar."""
    pytest.importorskip("bitsandbytes")
    [config, _] = two_4bit_jobs(tiny_base, datasets)
    fused = train_fused(tiny_base, [config], quantization=NF4)
    adapter = export_job(fused.finished[config.name], tmp_path / "text")
    assert read_provenance(adapter)["base_quantization"] == NF4.model_dump(mode="json")
    adapters = {"text": adapter}
    assert base_quantization(adapters, "auto") == NF4

    four_bit = FusedAdapters(str(tiny_base), adapters, quantization=NF4)
    data = load_dataset(datasets["text"], "auto", four_bit.tokenizer, 12)
    [result] = four_bit.evaluate(data)
    base = AutoModelForCausalLM.from_pretrained(
        tiny_base,
        dtype=torch.float32,
        quantization_config=quantization.bitsandbytes_config(NF4),
        device_map={"": "cpu"},
    )
    peft_model = four_bit_in_train_mode(PeftModel.from_pretrained(base, adapter).eval())
    loss, count = reference_eval_loss(peft_model, data)
    assert result.tokens == count
    assert abs(result.loss - loss) <= 1e-5 * loss
    # The loading matters: on the full-precision base the same adapter scores otherwise
    # (measured 8e-4 relative on this tiny base, 80x the match's bar).
    [full] = FusedAdapters(str(tiny_base), adapters).evaluate(data)
    assert abs(full.loss - loss) > 2e-4 * loss

    # Adapters of a 4-bit and a full-precision base together: the user chooses.
    plain = tmp_path / "plain"
    shutil.copytree(adapter, plain)
    record = read_provenance(plain)
    del record["base_quantization"]
    (plain / PROVENANCE_FILE).write_text(json.dumps(record))
    both = {"text": adapter, "plain": plain}
    with pytest.raises(AdapterArgumentError, match="text: 4-bit nf4; plain: full precision"):
        base_quantization(both, "auto")
    assert base_quantization(both, "none") is None
    assert base_quantization(both, "fp4").bnb_4bit_quant_type == "fp4"


def test_a_4bit_base_without_bitsandbytes_is_refused_before_any_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(adapter_args.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(AdapterArgumentError, match="needs bitsandbytes.*--base-quantization none"):
        base_quantization({}, "nf4")
    assert base_quantization({}, "none") is None
    assert base_quantization({}, "auto") is None  # no adapter asks for 4 bits
