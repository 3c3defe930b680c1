"""What a simulated plan costs: seconds per catalog model, as a single plan's default pays them.

    python bench/simulate_cost.py [--out FILE]

Each model's QLoRA plan (checkpointing, 1 x 2048 tokens, trainer hf) is built once with the
formula and once with the allocator simulated (planner/step_trace.py), in one process after a
warm-up plan, so imports are not counted. The time grows with the layers traced, which is why a
single plan simulates by default only up to planner/request.AUTO_MAX_LAYERS layers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = (
    "Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.1-8B",
    "meta-llama/Llama-2-13b-hf", "Qwen/Qwen2.5-32B", "meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.1-405B",
)
OPTIONS = {"method": "qlora", "gradient_checkpointing": True, "batch_size": 1, "seq_len": 2048, "trainer": "hf", "gpu_memory_gib": 4096}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    date = datetime.date.today().isoformat()
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / f"simulate-cost-{date}.json")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["VRAMPLAN_TRACE_CACHE"] = "off"  # a trace read from the disk cache would time nothing
    from planner.catalog import load_catalog_spec
    from planner.options import TrainingOptions
    from planner.plan import build_plan
    from planner.step_trace import STEPS

    build_plan(load_catalog_spec("Qwen/Qwen2.5-0.5B"), TrainingOptions(simulate_allocator=True, method="lora", batch_size=1, seq_len=64))
    rows = []
    for model in args.models:
        spec = load_catalog_spec(model)
        started = time.perf_counter()
        build_plan(spec, TrainingOptions(simulate_allocator=False, **OPTIONS))
        formula_s = time.perf_counter() - started
        started = time.perf_counter()
        plan = build_plan(spec, TrainingOptions(simulate_allocator=True, **OPTIONS))
        simulated_s = time.perf_counter() - started
        rows.append({"model": model, "layers": spec.num_layers, "formula_s": round(formula_s, 3), "simulated_s": round(simulated_s, 2),
                     "reserve_source": plan.reserve_source})
        print(f"{model:32} {spec.num_layers:4} layers  formula {formula_s:6.3f} s  simulated {simulated_s:6.2f} s ({plan.reserve_source})", flush=True)
    result = {"date": date, "options": OPTIONS, "steps": STEPS, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "python": platform.python_version(),
              "rows": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
