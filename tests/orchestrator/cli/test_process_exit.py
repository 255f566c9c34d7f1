"""The `carpool` process ends at once after its command, owing nothing a normal exit pays."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

# Buffered output, an exit handler that writes, and a finalizer that would only run in the
# interpreter's teardown: the first two must come out, the last is what the quick exit skips.
QUICK = """
import atexit, sys
from carpool.orchestrator.cli.process_exit import exit_process
class Torn:
    def __del__(self):
        print("torn down", file=sys.stderr)
kept = Torn()
atexit.register(lambda: print("exit handler ran"))
sys.stdout.write("buffered, no newline")
exit_process(3)
"""

# Another thread still running: the normal exit waits for it.
WITH_THREAD = """
import sys, threading, time
from carpool.orchestrator.cli.process_exit import exit_process
def late():
    time.sleep(0.3)
    print("thread finished", flush=True)
threading.Thread(target=late).start()
exit_process(4)
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_quick_exit_keeps_output_handlers_and_code() -> None:
    done = _run(QUICK)
    assert done.returncode == 3
    assert done.stdout.startswith("buffered, no newline")
    assert "exit handler ran" in done.stdout
    assert "torn down" not in done.stderr  # the teardown was skipped


def test_a_running_thread_gets_the_normal_exit() -> None:
    done = _run(WITH_THREAD)
    assert done.returncode == 4
    assert "thread finished" in done.stdout


def test_carpool_command_exits_with_its_status(tiny_base: Path, tmp_path: Path) -> None:
    spec = {
        "name": "exit",
        "base_model": str(tiny_base),
        "dataset": {"path": str(tmp_path / "missing.jsonl")},
        "adapter": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]},
        "training": {"max_steps": 1, "batch_size": 1},
    }
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    done = subprocess.run(
        [sys.executable, "-m", "carpool", "validate", str(job)], capture_output=True, text=True
    )
    assert done.returncode == 1
    assert "dataset.path: file not found" in done.stderr
    (tmp_path / "missing.jsonl").write_text('{"text": "the cat sat"}\n')
    done = subprocess.run(
        [sys.executable, "-m", "carpool", "validate", str(job)], capture_output=True, text=True
    )
    assert (done.returncode, done.stdout) == (0, f"ok: exit ({job})\n")
