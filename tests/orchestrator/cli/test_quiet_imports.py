"""A command imports only what it uses: `carpool train` of a full-precision job and `carpool
plot` load neither bitsandbytes (peft would import it) nor DeepSpeed (saving a model would),
and print none of their lines about kernels or accelerators."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

NOISE = ("Failed to load CPU gemm_4bit_forward", "Setting accelerator to CPU")
PROBE = """
import sys
from carpool.orchestrator.cli.main import main
code = main(sys.argv[1:])
print("IMPORTED", sorted(m for m in ("bitsandbytes", "deepspeed") if m in sys.modules))
sys.exit(code)
"""


def run(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=300
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    return out


@pytest.mark.integration  # a process per command
def test_train_and_plot_load_neither_bitsandbytes_nor_deepspeed(
    tiny_base: Path, datasets: dict[str, Path], tmp_path: Path
) -> None:
    spec = {
        "name": "quiet",
        "base_model": str(tiny_base),
        "dataset": {"path": str(datasets["text"])},
        "training": {"max_steps": 2, "batch_size": 2},
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    trained = run("train", str(tmp_path / "job.yaml"), "--out", str(tmp_path / "out"))
    plotted = run("plot", str(tmp_path / "out" / "quiet"), "--out", str(tmp_path / "c.png"))
    for out in (trained, plotted):
        assert "IMPORTED []" in out, out[-2000:]
        assert not [line for line in NOISE if line in out], out[-2000:]
