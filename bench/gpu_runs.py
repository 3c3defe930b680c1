"""Measure training peaks on a CUDA GPU, one fresh process a run, as calibration rows.

    python bench/gpu_runs.py [--quick | --only NAME,...] [--out FILE] [--timeout SECONDS]

The device check for a session that is lent a GPU: each run of MATRIX starts its own Python
process with `PYTORCH_CUDA_ALLOC_CONF` set as the run says. That has to happen before CUDA starts,
and a fresh process also means no earlier run's cached blocks. The process builds the catalog
model's architecture with random weights (NF4 through bitsandbytes for QLoRA), adds PEFT and
checkpointing as the trainers do, and takes three steps: a plain forward with labels
(`trainer hf`) or TRL's fused LM head (`trainer trl`), under bf16 autocast unless the run turns
it off, then backward, fused AdamW, `zero_grad(set_to_none=True)`. It reports
`max_memory_allocated`, `max_memory_reserved`, and NVML's used memory minus the allocator's
reserved memory (what lies outside the allocator).

The rows go to bench/results/gpu-runs-<GPU>-<date>.jsonl in bench/calibrate.py's form, with the
GPU, the versions and the date. `python bench/calibrate.py bench/results/calibration-runs.jsonl
THAT_FILE` then refits the constants on them. Runs that fail (out of memory, a missing package)
are listed with their reason and left out of the rows.

The matrix fills what the committed H100 runs lack:
- `expandable_segments:True`, which launched runs plan for;
- TRL's fused LM head, the default trainer, where the peak is inside a layer's backward;
- autocast on, beside the committed runs without it;
- QLoRA with the weights loaded by bitsandbytes on the GPU;
- gradient accumulation 2, whose gradients stay through the second micro-batch (the plan's
  `gradient_accumulation_steps`);
- the allocator's release-and-retry: a run capped with `torch.cuda.set_per_process_memory_fraction`
  at 102% and at 95% of the least pool the planner's replay says the step runs in (`cap`): the
  first should survive (at a reserved peak under the cap), the second run out of memory. Its row
  says `survived` either way.
`--quick` takes the first seven runs (estimated at three minutes; not yet timed on a GPU).

Only torch, transformers and peft are needed on the GPU machine (trl for the fused-head runs,
bitsandbytes for QLoRA); the planner is not imported there. Exit status: 0 when every run was
measured, 1 when some failed, 2 when no CUDA GPU is present.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIGS = ROOT / "planner" / "catalog" / "configs"
RESULTS = ROOT / "bench" / "results"
STEPS = 3
LORA_R = 16
ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass(frozen=True)
class Run:
    name: str
    model: str  # catalog id; its config.json is in planner/catalog/configs
    options: dict = field(default_factory=dict)  # plan options, as bench/calibrate.py reads them
    # the allocator's cap, as a multiple of the least pool the planner's replay says the step runs in
    cap: float | None = None

    @property
    def config_file(self) -> Path:
        from planner.catalog import (
            file_stem,  # plain Python: no pydantic needed on the GPU machine
        )

        return CONFIGS / f"{file_stem(self.model)}.json"


def _run(name: str, model: str, cap: float | None = None, **options) -> Run:
    base = {"weights_dtype": "bf16", "precision": "bf16", "optimizer": "adamw", "attention": "sdpa", "lora_dropout": 0.0}
    if options.get("method") in ("lora", "qlora", "dora"):
        base |= {"lora_r": LORA_R, "lora_targets": ALL_LINEAR}
    return Run(name, model, base | options, cap)


L1B, Q15 = "meta-llama/Llama-3.2-1B", "Qwen/Qwen2.5-1.5B"
MATRIX = (
    # the default trainer (TRL's fused LM head), default allocator and expandable segments side by side
    _run("l1b-lora16all-b4s2048-gc-trl", L1B, method="lora", batch_size=4, seq_len=2048, gradient_checkpointing=True, trainer="trl"),
    _run("l1b-lora16all-b4s2048-gc-trl-exp", L1B, method="lora", batch_size=4, seq_len=2048, gradient_checkpointing=True, trainer="trl",
         allocator="expandable_segments"),
    _run("l1b-full-b4s1024-gc-trl", L1B, method="full", batch_size=4, seq_len=1024, gradient_checkpointing=True, trainer="trl"),
    _run("l1b-full-b4s1024-gc-trl-exp", L1B, method="full", batch_size=4, seq_len=1024, gradient_checkpointing=True, trainer="trl",
         allocator="expandable_segments"),
    # bitsandbytes' paged 8-bit AdamW (QLoRA's usual optimizer): its large states outside the pool
    _run("l1b-full-b4s1024-gc-hf-paged8bit", L1B, method="full", batch_size=4, seq_len=1024, gradient_checkpointing=True, trainer="hf",
         optimizer="paged_adamw_8bit"),
    # a committed run (l1b-lora16all-b8s2048-gc, no autocast) again under autocast, and with expandable segments
    _run("l1b-lora16all-b8s2048-gc-hf-autocast", L1B, method="lora", batch_size=8, seq_len=2048, gradient_checkpointing=True, trainer="hf"),
    _run("l1b-lora16all-b8s2048-gc-hf-autocast-exp", L1B, method="lora", batch_size=8, seq_len=2048, gradient_checkpointing=True, trainer="hf",
         allocator="expandable_segments"),
    # without checkpointing, the last layer's backward on the fused head
    _run("l1b-lora16all-b2s2048-trl", L1B, method="lora", batch_size=2, seq_len=2048, gradient_checkpointing=False, trainer="trl"),
    _run("q15-lora16all-b4s4096-gc-trl", Q15, method="lora", batch_size=4, seq_len=4096, gradient_checkpointing=True, trainer="trl"),
    _run("q15-full-b2s2048-gc-hf-exp", Q15, method="full", batch_size=2, seq_len=2048, gradient_checkpointing=True, trainer="hf",
         allocator="expandable_segments"),
    # QLoRA loaded on the GPU by bitsandbytes (its loading is inside the measured peak)
    _run("l1b-qlora16all-b2s2048-gc-trl", L1B, method="qlora", batch_size=2, seq_len=2048, gradient_checkpointing=True, trainer="trl"),
    _run("l1b-dora16all-b4s1024-gc-trl", L1B, method="dora", batch_size=4, seq_len=1024, gradient_checkpointing=True, trainer="trl"),
    # accumulation: the first micro-batch's gradients through the second's forward and backward
    _run("l1b-full-b4s1024-gc-trl-ga2", L1B, method="full", batch_size=4, seq_len=1024, gradient_checkpointing=True, trainer="trl",
         gradient_accumulation_steps=2),
    # full fp32 logits leave cached segments: capped above and below the replay's least pool
    _run("l1b-lora16all-b8s2048-gc-hf-autocast-cap102", L1B, cap=1.02, method="lora", batch_size=8, seq_len=2048, gradient_checkpointing=True,
         trainer="hf"),
    _run("l1b-lora16all-b8s2048-gc-hf-autocast-cap095", L1B, cap=0.95, method="lora", batch_size=8, seq_len=2048, gradient_checkpointing=True,
         trainer="hf"),
)
QUICK = 7


def run_by_name(name: str) -> Run:
    for run in MATRIX:
        if run.name == name:
            return run
    raise KeyError(name)


# -- one run, in its own process -----------------------------------------------------------------


def train_steps(run: Run, device: str = "cuda", config: dict | None = None) -> float:
    """Build the run's model on the device and take its training steps; seconds per step.
    `config` stands in for the catalog's (the CPU test runs the same code on a tiny model)."""
    import torch

    from tests.realstack import _autocast, apply_method, build_model

    options = run.options
    if config is None:
        config = json.loads(run.config_file.read_text())
        for key in ("architectures", "torch_dtype", "dtype"):
            config.pop(key, None)
    quantization = "nf4" if options["method"] == "qlora" else "none"
    model = build_model(config, options["weights_dtype"], quantization=quantization, attention=options["attention"], device=device)
    extra = {}
    if options["trainer"] == "trl":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)
        extra["fused_lm_head"] = True
    model = apply_method(model, options["method"], LORA_R, options["gradient_checkpointing"])
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if options["optimizer"] == "paged_adamw_8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.PagedAdamW8bit(trainable, lr=1e-5)
    else:
        # fused AdamW, the plan's adamw (CPU has a fused kernel too)
        optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=True)
    ids = torch.randint(3, config["vocab_size"], (options["batch_size"], options["seq_len"]), device=device)
    started = time.perf_counter()
    for _ in range(STEPS):
        for _ in range(options.get("gradient_accumulation_steps", 1)):
            with _autocast(options.get("autocast", True), device=device):
                loss = model(input_ids=ids, labels=ids, **extra).loss
            loss.backward()
            del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / STEPS


