"""Check plans against published measured runs from other projects (a held-out test: the fit never saw them).

    python bench/published.py [--check]

Reads bench/results/published-cases.json (the facts of 40 published runs, each with its source),
maps every case that can be planned faithfully to TrainingOptions, builds its plan, and compares
the measured value with what the plan predicts for the case's own metric:

    max_memory_reserved   the plan's peak less what lies outside the allocator (the CUDA context,
                          NCCL's buffers; the band likewise)
    max_memory_allocated  the plan's non-runtime components (torchtune's "active" bytes count here)
    NVML / nvidia-smi     the plan's whole peak, the band as it is

A case is skipped, with a one-line reason, when its metric is not stated, its model (or a config
with the same shapes) is not in the catalog, or it uses something the planner cannot express
(chunked loss with torch.compile, activation offloading, GPTQ, GaLore). Writes
bench/results/published-<DATE>.json and .md; --check only compares with the committed files.

It also writes bench/results/published-by-stack-<DATE>.json and .md: the same comparisons grouped
by stack (single GPU, DDP, ZeRO-2/3, FSDP1/FSDP2, CPU offload), method and stage, each group's
median and worst errors, band coverage and verdicts, before (the planner at the first HISTORY
commit) and after (the planner now), what each later commit moved, and what the fixes that are
plan options would move set as each source published them. --history re-takes the earlier
commits' figures in temporary git worktrees outside the checkout (VRAMPLAN_PLANNER_ROOT points
this file at an older planner); without it they are read from the committed report.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the planner to plan with: this checkout's, or (for the by-stack report's history) an older
# commit's checked out elsewhere; the cases and their mapping are always this file's
sys.path.insert(0, str(Path(os.environ.get("VRAMPLAN_PLANNER_ROOT", ROOT)).resolve()))

from planner.catalog import find_catalog_model, load_catalog_spec
from planner.options import TrainingOptions
from planner.plan import build_plan
from planner.runtime import calibration

GIB = 1 << 30
MIB = 1 << 20
DATE = "2026-12-06"
CASES_FILE = ROOT / "bench" / "results" / "published-cases.json"
RESULTS_JSON = ROOT / "bench" / "results" / f"published-{DATE}.json"
RESULTS_MD = ROOT / "bench" / "results" / f"published-{DATE}.md"
BY_STACK_JSON = ROOT / "bench" / "results" / f"published-by-stack-{DATE}.json"
BY_STACK_MD = ROOT / "bench" / "results" / f"published-by-stack-{DATE}.md"
UNITS = {"bytes": 1, "GiB": GIB, "GB": 10**9}

MISTRAL_V03_NOTE = "planned with Mistral-7B-v0.3's spec: vocabulary 32,768 instead of 32,000 (+6.3 M parameters, +2.4% logits)"
# Not in the catalog under their own id, but the same shapes as a catalog model: candidates in
# order, the first the planner's catalog has (a planner from before a model joined it, the report's
# history, plans with the look-alike it had then).
EQUIVALENT_MODELS = {
    "NousResearch/Llama-2-70b-hf": (("meta-llama/Llama-2-70b-hf", None),),
    "meta-llama/Meta-Llama-3-8B": (("meta-llama/Llama-3.1-8B", None),),
    "mistralai/Mistral-7B-v0.1": (("mistralai/Mistral-7B-v0.1", None), ("mistralai/Mistral-7B-v0.3", MISTRAL_V03_NOTE)),
    "mistral-community/Mistral-7B-v0.2 (base, 32k ctx)": (("mistral-community/Mistral-7B-v0.2", None),
                                                          ("mistralai/Mistral-7B-v0.3", MISTRAL_V03_NOTE)),
}

# Published GPU descriptions -> catalog names (the GPU changes the verdict, and the hardware
# rules on bf16 and FlashAttention, not the peak).
GPUS = {
    "NVIDIA L40S 48GB": "NVIDIA L40S",
    "A100-SXM 80GB": "NVIDIA A100-SXM4-80GB",
    "A100 (80GB)": "NVIDIA A100-SXM4-80GB",
    "A100": "NVIDIA A100-SXM4-80GB",
    "not stated (single GPU, likely A100)": "NVIDIA A100-SXM4-80GB",
    "not stated": "NVIDIA A100-SXM4-80GB",
    "2x RTX 3090 24GB": "NVIDIA GeForce RTX 3090",
    "2x RTX 3090 / 2x RTX 4090 24GB": "NVIDIA GeForce RTX 3090",
    "2x RTX 4090 24GB": "NVIDIA GeForce RTX 4090",
    "A10G 24GB": "NVIDIA A10G",
}

# What each source's stack does that the case rows leave implicit (from each source's own
# description of its harness): the loss path, the attention kernel, and the dtypes.
STACKS = {
    # hand-written loop, model(labels=...); weights bf16 without autocast; PEFT's fp32 adapters
    "peft_mc": {"trainer": "hf", "attention": "sdpa", "precision": "bf16", "weights_dtype": "bf16", "autocast": False},
    # HF Trainer, use_flash_attn=True, torch_dtype bf16; transformers 4.48.1 (refs/requirements.txt),
    # whose ForCausalLMLoss shifts the upcast logits into a copy: fp32_upcast_shifted; its
    # gradient_checkpointing_enable defaults to use_reentrant true
    "fms": {"trainer": "hf", "attention": "flash", "precision": "bf16", "weights_dtype": "bf16", "loss_implementation": "fp32_upcast_shifted",
            "use_reentrant": True},
    # torchtune recipes: own loop over full logits, pure bf16 (LoRA weights too: not expressible, a few MiB)
    "tt_lora_tut": {"trainer": "hf", "attention": "sdpa", "precision": "bf16", "weights_dtype": "bf16"},
    "tt_opt_table": {"trainer": "hf", "attention": "sdpa", "precision": "bf16", "weights_dtype": "bf16"},
    # fsdp_qlora train.py: model(labels=...), pure bf16 (the model cast to bf16 before get_peft_model, no
    # autocast, no mixed-precision policy), reentrant checkpointing; PEFT of early 2024 (before 0.12) made
    # the adapters in the base's dtype: autocast_adapter_dtype false
    "aai": {"trainer": "hf", "attention": "sdpa", "precision": "bf16", "weights_dtype": "bf16", "autocast": False,
            "autocast_adapter_dtype": False, "use_reentrant": True},
    # litgpt: own loop, bf16-true (its LoRA weights bf16 like the base's: autocast_adapter_dtype false),
    # cross-entropy on the bf16 logits chunks without an upcast (litgpt/utils.py chunked_cross_entropy:
    # no_upcast; its 128-token chunking is not expressible, so the backward's temporaries are planned whole)
    "litgpt": {"trainer": "hf", "attention": "sdpa", "precision": "bf16", "weights_dtype": "bf16", "autocast_adapter_dtype": False,
               "loss_implementation": "no_upcast"},
}

# Sources whose trainer checkpointed each FSDP1 unit from outside with a reentrant checkpoint
# (reentrant_checkpoint_around_fsdp_unit): fms-acceleration's runs pinned transformers 4.48.1, whose
# LlamaModel/MistralModel loop calls _gradient_checkpointing_func(decoder_layer.__call__, ...) with
# use_reentrant true by default (modeling_utils gradient_checkpointing_enable), decoder_layer being
# FSDP1's unit. Answer.AI's fsdp_qlora applies torch's checkpoint_wrapper after wrapping (inside
# each unit), so its runs are planned without it. The option changes nothing off FSDP1 with PEFT.
REENTRANT_AROUND_UNIT_SOURCES = ("fms",)

# A model whose own code computes its loss otherwise than the source's trainer (loss_implementation,
# by source and model type): transformers 4.48.1, which fms-acceleration's runs pinned, gives
# GPTBigCodeForCausalLM its own CrossEntropyLoss on the bf16 logits after an explicit shift (no fp32
# upcast: models/gpt_bigcode/modeling_gpt_bigcode.py), where its Llama and Mistral call ForCausalLMLoss.
MODEL_LOSS_PATHS = {("fms", "gpt_bigcode"): "no_upcast"}

# Sources whose model code holds lm_head apart from the embedding whatever the checkpoint says:
# litgpt's GPT has its own lm_head (litgpt/model.py), its converter copies a tied checkpoint's
# embedding into lm_head.weight (scripts/convert_hf_checkpoint.py), and finetune/lora.py refuses
# tie_embeddings (litgpt 0.4.13 and 0.5.0). A tied model (Llama 3.2 1B) carries a second
# vocabulary x hidden matrix there, frozen under LoRA.
UNTIED_HEAD_SOURCES = ("litgpt",)

# The FSDP each source's harness ran where its cases do not name it (a case saying FSDP1 or FSDP2
# is planned as it says): Answer.AI's fsdp_qlora train.py wraps the model in torch's
# FullyShardedDataParallel (FSDP1); fms-acceleration's runs go through accelerate's FSDP plugin,
# whose default is fsdp_version 1 (and which had no FSDP2 before accelerate 1.6, after torch 2.4).
FSDP_VERSIONS = {"aai": 1, "fms": 1}

# Sources whose trainer prepared a 4-bit model on one GPU: fms-acceleration's baseline-peft-bnb hands
# the bare 4-bit model to TRL 0.13's SFTTrainer (its refs/requirements.txt pins trl 0.13.0), which
# runs PEFT's prepare_model_for_kbit_training and then its own peft_module_casting_to_bf16 (norms
# fp32, embeddings and lm_head back to bf16) when the 4-bit weights are on the GPU; on two GPUs with
# FSDP's cpu_ram_efficient_loading they are on cpu/meta, and TRL skips both (sharded QLoRA).
KBIT_PREPARING_SOURCES = ("fms",)

# Cases whose metric is known and model is plannable but that use what the planner cannot express.
NOT_EXPRESSIBLE = {
    "TT-9": "torch.compile and chunked cross-entropy on a 128k vocabulary (the planner holds the full logits and their fp32 upcast)",
    "TT-10": "activation offloading to the CPU, torch.compile and chunked cross-entropy, none of which the planner models",
    # planned until 2026-12-05 at -35.0%: the reserve is the loader's, not the step's
    "TT-2": "torchao's NF4 (torchtune's QLoRA) quantizes a model already loaded in bf16 on the GPU, and the allocator keeps the load's "
            "blocks: 9.13 GB reserved at init, before the first step; the planner plans bitsandbytes' loader (a Linear at a time)",
    # planned until 2026-12-05 at +146.6% allocated: the plan is of the installed transformers 5
    "FMS-7": "Mixtral QLoRA under transformers 4.48, whose per-expert Linear layers bitsandbytes quantized; the planner plans the "
             "installed transformers 5, whose fused 3-D expert parameters bitsandbytes leaves in bf16 (85 GiB of weights, not about 23)",
    # planned until 2026-12-05 at -23.6% allocated
    "LIT-2": "bitsandbytes 0.42 (LitGPT's pin at the table's commits) kept every frozen 4-bit Linear's input for backward "
             "(MatMul4Bit's ctx.tensors, dropped in 0.43.2) and LitGPT quantizes lm_head too, dequantizing the 128k x 4096 head for each "
             "128-token chunk; the planner plans bitsandbytes 0.43.2 and later",
    # planned as LoRA r=2 until 2026-11-29 (+12.2% formula, +9.1% simulated): LoRA's fp32 adapter
    # casts its input and saves the copy, TinyLoRA's frozen projections save nothing of it
    "PMC-5": "TinyLoRA, which the planner has no method for: it trains a vector between frozen projections, so unlike LoRA it saves no "
             "fp32 copy of each adapted layer's input (bench/tinylora_saved.py: 2 such copies a layer, about 2 GiB on this run)",
}

SOURCE_NOTES = {
    "peft_mc": "seq_len is the cap (768); the run's longest batch (about 400-500 tokens) is not published, so activations and logits are planned high",
    "fms": "HF Trainer's adamw_torch is torch's multi-tensor (foreach) AdamW: planned as adamw_foreach (before that option, FMS-2 was -9.5% allocated; now +0.1%); "
           "the loss is transformers 4.48.1's: fp32_upcast_shifted (its ForCausalLMLoss copies the shifted fp32 logits; before that path, "
           "FMS-4 was -4.5% allocated and FMS-6 -5.9%), and GPT-BigCode's own cross-entropy on the bf16 logits, no_upcast (FMS-1 was +11.2%)",
}

# Known limits of a mapping, kept beside its row.
CASE_NOTES = {
    "TT-8": "metric is torchtune's peak active bytes, compared as allocated",
    "FMS-8": "transformers 4.48.1 checkpointed each FSDP1 unit from outside, reentrant: planned with reentrant_checkpoint_around_fsdp_unit "
             "(FSDP1's hook holds every layer's input and its gradient to the end of backward; -19.9% allocated without it); the plan's "
             "band carries the 'sharded QLoRA' allowance (planner/plan.py KNOWN_GAPS), sized from this run and AAI-1, so their band coverage "
             "is not a held-out figure",
    "AAI-1": "sharded QLoRA: the plan's band carries the 'sharded QLoRA' allowance (planner/plan.py KNOWN_GAPS), sized from this run and "
             "FMS-8, so their band coverage is not a held-out figure",
    "LIT-1": "litgpt computes the LM head and loss in 128-token chunks: planned as cross-entropy on the whole bf16 logits (no_upcast), "
             "whose backward temporaries the chunks keep smaller; litgpt's loop also keeps the last micro-batch's logits into the next "
             "forward, which the plan does not hold",
    "LIT-3": "litgpt keeps lm_head apart from the embedding (planned untied: 262,668,288 more frozen bf16 parameters than the tied "
             "checkpoint); its chunked bf16 loss planned as no_upcast, as on LIT-1",
    "FMS-6": "TRL 0.13's SFTTrainer prepared the 4-bit model (prepare_model_for_kbit_training, then peft_module_casting_to_bf16): planned "
             "with both (-25.4% allocated without them); fp32 norms make every layer input after the first fp32 (the source's accelerated "
             "loader, which skips the upcast, held 4.0 GiB less)",
}


def load_cases(path: Path = CASES_FILE) -> list[dict]:
    return json.loads(path.read_text())["cases"]


def measured_bytes(case: dict) -> int:
    return round(case["value"] * UNITS[case["unit"]])


def metric_of(case: dict) -> str | None:
    """reserved, allocated, nvml, or None when the source does not say which."""
    text = case["metric"].lower()
    if "not stated" in text or text.startswith("likely") or "probably" in text:
        return None
    if "max_memory_reserved" in text:
        return "reserved"
    if "max_memory_allocated" in text or "active bytes" in text:
        return "allocated"
    if "nvidia-smi" in text or "nvml" in text:
        return "nvml"
    return None


def catalog_model(case: dict) -> tuple[str | None, str | None]:
    """(catalog id or variant name to plan with, a note), or (None, None) when nothing fits."""
    name = case["model"]
    for model, note in EQUIVALENT_MODELS.get(name, ()):
        if find_catalog_model(model) is not None:
            return model, note
    match = find_catalog_model(name)
    if match is None:
        return None, None
    return name, match.note


def _spec(model: str):
    match = find_catalog_model(model)
    return match.spec if match is not None else load_catalog_spec(model)


def spec_for(case: dict, model: str):
    """The spec the case's source built: the catalog's, untied where the source's model code
    keeps lm_head apart (UNTIED_HEAD_SOURCES)."""
    spec = _spec(model)
    if case["source"]["key"] not in UNTIED_HEAD_SOURCES or not spec.tie_word_embeddings:
        return spec
    from planner.catalog import CONFIGS_DIR, file_stem
    from planner.introspect import spec_from_config

    config = json.loads((CONFIGS_DIR / f"{file_stem(spec.name)}.json").read_text())
    return spec_from_config(dict(config, tie_word_embeddings=False), spec.name)


def _targets(lora: dict) -> list[str] | str:
    targets = lora["targets"]
    if targets == "all-linear":
        return targets
    # litgpt's fused qkv: 'query' and 'value' adapt the q and v projections
    names = {"query": "q_proj", "value (fused qkv in litgpt)": "v_proj", "q": "q_proj", "v": "v_proj"}
    return [names.get(t, t) for t in targets]


def _method(case: dict) -> str:
    text = case["method"].lower()
    if text.startswith("full"):
        return "full"
    if "qlora" in text or "q-lora" in text:
        return "qlora"
    if "dora" in text or (case.get("lora") or {}).get("use_dora"):
        return "dora"
    return "lora"


def skip_reason(case: dict) -> str | None:
    if metric_of(case) is None:
        return f"metric not stated ({case['metric']})"
    if case["id"] in NOT_EXPRESSIBLE:
        return NOT_EXPRESSIBLE[case["id"]]
    if catalog_model(case)[0] is None:
        return f"{case['model']} is not in the catalog and has no catalog model with the same shapes"
    if case.get("seq_len") is None:
        return "sequence length not published"
    return None


def _optimizer(case: dict) -> str:
    """torch's AdamW without fused=True runs its multi-tensor (foreach) path on CUDA, and so does
    transformers' adamw_torch: `adamw_foreach`. Fused and DeepSpeed's AdamW update in place: `adamw`."""
    text = case.get("optimizer", "").lower()
    if "fused=true" in text or "deepspeed" in text:
        return "adamw"
    return "adamw_foreach"


def fsdp_version_of(case: dict) -> int | None:
    """The FSDP a sharded case ran: as the case says (FSDP1, FSDP2), else its source's harness's."""
    sharding = case["sharding"].lower()
    return 2 if "fsdp2" in sharding else 1 if "fsdp1" in sharding else FSDP_VERSIONS.get(case["source"]["key"])


def options_for(case: dict) -> TrainingOptions:
    """The TrainingOptions of a plannable case: its own fields, plus its source's stack."""
    stack = STACKS[case["source"]["key"]]
    method = _method(case)
    # options a planner from before them (the report's history) does not have: planned as it did
    fields = {name: value for name, value in stack.items() if _has_option(name, value)}
    fields.update(
        method=method,
        gpu=GPUS[case["gpu"]],
        num_gpus=case["n_gpus"],
        batch_size=case["batch"],
        seq_len=case["seq_len"],
        gradient_checkpointing=bool(case["gc"]),
        optimizer=_optimizer(case),
    )
    model_loss = MODEL_LOSS_PATHS.get((case["source"]["key"], _spec(catalog_model(case)[0]).model_type))
    if model_loss is not None and _has_option("loss_implementation", model_loss):
        fields["loss_implementation"] = model_loss
    accumulation = _accumulation(case, fields)
    if accumulation is not None and _has_option("gradient_accumulation_steps"):
        fields["gradient_accumulation_steps"] = accumulation
    sharding = case["sharding"].lower()
    if case["n_gpus"] > 1:
        if "fsdp" not in sharding:
            raise ValueError(f"{case['id']}: unmapped sharding {case['sharding']!r}")
        fields["parallelism"] = "fsdp"
        version = fsdp_version_of(case)
        # a planner from before the option (the report's history) has the one FSDP model
        if version is not None and _has_option("fsdp_version"):
            fields["fsdp_version"] = version
        if "offload" in sharding and "no offload" not in sharding and "no cpu offload" not in sharding:
            fields["offload"] = "params"
    lora = case.get("lora")
    if method in ("lora", "qlora", "dora"):
        fields.update(lora_r=lora["r"], lora_targets=_targets(lora), lora_dropout=lora.get("dropout", 0.0))
        if "alpha" in lora:
            fields["lora_alpha"] = lora["alpha"]
    if (case["source"]["key"] in REENTRANT_AROUND_UNIT_SOURCES and fields.get("parallelism") == "fsdp" and fields.get("fsdp_version", 1) == 1
            and bool(case["gc"]) and _has_option("reentrant_checkpoint_around_fsdp_unit")):
        fields["reentrant_checkpoint_around_fsdp_unit"] = True
    if method == "qlora" and "no double quant" in case["method"].lower():
        fields["double_quant"] = False
    if method == "qlora" and case["source"]["key"] in KBIT_PREPARING_SOURCES and case["n_gpus"] == 1 and _has_option("peft_module_casting_to_bf16"):
        fields.update(prepare_model_for_kbit_training=True, peft_module_casting_to_bf16=True)
    return TrainingOptions(**fields)


