"""Measure training peaks on a CUDA GPU, one fresh process a run, as calibration rows.

    python bench/gpu_runs.py [--quick | --only NAME,...] [--out FILE] [--timeout SECONDS]
    python bench/gpu_runs.py --estimate [--quick]    (each run's estimated seconds; no GPU needed)

The device check for a session that is lent a GPU: each run of MATRIX starts its own Python
process with `PYTORCH_CUDA_ALLOC_CONF` set as the run says. That has to happen before CUDA starts,
and a fresh process also means no earlier run's cached blocks. The process builds the catalog
model's architecture with random weights (NF4 through bitsandbytes for QLoRA), adds PEFT and
checkpointing as the trainers do, and takes three steps: a plain forward with labels
(`trainer hf`) or TRL's fused LM head (`trainer trl`), under bf16 autocast unless the run turns
it off, then backward, fused AdamW, `zero_grad(set_to_none=True)`. It reports
`max_memory_allocated`, `max_memory_reserved` (over the whole process, the model's loading
included, as the committed runs took them), and NVML's used memory minus the allocator's
reserved memory (what lies outside the allocator).

The rows go to bench/results/gpu-runs-<GPU>-<date>.jsonl in bench/calibrate.py's form, with the
GPU, the versions and the date: `options` holds the planner's names for what the run did, so the
planner plans the same case. `python bench/calibrate.py bench/results/calibration-runs.jsonl
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
  says `survived` either way;
- the real trainers on a bare loop's config (`-trainer`, `-sfttrainer`, `-dpotrainer`):
  transformers' `Trainer` beside l1b-lora16all-b8s2048-gc-hf-autocast, TRL's `SFTTrainer` and
  `DPOTrainer` beside l1b-lora16all-b4s2048-gc-trl, three steps each on a tiny in-memory dataset of
  fixed-length rows (a word-level tokenizer trained here, no hub; DPO's pairs chat-less). The row
  says the trainer and its version (`trainer`) and the settings that move memory by the trainer's
  own names (`trainer_settings`: per_device_train_batch_size, gradient_accumulation_steps,
  activation/gradient_checkpointing, bf16, optim, max_length, packing, padding_free, beta,
  precompute_ref_log_probs, ...), and the loss it returned; DPO's options say stage "dpo";
- padded batches (`-padded40`): rows of random lengths (seeded) padded on the right to each
  batch's longest, with the attention mask, over 40 steps (the plan's padding "longest", batch
  layout padded, at seq_len the longest a row may be); the row keeps each batch's length. Beside
  it the same config at the full length every step, also over 40 steps (`-fixed40`);
- the allocator's memory history over two steps (`-history`): the pickle of
  `torch.cuda.memory._dump_snapshot` (for PyTorch's memory viewer; tens of MB with Python stacks)
  and events.json, the allocations and frees in the planner's form, in
  <rows file>-files/<run>/; the row's `memory_history.comparison` holds them to the planner's
  trace of the same steps (counts, bytes allocated, peak of live bytes, first diverging event;
  `compare_events`, which runs anywhere);
- the CUDA context with bitsandbytes' and Triton's kernels loaded (`-ctx`): NVML used minus
  reserved after CUDA starts and after a 4-bit quantize round trip and a Triton kernel, in
  `observed`, then the run of l1b-lora16all-b4s2048-gc-trl, whose figure after the run is the row's
  `outside_allocator`.
`--quick` takes the first seven runs (estimated at under three minutes).

Time on one H100, estimated and not yet timed (`--estimate` prints each run's): a fresh process
(imports, CUDA context, the model built, first kernels) about 15 s; the trainers 10 to 15 s more,
the history 10 s (the snapshot, and the planner's trace in the parent), the library run 5 s,
QLoRA's checkpoint 30 s, a cap's trace 10 s; the steps at 200 TFLOP/s (6 x parameters x tokens,
4/3 of it with checkpointing, DPO's pairs and reference forward): a few seconds, 8 s for each
40-step run; 30 s for the first run's cold Triton cache. The default set of 22 runs comes to about
560 s (9.4 min), the quick set to 160 s.

Only torch, transformers and peft are needed on the GPU machine (trl for the fused-head and TRL
trainer runs, datasets for the trainers, bitsandbytes for QLoRA and the library run); the planner
runs in the parent only (the caps' least pool, the history's comparison). Exit status: 0 when
every run was measured, 1 when some failed, 2 when no CUDA GPU is present.
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
LONG_STEPS = 40  # the padded run and its fixed-length control
HISTORY_STEPS = 2  # the planner's trace takes two steps (planner/step_trace.STEPS)
HISTORY_MAX_ENTRIES = 300_000
LORA_R = 16
ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass(frozen=True)
class Run:
    name: str
    model: str  # catalog id; its config.json is in planner/catalog/configs
    options: dict = field(default_factory=dict)  # plan options, as bench/calibrate.py reads them
    # the allocator's cap, as a multiple of the least pool the planner's replay says the step runs in
    cap: float | None = None
    # what runs the step: "loop" (the bare loop below), "trainer" (transformers' Trainer), "sft" and
    # "dpo" (TRL's SFTTrainer and DPOTrainer), "history" (the loop under the allocator's memory
    # history), "context" (the loop after bitsandbytes and Triton have loaded their CUDA code)
    kind: str = "loop"
    steps: int = STEPS  # optimizer steps the peak is taken over

    @property
    def config_file(self) -> Path:
        from planner.catalog import (
            file_stem,  # plain Python: no pydantic needed on the GPU machine
        )

        return CONFIGS / f"{file_stem(self.model)}.json"


def _run(name: str, model: str, cap: float | None = None, kind: str = "loop", steps: int = STEPS, **options) -> Run:
    base = {"weights_dtype": "bf16", "precision": "bf16", "optimizer": "adamw", "attention": "sdpa", "lora_dropout": 0.0}
    if options.get("method") in ("lora", "qlora", "dora"):
        base |= {"lora_r": LORA_R, "lora_targets": ALL_LINEAR}
    return Run(name, model, base | options, cap, kind, steps)


def _like(run: Run, name: str, kind: str = "loop", steps: int = STEPS, **options) -> Run:
    """Another run on the same config as `run`, with these plan options changed."""
    return Run(name, run.model, {**run.options, **options}, None, kind, steps)


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
# the bare-loop runs the trainers', the padded and the library runs repeat
_SFT_LOOP, _HF_LOOP = MATRIX[0], MATRIX[5]
_LOOP_B4S1024 = _run("l1b-lora16all-b4s1024-gc-trl", L1B, method="lora", batch_size=4, seq_len=1024, gradient_checkpointing=True, trainer="trl")
MATRIX += (
    # the real trainers on a bare loop's config: transformers' Trainer beside l1b-lora16all-b8s2048-gc-hf-autocast,
    # TRL's SFTTrainer beside l1b-lora16all-b4s2048-gc-trl, and TRL's DPOTrainer on that config (chosen and
    # rejected in one forward, the reference with the adapter disabled)
    _like(_HF_LOOP, "l1b-lora16all-b8s2048-gc-hf-trainer", kind="trainer"),
    _like(_SFT_LOOP, "l1b-lora16all-b4s2048-gc-trl-sfttrainer", kind="sft"),
    _like(_SFT_LOOP, "l1b-lora16all-b4s2048-gc-trl-dpotrainer", kind="dpo", stage="dpo", beta=0.1, precompute_ref_log_probs=False),
    # rows of random lengths padded to each batch's longest, with the attention mask, over 40 steps;
    # and the same config at the full length every step
    _like(_LOOP_B4S1024, "l1b-lora16all-b4s1024-gc-trl-padded40", steps=LONG_STEPS, padding="longest"),
    _like(_LOOP_B4S1024, "l1b-lora16all-b4s1024-gc-trl-fixed40", steps=LONG_STEPS),
    # the allocator's own record of two steps, to hold the planner's trace to event by event
    _run("l1b-lora16all-b2s1024-gc-trl-history", L1B, kind="history", steps=HISTORY_STEPS, method="lora", batch_size=2, seq_len=1024,
         gradient_checkpointing=True, trainer="trl"),
    # the CUDA context once bitsandbytes and Triton have loaded their kernels, on the first run's config
    _like(_SFT_LOOP, "l1b-lora16all-b4s2048-gc-trl-ctx", kind="context"),
)
QUICK = 7


def run_by_name(name: str) -> Run:
    for run in MATRIX:
        if run.name == name:
            return run
    raise KeyError(name)


# -- one run, in its own process -----------------------------------------------------------------


@dataclass
class Stepped:
    """What a run's steps did: seconds per optimizer step, the loss of each micro-batch, and the
    length each batch was padded to (its longest row; every row's for fixed-length batches)."""

    seconds: float
    losses: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)