def measure(run: Run) -> dict:
    """The run on GPU 0 in this process; the figures bench/calibrate.py reads. A capped run
    (VRAMPLAN_POOL_CAP_BYTES from the parent) that runs out of memory says so instead."""
    import torch

    cap = os.environ.get("VRAMPLAN_POOL_CAP_BYTES")
    if cap:
        torch.cuda.set_per_process_memory_fraction(int(cap) / torch.cuda.get_device_properties(0).total_memory)
    try:
        seconds = train_steps(run, "cuda")
    except torch.OutOfMemoryError:
        if not cap:
            raise
        return {"survived": False, "cap_bytes": int(cap), "peak_allocated": torch.cuda.max_memory_allocated(),
                "peak_reserved": torch.cuda.max_memory_reserved(), "outside_allocator": None}
    return {"survived": True, "cap_bytes": int(cap) if cap else None,
        "peak_allocated": torch.cuda.max_memory_allocated(),
        "peak_reserved": torch.cuda.max_memory_reserved(),
        "outside_allocator": _outside_allocator(torch.cuda.memory_reserved()),
        "step_seconds": round(seconds, 3),
    }


def _outside_allocator(reserved: int) -> int | None:
    """NVML's used memory on GPU 0 less the allocator's reserved: the CUDA context and library
    workspaces (the committed runs' definition); None where NVML cannot tell."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        used = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used
    except pynvml.NVMLError:
        return None
    return used - reserved


# -- the matrix, a process each ---------------------------------------------------------------------


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("torch", "transformers", "peft", "trl", "bitsandbytes"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    return out


def calibration_row(run: Run, measured: dict, gpu: str, found_versions: dict, date: str) -> dict:
    """A measured run in bench/calibrate.py's form."""
    return {
        "name": run.name,
        "model": run.model,
        "options": dict(run.options),
        "gpu": gpu,
        "measured": {k: measured[k] for k in ("peak_allocated", "peak_reserved", "outside_allocator")},
        **({"cap_bytes": measured["cap_bytes"], "survived": measured["survived"]} if measured.get("cap_bytes") else {}),
        "metric": f"max_memory_allocated / max_memory_reserved over {STEPS} steps in a fresh process; outside_allocator = NVML used - reserved after the run",
        "versions": found_versions,
        "step_seconds": measured.get("step_seconds"),
        "date": date,
        "source": "bench/gpu_runs.py (random weights of the public architecture)",
    }


