"""Cold start: `vramplan check` on a catalog model vs `python -c "import torch, transformers"`.

Each command runs as a fresh process, N times, alternating, in one run; the medians go to
bench/results/cold-check-<date>.json with the versions. A check simulates the allocator by
default, and cold (a fresh machine: nothing in the trace cache, VRAMPLAN_TRACE_CACHE=off here) it
traces two training steps first. Before the trace it prints one line on stderr with the
calibrated formula's fast answer; the traced answer is the one line on stdout at the end. Both
are timed from the process's start:

- first answer: the fast line on stderr (or stdout's line, when nothing is traced);
- final answer: the traced line on stdout, the process's exit.

Target: the first answer within half the time of the import (a CI capacity check should not pay
for torch); the final answer's time is reported beside it. The check asked again with the trace
kept (the disk cache, planner/trace_cache.py, a fresh folder here) is timed too.

    python bench/cold_check.py [-n 5]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CHECK = [sys.executable, "-m", "app.cli", "check", "meta-llama/Llama-3.1-8B", "--method", "qlora", "--gpu", "RTX 4000 Ada"]
IMPORT = [sys.executable, "-c", "import torch, transformers"]


def timed(cmd: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=False, capture_output=True, env=env)
    return time.perf_counter() - start


def timed_check(env: dict) -> dict:
    """Seconds to the first line on either stream and to the exit, and the lines themselves."""
    start = time.perf_counter()
    proc = subprocess.Popen(CHECK, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[tuple[float, str, str]] = []

    def read(stream, name):
        for line in stream:
            lines.append((time.perf_counter() - start, name, line.rstrip("\n")))

    readers = [threading.Thread(target=read, args=(proc.stdout, "stdout")), threading.Thread(target=read, args=(proc.stderr, "stderr"))]
    for reader in readers:
        reader.start()
    proc.wait()
    for reader in readers:
        reader.join()
    final = time.perf_counter() - start
    lines.sort()
    return {"first_s": lines[0][0] if lines else final, "final_s": final, "exit": proc.returncode,
            "first_line": lines[0][2] if lines else "", "final_line": next((t for _, n, t in reversed(lines) if n == "stdout"), "")}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=5)
    args = parser.parse_args()
    os.environ.pop("VRAMPLAN_SIMULATE_ALLOCATOR", None)
    cold_env = {**os.environ, "VRAMPLAN_TRACE_CACHE": "off"}
    kept_env = {**os.environ, "VRAMPLAN_CACHE_DIR": tempfile.mkdtemp(prefix="vramplan-cold-check-")}
    kept_env.pop("VRAMPLAN_TRACE_CACHE", None)
    timed(IMPORT)  # warm the OS file cache: "cold" means a new process, not a cold disk
    timed(CHECK, kept_env)  # traces the step and keeps it, for the repeats with the trace kept
    cold, imports, kept = [], [], []
    for _ in range(args.n):
        cold.append(timed_check(cold_env))
        imports.append(timed(IMPORT))
        kept.append(timed(CHECK, kept_env))
    import torch
    import transformers

    first = statistics.median(c["first_s"] for c in cold)
    final = statistics.median(c["final_s"] for c in cold)
    imported = statistics.median(imports)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "command": " ".join(["vramplan", *CHECK[3:]]),
        "runs": args.n,
        "cold_first_answer_median_s": round(first, 3),
        "cold_final_answer_median_s": round(final, 3),
        "import_torch_transformers_median_s": round(imported, 3),
        "first_answer_ratio": round(first / imported, 3),
        "final_answer_ratio": round(final / imported, 3),
        # the time half of the goal: the first answer is the calibrated formula's, whose held-out
        # error (docs/accuracy.md) is not yet the simulated plan's, so that half is not met by it
        "first_answer_time_target_met": first / imported <= 0.5,
        "first_answer_source": "formula (calibrated reserve); the traced answer follows on stdout",
        "check_with_trace_kept_median_s": round(statistics.median(kept), 3),
        "cold_runs": [{k: round(v, 3) if isinstance(v, float) else v for k, v in c.items() if k not in ("first_line", "final_line")} for c in cold],
        "first_line": cold[-1]["first_line"],
        "final_line": cold[-1]["final_line"],
        "import_runs_s": [round(t, 3) for t in imports],
    }
    out = Path(__file__).parent / "results" / f"cold-check-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