# Sources whose runs are the stack the step trace reproduces: a transformers forward with labels
# and PEFT adapters, one GPU, the allocator's reserved metric (over many steps of variable length)
TRACED_STACKS = ("peft_mc",)


def skipped_traced_cases(cases: list[dict] | None = None) -> list[tuple[str, str]]:
    """(id, why) of the traced stack's runs that calibration_rows leaves out: a method or setting
    the planner cannot express, so their error would be the mapping's, not the band's."""
    return [(case["id"], reason) for case in (cases if cases is not None else load_cases())
            if case["source"]["key"] in TRACED_STACKS and (reason := skip_reason(case)) is not None]


def calibration_rows(cases: list[dict] | None = None) -> list[dict]:
    """The published runs of a traced stack, in bench/calibrate.py's form: they join the
    simulated allocator's check (and its band) as runs of variable-length data."""
    rows = []
    for case in cases if cases is not None else load_cases():
        if case["source"]["key"] not in TRACED_STACKS or skip_reason(case) is not None or metric_of(case) != "reserved":
            continue
        model, _ = catalog_model(case)
        options = options_for(case).model_dump(mode="json", exclude_defaults=True)
        options.pop("gpu", None)
        rows.append({"name": f"published {case['id']}", "model": model, "options": options, "gpu": case["gpu"],
                     "measured": {"peak_allocated": None, "peak_reserved": measured_bytes(case), "outside_allocator": None},
                     "source": case["source"]["key"], "variable_length": True})
    return rows


