"""The operator config: defaults, a full file, and errors that list every problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from carpool.orchestrator.control.operator_config import (
    OperatorConfig,
    OperatorConfigError,
    load_operator_config,
)

FULL = """\
state_dir: /srv/carpool
storage: s3://bucket/carpool
group_size: 4
zero_stage: auto
max_tokens_per_step: 131072
max_adapters_per_group: 16
max_memory_bytes: 4294967296
max_groups: 2
device: cuda
micro_batch_tokens: 8192
adapter_math: bmm
checkpoint_every_steps: 50
keep_checkpoints: 3
max_attempts: 5
trust_remote_code: true
allowed_roots: [/data, /models]
max_dataset_bytes: 1000000
poll_interval_s: 0.5
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "operator.yaml"
    path.write_text(text)
    return path


def test_defaults_serve_one_machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_operator_config(None)
    assert config == OperatorConfig()
    assert config.state_dir == tmp_path / ".carpool"
    assert config.storage is None
    assert config.storage_root() == str(tmp_path / ".carpool" / "artifacts")
    assert config.queue_path() == tmp_path / ".carpool" / "queue.sqlite"
    assert (config.group_size, config.zero_stage, config.device) == (1, 0, "auto")
    assert (config.max_tokens_per_step, config.max_adapters_per_group) == (65536, 32)
    assert config.max_memory_bytes == 8 * 2**30
    assert config.max_groups is None and config.allowed_roots is None
    assert (config.keep_checkpoints, config.max_attempts, config.poll_interval_s) == (2, 3, 0.2)
    assert config.trust_remote_code is False
    assert config.adapter_math == "auto"


def test_full_file_round_trip(tmp_path: Path) -> None:
    config = load_operator_config(write(tmp_path, FULL))
    assert config.state_dir == Path("/srv/carpool")
    assert config.storage_root() == "s3://bucket/carpool"
    assert config.queue_path() == Path("/srv/carpool/queue.sqlite")
    assert config.group_size == 4 and config.zero_stage == "auto" and config.device == "cuda"
    assert config.max_groups == 2 and config.micro_batch_tokens == 8192
    assert config.engine_options()["adapter_math"] == "bmm"  # what a worker's Engine gets
    assert config.checkpoint_every_steps == 50 and config.keep_checkpoints == 3
    assert config.trust_remote_code is True
    assert config.allowed_roots == [Path("/data"), Path("/models")]
    assert config.max_dataset_bytes == 1_000_000 and config.poll_interval_s == 0.5
    # Dumping and reloading gives the same config.
    dumped = config.model_dump(mode="json")
    again = load_operator_config(write(tmp_path, yaml.safe_dump(dumped)))
    assert again == config


def test_every_problem_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "group_sise: 2\ngroup_size: 0\nzero_stage: 2\npoll_interval_s: 0\n"
        "allowed_roots: [/ok, 3.5, {a: 1}]\nadapter_math: grouped\n",
    )
    with pytest.raises(OperatorConfigError) as info:
        load_operator_config(path)
    lines = str(info.value).splitlines()
    assert all(line.startswith(f"{path}: ") for line in lines), lines
    fields = [line.split(": ")[1] for line in lines]
    assert {"group_sise", "group_size", "zero_stage", "poll_interval_s", "adapter_math"} <= set(
        fields
    )
    assert "allowed_roots.1" in fields or "allowed_roots.2" in fields
    assert f"{path}: group_sise: unknown field" in lines
    assert any(line.startswith(f"{path}: zero_stage: ") and "3" in line for line in lines)
    assert any(
        line.startswith(f"{path}: adapter_math: ") and "grouped_mm" in line for line in lines
    )


def test_strict_counts(tmp_path: Path) -> None:
    with pytest.raises(OperatorConfigError, match="group_size"):
        load_operator_config(write(tmp_path, "group_size: true\n"))
    with pytest.raises(OperatorConfigError, match="max_groups"):
        load_operator_config(write(tmp_path, "max_groups: 1.5\n"))


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "group_size: 2\ndevice: [cpu\nmax_groups: 1\n")
    with pytest.raises(OperatorConfigError) as info:
        load_operator_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: line ") and "invalid YAML" in message


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(OperatorConfigError, match="mapping"):
        load_operator_config(write(tmp_path, "- group_size\n"))


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(OperatorConfigError, match="cannot read"):
        load_operator_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize("text", ["", "\n# only a comment\n"])
def test_empty_file_gives_defaults(tmp_path: Path, text: str) -> None:
    assert load_operator_config(write(tmp_path, text)) == OperatorConfig()


def test_tilde_expands(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_operator_config(
        write(tmp_path, "state_dir: ~/state\nallowed_roots: [~/data, /abs]\n")
    )
    assert config.state_dir == tmp_path / "state"
    assert config.allowed_roots == [tmp_path / "data", Path("/abs")]
    assert config.storage_root() == str(tmp_path / "state" / "artifacts")
    assert config.queue_path() == tmp_path / "state" / "queue.sqlite"
    # The Python constructor expands too, not only the loader.
    assert OperatorConfig(state_dir=Path("~/x")).state_dir == tmp_path / "x"


def test_repeated_key_is_refused_with_other_problems(tmp_path: Path) -> None:
    path = write(tmp_path, "group_size: 2\nmax_groups: 1\ngroup_size: 4\ncolour: red\n")
    with pytest.raises(OperatorConfigError) as info:
        load_operator_config(path)
    assert str(info.value).splitlines() == [
        f"{path}: line 3: duplicate key 'group_size' (first on line 1)",
        f"{path}: colour: unknown field",
    ]


@pytest.mark.parametrize(
    ("device", "cluster_gpus", "expected"),
    [("cuda", 0, True), ("cpu", 8, False), ("auto", 0, False), ("auto", 1, True)],
)
def test_ranks_and_replicas_ask_for_a_gpu_by_device_and_cluster(
    device: str, cluster_gpus: float, expected: bool
) -> None:
    assert OperatorConfig(device=device).uses_gpu(cluster_gpus) is expected
