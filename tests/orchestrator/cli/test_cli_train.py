"""`carpool train` end to end, and the demo's shipped specs."""

from __future__ import annotations

import re
from pathlib import Path

import carpool.workers.losses.position_losses as position_losses_module
import carpool.workers.training.engine as engine_module
import pytest
import torch
import yaml
from carpool.orchestrator.cli.main import main
from carpool.orchestrator.demo.demo_base import Recipe
from carpool.orchestrator.demo.run import prepare
from carpool.orchestrator.spec_check.validation import validate_files
from carpool.workers.peft_files.peft_format import read_adapter
from peft import PeftModel
from transformers import AutoModelForCausalLM, TrainerState

FILES = ("adapter_model.safetensors", "trainer_state.json")


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
    # Beside each adapter its history, as HF's Trainer writes it: the last step is logged.
    state = TrainerState.load_from_json(str(out / "job-b" / "trainer_state.json"))
    assert (state.global_step, [e["step"] for e in state.log_history]) == (3, [3])

    # A rerun resumes finished jobs from their checkpoints and trains nothing more.
    before = {f: (out / "job-b" / f).read_bytes() for f in FILES}
    assert main(["train", str(b), "--out", str(out), "--checkpoint-dir", str(ckpt)]) == 0
    assert {f: (out / "job-b" / f).read_bytes() for f in FILES} == before

    curves = tmp_path / "curves.png"
    assert main(["plot", str(out / "job-a"), str(out / "job-b"), "--out", str(curves)]) == 0
    assert curves.read_bytes().startswith(b"\x89PNG")


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
    specs = prepare(tmp_path / "demo", Recipe(steps=2, batch_size=4))
    jobs = validate_files(specs)
    assert [j.name for j in jobs] == ["demo-shout", "demo-reverse", "demo-polite"]
    assert len({j.adapter.r for j in jobs}) == 3


