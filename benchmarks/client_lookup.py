"""What a queue command pays to find the controller: the imports of looking it up.

Ray unpickles the controller actor's class in every client that looks the actor
up (`carpool status`, `logs`, `wait`, ...), importing the class's module. That
module is `carpool.orchestrator.runtime.controller_actor`, which leaves the control
plane (torch, transformers) to the actor itself; the class used to live in
`carpool.orchestrator.runtime.ray_runtime`, which imports all of it. Each trial imports
one of the two in a fresh interpreter, in turn, and the medians are compared.

    python benchmarks/client_lookup.py [--trials 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

MODULES = {
    "controller_actor (looked up now)": "carpool.orchestrator.runtime.controller_actor",
    "ray_runtime (the control plane)": "carpool.orchestrator.runtime.ray_runtime",
}


def import_seconds(module: str) -> float:
    """Wall time of a fresh interpreter that imports `module` and exits."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=7)
    args = parser.parse_args()
    for module in MODULES.values():  # warm the file cache for both
        import_seconds(module)
    times: dict[str, list[float]] = {label: [] for label in MODULES}
    for _ in range(args.trials):
        for label, module in MODULES.items():
            times[label].append(import_seconds(module))
    medians = {label: statistics.median(t) for label, t in times.items()}
    for label, t in times.items():
        print(f"{label:<34} median {medians[label]:.2f} s  (min {min(t):.2f}, max {max(t):.2f})")
    now, before = medians.values()
    print(f"lookup imports: control plane / controller_actor = {before / now:.1f}x")


if __name__ == "__main__":
    main()