def _outside_allocator(component) -> bool:
    # a planner older than Component.outside_allocator held only the CUDA context outside it
    return getattr(component, "outside_allocator", component.name == "runtime.cuda_context")


def _prediction(plan, metric: str) -> tuple[int, int | None, int | None]:
    """(central, band low, band high) of the plan for a metric; allocated has no band."""
    context = sum(c.bytes for c in plan.components if _outside_allocator(c))
    if metric == "allocated":
        return sum(c.bytes for c in plan.components if c.family != "runtime" and not _outside_allocator(c)), None, None
    if metric == "reserved":
        return plan.peak_bytes - context, plan.peak_low_bytes - context, plan.peak_high_bytes - context
    return plan.peak_bytes, plan.peak_low_bytes, plan.peak_high_bytes


def _row(case: dict, plan, metric: str, measured: int, row_id: str, model_note: str | None) -> dict:
    central, low, high = _prediction(plan, metric)
    notes = [n for n in (model_note, SOURCE_NOTES.get(case["source"]["key"]), CASE_NOTES.get(case["id"])) if n]
    return {
        "id": row_id,
        "case": case["id"],
        "grade": case["rel"],
        "model": case["model"],
        "planned_as": plan.model_name,
        "method": case["method"],
        "gpu": case["gpu"],
        "num_gpus": case["n_gpus"],
        "metric": metric,
        "published_metric": case["metric"],
        "measured_bytes": measured,
        "central_bytes": central,
        "low_bytes": low,
        "high_bytes": high,
        "error": round((central - measured) / measured, 4),
        "in_band": None if low is None else low <= measured <= high,
        "above_high": None if high is None else round(max(0, measured - high) / high, 4),
        "peak_phase": plan.peak_phase,
        "options": plan.options.model_dump(mode="json", exclude_defaults=True),
        "notes": notes,
        "source": case["source"],
    }


