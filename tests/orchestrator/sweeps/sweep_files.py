"""Sweep files for tests: a template job spec and a sweep over it, written side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def write_sweep(
    root: Path,
    base: Path,
    data: Path,
    eval_data: Path,
    training: dict[str, Any],
    adapter: dict[str, Any] | None = None,
    **sweep: Any,
) -> Path:
    """`root/template.yaml` (the base, data, eval data, adapter and training given) and
    `root/sweep.yaml` over it (the sweep's fields given); returns the sweep file."""
    template = {
        "name": "t",
        "base_model": str(base),
        "dataset": {"path": str(data)},
        "eval_dataset": {"path": str(eval_data)},
        "adapter": adapter or {"r": 2, "target_modules": ["q_proj", "v_proj"]},
        "training": {"batch_size": 2, **training},
    }
    (root / "template.yaml").write_text(yaml.safe_dump(template))
    (root / "sweep.yaml").write_text(yaml.safe_dump({"template": "template.yaml", **sweep}))
    return root / "sweep.yaml"
