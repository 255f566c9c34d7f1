"""Sweep files: parsed and checked up front with every problem at once; trials are jobs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from carpool.orchestrator.spec_check.spec_problems import SpecValidationError
from carpool.orchestrator.sweeps.sweep_spec import SweepSpec, load_sweep_file, trial_spec
from carpool.workers.spec.job_spec import JobSpec
from pydantic import ValidationError


def write_yaml(path: Path, raw: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def template(tmp_path: Path, tiny_base: Path, datasets: dict[str, Path]) -> Path:
    """A job spec with an eval set and eval_steps, in a folder of its own (paths are relative
    to it)."""
    return write_yaml(
        tmp_path / "jobs" / "support.yaml",
        {
            "name": "support",
            "base_model": str(tiny_base),
            "dataset": {"path": str(datasets["text"])},
            "eval_dataset": {"path": str(datasets["one_row"])},
            "adapter": {"r": 8},
            "training": {"max_steps": 20, "eval_steps": 5},
        },
    )


def sweep(**overrides: object) -> dict:
    raw: dict = {
        "name": "support-sweep",
        "template": "jobs/support.yaml",
        "parameters": {
            "training.learning_rate": {"low": 1.0e-5, "high": 1.0e-3, "log": True},
            "adapter.r": {"choices": [4, 8, 16]},
            "adapter.target_modules": {"choices": [["q_proj", "v_proj"], "all-linear"]},
        },
        "trials": 6,
        "pruner": "successive_halving",
        "pruner_options": {"min_resource": 5, "reduction_factor": 3},
    }
    raw.update(overrides)
    return raw


def problems_of(path: Path) -> dict[str, str]:
    """Each field's problems, joined."""
    with pytest.raises(SpecValidationError) as e:
        load_sweep_file(path)
    found: dict[str, str] = {}
    for p in e.value.problems:
        found[p.field] = f"{found[p.field]}; {p.message}" if p.field in found else p.message
    return found


def test_good_sweep_loads(tmp_path: Path, template: Path) -> None:
    loaded = load_sweep_file(write_yaml(tmp_path / "sweep.yaml", sweep()))
    assert loaded.spec.name == "support-sweep"
    assert loaded.spec.sampler == "tpe" and loaded.spec.max_concurrent == 8
    assert loaded.path == tmp_path / "sweep.yaml"
    assert loaded.template["name"] == "support"
    assert Path(loaded.template["dataset"]["path"]).is_absolute()
    JobSpec.model_validate(loaded.template)


def test_trial_spec_sets_dotted_paths_and_names_the_trial(tmp_path: Path, template: Path) -> None:
    loaded = load_sweep_file(write_yaml(tmp_path / "sweep.yaml", sweep()))
    params = {
        "training.learning_rate": 3e-4,
        "adapter.r": 16,
        "adapter.target_modules": ["q_proj", "v_proj"],
    }
    spec = trial_spec(loaded, 3, params)
    assert spec["name"] == "support-sweep-t03"
    assert spec["training"]["learning_rate"] == 3e-4
    assert spec["training"]["max_steps"] == 20  # the template's, untouched
    assert spec["adapter"]["r"] == 16
    assert spec["adapter"]["target_modules"] == ["q_proj", "v_proj"]
    assert (
        trial_spec(loaded, 12, {"adapter.target_modules": "all-linear"})["adapter"][
            "target_modules"
        ]
        == "all-linear"
    )
    assert loaded.template["adapter"]["r"] == 8  # the template is not changed
    with pytest.raises(ValueError, match="t04"):
        trial_spec(loaded, 4, {"adapter.r": 0})


def test_bad_sweep_reports_every_problem_at_once(tmp_path: Path, template: Path) -> None:
    raw = sweep(
        trails=3,  # typo: unknown key
        trials=0,
        parameters={
            "adapter.rr": {"choices": [4]},
            "training.nope": {"low": 1, "high": 2},
            "adapter.r": {"choices": [4, 1000, 2.5]},
            "training.learning_rate": {"low": 1.0e-3, "high": 1.0e-5},
            "training.warmup_steps": {"low": 0.5, "high": 4.5},
            "adapter.lora_dropout": {"low": 0.0, "high": 0.5, "log": True},
            "adapter.target_modules": {"choices": [["q_proj", "nope_proj"], "all-linear"]},
        },
        pruner_options={"min_resource": 5, "reduction_fctor": 3},
    )
    found = problems_of(write_yaml(tmp_path / "sweep.yaml", raw))
    assert "did you mean 'trials'" in found["trails"]
    assert "greater than or equal to 1" in found["trials"]
    assert "adapter has no field 'rr'; did you mean 'r'?" in found["parameters.adapter.rr"]
    assert "training has no field 'nope'" in found["parameters.training.nope"]
    r_problem = found["parameters.adapter.r"]
    assert "choice 1000" in r_problem and "choice 2.5" in r_problem and "choice 4" not in r_problem
    assert "low (0.001) must be below high" in found["parameters.training.learning_rate"]
    assert "low 0.5" in found["parameters.training.warmup_steps"]  # a float range, an int field
    assert "log needs low > 0" in found["parameters.adapter.lora_dropout"]
    assert "choice ['q_proj', 'nope_proj']" in found["parameters.adapter.target_modules"]
    assert "nope_proj" in found["parameters.adapter.target_modules"]
    assert "min_resource" in found["pruner_options.reduction_fctor"]