def evaluate(cases: list[dict]) -> tuple[list[dict], list[dict]]:
    rows, skipped, _ = _evaluate(cases)
    return rows, skipped


def _evaluate(cases: list[dict], adjust=None) -> tuple[list[dict], list[dict], dict]:
    """(rows, skipped, {case id: plan}); adjust(case, fields) -> fields or None re-plans a case
    with changed options (None: as mapped)."""
    rows, skipped, plans = [], [], {}
    for case in cases:
        reason = skip_reason(case)
        if reason is not None:
            skipped.append({"id": case["id"], "grade": case["rel"], "model": case["model"], "reason": reason, "source": case["source"]})
            continue
        model, model_note = catalog_model(case)
        options = options_for(case)
        if adjust is not None and (fields := adjust(case, options.model_dump(exclude_defaults=True))) is not None:
            options = TrainingOptions(**fields)
        plan = build_plan(spec_for(case, model), options)
        plans[case["id"]] = plan
        metric = metric_of(case)
        rows.append(_row(case, plan, metric, measured_bytes(case), case["id"], model_note))
        # a second metric the same source published for the same run
        alt = case.get("alt") or {}
        if "nvidia_smi_MiB" in alt:
            rows.append(_row(case, plan, "nvml", alt["nvidia_smi_MiB"] * MIB, f"{case['id']}/nvml", model_note))
        if "peak_allocated_GiB" in alt:
            rows.append(_row(case, plan, "allocated", round(alt["peak_allocated_GiB"] * GIB), f"{case['id']}/allocated", model_note))
    return rows, skipped, plans


def summarize(rows: list[dict]) -> dict:
    if not rows:
        return {"rows": 0}
    errors = [r["error"] for r in rows]
    under = min(rows, key=lambda r: r["error"])
    over = max(rows, key=lambda r: r["error"])
    banded = [r for r in rows if r["in_band"] is not None]
    out = {
        "rows": len(rows),
        "median_abs_error": round(statistics.median(abs(e) for e in errors), 4),
        "worst_under": {"id": under["id"], "error": under["error"]},
        "worst_over": {"id": over["id"], "error": over["error"]},
        "within_10pct": sum(abs(e) <= 0.10 for e in errors),
        "band_rows": len(banded),
    }
    if banded:
        out["band_coverage"] = round(sum(r["in_band"] for r in banded) / len(banded), 4)
        out["worst_above_high"] = max(r["above_high"] for r in banded)
    return out


def results(cases_file: Path = CASES_FILE) -> dict:
    cases = load_cases(cases_file)
    rows, skipped = evaluate(cases)
    groups = {
        "all": rows,
        "grade A/A-": [r for r in rows if r["grade"] in ("A", "A-")],
        "grade B/B-": [r for r in rows if r["grade"] not in ("A", "A-")],
        "single GPU": [r for r in rows if r["num_gpus"] == 1],
        "multi GPU": [r for r in rows if r["num_gpus"] > 1],
    }
    return {
        "about": "Plans against published measured runs from other projects (held out: the calibration never saw them). "
                 "error = (central - measured) / measured, per the case's own metric: reserved = plan peak less the CUDA context, "
                 "allocated = the plan's non-runtime components, nvml = the whole plan peak. The band applies to reserved and nvml.",
        "date": DATE,
        "calibration": calibration().name,
        "cases": len(cases),
        "mapped": len({r["case"] for r in rows}),
        "skipped_count": len(skipped),
        "summary": {name: summarize(group) for name, group in groups.items()},
        "rows": rows,
        "skipped": skipped,
    }


# ---------------------------------------------------------------------------------------------
# By stack: the same comparisons grouped by how each run was trained, with the plan's verdict,
# for the planner now and (from the committed history) for the planner at earlier commits.

# Each step of the planner's history the by-stack report is taken at: (commit, what it changed).
# The first is the planner before the work on the runs users launch; each later one is what that
# commit's change moved on the published cases (figures taken with this file's mapping and report).
HISTORY = (
    ("2efa107", "before: the planner before gradient accumulation, the allocator's release-and-retry, the PEFT methods, the loss path, padding and the DeepSpeed/FSDP2 buffers"),
    ("5e9227c", "gradient accumulation planned; the verdict on the least memory the step runs in (the allocator's release-and-retry)"),
    ("4f55f23", "PEFT methods beyond LoRA (IA3's feed-forward modules, prompt and prefix tuning)"),
    ("156d732", "loss path as a plan option (loss_implementation)"),
    ("f469e3a", "the loss-path work wired in: the lm_head input counted once, by activations, for every loss path that keeps it"),
    ("fbc64d8", "calibration refit (reserve floor 909 -> 914 MB, band high +20.4% -> +20.6%, low -10.2% -> -10.0% of the dynamic part)"),
    ("7ea921b", "padding and packing; DeepSpeed's buffers, FSDP2's gathered layers, copy-out and unsharded gradients, NCCL's buffers outside the allocator"),
    ("2e57f73", "FSDP1 planned by its own terms (fsdp_version, default 1; 886cdba with its option in 2e57f73), the FSDP cases planned with the FSDP their harness ran"),
    ("d621c40", "bitsandbytes' quantization constants whole on every GPU under FSDP and ZeRO-3 and never offloaded; FSDP2 gathers 4-bit layers as stored"),
)
STAGES_NOTE = ("Every published case is a supervised next-token training step (SFT; GL-1 is pre-training from random init, the same "
               "step): the file holds no measurement of an alignment stage (DPO, KTO, ORPO, reward, PPO, GRPO), so no stage other "
               "than SFT can be checked on it.")


