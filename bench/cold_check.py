"""Cold start: `vramplan check` on a catalog model vs `python -c "import torch, transformers"`.

Each command runs as a fresh process, N times, alternating; the medians go to
bench/results/cold-check-<date>.json with the versions. Target: the check takes at most half
the time of the import (a CI capacity check should not pay for torch). A single check simulates
the allocator by default: the first one traces the step (imports included), which is timed on its
own; the N repeats read that trace from the disk cache (planner/trace_cache.py, a fresh folder
here), as a CI check asked again does.

    python bench/cold_check.py [-n 7]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHECK = [sys.executable, "-m", "app.cli", "check", "meta-llama/Llama-3.1-8B", "--method", "qlora", "--gpu", "RTX 4000 Ada"]
IMPORT = [sys.executable, "-c", "import torch, transformers"]


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=False, capture_output=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=7)
    args = parser.parse_args()
    os.environ["VRAMPLAN_CACHE_DIR"] = tempfile.mkdtemp(prefix="vramplan-cold-check-")
    os.environ.pop("VRAMPLAN_TRACE_CACHE", None)
    os.environ.pop("VRAMPLAN_SIMULATE_ALLOCATOR", None)
    timed(IMPORT)  # warm the OS file cache: "cold" means a new process, not a cold disk
    first = timed(CHECK)  # traces the step and keeps it
    check, imports = [], []
    for _ in range(args.n):
        check.append(timed(CHECK))
        imports.append(timed(IMPORT))
    import torch
    import transformers

    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "runs": args.n,
        "first_check_with_trace_s": round(first, 3),
        "vramplan_check_median_s": round(statistics.median(check), 3),
        "import_torch_transformers_median_s": round(statistics.median(imports), 3),
    }
    result["ratio"] = round(result["vramplan_check_median_s"] / result["import_torch_transformers_median_s"], 3)
    result["target_met"] = result["ratio"] <= 0.5
    out = Path(__file__).parent / "results" / f"cold-check-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
