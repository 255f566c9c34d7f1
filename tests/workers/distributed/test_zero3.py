"""ZeRO-3: the base partitioned across two ranks (gloo, CPU) trains what a replicated base trains.

Runs in float32, the widest dtype `deepspeed.zero.Init` takes. Forwards match
bit for bit (the gathered weights are the checkpoint's); gradients match to
rounding, since DeepSpeed's backward hooks add autograd nodes that change the
order in which a tensor's gradient contributions are summed. After AdamW that
rounding stays under the usual 1e-4, as does splitting steps over ranks.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import carpool.workers.training.engine as engine_module
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from carpool.orchestrator.runtime.local_ray import free_port
from carpool.workers.distributed.data_parallel import DataParallel
from carpool.workers.distributed.zero3 import (
    base_parameter_bytes,
    choose_zero_stage,
    deepspeed_zero3_config,
    parameter_bytes_on_this_rank,
)
from carpool.workers.spec.job_spec import AdapterSpec, DatasetSpec, JobSpec, TrainingSpec
from carpool.workers.spec.objective import DpoObjective, KtoObjective
from carpool.workers.training.engine import Engine
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.helpers.jobs import changed, group_jobs, step_losses
from tests.helpers.peft_reference import max_relative_difference
from tests.helpers.round_driver import KeepFinished

# Small enough that the ranks' shares split into different numbers of micro-batches.
MICRO_BATCH_TOKENS = 48
# Keep nothing gathered between uses: DeepSpeed would otherwise keep every
# parameter of this tiny base (all under 1e5 elements) whole on every rank.
ZERO_OPTIONS = {"stage3_param_persistence_threshold": 0}


def zero3_jobs(base: Path, datasets: dict[str, Path]) -> list[JobSpec]:
    """test_data_parallel's jobs, plus one that outlives them with one row per step.

    In its last rounds it is the only job: rank 1 has no rows at all and must
    still run a (dummy) forward/backward for rank 0's gathers to complete.

    LoRA-FA targets v_proj and down_proj here instead of q_proj and down_proj:
    with a frozen A, layer 0's q_proj B gets gradients so small that AdamW turns
    float32 rounding into 7e-4 of the weights (float32 vs float64, one rank), so
    no float32 run can be held to 1e-4 on it. On these targets that gap is 2e-6.
    """
    jobs = [
        changed(c, adapter={"target_modules": ["v_proj", "down_proj"]}) if c.name == "lorafa" else c
        for c in group_jobs(base, datasets)
    ]
    solo = JobSpec(
        name="solo",
        base_model=str(base),
        dataset=DatasetSpec(path=datasets["text"]),
        adapter=AdapterSpec(r=2, target_modules=["v_proj", "up_proj"]),
        training=TrainingSpec(learning_rate=1e-2, max_steps=8, batch_size=1, seed=3),
    )
    # A DPO job: every rank runs the base-only reference forward of each micro-batch,
    # over a filler row where it holds no pair of its own (its gathers are collectives).
    dpo = changed(
        JobSpec(
            name="dpo",
            base_model=str(base),
            dataset=DatasetSpec(path=datasets["preference"]),
            adapter=AdapterSpec(r=4, target_modules=["q_proj", "v_proj"]),
            training=TrainingSpec(learning_rate=1e-2, max_steps=3, batch_size=3, seed=4),
        ),
        objective=DpoObjective(type="dpo", beta=0.3),
    )
    # Its references precomputed: every rank runs the same pass over the whole dataset.
    kept = changed(
        dpo,
        name="dpo-kept",
        objective=DpoObjective(type="dpo", beta=0.5, precompute_ref_log_probs=True),
    )
    # A KTO job: its KL rows' no-grad passes are collectives too, before each round's.
    kto = changed(
        dpo,
        name="kto",
        dataset=DatasetSpec(path=datasets["unpaired"]),
        objective=KtoObjective(type="kto", beta=0.5),
    )
    return [*jobs, solo, dpo, kept, kto]


def mixed_target_jobs(base: Path, datasets: dict[str, Path]) -> list[JobSpec]:
    """Rank 1 gets rows of the MLP-only job alone (every job's first row goes to rank 0).

    Without gradients forced through the whole base, rank 1's backward would
    skip layer 0's attention while rank 0's gathers its weights: a hang.
    """

    def job(name: str, targets: list[str], batch_size: int) -> JobSpec:
        return JobSpec(
            name=name,
            base_model=str(base),
            dataset=DatasetSpec(path=datasets["prompt_completion"]),
            adapter=AdapterSpec(r=2, target_modules=targets),
            training=TrainingSpec(learning_rate=1e-2, max_steps=2, batch_size=batch_size),
        )

    return [job("attention", ["q_proj"], 1), job("mlp", ["down_proj"], 2)]


def _train(engine: Engine, configs: list[JobSpec]) -> dict:
    for config in configs:
        engine.add_job(config)
    losses, finished = [], KeepFinished()
    while engine.active_jobs():
        losses.append(step_losses(engine, finished))
    return {
        "adapters": {n: j.adapter.named_tensors() for n, j in finished.jobs.items()},
        "losses": losses,
    }


def _rank(rank: int, world: int, port: int, base: Path, datasets: dict, out: Path) -> None:
    # A short timeout: a rank that skips a gather makes the others fail, not hang.
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    # Record each round's micro-batch counts before and after the ZeRO-3 padding.
    padding: list[tuple[int, int]] = []
    pad = engine_module.pad_micro_batches

    def spy(micro_batches, dp, filler):
        padded = pad(micro_batches, dp, filler)
        padding.append((len(micro_batches), len(padded)))
        return padded

    engine_module.pad_micro_batches = spy
    try:
        configs = zero3_jobs(base, datasets)
        kwargs = {"device": "cpu", "dtype": torch.float32, "micro_batch_tokens": MICRO_BATCH_TOKENS}
        # Replicated first: once a ZeRO-3 base is loaded, transformers builds every
        # later model of this process inside zero.Init.
        replicated = Engine(str(base), data_parallel=DataParallel(), **kwargs)
        result = {"replicated": _train(replicated, configs)}

        dp = DataParallel()
        engine = Engine(
            str(base), data_parallel=dp, zero_stage=3, zero_options=ZERO_OPTIONS, **kwargs
        )
        result["bytes_loaded"] = parameter_bytes_on_this_rank(engine.base)
        result["zero3"] = _train(engine, configs)
        result["bytes_trained"] = parameter_bytes_on_this_rank(engine.base)
        result["bytes_total"] = sum(p.ds_numel * p.element_size() for p in engine.base.parameters())
        result["padding"] = padding
        result["collective_kinds"] = sorted(dp.collective_bytes)

        offloaded = Engine(
            str(base),
            device="cpu",
            dtype=torch.float32,
            data_parallel=DataParallel(),
            zero_stage=3,
            offload_params=True,
            gradient_checkpointing=True,  # its reruns gather the partitions again
        )
        result["mixed"] = _train(offloaded, mixed_target_jobs(base, datasets))
        # Plain base forwards (no adapter routed) agree: replicated, partitioned, offloaded.
        ids = torch.arange(3, 19).view(2, 8)
        with torch.no_grad():
            result["logits"] = [
                e.base(input_ids=ids, use_cache=False).logits
                for e in (replicated, engine, offloaded)
            ]

        import deepspeed

        # A collective: every rank gathers, rank 0 keeps a copy.
        with deepspeed.zero.GatheredParameters(list(engine.base.parameters())):
            result["weights"] = {
                n: p.detach().clone() for n, p in engine.base.named_parameters() if rank == 0
            }
        torch.save(result, out / f"rank{rank}.pt")
    finally:
        engine_module.pad_micro_batches = pad
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def zero3_run(tiny_base: Path, datasets: dict[str, Path], tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("zero3")
    mp.spawn(_rank, args=(2, free_port(), tiny_base, datasets, out), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.integration
def test_zero3_trains_what_a_replicated_base_trains(
    zero3_run: list[dict], tiny_base: Path, datasets: dict[str, Path]
) -> None:
    configs = zero3_jobs(tiny_base, datasets)
    single = Engine(
        str(tiny_base), device="cpu", dtype=torch.float32, micro_batch_tokens=MICRO_BATCH_TOKENS
    )
    alone = _train(single, configs)
    for config in configs:
        name = config.name
        zero3 = zero3_run[0]["zero3"]["adapters"][name]
        assert max_relative_difference(zero3_run[0]["replicated"]["adapters"][name], zero3) <= 1e-4
        assert max_relative_difference(alone["adapters"][name], zero3) <= 1e-4, name
        for key, tensor in zero3.items():  # replicas stay identical
            assert torch.equal(tensor, zero3_run[1]["zero3"]["adapters"][name][key]), key
    # The rows of every job were trained: the adapters moved off their start.
    start = Engine(str(tiny_base), device="cpu", dtype=torch.float32)
    for config in configs:
        init = start._initial_adapter(config).named_tensors()
        assert max_relative_difference(init, zero3_run[0]["zero3"]["adapters"][config.name]) > 1e-3
    for got, want in zip(zero3_run[0]["zero3"]["losses"], alone["losses"], strict=True):
        assert got.keys() == want.keys()
        assert all(abs(got[k] - want[k]) <= 1e-4 * max(1.0, abs(want[k])) for k in want)

    # Both ranks ran the same number of passes every round; rank 1 had rounds with
    # no rows (solo's last steps) and rounds with fewer micro-batches than rank 0.
    pads = [run["padding"] for run in zero3_run]
    assert [after for _, after in pads[0]] == [after for _, after in pads[1]]
    assert any(before == 0 and after > 0 for before, after in pads[1])
    assert any(0 < before < after for p in pads for before, after in p)
    assert zero3_run[0]["collective_kinds"] == [
        "adapter_gradients",
        "losses",
        "micro_batch_count",
    ]

    # Jobs whose adapters sit on different modules, one of them alone on a rank,
    # with the partitions offloaded to the host.
    mixed = mixed_target_jobs(tiny_base, datasets)
    alone_mixed = _train(Engine(str(tiny_base), device="cpu", dtype=torch.float32), mixed)
    for config in mixed:
        want = alone_mixed["adapters"][config.name]
        assert max_relative_difference(want, zero3_run[0]["mixed"]["adapters"][config.name]) <= 1e-4

    replicated, partitioned, offloaded = zero3_run[0]["logits"]
    assert torch.equal(replicated, partitioned)
    assert torch.equal(replicated, offloaded)


@pytest.mark.integration
def test_each_rank_holds_half_the_base(zero3_run: list[dict]) -> None:
    total = zero3_run[0]["bytes_total"]
    for run in zero3_run:
        assert run["bytes_total"] == total
        for held in (run["bytes_loaded"], run["bytes_trained"]):
            assert abs(held - total / 2) <= 0.1 * total / 2, (held, total)


@pytest.mark.integration
def test_base_weights_unchanged(zero3_run: list[dict], tiny_base: Path) -> None:
    saved = load_file(tiny_base / "model.safetensors")
    weights = zero3_run[0]["weights"]
    assert set(weights) == set(saved)
    for name, tensor in saved.items():
        assert torch.equal(weights[name], tensor.to(weights[name].dtype)), name


def test_choose_zero_stage() -> None:
    gib = 2**30
    assert choose_zero_stage(16 * gib, 80 * gib) == 0  # an 8B model in bf16 on an 80 GiB GPU
    assert choose_zero_stage(140 * gib, 80 * gib) == 3  # 70B: it must be partitioned
    assert choose_zero_stage(48 * gib, 80 * gib) == 0  # exactly at the 60% headroom
    assert choose_zero_stage(48 * gib + 1, 80 * gib) == 3
    assert choose_zero_stage(30 * gib, 80 * gib, headroom=0.3) == 3
    assert choose_zero_stage(0, 1) == 0
    for bad in [(-1, gib), (gib, 0)]:
        with pytest.raises(ValueError):
            choose_zero_stage(*bad)
    with pytest.raises(ValueError, match="headroom"):
        choose_zero_stage(gib, gib, headroom=0.0)


def test_base_parameter_bytes_from_config_alone(tiny_base: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    loaded = parameter_bytes_on_this_rank(model)  # no ZeRO-3 here: every parameter whole
    assert loaded == sum(p.numel() * 4 for p in model.parameters())
    assert base_parameter_bytes(str(tiny_base), dtype=torch.float32) == loaded
    assert base_parameter_bytes(str(tiny_base), dtype=torch.bfloat16) == loaded // 2


def test_deepspeed_config() -> None:
    config = deepspeed_zero3_config(torch.bfloat16, offload_params=True, zero_options=ZERO_OPTIONS)
    assert config["zero_optimization"] == {
        "stage": 3,
        "offload_param": {"device": "cpu"},
        "stage3_param_persistence_threshold": 0,
    }
    assert config["bf16"]["enabled"] and config["train_micro_batch_size_per_gpu"] == 1
    plain = deepspeed_zero3_config(torch.float32)
    assert plain["zero_optimization"] == {"stage": 3} and not plain["bf16"]["enabled"]
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        deepspeed_zero3_config(torch.float64)


def test_zero3_needs_a_group() -> None:
    with pytest.raises(ValueError, match="data_parallel"):
        Engine("unused", zero_stage=3)
    with pytest.raises(ValueError, match="zero_stage"):
        Engine("unused", zero_stage=2)
