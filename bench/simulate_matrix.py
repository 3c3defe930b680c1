"""Simulated process peaks of catalog models too large for the measured runs, as calibration rows.

    python bench/simulate_matrix.py [--out FILE]

The measured runs (bench/results/calibration-runs.jsonl) are of 0.5B-1.5B models. This traces the
training steps of 0.5B-13B catalog models (planner/step_trace.py: the real transformers/PEFT code
on the meta device, replayed through the caching-allocator model, which reproduces the measured
runs' max_memory_reserved within -1.1% to +1.4%) and writes each as a row in bench/calibrate.py's
form, marked `"simulated": true`. bench/calibrate.py does not fit the formula to them; it holds
the formula's band to them, so that the band covers what the allocator does on models the
measured runs do not reach. About ten minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = (
    "Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B", "Qwen/Qwen2.5-1.5B", "meta-llama/Llama-3.2-3B",
    "mistralai/Mistral-7B-v0.3", "Qwen/Qwen2.5-7B", "meta-llama/Llama-3.1-8B", "meta-llama/Llama-2-13b-hf",
)
SHAPES = ((1, 2048), (4, 1024), (8, 2048), (2, 4096))
METHODS = ("full", "lora", "qlora")
FULL_MAX_PARAMS = 4e9  # full fine-tuning of 7B+ needs more than one GPU: not a single-GPU row
BIG_TOKENS = 8192  # without checkpointing, 7B+ models at more tokens than this need over 140 GiB


def matrix() -> list[tuple[str, dict]]:
    from planner.catalog import load_catalog_spec

    out = []
    for model in MODELS:
        params = load_catalog_spec(model).total_params
        for method, checkpointing, (batch, seq) in itertools.product(METHODS, (True, False), SHAPES):
            if method == "full" and params > FULL_MAX_PARAMS:
                continue
            if not checkpointing and batch * seq > BIG_TOKENS and params > FULL_MAX_PARAMS:
                continue
            out.append((model, {"method": method, "gradient_checkpointing": checkpointing, "batch_size": batch, "seq_len": seq,
                                "trainer": "hf", "lora_dropout": 0.0}))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    date = datetime.date.today().isoformat()
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / f"simulated-matrix-{date}.jsonl")
    args = parser.parse_args(argv)
    os.environ["VRAMPLAN_TRACE_CACHE"] = "off"  # every row traced now, with its own seconds
    from planner.catalog import load_catalog_spec
    from planner.options import TrainingOptions
    from planner.step_trace import STEPS, simulated_for

    rows, started = [], time.perf_counter()
    todo = matrix()
    for index, (model, options) in enumerate(todo, 1):
        # the catalog's spec (so the id is valid for bench/calibrate.py) and the trace a plan makes of it
        simulated = simulated_for(load_catalog_spec(model), TrainingOptions(**options))
        if isinstance(simulated, str):
            print(f"{model} {options}: not simulated ({simulated})", file=sys.stderr)
            continue
        rows.append({
            "name": f"sim {model.split('/')[-1]} {options['method']} {'gc' if options['gradient_checkpointing'] else 'no-gc'} {options['batch_size']}x{options['seq_len']}",
            "model": model, "options": options, "simulated": True,
            "measured": {"peak_allocated": simulated.peaks.peak_allocated, "peak_reserved": simulated.peaks.peak_reserved, "outside_allocator": None},
            "metric": f"planner/step_trace.py: the caching-allocator model over {STEPS} traced steps (no GPU)",
            "date": date,
        })
        print(f"[{index}/{len(todo)} {time.perf_counter() - started:.0f} s] {rows[-1]['name']}: reserved {simulated.peaks.peak_reserved / (1 << 30):.2f} GiB",
              file=sys.stderr, flush=True)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
