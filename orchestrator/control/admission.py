"""What the operator allows a job: path roots, dataset size, a quantized base beside ZeRO-3.

Checked twice: by the client before submitting (so the user sees every
problem at once) and by the controller before queueing (a client is not
trusted to have checked).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from carpool.orchestrator.control.operator_config import OperatorConfig
from carpool.orchestrator.spec_check.spec_problems import SpecProblem, SpecValidationError
from carpool.workers.spec.job_spec import JobSpec


def _under(path: Path, roots: Sequence[Path]) -> bool:
    """True if `path`, with symlinks and '..' resolved, lies inside one of `roots`."""
    real = Path(os.path.realpath(path))
    return any(real.is_relative_to(Path(os.path.realpath(root))) for root in roots)


def admission_problems(spec: JobSpec, config: OperatorConfig, source: str) -> list[SpecProblem]:
    problems = []
    roots = config.allowed_roots
    datasets = {"dataset.path": spec.dataset.path}
    if spec.eval_dataset is not None:
        datasets["eval_dataset.path"] = spec.eval_dataset.path
    paths = {"base_model": spec.base_model, **datasets}
    if spec.adapter.init_from is not None:
        paths["adapter.init_from"] = spec.adapter.init_from
    if roots is not None:
        allowed = ", ".join(str(r) for r in roots)
        for field, value in paths.items():
            path = Path(value)
            if not path.is_absolute() or not path.exists():
                # With allowed roots, a hub id or a relative path could point anywhere.
                problems.append(
                    SpecProblem(source, field, f"must be an existing path under {allowed}")
                )
            elif not _under(path, roots):
                problems.append(
                    SpecProblem(source, field, f"{value} is outside the allowed roots ({allowed})")
                )
    if spec.base_quantization is not None and config.zero_stage == 3:
        # DeepSpeed partitions float parameters; a 4-bit base's are packed bitsandbytes ones.
        message = "a 4-bit base cannot be partitioned by ZeRO-3 (the operator's zero_stage is 3)"
        problems.append(SpecProblem(source, "base_quantization", message))
    if spec.adapter.use_dora and config.zero_stage == 3:
        # With zero_stage auto the engine refuses it when it does partition the base.
        message = "DoRA reads each module's whole weight, which zero_stage 3 partitions"
        problems.append(SpecProblem(source, "adapter.use_dora", message))
    cap = config.max_dataset_bytes
    for field, value in datasets.items():
        dataset = Path(value)
        size = dataset.stat().st_size if cap is not None and dataset.is_file() else 0
        if cap is not None and size > cap:
            message = f"{size} bytes is over the operator's cap of {cap} bytes"
            problems.append(SpecProblem(source, field, message))
    return problems


def check_admission(
    specs: Sequence[JobSpec], config: OperatorConfig, sources: Sequence[str]
) -> None:
    """Raise SpecValidationError with every problem of every spec, or return."""
    problems = [
        p
        for spec, src in zip(specs, sources, strict=True)
        for p in admission_problems(spec, config, src)
    ]
    if problems:
        raise SpecValidationError(problems)