def test_gradient_checkpointing_flag_gives_the_same_adapter(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    wrapped: list[int] = []
    enable = engine_module.enable_gradient_checkpointing
    monkeypatch.setattr(
        engine_module, "enable_gradient_checkpointing", lambda m: wrapped.append(enable(m))
    )
    spec = write_spec(tmp_path / "a.yaml", **spec_fields("job-a", tiny_base, datasets["text"]))
    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    assert main(["train", str(spec), "--out", str(plain)]) == 0
    assert wrapped == []
    assert main(["train", str(spec), "--out", str(checkpointed), "--gradient-checkpointing"]) == 0
    assert wrapped and wrapped[0] > 0  # the flag reached the engine, which wrapped its layers
    first = read_adapter(plain / "job-a").weights
    second = read_adapter(checkpointed / "job-a").weights
    assert first.keys() == second.keys()
    for module, (a, b) in first.items():
        torch.testing.assert_close(second[module][0], a, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(second[module][1], b, rtol=1e-6, atol=1e-7)


def test_loss_chunk_tokens_flag_gives_the_same_adapter(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path, monkeypatch, capsys
) -> None:
    chunks: list[int] = []
    chunked = position_losses_module.chunked_token_losses
    monkeypatch.setattr(
        position_losses_module,
        "chunked_token_losses",
        lambda hidden, head, targets, n: chunks.append(n) or chunked(hidden, head, targets, n),
    )
    spec = write_spec(tmp_path / "a.yaml", **spec_fields("job-a", tiny_base, datasets["text"]))
    plain, split = tmp_path / "plain", tmp_path / "split"
    assert main(["train", str(spec), "--out", str(plain)]) == 0
    assert main(["train", str(spec), "--out", str(split), "--loss-chunk-tokens", "7"]) == 0
    assert chunks and set(chunks) == {7}  # the flag reached the loss
    first, second = read_adapter(plain / "job-a").weights, read_adapter(split / "job-a").weights
    for module, (a, b) in first.items():
        torch.testing.assert_close(second[module][0], a, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(second[module][1], b, rtol=1e-4, atol=1e-6)
    with pytest.raises(SystemExit):
        main(["train", str(spec), "--out", str(split), "--loss-chunk-tokens", "0"])
    assert "--loss-chunk-tokens: must be at least 1" in capsys.readouterr().err


def test_adapter_math_flag_reaches_the_bank_and_gives_the_same_adapter(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path, monkeypatch, capsys
) -> None:
    chosen: list[str] = []
    bank = engine_module.AdapterBank
    monkeypatch.setattr(
        engine_module,
        "AdapterBank",
        lambda base, adapter_math: chosen.append(adapter_math) or bank(base, adapter_math),
    )
    spec = write_spec(tmp_path / "a.yaml", **spec_fields("job-a", tiny_base, datasets["text"]))
    plain, grouped = tmp_path / "plain", tmp_path / "grouped"
    assert main(["train", str(spec), "--out", str(plain), "--adapter-math", "loop"]) == 0
    assert main(["train", str(spec), "--out", str(grouped), "--adapter-math", "bmm"]) == 0
    assert chosen == ["loop", "bmm"]
    first, second = read_adapter(plain / "job-a").weights, read_adapter(grouped / "job-a").weights
    for module, (a, b) in first.items():
        torch.testing.assert_close(second[module][0], a, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(second[module][1], b, rtol=1e-4, atol=1e-6)
    with pytest.raises(SystemExit):
        main(["train", str(spec), "--out", str(grouped), "--adapter-math", "grouped"])
    assert "invalid choice: 'grouped'" in capsys.readouterr().err


def test_train_continues_from_an_adapter_and_refuses_a_conflicting_spec(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path, capsys
) -> None:
    fields = spec_fields("job-a", tiny_base, datasets["text"])
    fields["adapter"]["lora_alpha"] = 32
    first = tmp_path / "first"
    assert main(["train", str(write_spec(tmp_path / "a.yaml", **fields)), "--out", str(first)]) == 0

    # Only a training choice beside init_from: the rest comes from the adapter.
    fields = spec_fields("job-c", tiny_base, datasets["text"])
    fields["adapter"] = {"init_from": str(first / "job-a"), "lora_dropout": 0.1}
    out = tmp_path / "out"
    assert main(["train", str(write_spec(tmp_path / "c.yaml", **fields)), "--out", str(out)]) == 0
    continued = read_adapter(out / "job-c")
    assert (continued.r, continued.lora_alpha) == (4, 32)
    assert set(continued.target_modules) == {"q_proj", "v_proj"}  # PEFT saves a set

    fields["adapter"]["lora_alpha"] = 16
    conflicting = write_spec(tmp_path / "d.yaml", **fields)
    assert main(["train", str(conflicting), "--out", str(tmp_path / "never")]) == 1
    err = capsys.readouterr().err
    assert f"{conflicting}: adapter.lora_alpha: 16 conflicts with init_from's lora_alpha 32" in err
    assert not (tmp_path / "never").exists()


def test_a_job_that_fails_shows_failed_and_the_others_finish(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    from carpool.orchestrator.cli.local_train import train_locally

    good = spec_fields("good", tiny_base, datasets["text"])
    # A learning rate this large makes the adapter blow up within a few steps.
    bad = spec_fields("bad", tiny_base, datasets["messages"], max_steps=6, learning_rate=1e30)
    bad["adapter"]["target_modules"] = "all-linear"
    specs = validate_files(
        [write_spec(tmp_path / "good.yaml", **good), write_spec(tmp_path / "bad.yaml", **bad)]
    )
    rows, notices = [], []

    out = tmp_path / "out"
    adapters = train_locally(specs, out, on_progress=rows.append, on_notice=notices.append)

    assert set(adapters) == {"good"}
    assert [r.state for r in rows if r.name == "good"][-1] == "done"
    bad_states = [r.state for r in rows if r.name == "bad"]
    assert bad_states[-1] == "failed" and bad_states.count("failed") == 1
    assert any(n.startswith("bad: failed: ") for n in notices)
    assert not (out / "bad").exists()


def test_progress_bars_show_learning_rate_and_grad_norm(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    import io

    from carpool.orchestrator.cli.local_train import train_locally
    from carpool.orchestrator.cli.progress import JobProgress
    from rich.console import Console

    spec = write_spec(tmp_path / "a.yaml", **spec_fields("job-a", tiny_base, datasets["text"]))
    rows = []
    train_locally(validate_files([spec]), tmp_path / "out", on_progress=rows.append)
    trained = [r for r in rows if r.state in ("running", "done")]
    assert [r.step for r in trained] == [1, 2, 3]
    assert all(r.learning_rate == 1e-2 and r.grad_norm > 0 for r in trained)

    console = Console(file=io.StringIO(), width=200, force_terminal=True)
    with JobProgress(console) as progress:
        progress.update(trained[-1])
    shown = console.file.getvalue()
    assert "lr 1.00e-02" in shown
    assert re.search(rf"gnorm +{trained[-1].grad_norm:.3g} ", shown), shown


def test_carpool_train_exits_1_when_a_job_failed(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path, capsys
) -> None:
    good = write_spec(tmp_path / "good.yaml", **spec_fields("good", tiny_base, datasets["text"]))
    bad = spec_fields("bad", tiny_base, datasets["messages"], max_steps=6, learning_rate=1e30)
    bad["adapter"]["target_modules"] = "all-linear"
    out = tmp_path / "out"
    assert (
        main(["train", str(good), str(write_spec(tmp_path / "bad.yaml", **bad)), "--out", str(out)])
        == 1
    )
    assert "1 job(s) failed: bad" in capsys.readouterr().err
    assert (out / "good" / "adapter_config.json").is_file()