def stack_of(case: dict) -> str:
    """How the run is spread over its GPUs, from the case's own words: single GPU, DDP, ZeRO-2,
    ZeRO-3, FSDP1 / FSDP2 where the case says which, else FSDP (version not stated)."""
    text = case["sharding"].lower()
    if "deepspeed" in text or "zero" in text:
        return "ZeRO-3" if "zero-3" in text or "stage3" in text or "zero3" in text else "ZeRO-2" if "zero-2" in text else "ZeRO-1"
    if "fsdp2" in text:
        return "FSDP2"
    if "fsdp1" in text:
        return "FSDP1"
    if "fsdp" in text:
        return "FSDP (version not stated)"
    return "DDP" if case["n_gpus"] > 1 else "single GPU"


def offloads(case: dict) -> bool:
    text = case["sharding"].lower()
    return "offload" in text and "no offload" not in text and "no cpu offload" not in text


def method_of(case: dict) -> str:
    text = case["method"].lower()
    if text.startswith("full"):
        return "full"
    if "tinylora" in text or "ia3" in text or "prompt" in text or "prefix" in text:
        return "other PEFT"
    if "qlora" in text or "q-lora" in text:
        return "QLoRA"
    if "dora" in text or (case.get("lora") or {}).get("use_dora"):
        return "DoRA"
    if "lora" in text:
        return "LoRA"
    return "other PEFT"


STACK_ORDER = ("single GPU", "DDP", "ZeRO-2", "ZeRO-3", "FSDP1", "FSDP2", "FSDP (version not stated)", "CPU offload", "all multi-GPU")
METHOD_ORDER = ("full", "LoRA", "QLoRA", "DoRA", "other PEFT")


def groupings(cases: list[dict]) -> dict[str, dict[str, set[str]]]:
    """{grouping: {group: case ids}}. Stacks are disjoint but for "CPU offload" and "all multi-GPU",
    which gather cases across them."""
    by_stack = {name: set() for name in STACK_ORDER}
    by_method = {name: set() for name in METHOD_ORDER}
    for case in cases:
        by_stack[stack_of(case)].add(case["id"])
        if offloads(case):
            by_stack["CPU offload"].add(case["id"])
        if case["n_gpus"] > 1:
            by_stack["all multi-GPU"].add(case["id"])
        by_method[method_of(case)].add(case["id"])
    return {"all": {"all": {c["id"] for c in cases}}, "stack": by_stack, "method": by_method,
            "stage": {"SFT": {c["id"] for c in cases}}}


def _verdict(plan) -> dict:
    """The plan's verdict on the case's own GPU, and what it was judged on: the least memory the step
    runs in where the planner has it (runs_within_*), the reserved peak's band before."""
    high = getattr(plan, "runs_within_high_bytes", plan.peak_high_bytes)
    return {"verdict": plan.verdict, "judged_high_bytes": high, "usable_bytes": plan.usable_bytes,
            "release_bytes": getattr(plan, "allocator_release_bytes", 0), "reserve_source": plan.reserve_source}


def group_figures(rows: list[dict], verdicts: dict[str, dict], ids: set[str]) -> dict:
    """One group's figures: cases planned and skipped, the comparisons' median |error|, worst under and
    over, band coverage, how many measurements lay more than 3% above the band's high end (the goal:
    the band never more than 3% below the measurement) or below its low end, and the verdicts (every
    published run ran, so "does not fit" is wrong and "tight" is not a "fits")."""
    mine = [r for r in rows if r["case"] in ids]
    planned = sorted({r["case"] for r in mine})
    out = {"cases": len(ids), "planned": len(planned), "skipped": len(ids) - len(planned), "rows": len(mine)}
    if not mine:
        return out
    under = min(mine, key=lambda r: r["error"])
    over = max(mine, key=lambda r: r["error"])
    banded = [r for r in mine if r["in_band"] is not None]
    said = [verdicts[i]["verdict"] for i in planned]
    out.update({
        "median_abs_error": round(statistics.median(abs(r["error"]) for r in mine), 4),
        "worst_under": {"id": under["id"], "error": under["error"]},
        "worst_over": {"id": over["id"], "error": over["error"]},
        "within_10pct": sum(abs(r["error"]) <= 0.10 for r in mine),
        "band_rows": len(banded),
        "in_band": sum(bool(r["in_band"]) for r in banded),
        "above_high_over_3pct": sum(r["above_high"] > 0.03 for r in banded),
        "below_low": sum(r["measured_bytes"] < r["low_bytes"] for r in banded),
        "worst_above_high": max((r["above_high"] for r in banded), default=None),
        "verdicts": {v: said.count(v) for v in ("fits", "tight", "does not fit") if v in said},
        "wrong_verdicts": sorted(i for i in planned if verdicts[i]["verdict"] == "does not fit"),
        "tight_verdicts": sorted(i for i in planned if verdicts[i]["verdict"] == "tight"),
    })
    return out


def figures(cases: list[dict] | None = None, adjust=None) -> dict:
    """The by-stack figures of the planner on the import path: every grouping's figures, and each
    comparison's and verdict's own values (so a later step's moves can be told row by row)."""
    cases = cases if cases is not None else load_cases()
    rows, _, plans = _evaluate(cases, adjust)
    verdicts = {case_id: _verdict(plan) for case_id, plan in plans.items()}
    return {
        "groups": {name: {group: group_figures(rows, verdicts, ids) for group, ids in groups.items()}
                   for name, groups in groupings(cases).items()},
        "rows": {r["id"]: {"error": r["error"], "central_bytes": r["central_bytes"], "low_bytes": r["low_bytes"],
                           "high_bytes": r["high_bytes"], "in_band": r["in_band"]} for r in rows},
        "verdicts": verdicts,
    }


def _has_option(name: str, value=None) -> bool:
    """Whether the planner in use has the option (and, given a string value, that value of it)."""
    if name not in TrainingOptions.model_fields:
        return False
    choices = _literal_choices(TrainingOptions.model_fields[name].annotation)
    return not isinstance(value, str) or not choices or value in choices


def _literal_choices(annotation) -> list:
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return [choice for arg in typing.get_args(annotation) for choice in _literal_choices(arg)]


def _with(**changes):
    """An adjust for figures(): the given per-case option changes, where the case's own settings call
    for them (a change function returns None to leave a case as mapped)."""
    def adjust(case, fields):
        changed = dict(fields)
        moved = False
        for name, change in changes.items():
            value = change(case, fields)
            if value is not None and _has_option(name):
                changed[name] = value
                moved = True
        return changed if moved else None
    return adjust


def _accumulation(case, fields):
    steps = case.get("grad_accum")
    return steps if isinstance(steps, int) and steps > 1 else None


def _padding(case, fields):
    return "longest" if "dynamic padding" in (case.get("seq_mode") or "") else None


