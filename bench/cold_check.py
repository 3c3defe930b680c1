"""Cold start: `vramplan check` on a catalog model vs `python -c "import torch, transformers"`.

Each command runs as a fresh process, N times, alternating, in one run; the medians go to
bench/results/cold-check-<date>.json with the versions. A check simulates the allocator by
default. Cold (a fresh machine: nothing in the trace cache, VRAMPLAN_TRACE_CACHE=off here) it
replays the shipped trace template of the step where one holds (planner/trace_templates.py: the
traced plan's numbers, no torch), which the README's check has; timed too with
VRAMPLAN_TRACE_TEMPLATES=off, as before templates: the calibrated formula's fast line on stderr,
then two training steps traced and the traced answer on stdout. Both are timed from the
process's start:

- first answer: the first line on either stream;
- final answer: the traced (or replayed) line on stdout, the process's exit.

Target: the first answer within half the time of the import (a CI capacity check should not pay
for torch), and that answer the simulated plan's. The check asked again with the trace kept (the
disk cache, planner/trace_cache.py, a fresh folder here, templates off) is timed too.

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


def _simulated(line: str) -> bool:
    return "allocator simulated" in line


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=5)
    args = parser.parse_args()
    os.environ.pop("VRAMPLAN_SIMULATE_ALLOCATOR", None)
    cold_env = {**os.environ, "VRAMPLAN_TRACE_CACHE": "off"}
    cold_env.pop("VRAMPLAN_TRACE_TEMPLATES", None)
    untemplated_env = {**cold_env, "VRAMPLAN_TRACE_TEMPLATES": "off"}
    kept_env = {**untemplated_env, "VRAMPLAN_CACHE_DIR": tempfile.mkdtemp(prefix="vramplan-cold-check-")}
    kept_env.pop("VRAMPLAN_TRACE_CACHE", None)
    timed(IMPORT)  # warm the OS file cache: "cold" means a new process, not a cold disk
    timed(CHECK, kept_env)  # traces the step and keeps it, for the repeats with the trace kept
    cold, untemplated, imports, kept = [], [], [], []
    for _ in range(args.n):
        cold.append(timed_check(cold_env))
        imports.append(timed(IMPORT))
        untemplated.append(timed_check(untemplated_env))
        kept.append(timed(CHECK, kept_env))
    import torch
    import transformers

    imported = statistics.median(imports)

    def summary(runs: list[dict]) -> dict:
        first = statistics.median(c["first_s"] for c in runs)
        final = statistics.median(c["final_s"] for c in runs)
        simulated_first = all(_simulated(c["first_line"]) for c in runs)
        return {
            "first_answer_median_s": round(first, 3),
            "final_answer_median_s": round(final, 3),
            "first_answer_ratio": round(first / imported, 3),
            "final_answer_ratio": round(final / imported, 3),
            "first_answer_is_the_simulated_plan": simulated_first,
            "target_met": first / imported <= 0.5 and simulated_first,
            "runs": [{k: round(v, 3) if isinstance(v, float) else v for k, v in c.items() if k not in ("first_line", "final_line")} for c in runs],
            "first_line": runs[-1]["first_line"],
            "final_line": runs[-1]["final_line"],
        }

    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "command": " ".join(["vramplan", *CHECK[3:]]),
        "runs": args.n,
        "import_torch_transformers_median_s": round(imported, 3),
        "cold_with_templates": summary(cold),
        "cold_without_templates": summary(untemplated),
        "check_with_trace_kept_median_s": round(statistics.median(kept), 3),
        "import_runs_s": [round(t, 3) for t in imports],
    }
    out = Path(__file__).parent / "results" / f"cold-check-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
