"""Every model family the suite covers trains to PEFT's result, packed where it can be.

Each family is a tiny random base of its real shape (fused `qkv_proj` for
Phi-3, Conv1D `c_attn` for GPT-2, soft-capped attention for Gemma-2, ...)
with a byte-level BPE tokenizer, loaded through the same from_pretrained path
a hub id takes.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from carpool.orchestrator.spec_check.validation import check_spec
from carpool.workers.base.base_facts import read_base_facts
from carpool.workers.base.base_model import linear_module_shapes, load_tokenizer
from carpool.workers.base.tiny_base import FAMILIES, build_tiny_base, family_config
from carpool.workers.data.dataset import load_dataset
from carpool.workers.data.row_attention import packed_unsupported
from carpool.workers.peft_files.peft_format import CONFIG_FILE
from carpool.workers.spec.job_spec import AdapterSpec, JobSpec
from carpool.workers.training.engine import Engine
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM

from tests.helpers.jobs import changed, job, randomize_b
from tests.helpers.peft_reference import (
    max_relative_difference,
    save_peft_adapter,
    train_reference,
)
from tests.helpers.round_driver import train_to_end

STEPS = 3
# The attention projections a family names; the other job takes `all-linear`.
ATTENTION_TARGETS = {"phi3": ["qkv_proj"], "gpt2": ["c_attn"]}
# Gemma-2 soft-caps attention logits and has sliding-window layers: rows stay padded.
PADDED_ONLY = {"gemma2"}


def tiny_family_base(family: str, root: Path) -> Path:
    return build_tiny_base(
        root / f"tiny-{family}", family=family, hidden_size=32, intermediate_size=64
    )


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("families")


def family_jobs(family: str, base: Path, datasets: dict[str, Path]) -> list[JobSpec]:
    attention = ATTENTION_TARGETS.get(family, ["q_proj", "v_proj"])
    return [
        job("all", base, datasets["prompt_completion"],
            AdapterSpec(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True),
            batch_size=3, max_steps=STEPS, learning_rate=1e-2, max_grad_norm=0.5),
        job("attn", base, datasets["text"],
            AdapterSpec(r=2, lora_alpha=4, target_modules=attention),
            batch_size=4, max_steps=STEPS, learning_rate=2e-2, lr_scheduler_type="linear",
            warmup_steps=1),
    ]  # fmt: skip


def train(base: Path, configs: list[JobSpec], layout: str) -> tuple[Engine, dict, dict]:
    """Both jobs fused in one engine; (engine, finished jobs, starting adapters)."""
    engine = Engine(str(base), device="cpu", batch_layout=layout)
    starts = {}
    for i, config in enumerate(configs):
        engine.add_job(config)
        starts[config.name] = randomize_b(engine, config.name, seed=i)
    return engine, train_to_end(engine), starts


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_jobs_match_peft(family: str, bases: Path, datasets: dict[str, Path]) -> None:
    base = tiny_family_base(family, bases)
    configs = family_jobs(family, base, datasets)
    engine, finished, starts = train(base, configs, "auto")
    assert engine.packed == (family not in PADDED_ONLY)
    # A tokenizer rebuilt wrongly maps every row to one repeated id: the rows must vary.
    for row in finished["attn"].dataset.rows[:3]:
        assert len(set(row.input_ids)) >= 4, row.input_ids
    padded = train(base, configs, "padded")[1] if engine.packed else finished
    for config in configs:
        got = finished[config.name].adapter.named_tensors()
        rows = list(finished[config.name].dataset.rows)
        pad_id = engine.tokenizer.pad_token_id
        expected = train_reference(base, config, rows, starts[config.name], STEPS, pad_id)
        difference = max_relative_difference(expected, got)
        print(f"{family} {config.name} packed={engine.packed} vs PEFT: {difference:.2e}")
        assert difference <= 1e-4, config.name
        assert max_relative_difference(starts[config.name], got) > 1e-3, config.name
        if engine.packed:
            layout_gap = max_relative_difference(padded[config.name].adapter.named_tensors(), got)
            print(f"{family} {config.name} packed vs padded: {layout_gap:.2e}")
            # float32 runs in two op orders: the invariant's bar (measured up to 8e-5 after
            # 3 steps on an AVX2 machine; packed == padded to 1e-9 in float64 elsewhere).
            assert layout_gap <= 1e-4, config.name


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_base_facts_are_what_the_base_gives(
    family: str, bases: Path, datasets: dict[str, Path]
) -> None:
    """Validation keeps a base's linear shapes and tokenizer class (`base_facts`); read back,
    they give what the model class and AutoTokenizer give, row for row."""
    base = tiny_family_base(family, bases)
    check_spec(family_jobs(family, base, datasets)[0], f"{family}-job.yaml")
    kept = read_base_facts(str(base))
    assert kept is not None
    assert kept.linear_shapes == linear_module_shapes(str(base))
    by_class = load_tokenizer(str(base), class_name=kept.tokenizer_class)
    by_auto = load_tokenizer(str(base))
    assert type(by_class) is type(by_auto)
    assert by_class.special_tokens_map == by_auto.special_tokens_map
    assert by_class.pad_token_id == by_auto.pad_token_id
    for data in datasets.values():
        rows = [load_dataset(data, "auto", tokenizer, 24).rows for tokenizer in (by_class, by_auto)]
        assert rows[0] == rows[1], data.name


def test_validation_takes_conv1d_targets(bases: Path, datasets: dict[str, Path]) -> None:
    """GPT-2's attention is one Conv1D, `c_attn`: a spec may name it."""
    base = tiny_family_base("gpt2", bases)
    assert check_spec(family_jobs("gpt2", base, datasets)[1], "gpt2-job.yaml") == []
    wrong = changed(family_jobs("gpt2", base, datasets)[1], adapter={"target_modules": ["q_proj"]})
    [problem] = check_spec(wrong, "gpt2-job.yaml")
    assert "c_attn, c_fc, c_proj" in problem.message