def test_problems_of_each_parameter_are_all_listed(tmp_path: Path, template: Path) -> None:
    raw = sweep(parameters={"adapter.r": {"choices": [1000, 2000]}})
    with pytest.raises(SpecValidationError) as e:
        load_sweep_file(write_yaml(tmp_path / "sweep.yaml", raw))
    messages = [p.message for p in e.value.problems if p.field == "parameters.adapter.r"]
    assert len(messages) == 2 and "choice 1000" in messages[0] and "choice 2000" in messages[1]


def test_grid_needs_choices_or_steps_and_enough_points(tmp_path: Path, template: Path) -> None:
    raw = sweep(
        sampler="grid",
        trials=5,
        parameters={
            "adapter.r": {"choices": [4, 8]},
            "training.learning_rate": {"low": 1.0e-5, "high": 1.0e-3},
        },
    )
    found = problems_of(write_yaml(tmp_path / "sweep.yaml", raw))
    assert "grid needs choices or a range with step" in found["parameters.training.learning_rate"]
    raw["parameters"]["training.learning_rate"] = {"low": 0.1, "high": 0.2, "step": 0.1}
    found = problems_of(write_yaml(tmp_path / "sweep.yaml", raw))
    assert list(found) == ["trials"]
    assert "grid's 4 points" in found["trials"]
    raw["trials"] = 4
    assert load_sweep_file(write_yaml(tmp_path / "sweep.yaml", raw)).spec.trials == 4


def test_template_without_eval_names_template(tmp_path: Path, template: Path) -> None:
    raw = yaml.safe_load(template.read_text())
    del raw["eval_dataset"]
    del raw["training"]["eval_steps"]
    write_yaml(template, raw)
    found = problems_of(write_yaml(tmp_path / "sweep.yaml", sweep()))
    assert list(found) == ["template"]
    with pytest.raises(SpecValidationError) as e:
        load_sweep_file(tmp_path / "sweep.yaml")
    messages = " ".join(p.message for p in e.value.problems)
    assert "eval_dataset" in messages and "training.eval_steps" in messages


def test_invalid_or_missing_template_is_reported(tmp_path: Path, template: Path) -> None:
    raw = yaml.safe_load(template.read_text())
    raw["adapter"]["r"] = 0
    write_yaml(template, raw)
    with pytest.raises(SpecValidationError) as e:
        load_sweep_file(write_yaml(tmp_path / "sweep.yaml", sweep(trials=0)))
    by_source = {(Path(p.source).name, p.field) for p in e.value.problems}
    assert ("support.yaml", "adapter.r") in by_source  # the template's own problem
    assert ("sweep.yaml", "trials") in by_source  # and the sweep's, in the same run
    found = problems_of(write_yaml(tmp_path / "sweep.yaml", sweep(template="nowhere.yaml")))
    assert "file not found" in found["template"]


def test_pruner_options_need_a_pruner(tmp_path: Path, template: Path) -> None:
    found = problems_of(write_yaml(tmp_path / "sweep.yaml", sweep(pruner="none")))
    assert found == {"pruner_options": "pruner none takes no options"}
    bad_value = sweep(pruner="median", pruner_options={"n_startup_trials": -1})
    found = problems_of(write_yaml(tmp_path / "sweep.yaml", bad_value))
    assert "n_startup_trials" in found["pruner_options"]


def test_sweep_spec_model_enforces_its_rules() -> None:
    base = {"name": "s", "template": "t.yaml", "trials": 3}
    with pytest.raises(ValidationError, match="grid needs choices"):
        SweepSpec.model_validate(
            {**base, "sampler": "grid", "parameters": {"a.b": {"low": 1, "high": 2}}}
        )
    with pytest.raises(ValidationError, match="must be"):
        SweepSpec.model_validate({**base, "parameters": {"adapter.r": 8}})
    with pytest.raises(ValidationError, match="repeats"):
        SweepSpec.model_validate({**base, "parameters": {"adapter.r": {"choices": [4, 4]}}})
    with pytest.raises(ValidationError, match="too long"):
        SweepSpec.model_validate({**base, "name": "x" * 62, "parameters": {"a": {"choices": [1]}}})


