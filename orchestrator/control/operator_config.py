"""The operator's config: where state and artifacts live and how groups are sized.

The file is optional; the defaults serve one machine. Like the job spec, every
field is checked and unknown fields are errors, and a bad file reports every
problem at once (one per line, `<file>: <dotted.field>: <message>`) so an
operator fixes the file in one pass instead of one error per restart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from carpool.orchestrator.spec_check.yaml_loader import load_yaml
from carpool.workers.bank.adapter_math import AdapterMath
from carpool.workers.data.batch_layout import BatchLayout
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)


class OperatorConfigError(ValueError):
    """A config file that cannot be read or does not validate; lists every problem."""


def _default_state_dir() -> Path:
    # A factory, not a constant, so HOME is read when a config is made, not at import.
    return Path("~/.carpool").expanduser()


class ServeConfig(BaseModel):
    """`carpool serve`: where the OpenAI-compatible endpoint listens and how big it is."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", min_length=1)  # reachable from this machine only
    port: StrictInt = Field(8000, ge=1, le=65535)
    # The bearer key's file; None: `<state_dir>/serve/api_key`, created (mode 0600).
    key_file: Path | None = None
    replicas: StrictInt = Field(1, ge=1)  # per served base
    # Reserved for each replica (and its torch threads), so serving and training groups
    # share a node predictably.
    cpus_per_replica: StrictInt = Field(1, ge=1)
    max_adapters_per_replica: StrictInt = Field(16, ge=1)  # LRU beyond it
    max_completion_tokens: StrictInt = Field(512, ge=1)  # the largest `max_tokens`
    max_batch_rows: StrictInt = Field(64, ge=1)  # rows one replica decodes at once
    # A streamed completion's pieces after its first go out at most this often: each
    # piece costs the path to the client (replica, ingress, proxy) more than a token
    # costs the decoder, so on a busy CPU a shorter interval lowers throughput
    # (benchmarks/serve.py). 0 sends every token as it comes.
    stream_interval_s: float = Field(0.5, ge=0)

    @field_validator("key_file")
    @classmethod
    def _expand_key_file(cls, path: Path | None) -> Path | None:
        return None if path is None else path.expanduser()


class OperatorConfig(BaseModel):
    # Counts are StrictInt so `group_size: true` or `8.5` fail instead of coercing.
    model_config = ConfigDict(extra="forbid")

    state_dir: Path = Field(default_factory=_default_state_dir)
    storage: str | None = Field(None, min_length=1)
    group_size: StrictInt = Field(1, ge=1)
    # CPUs Ray reserves for each rank; on CPU devices also its torch threads.
    cpus_per_rank: StrictInt = Field(1, ge=1)
    # How a group's ranks are placed on nodes (a Ray placement group strategy).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Extra Ray resources each rank asks for, by rank (e.g. to pin ranks to nodes).
    rank_resources: list[dict[str, float]] | None = None
    placement_timeout_s: float = Field(120, gt=0)
    zero_stage: Literal[0, 3, "auto"] = 0
    # With ZeRO-3: keep the base's partitions in host memory (a base larger than the group's).
    offload_params: bool = False
    max_tokens_per_step: StrictInt = Field(65536, ge=1)
    max_adapters_per_group: StrictInt = Field(32, ge=1)
    max_memory_bytes: StrictInt = Field(8 * 2**30, ge=1)
    max_groups: StrictInt | None = Field(None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    micro_batch_tokens: StrictInt | None = Field(None, ge=1)
    # Recompute decoder layers in the backward: activation memory for more jobs per group.
    gradient_checkpointing: bool = False
    # Loss through the output layer this many tokens at a time: no whole-batch logits.
    loss_chunk_tokens: StrictInt | None = Field(None, ge=1)
    # How the bank computes the LoRA terms (carpool.workers.bank.adapter_math); auto: per device.
    adapter_math: AdapterMath = "auto"
    # Rows of a micro-batch padded or packed end to end (carpool.workers.data.batch_layout).
    batch_layout: BatchLayout = "auto"
    checkpoint_every_steps: StrictInt | None = Field(None, ge=1)
    # Checkpoints each running job keeps in the store (the newest); a job that
    # succeeded keeps none.
    keep_checkpoints: StrictInt = Field(2, ge=1)
    max_attempts: StrictInt = Field(3, ge=1)
    trust_remote_code: bool = False
    allowed_roots: list[Path] | None = None
    max_dataset_bytes: StrictInt | None = Field(None, ge=1)
    poll_interval_s: float = Field(0.2, gt=0)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @model_validator(mode="after")
    def _rank_resources_per_rank(self) -> OperatorConfig:
        if self.rank_resources is not None and len(self.rank_resources) != self.group_size:
            raise ValueError(
                f"rank_resources has {len(self.rank_resources)} entries; group_size is "
                f"{self.group_size}"
            )
        return self

    @field_validator("state_dir")
    @classmethod
    def _expand_state_dir(cls, path: Path) -> Path:
        return path.expanduser()

    @field_validator("allowed_roots")
    @classmethod
    def _expand_roots(cls, roots: list[Path] | None) -> list[Path] | None:
        return None if roots is None else [root.expanduser() for root in roots]

    def storage_root(self) -> str:
        """The artifact root: `storage` as given, else a folder under `state_dir`."""
        return self.storage if self.storage is not None else str(self.state_dir / "artifacts")

    def queue_path(self) -> Path:
        return self.state_dir / "queue.sqlite"

    def serve_key_file(self) -> Path:
        return self.serve.key_file or self.state_dir / "serve" / "api_key"

    def uses_gpu(self, cluster_gpus: float) -> bool:
        """Whether ranks and serving replicas ask for a GPU: `cuda`, or `auto` on a cluster
        that has one."""
        return self.device == "cuda" or (self.device == "auto" and cluster_gpus > 0)

    def engine_options(self) -> dict[str, Any]:
        """The `Engine` arguments a worker passes on as they are: how rounds run."""
        return {
            "micro_batch_tokens": self.micro_batch_tokens,
            "offload_params": self.offload_params,
            "gradient_checkpointing": self.gradient_checkpointing,
            "loss_chunk_tokens": self.loss_chunk_tokens,
            "adapter_math": self.adapter_math,
            "batch_layout": self.batch_layout,
        }


def _dotted(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _message(error: Any) -> str:
    # pydantic's wording for a typo'd key ("Extra inputs are not permitted") hides the cause.
    return "unknown field" if error["type"] == "extra_forbidden" else error["msg"]


def load_operator_config(path: str | Path | None) -> OperatorConfig:
    """Read and validate the operator config; `None` or an empty file gives the defaults."""
    if path is None:
        return OperatorConfig()
    name = str(path)
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise OperatorConfigError(f"{name}: cannot read: {exc.strerror or exc}") from exc
    try:
        raw, duplicates = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise OperatorConfigError(f"{name}: {where}invalid YAML: {problem}") from exc
    if raw is None:
        return OperatorConfig()
    # A repeated key is refused together with the file's other problems.
    problems = [f"{name}: {d}" for d in duplicates]
    if not isinstance(raw, dict):
        got = type(raw).__name__
        problems.append(f"{name}: (top level): must be a mapping of settings, got {got}")
    else:
        try:
            config = OperatorConfig.model_validate(raw)
        except ValidationError as exc:
            problems += [f"{name}: {_dotted(err['loc'])}: {_message(err)}" for err in exc.errors()]
    if problems:
        raise OperatorConfigError("\n".join(problems))
    return config
