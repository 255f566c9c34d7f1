"""EngineWorker, the engine behind one rank, driven directly (no Ray)."""

from __future__ import annotations

import shutil
from pathlib import Path

from orchestrator.engine_worker import EngineWorker
from workers.job_config import AdapterConfig, DatasetConfig, JobConfig, TrainingConfig


def worker(tiny_base: Path, tmp_path: Path) -> EngineWorker:
    return EngineWorker(
        "g1",
        str(tiny_base),
        storage_root=str(tmp_path / "store"),
        scratch_dir=tmp_path / "scratch",
        device="cpu",
    )


def config(datasets: dict[str, Path], steps: int = 2) -> JobConfig:
    training = TrainingConfig(max_steps=steps, batch_size=2, max_seq_length=16, save_steps=1)
    return JobConfig("ignored", "", DatasetConfig(datasets["text"]), AdapterConfig(r=2), training)


def test_job_resumed_from_its_final_checkpoint_is_exported_at_admission(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    first = worker(tiny_base, tmp_path)
    assert first.add_job("job-a", config(datasets)).adapter is None
    first.step()
    (final,) = first.step()
    assert final.adapter is not None and final.checkpoint.endswith("step-00000002")
    shutil.rmtree(final.adapter)  # so only admission can write it again

    restarted = worker(tiny_base, tmp_path)  # the same store, as after a controller restart
    admitted = restarted.add_job("job-a", config(datasets), final.checkpoint)

    assert (admitted.step, admitted.adapter) == (2, final.adapter)
    assert restarted.job_ids() == []  # nothing left that a round would have to report
    assert (Path(admitted.adapter) / "adapter_model.safetensors").is_file()
    assert restarted.step() == []