def predicted_least_pool(run: Run) -> int:
    """The least pool the planner's replay says this run's step runs in (the planner runs here, in
    the parent; the child only trains)."""
    from planner.catalog import load_catalog_spec
    from planner.options import TrainingOptions
    from planner.step_trace import simulated_for

    options = {k: v for k, v in run.options.items() if k in TrainingOptions.model_fields}
    options["lora_targets"] = options["lora_targets"].split(",") if isinstance(options.get("lora_targets"), str) else options.get("lora_targets", "all-linear")
    step = simulated_for(load_catalog_spec(run.model), TrainingOptions(simulate_allocator=True, gpu_memory_gib=4096, **options))
    if isinstance(step, str):
        raise RuntimeError(f"{run.name}: the planner cannot trace it: {step}")
    return step.peaks.smallest_capacity


def run_in_process(run: Run, timeout: float) -> tuple[dict | None, str]:
    """(measured figures, or None and why) from a fresh Python process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    env.pop("VRAMPLAN_POOL_CAP_BYTES", None)
    if run.cap is not None:
        env["VRAMPLAN_POOL_CAP_BYTES"] = str(int(run.cap * predicted_least_pool(run)))
    if run.options.get("allocator") == "expandable_segments":
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    else:
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    try:
        done = subprocess.run([sys.executable, __file__, "--one", run.name], capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return None, f"over {timeout:.0f} s"
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1]), ""
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return None, f"exit {done.returncode}: {tail[:300]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"the first {QUICK} runs only")
    parser.add_argument("--only", default=None, metavar="NAME,...", help="these runs only (names as in MATRIX)")
    parser.add_argument("--out", type=Path, default=None, help="rows file (default bench/results/gpu-runs-<GPU>-<date>.jsonl)")
    parser.add_argument("--timeout", type=float, default=180, help="seconds a run may take (default 180)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child: measure one run, print its JSON
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_runs: no CUDA GPU here: nothing to measure (run this on the GPU machine)", file=sys.stderr)
        return 2
    if args.one is not None:
        try:
            run = run_by_name(args.one)
        except KeyError:
            print(f"gpu_runs: no run named {args.one!r}", file=sys.stderr)
            return 2
        print(json.dumps(measure(run)))
        return 0

    gpu = torch.cuda.get_device_name(0)
    date = datetime.date.today().isoformat()
    found_versions = versions()
    out = args.out or RESULTS / f"gpu-runs-{gpu.replace(' ', '-')}-{date}.jsonl"
    runs = MATRIX[:QUICK] if args.quick else MATRIX
    if args.only:
        try:
            runs = tuple(run_by_name(name.strip()) for name in args.only.split(",") if name.strip())
        except KeyError as exc:
            print(f"gpu_runs: no run named {exc.args[0]!r}; the runs are: {', '.join(run.name for run in MATRIX)}", file=sys.stderr)
            return 2
    rows, failed = [], []
    for index, run in enumerate(runs, 1):
        measured, why = run_in_process(run, args.timeout)
        if measured is None:
            failed.append({"name": run.name, "why": why})
            print(f"[{index}/{len(runs)}] {run.name}: failed ({why})", flush=True)
            continue
        rows.append(calibration_row(run, measured, gpu, found_versions, date))
        capped = f", capped at {measured['cap_bytes'] / 2**30:.2f} GiB: {'survived' if measured['survived'] else 'out of memory'}" if measured.get("cap_bytes") else ""
        print(f"[{index}/{len(runs)}] {run.name}: allocated {measured['peak_allocated'] / 2**30:.2f} GiB, "
              f"reserved {measured['peak_reserved'] / 2**30:.2f} GiB{capped}", flush=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} rows to {out}" + (f"; {len(failed)} failed: " + json.dumps(failed) if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