def test_importing_sweep_spec_loads_no_torch() -> None:
    code = "import sys, carpool.orchestrator.sweeps.sweep_spec; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_operator_limits_are_checked_for_every_value_a_trial_may_take(
    tmp_path: Path, template: Path, datasets: dict[str, Path], tiny_base: Path
) -> None:
    from carpool.orchestrator.control.admission import check_admission
    from carpool.orchestrator.control.operator_config import OperatorConfig
    from carpool.orchestrator.sweeps.sweep_spec import value_specs

    outside = tmp_path / "elsewhere" / "data.jsonl"
    outside.parent.mkdir()
    outside.write_text(datasets["text"].read_text())
    raw = sweep(parameters={"dataset.path": {"choices": [str(datasets["text"]), str(outside)]}})
    loaded = load_sweep_file(write_yaml(tmp_path / "sweep.yaml", raw))
    values = value_specs(loaded)
    assert [label for label, _ in values] == [
        f"parameters.dataset.path choice {str(datasets['text'])!r}",
        f"parameters.dataset.path choice {str(outside)!r}",
    ]
    roots = [str(datasets["text"].parent), str(tiny_base), str(template.parent)]
    config = OperatorConfig.model_validate({"allowed_roots": roots})
    specs = [JobSpec.model_validate(raw) for _, raw in values]
    with pytest.raises(SpecValidationError) as e:
        check_admission(specs, config, [label for label, _ in values])
    (problem,) = e.value.problems
    assert problem.field == "dataset.path" and str(outside) in problem.source


def test_a_sweep_path_into_the_objective_follows_its_templates_type(
    tmp_path: Path, tiny_base: Path, datasets: dict[str, Path]
) -> None:
    """`objective.beta` names a field of the dpo objective; a template whose objective is
    sft (the default) has no such option, and the problem says what its type takes."""
    dpo = {
        "name": "prefs",
        "base_model": str(tiny_base),
        "dataset": {"path": str(datasets["preference"])},
        "objective": {"type": "dpo", "beta": 0.1},
        "training": {"max_steps": 4},
    }
    write_yaml(tmp_path / "jobs" / "prefs.yaml", dpo)
    raw = sweep(template="jobs/prefs.yaml", parameters={"objective.beta": {"choices": [0.05, 0.5]}})
    found = problems_of(write_yaml(tmp_path / "sweep.yaml", raw))
    assert "parameters.objective.beta" not in found  # a field of the template's objective
    sft = {k: v for k, v in dpo.items() if k != "objective"}
    sft["dataset"] = {"path": str(datasets["text"])}
    write_yaml(tmp_path / "jobs" / "prefs.yaml", sft)
    found = problems_of(tmp_path / "sweep.yaml")
    assert "objective sft takes: type" in found["parameters.objective.beta"]
    raw["parameters"] = {"objective.bta": {"choices": [0.1]}}
    found = problems_of(write_yaml(tmp_path / "typo.yaml", raw))
    assert "did you mean 'beta'?" in found["parameters.objective.bta"]


def test_a_sweep_may_search_any_option_of_its_templates_objective(
    tmp_path: Path, tiny_base: Path, datasets: dict[str, Path]
) -> None:
    kto = {
        "name": "kto",
        "base_model": str(tiny_base),
        "dataset": {"path": str(datasets["unpaired"])},
        "eval_dataset": {"path": str(datasets["unpaired"])},
        "objective": {"type": "kto"},
        "training": {"max_steps": 4, "batch_size": 4, "eval_steps": 2},
    }
    write_yaml(tmp_path / "jobs" / "kto.yaml", kto)
    weights = {"objective.desirable_weight": {"choices": [1.0, 1.33]}}
    raw = sweep(template="jobs/kto.yaml", parameters=weights)
    loaded = load_sweep_file(write_yaml(tmp_path / "sweep.yaml", raw))
    assert "objective.desirable_weight" in loaded.spec.parameters
    raw["parameters"] = {"objective.simpo_gamma": {"choices": [0.5, 1.0]}}
    found = problems_of(write_yaml(tmp_path / "other.yaml", raw))
    assert "objective kto takes:" in found["parameters.objective.simpo_gamma"]


def test_a_sweep_may_search_soras_lambdas_and_dyloras_r(
    tmp_path: Path, tiny_base: Path, datasets: dict[str, Path]
) -> None:
    for kind, parameter in (("SORA", "adapter.sparse_lambda"), ("DYLORA", "adapter.r")):
        template = {
            "name": kind.lower(),
            "base_model": str(tiny_base),
            "dataset": {"path": str(datasets["text"])},
            "eval_dataset": {"path": str(datasets["text"])},
            "adapter": {"peft_type": kind, "r": 4},
            "training": {"max_steps": 4, "eval_steps": 2},
        }
        write_yaml(tmp_path / "jobs" / f"{kind}.yaml", template)
        raw = sweep(template=f"jobs/{kind}.yaml", parameters={parameter: {"choices": [2, 4]}})
        loaded = load_sweep_file(write_yaml(tmp_path / f"{kind}.yaml", raw))
        assert parameter in loaded.spec.parameters