# The fixes that are plan options but not mapped, each turned to what the case's source published
# (the mapping leaves them at their defaults): how far each would move the figures. Accumulation
# and the loss path are mapped as published; the release-and-retry verdict and the sharded buffers
# are not options.
TOGGLES = (
    ("padding", "padding longest for the runs the source says are dynamically padded (PMC-1..4, TT-1/2, LIT-1..3; the mapping plans fixed-length rows)",
     _with(padding=_padding)),
)


def toggles(cases: list[dict]) -> list[dict]:
    out = []
    for name, what, adjust in TOGGLES:
        if not _has_option(name):
            continue
        out.append({"option": name, "what": what, "figures": figures(cases, adjust)})
    return out


def _history_figures(commit: str, python: str) -> dict:
    """figures() of the planner at a commit: checked out in a temporary worktree outside this
    checkout, planned with this file's mapping and report, the worktree removed after."""
    with tempfile.TemporaryDirectory(prefix="vramplan-published-") as tmp:
        tree = Path(tmp) / commit
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(tree), commit], check=True)
        try:
            env = dict(os.environ, VRAMPLAN_PLANNER_ROOT=str(tree), HF_HUB_OFFLINE="1")
            done = subprocess.run([python, str(Path(__file__).resolve()), "--figures"], env=env, cwd=tree,
                                  check=True, capture_output=True, text=True)
            return json.loads(done.stdout)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)


def by_stack(history: list[dict] | None = None) -> dict:
    """The by-stack report: the planner now, each HISTORY step's figures (from `history`, else the
    committed report's), and the option toggles."""
    cases = load_cases()
    if history is None:
        history = json.loads(BY_STACK_JSON.read_text())["history"] if BY_STACK_JSON.exists() else []
    return {
        "about": "Plans against published measured runs, grouped by stack, method and stage; the comparisons of "
                 f"published-{DATE}.json (same mapping, same metrics). 'history' holds the same figures for the planner at earlier "
                 "commits, planned with this mapping (python bench/published.py --history); 'after' is the planner now; 'toggles' re-plan "
                 "with one option set as the case's source published it.",
        "date": DATE,
        "calibration": calibration().name,
        "stages": STAGES_NOTE,
        "case_groups": {name: {group: sorted(ids) for group, ids in groups.items()} for name, groups in groupings(cases).items()},
        "history": history,
        "after": figures(cases),
        "toggles": toggles(cases),
    }

def _pct(x: float | None) -> str:
    return "" if x is None else f"{x * 100:+.1f}%"


