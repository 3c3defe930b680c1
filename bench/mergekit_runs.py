"""mergekit merges measured against their plans, on this machine's CPU.

Builds random Llamas of several shapes (bf16 safetensors, as save_pretrained writes them), runs
every mergekit method through `vramplan merge MODEL --method M --merge-with DIR ... --run --json`
(the measured child of launcher/merge_job.py: the anonymous memory's peak above the imported
runtime) and sets the plan's host peak beside it.

The per-value working sets in planner/merge.py (MERGEKIT_WORKING_PER_VALUE) were measured on the
head of the "fit" shape only (hidden 512, vocab 16,000: 8.2 M values), one tensor at a time; the
other shapes' whole merges are held out: other hidden sizes, vocabularies and layer counts, a model
whose largest tensor is an MLP weight, not the head.

    python bench/mergekit_runs.py            # every shape, method, model count; bf16 (about 15 minutes on 2 cores)
    python bench/mergekit_runs.py --quick    # one held-out shape, bf16 and fp32
    python bench/mergekit_runs.py --out bench/results/mergekit-DATE.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# name: (hidden, layers, vocab, held out)
SHAPES = {
    "fit-h512-v16k": (512, 4, 16000, False),
    "h1024-v16k": (1024, 4, 16000, True),
    "h768-v32k": (768, 3, 32000, True),
    "h1024-v2k (MLP largest)": (1024, 2, 2000, True),
}
CASES = [("linear", 2), ("linear", 3), ("slerp", 2), ("task_arithmetic", 2), ("task_arithmetic", 3), ("ties", 2), ("ties", 3),
         ("dare_ties", 3), ("dare_linear", 3), ("passthrough", 2)]


def build(root: Path, hidden: int, layers: int, vocab: int, count: int) -> list[Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    paths = []
    for seed in range(count):
        path = root / f"m{seed}"
        torch.manual_seed(seed)
        config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 5 // 2, num_hidden_layers=layers, vocab_size=vocab,
                             num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256), tie_word_embeddings=False)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
        paths.append(path)
    return paths


def run_case(models: list[Path], method: str, n: int, dtype: str, out: Path) -> dict:
    from app.cli import main

    args = ["merge", str(models[0]), "--method", method, "--dtype", dtype, "--run", "--output", str(out), "--json"]
    for other in models[1:n]:
        args += ["--merge-with", str(other)]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(args)
    if code != 0:
        return {"error": f"exit {code}"}
    result = json.loads(buffer.getvalue())
    c = result["comparison"]
    return {"measured_bytes": c["host_measured_bytes"], "planned_bytes": c["host_planned_bytes"], "error": c["host_error"],
            "within_band": c["host_within_band"], "page_cache_measured_bytes": c["host_page_cache_measured_bytes"],
            "page_cache_planned_bytes": c["host_page_cache_planned_bytes"], "resident_measured_bytes": c["host_resident_measured_bytes"],
            "runtime_measured_bytes": c["runtime_measured_bytes"], "seconds": result["measured"]["seconds"],
            "peak_at": next((note for note in result["plan"]["notes"] if "the peak is at" in note), "")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    shapes = {"h768-v32k": SHAPES["h768-v32k"]} if args.quick else SHAPES
    dtypes = ("bfloat16", "float32") if args.quick else ("bfloat16",)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vramplan-mergekit-") as tmp:
        for name, (hidden, layers, vocab, held_out) in shapes.items():
            models = build(Path(tmp) / name.split()[0], hidden, layers, vocab, 3)
            for dtype in dtypes:
                for method, n in CASES:
                    out = Path(tmp) / "out"
                    start = time.monotonic()
                    row = {"shape": name, "hidden": hidden, "layers": layers, "vocab": vocab, "held_out": held_out,
                           "method": method, "models": n, "dtype": dtype, **run_case(models, method, n, dtype, out)}
                    import shutil

                    shutil.rmtree(out, ignore_errors=True)
                    rows.append(row)
                    if "measured_bytes" in row:
                        print(f"{name:24s} {dtype:9s} {method:16s} n={n}  measured {row['measured_bytes'] / 2**20:7.1f} MiB  "
                              f"planned {row['planned_bytes'] / 2**20:7.1f} MiB  {row['error']:+6.1%}  ({time.monotonic() - start:.0f} s)", flush=True)
                    else:
                        print(f"{name:24s} {dtype:9s} {method:16s} n={n}  {row['error']}", flush=True)
    # passthrough holds nothing but mergekit's fixed bookkeeping (about 1-2 MiB): its relative error says nothing
    scored = [r for r in rows if "measured_bytes" in r and r["held_out"] and r["method"] != "passthrough"]
    summary = {}
    if scored:
        errors = [r["error"] for r in scored]
        summary = {"held_out_cases": len(scored), "median_abs_error": round(statistics.median(abs(e) for e in errors), 4),
                   "max_over": round(max(errors), 4), "max_under": round(min(errors), 4),
                   "within_10pct": sum(abs(e) <= 0.10 for e in errors), "within_band": sum(r["within_band"] for r in scored)}
        print(json.dumps(summary))
    if args.out:
        import platform

        import mergekit  # noqa: F401
        import torch
        from importlib.metadata import version

        args.out.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()} {os.cpu_count()} CPUs (CPU only)",
            "versions": {"torch": torch.__version__, "transformers": version("transformers"), "mergekit": version("mergekit"),
                         "safetensors": version("safetensors")},
            "summary": summary, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
