"""`carpool train` end to end, and the demo's shipped specs."""

from __future__ import annotations

from pathlib import Path

import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from orchestrator.cli import main
from orchestrator.demo import prepare
from orchestrator.validation import validate_files


def write_spec(path: Path, **fields) -> Path:
    path.write_text(yaml.safe_dump(fields))
    return path


def spec_fields(name: str, base: Path, data: Path, **training) -> dict:
    return {
        "name": name,
        "base_model": str(base),
        "dataset": {"path": str(data)},
        "adapter": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
        "training": {"max_steps": 3, "batch_size": 4, "learning_rate": 1e-2, **training},
    }


def test_train_writes_a_peft_adapter_per_job(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    a = write_spec(tmp_path / "a.yaml", **spec_fields("job-a", tiny_base, datasets["text"]))
    b = write_spec(
        tmp_path / "b.yaml",
        **spec_fields("job-b", tiny_base, datasets["messages"], save_steps=2),
    )
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    assert main(["train", str(a), str(b), "--out", str(out), "--checkpoint-dir", str(ckpt)]) == 0
    for name in ("job-a", "job-b"):
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_base), out / name
        )
        assert any("lora_A" in n for n, _ in model.named_parameters())
    assert sorted(p.name for p in (ckpt / "job-b").iterdir()) == ["step-00000002", "step-00000003"]

    # A rerun resumes finished jobs from their checkpoints and trains nothing more.
    before = (out / "job-b" / "adapter_model.safetensors").read_bytes()
    assert main(["train", str(b), "--out", str(out), "--checkpoint-dir", str(ckpt)]) == 0
    assert (out / "job-b" / "adapter_model.safetensors").read_bytes() == before


def test_train_refuses_bad_specs_before_any_work(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path, capsys
) -> None:
    good = write_spec(tmp_path / "good.yaml", **spec_fields("good", tiny_base, datasets["text"]))
    fields = spec_fields("bad", tiny_base, datasets["text"])
    fields["adapter"]["r"] = 0
    fields["training"]["learning_rate"] = -1
    bad = write_spec(tmp_path / "bad.yaml", **fields)
    out = tmp_path / "out"
    assert main(["train", str(good), str(bad), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "adapter.r" in err and "training.learning_rate" in err
    assert "Traceback" not in err
    assert not out.exists()  # nothing trained, not even the good job


def test_demo_specs_are_valid(tmp_path: Path) -> None:
    specs = prepare(tmp_path / "demo")
    jobs = validate_files(specs)
    assert [j.name for j in jobs] == ["demo-shout", "demo-reverse", "demo-polite"]
    assert len({j.adapter.r for j in jobs}) == 3
