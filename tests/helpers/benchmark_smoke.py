"""Each benchmark script's smallest run (a smoke run): it must complete and print its
verdict, so that no benchmark rots unnoticed. The figures themselves are BENCHMARKS.md's,
measured by hand."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).parent.parent.parent / "benchmarks"

# The smallest arguments of each script.
SMOKE_ARGS: dict[str, list[str]] = {
    "after_training.py": ["--adapters", "2", "--rows", "4", "--prompts", "2", "--new-tokens", "2",
                          "--batch-rows", "4", "--hidden", "32", "--layers", "1", "--repeats", "1"],
    "client_lookup.py": ["--trials", "1"],
    "controller_tick.py": ["--ticks", "5", "--trials", "1"],
    "engine.py": ["--jobs", "2", "--rows", "1", "--seq", "16", "--steps", "1", "--warmup", "0",
                  "--trials", "1"],
    "engine_sweep.py": ["--jobs", "1", "--rows", "1", "--lengths", "fixed", "--seq", "16", "--",
                        "--steps", "1", "--warmup", "0", "--trials", "1"],
    "fixed_costs.py": ["--trials", "1", "--jobs", "1"],
    "groups.py": ["--jobs", "1", "--steps", "1"],
    "orchestrator.py": ["--jobs", "1", "--steps", "2"],
    "preference.py": ["--jobs", "1", "--steps", "1", "--pairs", "2"],
    "qlora_cpu_kernel.py": ["--hidden", "64", "--layers", "1", "--rows", "2", "--seq", "16",
                            "--trials", "1"],
    "serve.py": ["--adapters", "2", "--requests", "4", "--concurrency", "2", "--new-tokens", "2",
                 "--hidden", "32", "--layers", "1"],
    "shared_reference.py": ["--jobs", "2", "--pairs", "4", "--epochs", "1", "--batch", "2",
                            "--trials", "1"],
    "soak.py": ["--minutes", "0.02", "--submit-every", "1", "--kill-every", "1000",
                "--drain-minutes", "2"],
    "sweep.py": ["--steps", "4", "--eval-steps", "2", "--concurrent", "2", "--hidden", "32",
                 "--layers", "1"],
}  # fmt: skip
# Scripts that take `--address`: their smoke runs use the suite's Ray head (the soak's
# smoke run kills nothing).
ATTACHED = {"orchestrator.py", "serve.py", "soak.py"}
RATIO = re.compile(r"\d\.\d+x")
# The scripts whose verdict is not a ratio: what they print instead.
VERDICT = {
    "fixed_costs.py": re.compile(r"^total +\d", re.M),
    "soak.py": re.compile(r'"lost": 0\b'),
    # Without AVX512-BF16 the CPU has one 4-bit kernel: the script says so instead.
    "qlora_cpu_kernel.py": re.compile(r"exact/fast time: \d|one kernel"),
}


def run_smallest(script: str, address: str | None = None) -> None:
    """Run the script as a user does (its folder leads sys.path, so no file there may shadow
    a package), at its smallest size, on the Ray head at `address` if given."""
    extra = ["--address", address] if address else []
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *SMOKE_ARGS[script], *extra],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
    assert VERDICT.get(script, RATIO).search(done.stdout), done.stdout[-2000:]