def test_gpt2_adapter_exports_for_peft_and_starts_a_job(
    bases: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    """Conv1D targets: exported with fan_in_fan_out, loaded by PEFT, and `init_from` works
    for carpool's export and PEFT's own save alike."""
    base = tiny_family_base("gpt2", bases)
    config = family_jobs("gpt2", base, datasets)[0]
    engine = Engine(str(base), device="cpu")
    engine.add_job(config)
    randomize_b(engine, config.name, seed=3)
    out = engine.export(config.name, tmp_path / "exported")
    assert json.loads((out / CONFIG_FILE).read_text())["fan_in_fan_out"] is True

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft = PeftModel.from_pretrained(model, str(out)).eval()
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    ids = torch.tensor([[1, 40, 41, 300, 7, 99, 12]])
    with torch.no_grad():
        assert torch.allclose(
            peft(input_ids=ids).logits, engine.logits(config.name, ids), atol=1e-5
        )

    peft_saved = save_peft_adapter(base, tmp_path / "peft", r=2, target_modules=["c_attn"])
    for name, source in [("from-export", out), ("from-peft", peft_saved)]:
        cont = changed(config, name=name, adapter={"init_from": source})
        started = engine.add_job(cont).adapter
        assert started.fan_in_fan_out
        if source == out:
            expected = engine.jobs[config.name].adapter.named_tensors()
            assert max_relative_difference(expected, started.named_tensors()) == 0.0
        else:
            assert {m.rsplit(".", 1)[-1] for m in started.modules} == {"c_attn"}


def test_a_window_packs_only_where_the_model_never_applies_it() -> None:
    """Qwen2/Qwen3 configs may carry `sliding_window` with `use_sliding_window: false`."""
    sizes = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    for family in ("qwen2", "qwen3"):
        config = AutoConfig.for_model(**family_config(family, **sizes), vocab_size=64)
        model = AutoModelForCausalLM.from_config(config)
        model.config.sliding_window = 4096  # as older transformers keep it when unused
        assert packed_unsupported(model) is None
        model.config.use_sliding_window = True
        assert "sliding_window=4096" in packed_unsupported(model)
    mistral = dict(family_config("mistral", **sizes), sliding_window=16)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**mistral, vocab_size=64))
    assert "sliding_window=16" in packed_unsupported(model)