def markdown(res: dict) -> str:
    lines = [
        f"# Plans against published measured runs ({res['date']})",
        "",
        (f"Published measured runs from other projects (the cases' sources are listed per row in "
        f"`published-{res['date']}.json`); the calibration ({res['calibration']}) never saw them. "
        f"{res['mapped']} of {res['cases']} cases mapped to plan options ({len(res['rows'])} comparisons: some runs published two metrics), "
        f"{res['skipped_count']} skipped. Error is (central - measured) / measured for the case's own metric: "
        "reserved = the plan's peak less the CUDA context, allocated = its non-runtime components, nvml = its whole peak. "
        "The band applies to reserved and nvml. Regenerate with `python bench/published.py`."),
        "",
        "| id | grade | model | method | GPU(s) | metric | measured GiB | central GiB | error | in band |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        band = "" if r["in_band"] is None else ("yes" if r["in_band"] else "no")
        gpus = f"{r['num_gpus']}x {r['gpu']}" if r["num_gpus"] > 1 and not r["gpu"].startswith(f"{r['num_gpus']}x") else r["gpu"]
        lines.append(f"| {r['id']} | {r['grade']} | {r['model']} | {r['method']} | {gpus} | {r['metric']} | "
                     f"{r['measured_bytes'] / GIB:.2f} | {r['central_bytes'] / GIB:.2f} | {_pct(r['error'])} | {band} |")
    lines += ["", "## Summary", "", "| rows | n | median abs error | worst under | worst over | within 10% | band coverage | worst above high |",
              "|---|---|---|---|---|---|---|---|"]
    for name, s in res["summary"].items():
        if not s["rows"]:
            lines.append(f"| {name} | 0 | | | | | | |")
            continue
        cover = f"{s['band_coverage'] * 100:.0f}% of {s['band_rows']}" if s["band_rows"] else "n/a"
        above = _pct(s.get("worst_above_high")) if s["band_rows"] else ""
        lines.append(f"| {name} | {s['rows']} | {s['median_abs_error'] * 100:.1f}% | {s['worst_under']['id']} {_pct(s['worst_under']['error'])} | "
                     f"{s['worst_over']['id']} {_pct(s['worst_over']['error'])} | {s['within_10pct']} | {cover} | {above} |")
    lines += ["", "## Skipped", ""]
    lines += [f"- {s['id']} ({s['grade']}): {s['reason']}" for s in res["skipped"]]
    notes = [(r["id"], n) for r in res["rows"] for n in r["notes"] if "/" not in r["id"]]
    if notes:
        lines += ["", "## Mapping notes", ""]
        lines += [f"- {i}: {n}" for i, n in notes]
    return "\n".join(lines) + "\n"


def _cover(g: dict) -> str:
    return f"{g['in_band']}/{g['band_rows']}" if g.get("band_rows") else "n/a"


def _worst(g: dict, side: str) -> str:
    return f"{g[side]['id']} {_pct(g[side]['error'])}" if side in g else ""


def _verdict_cell(g: dict) -> str:
    if "verdicts" not in g:
        return ""
    wrong, tight = g["wrong_verdicts"], g["tight_verdicts"]
    return (f"{len(wrong)} wrong" + (f" ({', '.join(wrong)})" if wrong else "")
            + (f", {len(tight)} tight ({', '.join(tight)})" if tight else ""))


def _ba(before: str, after: str) -> str:
    return after if before == after else f"{before} → {after}"


def _group_table(before: dict, after: dict, order) -> list[str]:
    lines = ["| group | cases | planned | skipped | median abs error | worst under | worst over | within 10% | band coverage | >3% above band high | below band low | verdicts (of planned) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in order:
        a, b = after[name], before.get(name, {})
        if not a["cases"]:
            lines.append(f"| {name} | 0 | | | | | | | | | | |")
            continue
        if not a["rows"]:
            lines.append(f"| {name} | {a['cases']} | 0 | {a['skipped']} | (none planned) | | | | | | | |")
            continue
        median = lambda g: f"{g['median_abs_error'] * 100:.1f}%" if g.get("rows") else "n/a"
        count = lambda g, k: str(g[k]) if g.get("band_rows") else "n/a"
        within = lambda g: f"{g['within_10pct']}/{g['rows']}" if g.get("rows") else "n/a"
        lines.append(f"| {name} | {a['cases']} | {a['planned']} | {a['skipped']} | {_ba(median(b), median(a))} | {_ba(_worst(b, 'worst_under'), _worst(a, 'worst_under'))} | "
                     f"{_ba(_worst(b, 'worst_over'), _worst(a, 'worst_over'))} | {_ba(within(b), within(a))} | {_ba(_cover(b), _cover(a))} | "
                     f"{_ba(count(b, 'above_high_over_3pct'), count(a, 'above_high_over_3pct'))} | {_ba(count(b, 'below_low'), count(a, 'below_low'))} | "
                     f"{_ba(_verdict_cell(b), _verdict_cell(a))} |")
    return lines


def moves(before: dict, after: dict) -> dict:
    """What changed between two figures(): each comparison whose central figure moved (its error
    before and after), each verdict that changed, and the overall figures."""
    moved = [{"id": i, "before": before["rows"][i]["error"], "after": r["error"]}
             for i, r in after["rows"].items() if i in before["rows"] and before["rows"][i]["central_bytes"] != r["central_bytes"]]
    banded = [i for i, r in after["rows"].items() if i in before["rows"] and before["rows"][i]["in_band"] != r["in_band"]]
    verdicts = [{"case": i, "before": before["verdicts"][i]["verdict"], "after": v["verdict"]}
                for i, v in after["verdicts"].items() if i in before["verdicts"] and before["verdicts"][i]["verdict"] != v["verdict"]]
    return {"rows_moved": sorted(moved, key=lambda m: -abs(m["after"] - m["before"])), "band_changed": banded, "verdicts_changed": verdicts}


def _moves_line(step: dict) -> tuple[str, str, str]:
    rows = step["rows_moved"]
    if not rows:
        moved = "nothing"
    else:
        shown = ", ".join(f"{m['id']} {_pct(m['before'])} → {_pct(m['after'])}" for m in rows[:8])
        moved = f"{len(rows)}: {shown}" + (f" and {len(rows) - 8} more" if len(rows) > 8 else "")
    band = ", ".join(step["band_changed"]) or "none"
    verdicts = ", ".join(f"{v['case']} {v['before']} → {v['after']}" for v in step["verdicts_changed"]) or "none"
    return moved, band, verdicts


def _overall(g: dict) -> str:
    if not g.get("rows"):
        return "n/a"
    return (f"{g['median_abs_error'] * 100:.1f}%, {_pct(g['worst_under']['error'])} / {_pct(g['worst_over']['error'])}, "
            f"band {_cover(g)}, {len(g['wrong_verdicts'])} wrong")


GOALS = ("every run within 10%", "median within 3%", "band covers at least 90%", "band high never more than 3% below the measurement", "no wrong verdict")


def goals_met(g: dict) -> dict:
    if not g.get("rows"):
        return {}
    return {
        GOALS[0]: g["within_10pct"] == g["rows"],
        GOALS[1]: g["median_abs_error"] <= 0.03,
        GOALS[2]: None if not g["band_rows"] else g["in_band"] / g["band_rows"] >= 0.90,
        GOALS[3]: None if not g["band_rows"] else g["above_high_over_3pct"] == 0,
        GOALS[4]: not g["wrong_verdicts"],
    }


def by_stack_markdown(res: dict) -> str:
    after = res["after"]
    before = res["history"][0]["figures"] if res["history"] else after
    first = res["history"][0]["commit"] if res["history"] else "now"
    ga, gb = after["groups"]["all"]["all"], before["groups"]["all"]["all"]
    lines = [
        f"# Published runs by stack, before and after ({res['date']})",
        "",
        (f"The comparisons of `published-{res['date']}.md` (the same {ga['cases']} published cases, the same mapping to plan options "
         f"and the same metric per case: reserved, allocated or NVML), grouped by how each run was trained. Before is the planner at "
         f"{first}, after the planner now (calibration {res['calibration']}); both planned with this mapping, so a difference is the "
         "planner's. Cells read before → after where they differ. Error is (central - measured) / measured; the band applies to the "
         "reserved and NVML comparisons. A verdict is the plan's on the case's own GPU: every published run ran, so \"does not fit\" "
         "is wrong, and \"tight\" (the usable memory inside the band) is not a \"fits\". Regenerate with `python bench/published.py` "
         "(the planner now) and `python bench/published.py --history` (each earlier commit, in a temporary worktree)."),
        "",
        "## Overall",
        "",
        "| figure | before | after |",
        "|---|---|---|",
        f"| cases planned (of {ga['cases']}) | {gb['planned']} | {ga['planned']} |",
        f"| comparisons | {gb['rows']} | {ga['rows']} |",
        f"| median abs error | {gb['median_abs_error'] * 100:.1f}% | {ga['median_abs_error'] * 100:.1f}% |",
        f"| worst under | {_worst(gb, 'worst_under')} | {_worst(ga, 'worst_under')} |",
        f"| worst over | {_worst(gb, 'worst_over')} | {_worst(ga, 'worst_over')} |",
        f"| within 10% | {gb['within_10pct']}/{gb['rows']} | {ga['within_10pct']}/{ga['rows']} |",
        f"| band coverage | {_cover(gb)} | {_cover(ga)} |",
        f"| measurement more than 3% above the band's high end | {gb['above_high_over_3pct']} (worst {_pct(gb['worst_above_high'])}) | "
        f"{ga['above_high_over_3pct']} (worst {_pct(ga['worst_above_high'])}) |",
        f"| measurement below the band's low end | {gb['below_low']} | {ga['below_low']} |",
        f"| verdicts | {_verdict_cell(gb)} | {_verdict_cell(ga)} |",
        "",
    ]
    titles = {"stack": ("By stack", STACK_ORDER), "method": ("By method", METHOD_ORDER), "stage": ("By stage", ("SFT",))}
    for name, (title, order) in titles.items():
        lines += [f"## {title}", ""]
        if name == "stack":
            lines += ["Stacks as each case states them; \"CPU offload\" and \"all multi-GPU\" gather cases across the others. "
                      "Where a case does not say FSDP1 or FSDP2 it is \"FSDP (version not stated)\"; each is planned with the FSDP its "
                      "source's harness ran (fsdp_version: FSDP_VERSIONS).", ""]
        if name == "stage":
            lines += [res["stages"], ""]
        lines += _group_table(before["groups"][name], after["groups"][name], order) + [""]
    lines += ["## Goals, after", "",
              "| group | " + " | ".join(GOALS) + " |", "|---|" + "---|" * len(GOALS)]
    show = lambda v: "n/a" if v is None else ("yes" if v else "**no**")
    for name, (_, order) in (("all", (None, ("all",))), *titles.items()):
        for group in order:
            met = goals_met(after["groups"][name][group])
            if met:
                lines.append(f"| {group} | " + " | ".join(show(met[goal]) for goal in GOALS) + " |")
    lines += ["", "## What each fix moved", "",
              "Each step is the planner at a commit against the step before it (the last against the planner now); figures are all "
              "comparisons: median abs error, worst under / over, band coverage, wrong verdicts.", "",
              "| commit | change | comparisons whose plan moved | band changed | verdicts changed | all, after the step |",
              "|---|---|---|---|---|---|"]
    steps = res["history"] + [{"commit": "now", "what": "later commits, to the planner now", "figures": after}]
    lines.append(f"| {steps[0]['commit']} | {steps[0]['what']} | | | | {_overall(steps[0]['figures']['groups']['all']['all'])} |")
    for prev, step in zip(steps, steps[1:]):
        moved, band, verdicts = _moves_line(moves(prev["figures"], step["figures"]))
        lines.append(f"| {step['commit']} | {step['what']} | {moved} | {band} | {verdicts} | {_overall(step['figures']['groups']['all']['all'])} |")
    sources = [v["reserve_source"] for v in after["verdicts"].values()]
    released = sum(v["release_bytes"] > 0 for v in after["verdicts"].values())
    lines += ["", (f"Reserve source of the {len(sources)} plans now: " + ", ".join(f"{sources.count(k)} {k}" for k in sorted(set(sources)))
                   + f"; {released} give back cached segments before running out (allocator_release_bytes > 0). The release-and-retry "
                   "verdict comes from the simulated allocator, so on formula plans it leaves the verdict on the band's high end as before."),
              "",
              "The FSDP runs planned here (Answer.AI's fsdp_qlora train.py, FMS's accelerate FSDP under torch 2.4) wrap the model with "
              "FSDP1's FullyShardedDataParallel, though the cases do not say so. 7ea921b gave the planner one FSDP model, FSDP2's "
              "(gathered layers, copy-out and unsharded gradients fitted to an FSDP2 trace), and that step is what moved the multi-GPU "
              "figures; the planner now plans FSDP1 by its own terms (fsdp_version 1, its default) and these runs with it. Under "
              "either FSDP the QLoRA runs' bitsandbytes quantization constants (QuantState: absmax, nested absmax, code tables) are "
              "planned whole on every GPU and kept on the GPU under CPU offload, since they are attributes, not parameters, which FSDP "
              "neither shards nor offloads (about 1 GiB per GPU on a 70B model); a unit is all-gathered as stored, its 4-bit weights "
              "packed and its LoRA adapters with it."]
    lines += ["", "### The fixes that are options, set as the sources published them", "",
              "The mapping sets gradient accumulation and the loss path as each source published them (litgpt's bf16 chunked "
              "cross-entropy and transformers 4.48's GPT-BigCode loss as no_upcast), and plans litgpt's models with their own untied "
              "lm_head. Padding it leaves at its default, fixed-length rows; set per case as the source describes its run, against "
              "the planner now:", "",
              "| option | set for | comparisons whose plan moved | band changed | verdicts changed | all, with it |",
              "|---|---|---|---|---|---|"]
    for toggle in res["toggles"]:
        moved, band, verdicts = _moves_line(moves(after, toggle["figures"]))
        lines.append(f"| {toggle['option']} | {toggle['what']} | {moved} | {band} | {verdicts} | {_overall(toggle['figures']['groups']['all']['all'])} |")
    lines += ["", "What-ifs only: the committed comparisons keep the mapping as it is. Dynamic padding is planned at the published cap "
              "(seq_len), not the longest batch, so padding longest adds a mask and expanded keys/values to rows already planned long."]
    return "\n".join(lines) + "\n"


def accuracy_section(res: dict | None = None) -> list[str]:
    """docs/accuracy.md's published section (bench/validate.py writes it there): the by-stack table
    of the planner now and the headline figures before and after, from the committed by-stack report."""
    res = res if res is not None else json.loads(BY_STACK_JSON.read_text())
    after = res["after"]["groups"]
    before = res["history"][0] if res["history"] else None
    report = BY_STACK_MD.relative_to(ROOT)
    a = after["all"]["all"]
    lines = ["## Published runs from other projects, by stack", "",
             (f"{a['planned']} of the {a['cases']} published runs in `bench/results/published-cases.json` can be planned faithfully "
              f"({a['rows']} comparisons, each on the run's own metric: `bench/results/published-{res['date']}.md`). Grouped by how they "
              f"were trained, with the plan's verdict on the run's own GPU (every one of them ran, so \"does not fit\" is wrong); "
              f"`{report}` has the same by method and stage, the planner at earlier commits and what each change moved. "
              "All of them are SFT steps: no alignment-stage run is among them."), "",
             "| group | planned of cases | median abs error | worst under | worst over | within 10% | band coverage | verdicts |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for grouping, order in (("all", ("all",)), ("stack", STACK_ORDER), ("method", METHOD_ORDER)):
        for name in order:
            g = after[grouping][name]
            if not g["cases"]:
                continue
            if not g["rows"]:
                lines.append(f"| {name} | 0 of {g['cases']} | | | | | | |")
                continue
            lines.append(f"| {name} | {g['planned']} of {g['cases']} | {g['median_abs_error'] * 100:.1f}% | {_worst(g, 'worst_under')} | "
                         f"{_worst(g, 'worst_over')} | {g['within_10pct']}/{g['rows']} | {_cover(g)} | {_verdict_cell(g)} |")
    lines += ["", f"A group with none planned holds runs that do not state their metric or whose model is not in the catalog "
              f"(`bench/results/published-{res['date']}.md` says why each is skipped); no DDP run is among them."
              if not after["stack"]["DDP"]["cases"] else
              f"A group with none planned holds runs that do not state their metric or whose model is not in the catalog "
              f"(`bench/results/published-{res['date']}.md` says why each is skipped)."]
    if before is not None:
        b = before["figures"]["groups"]["all"]["all"]
        lines += ["", (f"All comparisons, the planner at {before['commit']} → now: median abs error {b['median_abs_error'] * 100:.1f}% → "
                       f"{a['median_abs_error'] * 100:.1f}%, worst under {_worst(b, 'worst_under')} → {_worst(a, 'worst_under')}, worst over "
                       f"{_worst(b, 'worst_over')} → {_worst(a, 'worst_over')}, within 10% {b['within_10pct']} → {a['within_10pct']} of {a['rows']}, "
                       f"band coverage {_cover(b)} → {_cover(a)}, wrong verdicts {len(b['wrong_verdicts'])} → {len(a['wrong_verdicts'])} "
                       f"({', '.join(a['wrong_verdicts']) or 'none'}).")]
    met = goals_met(a)
    lines += ["", "Goals on these runs: " + "; ".join(f"{goal}: {'met' if ok else 'not met' if ok is not None else 'n/a'}" for goal, ok in met.items()) + "."]
    return lines


def render(res: dict) -> tuple[str, str]:
    return json.dumps(res, indent=1) + "\n", markdown(res)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed results instead of writing them")
    parser.add_argument("--history", action="store_true",
                        help="also re-take the by-stack figures at each earlier commit of HISTORY (temporary git worktrees outside the checkout)")
    parser.add_argument("--figures", action="store_true", help="print the by-stack figures of the planner on the path as JSON (what --history runs)")
    args = parser.parse_args(argv)
    if args.figures:
        print(json.dumps(figures()))
        return 0
    res = results()
    text_json, text_md = render(res)
    history = None
    if args.history:
        history = [{"commit": commit, "what": what, "figures": _history_figures(commit, sys.executable)} for commit, what in HISTORY]
    stack = by_stack(history)
    stack_json, stack_md = json.dumps(stack, indent=1) + "\n", by_stack_markdown(stack)
    outputs = {RESULTS_JSON: text_json, RESULTS_MD: text_md, BY_STACK_JSON: stack_json, BY_STACK_MD: stack_md}
    if args.check:
        same = all(path.exists() and path.read_text() == text for path, text in outputs.items())
        print("committed results are current" if same else "committed results differ: run python bench/published.py")
        return 0 if same else 1
    for path, text in outputs.items():
        path.write_text(text)
    for name, s in res["summary"].items():
        print(name, json.dumps(s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
