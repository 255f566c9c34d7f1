"""`adapter.init_from` is checked, not trusted: its kind, its fit to the base, its agreement
with the spec. Adapters are made by PEFT itself on tiny bases."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from carpool.orchestrator.cli.main import main
from carpool.orchestrator.spec_check.validation import (
    SpecProblem,
    SpecValidationError,
    check_spec,
    validate_files,
)
from carpool.workers.base.tiny_base import build_tiny_base
from carpool.workers.peft_files.peft_format import WEIGHTS_FILE, AdapterFormatError, read_adapter
from carpool.workers.training.engine import Engine
from safetensors.torch import load_file, save_file

from tests.helpers.peft_reference import save_peft_adapter

ALL_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def _renamed(src: Path, dst: Path, old: str, new: str) -> Path:
    """A copy of the adapter at `src` whose module names have `old` replaced by `new`."""
    dst.mkdir()
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    tensors = {k.replace(old, new): v for k, v in load_file(src / WEIGHTS_FILE).items()}
    save_file(tensors, dst / WEIGHTS_FILE)
    return dst


@pytest.fixture(scope="module")
def adapters(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    wider = build_tiny_base(root / "wider-base", hidden_size=128)
    qv = {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
    made = {
        "plain": save_peft_adapter(tiny_base, root / "plain", **qv),
        "dora": save_peft_adapter(tiny_base, root / "dora", **qv, use_dora=True),
        "lora-bias": save_peft_adapter(tiny_base, root / "lora-bias", **qv, lora_bias=True),
        "other-base": save_peft_adapter(wider, root / "other-base", **qv),
        "all-linear": save_peft_adapter(tiny_base, root / "all", r=4, target_modules="all-linear"),
        "regex": save_peft_adapter(
            tiny_base, root / "regex", r=4, target_modules=r".*\.(q_proj|v_proj)"
        ),
        "layer-0": save_peft_adapter(
            tiny_base, root / "layer-0", r=4, target_modules=["q_proj"], layers_to_transform=[0]
        ),
    }
    made["foreign"] = _renamed(made["plain"], root / "foreign", "self_attn", "attn")
    return made


def _spec(base: Path, data: Path, adapter: dict, **top: object) -> dict:
    return {
        "name": "cont",
        "base_model": str(base),
        "dataset": {"path": str(data)},
        "adapter": adapter,
        "training": {"max_steps": 2},
        **top,
    }


def _problems(spec: dict) -> list[tuple[str, str]]:
    return [(p.field, p.message) for p in check_spec(spec, "mem")]


# (case id, adapter used, the spec's adapter section beside init_from, (field, message) expected)
REFUSED = [
    ("lora-bias", "lora-bias", {}, [("adapter.init_from", "with biases (lora_bias: true)")]),
    (
        "dora-as-dylora",
        "dora",
        {"peft_type": "DYLORA", "r": 4, "lora_alpha": 16},
        [("adapter.init_from", "DYLORA starts from a plain LoRA adapter: this one is DoRA")],
    ),
    (
        "dora-as-sora",
        "dora",
        {"peft_type": "SORA", "r": 4, "lora_alpha": 16},
        [("adapter.init_from", "SORA starts from a plain LoRA adapter: this one is DoRA")],
    ),
    (
        "dylora-rank-conflict",
        "plain",
        {"peft_type": "DYLORA", "r": 8},
        [("adapter.r", "8 conflicts with init_from's r 4")],
    ),
    (
        "dora-as-lora",
        "dora",
        {"use_dora": False},
        [("adapter.use_dora", "false conflicts with init_from's use_dora true")],
    ),
    (
        "other-base",
        "other-base",
        {},
        [
            (
                "adapter.init_from",
                "model.layers.0.self_attn.q_proj: lora_A is 4x128 but the base's module takes "
                "64 inputs (and 3 more modules do not fit)",
            )
        ],
    ),
    (
        "other-modules",
        "foreign",
        {},
        [("adapter.init_from", "model.layers.0.attn.q_proj: the base has no such linear module")],
    ),
    (
        "alpha-and-targets",
        "plain",
        {"lora_alpha": 4, "target_modules": ["q_proj"]},
        [
            ("adapter.lora_alpha", "4 conflicts with init_from's lora_alpha 16"),
            (
                "adapter.target_modules",
                "[q_proj] conflicts with init_from's target_modules [q_proj, v_proj]",
            ),
        ],
    ),
    ("r", "plain", {"r": 8}, [("adapter.r", "8 conflicts with init_from's r 4")]),
    (
        "rslora",
        "plain",
        {"use_rslora": True},
        [("adapter.use_rslora", "true conflicts with init_from's use_rslora false")],
    ),
    (
        "all-linear-vs-two",
        "plain",
        {"target_modules": "all-linear"},
        [
            (
                "adapter.target_modules",
                "all-linear conflicts with init_from's target_modules [q_proj, v_proj]",
            )
        ],
    ),
    (
        "regex-vs-one",
        "regex",
        {"target_modules": ["q_proj"]},
        [
            (
                "adapter.target_modules",
                "[q_proj] conflicts with init_from's target_modules [q_proj, v_proj]",
            )
        ],
    ),
    (
        "some-layers-vs-all",
        "layer-0",
        {"target_modules": ["q_proj"]},
        [
            (
                "adapter.target_modules",
                "[q_proj] conflicts with init_from's target_modules "
                "[model.layers.0.self_attn.q_proj]",
            )
        ],
    ),
]


@pytest.mark.parametrize(
    ("adapter", "section", "expected"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_refused(
    adapter: str,
    section: dict,
    expected: list,
    adapters: dict,
    tiny_base: Path,
    datasets: dict,
) -> None:
    spec = _spec(tiny_base, datasets["text"], {**section, "init_from": str(adapters[adapter])})
    problems = _problems(spec)
    assert [f for f, _ in problems] == [f for f, _ in expected], problems
    for (_, message), (_, wanted) in zip(problems, expected, strict=True):
        assert wanted in message, (message, wanted)


@pytest.mark.parametrize(
    ("adapter", "targets"),
    [
        ("plain", ["v_proj", "q_proj"]),  # a set of names: order is no conflict
        ("plain", ["self_attn.q_proj", "self_attn.v_proj"]),  # the same modules
        ("all-linear", "all-linear"),  # PEFT saved the expansion as full module names
        ("all-linear", ALL_LINEAR),
        ("regex", ["q_proj", "v_proj"]),
        ("layer-0", ["model.layers.0.self_attn.q_proj"]),
    ],
    ids=["order", "dotted", "all-linear", "all-linear-by-name", "regex", "one-layer"],
)
def test_targets_selecting_the_same_modules_agree(
    adapter: str, targets: object, adapters: dict, tiny_base: Path, datasets: dict
) -> None:
    section = {"target_modules": targets, "init_from": str(adapters[adapter])}
    assert _problems(_spec(tiny_base, datasets["text"], section)) == []


def test_training_choices_may_differ(adapters: dict, tiny_base: Path, datasets: dict) -> None:
    section = {
        "r": 4,
        "lora_alpha": 16.0,
        "target_modules": ["q_proj", "v_proj"],
        "use_rslora": False,
        "lora_dropout": 0.1,  # the adapter was saved with 0.0
        "freeze_lora_A": True,
        "loraplus_lr_ratio": 4,
        "init_from": str(adapters["plain"]),
    }
    assert _problems(_spec(tiny_base, datasets["text"], section)) == []


def test_left_out_fields_take_the_adapters_values_and_say_so(
    adapters: dict, tiny_base: Path, datasets: dict, tmp_path: Path, capsys
) -> None:
    raw = _spec(tiny_base, datasets["text"], {"init_from": str(adapters["plain"]), "r": 4})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    notes: list[SpecProblem] = []
    [spec] = validate_files([path], notes)
    a = spec.adapter
    assert (a.r, a.lora_alpha, a.target_modules, a.use_rslora) == (
        4,
        16,
        ["q_proj", "v_proj"],
        False,
    )
    assert [(n.field, n.message) for n in notes] == [
        ("adapter.lora_alpha", "not in the spec; taken from init_from: 16"),
        ("adapter.target_modules", "not in the spec; taken from init_from: [q_proj, v_proj]"),
        ("adapter.use_rslora", "not in the spec; taken from init_from: false"),
    ]
    # What is queued (the dumped spec) carries the values and checks clean again.
    assert check_spec(spec.model_dump(mode="json"), "queued") == []
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"ok: cont ({path})"] + [f"note: {n}" for n in notes]


@pytest.mark.parametrize(
    ("adapter", "targets"),
    [
        ("all-linear", ALL_LINEAR),
        ("regex", ["q_proj", "v_proj"]),
        ("layer-0", ["model.layers.0.self_attn.q_proj"]),
    ],
)
def test_filled_targets_name_what_the_adapter_holds(
    adapter: str, targets: list, adapters: dict, tiny_base: Path, datasets: dict, tmp_path: Path
) -> None:
    path = tmp_path / "job.yaml"
    section = {"init_from": str(adapters[adapter])}
    path.write_text(yaml.safe_dump(_spec(tiny_base, datasets["text"], section)))
    [spec] = validate_files([path])
    assert spec.adapter.target_modules == targets


def test_every_problem_of_a_file_at_once(adapters: dict, tmp_path: Path, datasets: dict) -> None:
    # The base cannot be read, yet the adapter's own values are still compared.
    raw = _spec(
        tmp_path / "no-base",
        datasets["text"],
        {
            "r": 0,
            "lora_alpha": 4,
            "target_modules": ["q_proj"],
            "init_from": str(adapters["plain"]),
        },
    )
    assert [f for f, _ in _problems(raw)] == [
        "adapter.r",  # the schema's; not also reported as a conflict
        "base_model",
        "adapter.lora_alpha",
        "adapter.target_modules",
    ]


def test_refused_at_submit(adapters: dict, tiny_base: Path, datasets: dict, tmp_path: Path, capsys):
    section = {"lora_alpha": 4, "init_from": str(adapters["lora-bias"])}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_spec(tiny_base, datasets["text"], section)))
    with pytest.raises(SpecValidationError):
        validate_files([path])
    assert main(["submit", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}: adapter.init_from: " in err and "lora_bias" in err and "no carpool" not in err


def test_the_engine_refuses_what_validation_refuses(
    adapters: dict, tiny_base: Path, datasets: dict
) -> None:
    from carpool.workers.spec.job_spec import JobInputError, JobSpec

    with pytest.raises(AdapterFormatError, match="lora_bias"):
        read_adapter(adapters["lora-bias"])
    engine = Engine(str(tiny_base), device="cpu")
    for name in ("other-base", "foreign"):
        raw = _spec(tiny_base, datasets["text"], {"init_from": str(adapters[name])})
        [(_, message)] = _problems(raw)
        with pytest.raises(JobInputError) as caught:  # the job's own input, named as such
            engine.add_job(JobSpec.model_validate(raw))
        assert message in str(caught.value)