def padded_batch(batch_size: int, seq_len: int, vocab_size: int, generator, device: str = "cpu"):
    """Rows of random lengths (from seq_len/8 to seq_len, drawn from `generator`) padded on the
    right to the batch's longest, as a collator with padding="longest" hands them over: token ids
    (pad id 0), the attention mask, and labels with -100 over the padding. Also the rows' lengths."""
    import torch

    lengths = torch.randint(max(1, seq_len // 8), seq_len + 1, (batch_size,), generator=generator)
    longest = int(lengths.max())
    ids = torch.randint(3, vocab_size, (batch_size, longest), generator=generator)
    mask = (torch.arange(longest)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    labels = ids.masked_fill(mask == 0, -100)
    return ids.to(device), mask.to(device), labels.to(device), lengths.tolist()


def _config_of(run: Run, config: dict | None) -> dict:
    if config is not None:
        return config
    config = json.loads(run.config_file.read_text())
    for key in ("architectures", "torch_dtype", "dtype"):
        config.pop(key, None)
    return config


def train_steps(run: Run, device: str = "cuda", config: dict | None = None, around_steps=None) -> Stepped:
    """Build the run's model on the device and take its `run.steps` training steps.
    `config` stands in for the catalog's (the CPU test runs the same code on a tiny model);
    `around_steps()`, a context manager, is entered once the model and optimizer are built, before
    the first batch is made, and left after the last step (the memory history records there)."""
    import contextlib

    import torch

    from tests.realstack import _autocast, apply_method, build_model

    options = run.options
    config = _config_of(run, config)
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
    padded = options.get("padding", "none") == "longest"
    generator = torch.Generator().manual_seed(0)  # the padded run's lengths, the same every time
    stepped = Stepped(0.0)
    with around_steps() if around_steps is not None else contextlib.nullcontext():
        if not padded:
            ids = torch.randint(3, config["vocab_size"], (options["batch_size"], options["seq_len"]), device=device)
        started = time.perf_counter()
        for _ in range(run.steps):
            for _ in range(options.get("gradient_accumulation_steps", 1)):
                if padded:
                    ids, mask, labels, _ = padded_batch(options["batch_size"], options["seq_len"], config["vocab_size"], generator, device)
                    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
                else:
                    batch = {"input_ids": ids, "labels": ids}
                stepped.lengths.append(int(batch["input_ids"].shape[1]))
                with _autocast(options.get("autocast", True), device=device):
                    loss = model(**batch, **extra).loss
                loss.backward()
                stepped.losses.append(loss.item())
                del loss, batch
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        stepped.seconds = (time.perf_counter() - started) / run.steps
    return stepped


# -- the real trainers ----------------------------------------------------------------------------


TOKENIZER_WORDS = 64


def word_tokenizer(words: int = TOKENIZER_WORDS):
    """A word-level tokenizer trained here on a few strings (no hub): "<unk>", "<s>", "</s>",
    "<pad>" (ids 0 to 3), then one token per word w0 ... w{words-1}, split on whitespace, so a text
    of n words is n tokens. Wrapped as transformers' PreTrainedTokenizerFast with its pad token set."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    texts = [" ".join(f"w{i}" for i in range(words)), " ".join(f"w{i}" for i in reversed(range(words)))]
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _words(rng, count: int, words: int = TOKENIZER_WORDS) -> str:
    return " ".join(f"w{rng.randrange(words)}" for _ in range(count))


def token_rows(tokenizer, rows: int, length: int, seed: int = 0) -> list[list[int]]:
    """`rows` token rows of exactly `length` tokens, tokenized from random word texts."""
    import random

    rng = random.Random(seed)
    out = [tokenizer(_words(rng, length))["input_ids"] for _ in range(rows)]
    assert all(len(row) == length for row in out), "the word tokenizer gives one token a word"
    return out


def preference_rows(rows: int, length: int, seed: int = 0) -> dict[str, list[str]]:
    """A chat-less prompt/chosen/rejected dataset whose pairs tokenize to `length` tokens each:
    half the length of prompt, the rest of completion with the EOS the DPOTrainer appends."""
    import random

    rng = random.Random(seed)
    prompt_len = length // 2
    completion_len = length - prompt_len - 1
    return {
        "prompt": [_words(rng, prompt_len) for _ in range(rows)],
        "chosen": [" " + _words(rng, completion_len) for _ in range(rows)],
        "rejected": [" " + _words(rng, completion_len) for _ in range(rows)],
    }


def _lora_config(run: Run):
    from peft import LoraConfig

    options = run.options
    return LoraConfig(r=options["lora_r"], lora_alpha=2 * options["lora_r"], target_modules=options["lora_targets"].split(","),
                      lora_dropout=options["lora_dropout"], task_type="CAUSAL_LM")


# the settings that move memory, by the trainers' own names, read back from the trainer's arguments
TRAINER_SETTINGS = ("per_device_train_batch_size", "gradient_accumulation_steps", "gradient_checkpointing", "activation_checkpointing",
                    "gradient_checkpointing_kwargs", "activation_checkpointing_kwargs", "bf16", "fp16", "optim", "max_steps")
STAGE_SETTINGS = {"sft": ("max_length", "packing", "padding_free", "completion_only_loss"),
                  "dpo": ("max_length", "padding_free", "beta", "precompute_ref_log_probs", "loss_type", "truncation_mode")}


def _json_safe(value):
    import enum

    if isinstance(value, enum.Enum):
        return _json_safe(value.value)  # optim, by its value
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    return str(value)


def trainer_settings(args, kind: str) -> dict:
    """The trainer's own names for what moves memory, as its arguments hold them."""
    names = TRAINER_SETTINGS + STAGE_SETTINGS.get(kind, ())
    return {name: _json_safe(getattr(args, name)) for name in names if hasattr(args, name)}


@dataclass
class Trained:
    """A trainer's run: seconds per step, its mean training loss, the steps it took, its class and
    library, and its settings by its own names."""

    seconds: float
    loss: float
    global_step: int
    trainer: str
    settings: dict


def trainer_steps(run: Run, device: str = "cuda", config: dict | None = None, workdir: Path | None = None) -> Trained:
    """The run's `run.steps` optimizer steps through transformers' Trainer (kind "trainer"), TRL's
    SFTTrainer ("sft") or DPOTrainer ("dpo"), on a model built as the bare loop builds it, LoRA
    added as each trainer's users add it (the Trainer: get_peft_model first; TRL: peft_config), a
    tiny in-memory dataset of fixed-length rows and the word tokenizer above."""
    import tempfile

    from datasets import Dataset

    from tests.realstack import build_model

    options = run.options
    if options["method"] != "lora" or options["optimizer"] != "adamw":
        raise ValueError(f"{run.name}: the trainer runs take LoRA with fused AdamW")
    config = _config_of(run, config)
    tokenizer = word_tokenizer()
    if len(tokenizer) > config["vocab_size"]:
        raise ValueError("the word tokenizer's ids must fit the model's vocabulary")
    model = build_model(config, options["weights_dtype"], attention=options["attention"], device=device)
    batch, accumulation, seq_len = options["batch_size"], options.get("gradient_accumulation_steps", 1), options["seq_len"]
    rows = batch * accumulation * run.steps
    common = dict(per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, max_steps=run.steps,
                  bf16=options["precision"] == "bf16" and options.get("autocast", True), optim="adamw_torch_fused", learning_rate=1e-5,
                  lr_scheduler_type="constant", report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
                  dataloader_num_workers=0, seed=0, use_cpu=device == "cpu")
    workdir = workdir or Path(tempfile.mkdtemp(prefix="vramplan-gpu-runs-"))
    kind = run.kind
    if kind == "trainer":
        from peft import get_peft_model
        from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

        args = TrainingArguments(output_dir=str(workdir), **common, **_checkpointing(TrainingArguments, options["gradient_checkpointing"]))
        model = get_peft_model(model, _lora_config(run))
        if options["gradient_checkpointing"]:
            model.enable_input_require_grads()  # PEFT's advice under checkpointing (TRL's trainers do the same)
        dataset = Dataset.from_dict({"input_ids": token_rows(tokenizer, rows, seq_len)})
        trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                          data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
        library = "transformers"
    elif kind == "sft":
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(output_dir=str(workdir), max_length=seq_len, packing=False, padding_free=False, **common,
                         **_checkpointing(SFTConfig, options["gradient_checkpointing"]))
        dataset = Dataset.from_dict({"input_ids": token_rows(tokenizer, rows, seq_len)})
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=_lora_config(run))
        library = "trl"
    elif kind == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(output_dir=str(workdir), max_length=seq_len, padding_free=False, beta=options.get("beta", 0.1),
                         precompute_ref_log_probs=options.get("precompute_ref_log_probs", False), **common,
                         **_checkpointing(DPOConfig, options["gradient_checkpointing"]))
        dataset = Dataset.from_dict(preference_rows(rows, seq_len))
        trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=_lora_config(run))
        library = "trl"
    else:
        raise ValueError(f"{run.name}: kind {kind} is not a trainer")
    output = trainer.train()
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    from importlib.metadata import version

    return Trained(seconds=output.metrics["train_runtime"] / run.steps, loss=float(output.training_loss), global_step=output.global_step,
                   trainer=f"{library} {version(library)} {type(trainer).__name__}", settings=trainer_settings(trainer.args, kind))


def _checkpointing(args_class, on: bool) -> dict:
    """Checkpointing by the name these arguments take: transformers 5 renames gradient_checkpointing
    activation_checkpointing (the old name warns)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(args_class)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": on}


# -- the allocator's memory history ---------------------------------------------------------------


def events_from_snapshot(snapshot: dict, device: int = 0) -> tuple[list[tuple], int]:
    """The allocator's trace in a memory snapshot (torch.cuda.memory._snapshot()) as the planner's
    trace writes its events (planner/step_trace.py): ("alloc", handle, bytes) and ("free", handle),
    in order, handles numbered from 1 as blocks are allocated. A block is freed when the allocator
    completes its free (free_requested where the trace has no completions). Frees of blocks
    allocated before the recording began have no handle: they are counted, not listed."""
    trace = snapshot.get("device_traces", [])
    entries = trace[device] if device < len(trace) else []
    free_action = "free_completed" if any(e["action"] == "free_completed" for e in entries) else "free_requested"
    live: dict[int, int] = {}
    events: list[tuple] = []
    earlier = allocated = 0
    for entry in entries:
        if entry["action"] == "alloc":
            allocated += 1
            live[entry["addr"]] = allocated
            events.append(("alloc", allocated, int(entry["size"])))
        elif entry["action"] == free_action:
            handle = live.pop(entry["addr"], None)
            if handle is None:
                earlier += 1
            else:
                events.append(("free", handle))
    return events, earlier


def _rounded(nbytes: int, round_to: int) -> int:
    return -(-nbytes // round_to) * round_to if round_to > 1 else nbytes


def event_summary(events, round_to: int = 512) -> dict:
    """Counts, bytes allocated and the peak of live bytes of an event list (each block rounded up
    to `round_to` bytes, as the caching allocator rounds it); frees of blocks the list never
    allocated are counted apart."""
    live: dict[int, int] = {}
    allocs = frees = unmatched = total = current = peak = 0
    for event in events:
        if event[0] == "alloc":
            size = _rounded(int(event[2]), round_to)
            live[event[1]] = size
            allocs += 1
            total += size
            current += size
            peak = max(peak, current)
        elif event[0] == "free":
            size = live.pop(event[1], None)
            if size is None:
                unmatched += 1
            else:
                frees += 1
                current -= size
    return {"allocs": allocs, "frees": frees, "unmatched_frees": unmatched, "bytes_allocated": total, "peak_live_bytes": peak,
            "live_at_end_bytes": current}


def compare_events(expected, measured, round_to: int = 512) -> dict:
    """Two event lists in the planner's form, ("alloc", handle, bytes) and ("free", handle), side
    by side: each one's counts, bytes allocated and peak of live bytes (event_summary), and the
    first event where they part. Handles are matched by the order their blocks were allocated, so
    two lists that number their blocks differently but allocate and free the same sizes in the same
    order agree; sizes are compared rounded to `round_to` (the allocator's 512 bytes)."""

    def canonical(events):
        order: dict = {}
        out = []
        for event in events:
            if event[0] == "alloc":
                order[event[1]] = len(order) + 1
                out.append(("alloc", order[event[1]], _rounded(int(event[2]), round_to)))
            else:
                out.append(("free", order.get(event[1])))
        return out

    left, right = canonical(expected), canonical(measured)
    first = next((i for i, (a, b) in enumerate(zip(left, right)) if a != b), None)
    if first is None and len(left) != len(right):
        first = min(len(left), len(right))
    a, b = event_summary(expected, round_to), event_summary(measured, round_to)
    return {
        "expected": a,
        "measured": b,
        "same": first is None,
        "first_divergence": None if first is None else {
            "index": first,
            "expected": list(left[first]) if first < len(left) else None,
            "measured": list(right[first]) if first < len(right) else None,
        },
        "peak_live_ratio": round(b["peak_live_bytes"] / a["peak_live_bytes"], 4) if a["peak_live_bytes"] else None,
    }


def planner_trace_events(config: dict, options: dict) -> tuple[list[tuple], int]:
    """The planner's traced events of this step (planner/step_trace.simulate_step, on the meta
    device, here on the CPU) up to the end of its last step (not the frees of the model and the
    optimizer's state when the trace is done with them), and where its steps begin: the events
    before that index are the model's parameters and buffers, recorded once it is built."""
    from planner import step_trace
    from planner.options import TrainingOptions

    plan_options = {k: v for k, v in options.items() if k in TrainingOptions.model_fields}
    if isinstance(plan_options.get("lora_targets"), str):
        plan_options["lora_targets"] = plan_options["lora_targets"].split(",")
    seen: dict = {}
    build = step_trace._build

    class Watched:
        """The trace's dispatch mode, noting how many events there are when its steps end."""

        def __init__(self, mode, events):
            self.mode, self.events = mode, events

        def __enter__(self):
            return self.mode.__enter__()

        def __exit__(self, *exc):
            seen["stepped"] = len(self.events)
            return self.mode.__exit__(*exc)

    def watched(config, options, tracer):
        model = build(config, options, tracer)
        seen["tracer"], seen["built"] = tracer, len(tracer.events)
        tracer.mode = Watched(tracer.mode, tracer.events)
        return model

    step_trace._build = watched
    try:
        step_trace.simulate_step(dict(config), TrainingOptions(gpu_memory_gib=4096, **plan_options))
    finally:
        step_trace._build = build
    return list(seen["tracer"].events[: seen["stepped"]]), seen["built"]


def history_comparison(run: Run, events: list, config: dict | None = None) -> dict:
    """The recorded steps' events against the planner's trace of the same steps (its events once
    the model is built: the recording starts there too)."""
    planned, built = planner_trace_events(_config_of(run, config), run.options)
    return compare_events(planned[built:], events)


def memory_history(folder: Path | None, device: str):
    """A context manager: on CUDA, the allocator's memory history while it is open, then its
    snapshot pickled by torch.cuda.memory._dump_snapshot (snapshot.pickle, for PyTorch's memory
    viewer) and its events in the planner's form (events.json) in `folder`. Elsewhere it records
    nothing."""
    import contextlib

    @contextlib.contextmanager
    def recording():
        if device != "cuda" or folder is None:
            yield
            return
        import pickle

        import torch

        folder.mkdir(parents=True, exist_ok=True)
        torch.cuda.synchronize()
        torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python", max_entries=HISTORY_MAX_ENTRIES)
        try:
            yield
            torch.cuda.synchronize()
            torch.cuda.memory._dump_snapshot(str(folder / "snapshot.pickle"))
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
        with open(folder / "snapshot.pickle", "rb") as f:
            events, earlier = events_from_snapshot(pickle.load(f), torch.cuda.current_device())
        (folder / "events.json").write_text(json.dumps({"events": events, "frees_of_earlier_blocks": earlier}, separators=(",", ":")))

    return recording


# -- the CUDA context with the libraries loaded ----------------------------------------------------


def load_libraries(device: str = "cuda", compile_backend: str = "inductor") -> dict:
    """Load bitsandbytes' kernels (a 4-bit quantize and dequantize) and Triton's (a trivial kernel
    compiled and launched where Triton is importable, else a tiny torch.compile'd function with
    `compile_backend`), as a run using them would; what ran and whether it computed right."""
    import torch

    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    x = torch.randn(256, 256, device=device, dtype=torch.bfloat16)
    packed, state = bnbf.quantize_4bit(x, quant_type="nf4")
    back = bnbf.dequantize_4bit(packed, state)
    out = {"bitsandbytes": bnb.__version__, "nf4_roundtrip_error": float((back.float() - x.float()).abs().mean())}
    try:
        import triton
    except ImportError:
        triton = None
    if triton is not None and device == "cuda":
        import triton.language as tl

        @triton.jit
        def add_one(pointer, n, BLOCK: tl.constexpr):
            offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            inside = offsets < n
            tl.store(pointer + offsets, tl.load(pointer + offsets, mask=inside) + 1, mask=inside)

        y = torch.zeros(1000, device=device)
        add_one[(triton.cdiv(1000, 256),)](y, 1000, BLOCK=256)
        out |= {"triton": triton.__version__, "ran": "a Triton kernel", "right": bool((y == 1).all())}
    else:
        compiled = torch.compile(lambda t: t * 2 + 1, backend=compile_backend)
        y = compiled(torch.zeros(1000, device=device))
        out |= {"triton": getattr(triton, "__version__", None), "ran": f"torch.compile (backend {compile_backend})", "right": bool((y == 1).all())}
    if device == "cuda":
        torch.cuda.synchronize()
    return out


# -- measuring, on GPU 0 ---------------------------------------------------------------------------


def measure(run: Run, artifacts: Path | None = None) -> dict:
    """The run on GPU 0 in this process; the figures bench/calibrate.py reads (the peaks over the
    whole process, the model's loading included, as the committed runs took them), and what else
    the run's kind observed. A capped run (VRAMPLAN_POOL_CAP_BYTES from the parent) that runs out
    of memory says so instead."""
    import torch

    cap = os.environ.get("VRAMPLAN_POOL_CAP_BYTES")
    if cap:
        torch.cuda.set_per_process_memory_fraction(int(cap) / torch.cuda.get_device_properties(0).total_memory)
    observed: dict = {}
    if run.kind == "context":
        torch.zeros(1, device="cuda")  # the CUDA context alone
        torch.cuda.synchronize()
        observed["outside_allocator_before_libraries"] = _outside_allocator(torch.cuda.memory_reserved())
        observed["libraries"] = load_libraries("cuda")
        observed["outside_allocator_after_libraries"] = _outside_allocator(torch.cuda.memory_reserved())
    try:
        if run.kind in ("trainer", "sft", "dpo"):
            trained = trainer_steps(run, "cuda")
            seconds = trained.seconds
            observed |= {"loss": trained.loss, "global_step": trained.global_step, "trainer": trained.trainer, "settings": trained.settings}
        else:
            history = memory_history(artifacts, "cuda") if run.kind == "history" else None
            stepped = train_steps(run, "cuda", around_steps=history)
            seconds = stepped.seconds
            observed["losses"] = [round(loss, 4) for loss in stepped.losses]
            if run.options.get("padding") == "longest":
                observed["batch_lengths"] = stepped.lengths
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
        "observed": observed,
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
    """A measured run in bench/calibrate.py's form: `options` holds the planner's names for what the
    run did (the planner plans the same case from them); a trainer's run adds the trainer and its
    settings by the trainer's own names, and each kind what else it observed."""
    observed = dict(measured.get("observed") or {})
    trainer = {k: observed.pop(k) for k in ("trainer", "settings") if k in observed}
    return {
        "name": run.name,
        "model": run.model,
        "options": dict(run.options),
        "gpu": gpu,
        "measured": {k: measured[k] for k in ("peak_allocated", "peak_reserved", "outside_allocator")},
        **({"cap_bytes": measured["cap_bytes"], "survived": measured["survived"]} if measured.get("cap_bytes") else {}),
        "metric": f"max_memory_allocated / max_memory_reserved over {run.steps} steps in a fresh process; outside_allocator = NVML used - reserved after the run",
        "kind": run.kind,
        **({"trainer": trainer["trainer"], "trainer_settings": trainer.get("settings", {})} if trainer else {}),
        **({"observed": observed} if observed else {}),
        "versions": found_versions,
        "step_seconds": measured.get("step_seconds"),
        "date": date,
        "source": "bench/gpu_runs.py (random weights of the public architecture)",
    }


# -- how long the matrix takes on one H100 -----------------------------------------------------------

# Estimated, not yet timed: a fresh process's imports and CUDA context, the model built on the GPU,
# the first step's kernel loads; more for what a kind adds; the steps' FLOPs at a modest bf16 rate
# (small batches of a 1B model are far from the H100's peak)
PROCESS_SECONDS = 15
# the trainers: datasets, accelerate and the trainer's set-up; the history: the snapshot written and
# read back, and the planner's trace of the same steps in the parent; the context: a Triton compile
KIND_SECONDS = {"loop": 0, "trainer": 10, "sft": 10, "dpo": 15, "history": 10, "context": 5}
QLORA_SECONDS = 30  # the checkpoint built on the CPU and written, then quantized while loading
CAP_SECONDS = 10  # the planner's trace in the parent, for the cap
FIRST_RUN_SECONDS = 30  # Triton's kernel cache is cold on a fresh machine
FLOPS_PER_SECOND = 200e12


def config_params(config: dict) -> int:
    """A decoder's parameters from its config: attention, MLP, two norms a layer and the final one,
    embeddings (and an untied head)."""
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads") or heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv * head_dim
    mlp = 3 * hidden * config["intermediate_size"]
    embeddings = config["vocab_size"] * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return layers * (attention + mlp + 2 * hidden) + hidden + embeddings


def estimate_seconds(run: Run, config: dict | None = None) -> float:
    """The run's estimated wall time on one H100, its process and the parent's work for it included."""
    options = run.options
    params = config_params(_config_of(run, config))
    sequences = options["batch_size"] * options.get("gradient_accumulation_steps", 1) * (2 if options.get("stage") == "dpo" else 1)
    tokens = sequences * options["seq_len"] * run.steps
    flops = 6 * params * tokens * (4 / 3 if options["gradient_checkpointing"] else 1)
    if options.get("stage") == "dpo" and not options.get("precompute_ref_log_probs"):
        flops += 2 * params * tokens  # the reference's forward
    seconds = PROCESS_SECONDS + KIND_SECONDS[run.kind] + 2 * params / 1e9 + flops / FLOPS_PER_SECOND
    seconds += QLORA_SECONDS if options["method"] == "qlora" else 0
    return seconds + (CAP_SECONDS if run.cap is not None else 0)


def estimate_total(runs) -> float:
    return FIRST_RUN_SECONDS + sum(estimate_seconds(run) for run in runs)


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


def run_in_process(run: Run, timeout: float, artifacts: Path | None = None) -> tuple[dict | None, str]:
    """(measured figures, or None and why) from a fresh Python process; a run that writes files
    (the memory history) writes them in `artifacts`."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    env.pop("VRAMPLAN_POOL_CAP_BYTES", None)
    if run.cap is not None:
        env["VRAMPLAN_POOL_CAP_BYTES"] = str(int(run.cap * predicted_least_pool(run)))
    if run.options.get("allocator") == "expandable_segments":
        env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    else:
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    command = [sys.executable, __file__, "--one", run.name, *(["--artifacts", str(artifacts)] if artifacts is not None else [])]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return None, f"over {timeout:.0f} s"
    # the child's figures are its last line; a trainer prints its metrics as a Python dict ({'...)
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"')]
    if done.returncode == 0 and lines:
        return json.loads(lines[-1]), ""
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return None, f"exit {done.returncode}: {tail[:300]}"


def history_row(run: Run, folder: Path) -> dict:
    """The memory history's files and its events held to the planner's trace (here, on the CPU)."""
    recorded = json.loads((folder / "events.json").read_text())
    out = {"snapshot": str(folder / "snapshot.pickle"), "events": str(folder / "events.json"),
           "frees_of_earlier_blocks": recorded["frees_of_earlier_blocks"]}
    try:
        out["comparison"] = history_comparison(run, recorded["events"])
    except Exception as exc:  # noqa: BLE001 - the row and its files stand without the comparison
        out["comparison_failed"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"the first {QUICK} runs only")
    parser.add_argument("--only", default=None, metavar="NAME,...", help="these runs only (names as in MATRIX)")
    parser.add_argument("--out", type=Path, default=None, help="rows file (default bench/results/gpu-runs-<GPU>-<date>.jsonl)")
    parser.add_argument("--timeout", type=float, default=180, help="seconds a run may take (default 180)")
    parser.add_argument("--estimate", action="store_true", help="print each run's estimated seconds on one H100 and the total, and exit")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child: measure one run, print its JSON
    parser.add_argument("--artifacts", type=Path, default=None, help=argparse.SUPPRESS)  # the child: where its files go
    args = parser.parse_args()
    if args.estimate:
        runs = MATRIX[:QUICK] if args.quick else MATRIX
        for run in runs:
            print(f"{estimate_seconds(run):6.0f} s  {run.name}")
        print(f"{estimate_total(runs):6.0f} s  in all, with {FIRST_RUN_SECONDS} s for the first run's cold caches (estimated, not timed)")
        return 0
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
        print(json.dumps(measure(run, args.artifacts)))
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
        artifacts = out.parent / f"{out.stem}-files" / run.name if run.kind == "history" else None
        measured, why = run_in_process(run, args.timeout, artifacts)
        if measured is None:
            failed.append({"name": run.name, "why": why})
            print(f"[{index}/{len(runs)}] {run.name}: failed ({why})", flush=True)
            continue
        row = calibration_row(run, measured, gpu, found_versions, date)
        if artifacts is not None:
            row["memory_history"] = history_row(run, artifacts)
        rows.append(row)
        capped = f", capped at {measured['cap_bytes'] / 2**30:.2f} GiB: {'survived' if measured['survived'] else 'out of memory'}" if measured.get("cap_bytes") else ""
        print(f"[{index}/{len(runs)}] {run.name}: allocated {measured['peak_allocated'] / 2**30:.2f} GiB, "
              f"reserved {measured['peak_reserved'] / 2**30:.2f} GiB{capped}", flush=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} rows to {out}" + (f"; {len(failed)} failed: " + json.dumps(failed) if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
