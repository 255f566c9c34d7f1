"""Per-job checkpoints a job resumes from exactly.

Layout: `<root>/step-<N>/` holding `adapter.safetensors` (weights),
`trainer_state.pt` (optimizer, schedule, data position; read with
`weights_only=True`) and `meta.json`. A checkpoint is written to a temporary
directory and renamed into place, so a crash mid-write never leaves a
half-written checkpoint that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from carpool.workers.training.training_job import TrainingJob
from safetensors.torch import load_file, save_file

ADAPTER_FILE = "adapter.safetensors"
STATE_FILE = "trainer_state.pt"
META_FILE = "meta.json"
_PREFIX = "step-"


def save_checkpoint(job: TrainingJob, root: str | Path, keep_last: int = 2) -> Path:
    """Write the job's state under `root` and prune older checkpoints."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{job.step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {k: v.cpu().contiguous() for k, v in job.adapter.named_tensors().items()}
    save_file(tensors, str(tmp / ADAPTER_FILE))
    torch.save(job.state_dict(), tmp / STATE_FILE)
    meta = {"job": job.name, "step": job.step, "total_steps": job.total_steps}
    (tmp / META_FILE).write_text(json.dumps(meta))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: str | Path) -> int:
    """The optimizer step a checkpoint directory (a path or URI ending `step-<N>`) holds."""
    name = str(path).rstrip("/").rsplit("/", 1)[-1]
    if not name.startswith(_PREFIX):
        raise ValueError(f"not a checkpoint directory: {path}")
    return int(name[len(_PREFIX) :])


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(job: TrainingJob, path: str | Path) -> None:
    """Restore adapter weights and training state saved by `save_checkpoint`."""
    path = Path(path)
    meta = json.loads((path / META_FILE).read_text())
    if meta["job"] != job.name:
        raise ValueError(f"checkpoint {path} belongs to job {meta['job']!r}, not {job.name!r}")
    device = next(iter(job.adapter.parameters())).device
    tensors = load_file(str(path / ADAPTER_FILE), device=str(device))
    job.adapter.load_tensors(tensors)
    job.load_state_dict(torch.load(path / STATE_FILE, map_location=device, weights_only=True))
