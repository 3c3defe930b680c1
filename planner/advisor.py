"""The method advisor: fine-tune or not, which stage, which method, which settings, and why.

The rules below (the team's method-selection rules) apply in order; every rule that fires adds a reason
in plain words with the numbers behind it. Memory questions are answered by real plans
(`build_plan` and the fit searches), never by a rule of thumb.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool

from planner.cost import TimeCost, Workload, estimate_time_cost
from planner.deployment import Deployment, deployment_advice
from planner.errors import PlanInputError
from planner.fit import fewest_gpus, largest_batch, smallest_fixes
from planner.options import TrainingOptions
from planner.plan import GIB, Plan, build_plan
from planner.spec import ModelSpec
from planner.trainable import split_moe_targets

Goal = Literal["style", "format", "domain", "knowledge", "alignment", "reasoning"]
DataKind = Literal["instructions", "preference_pairs", "thumbs", "verifiable_prompts", "raw_text"]

MIN_EXAMPLES_TO_FINE_TUNE = 500
FULL_FT_MIN_EXAMPLES = 100_000
SMALL_DATA_EXAMPLES = 2_000  # below this, more LoRA dropout
MANY_TENANTS = 1_000  # adapter size becomes the binding constraint
TARGET_EFFECTIVE_BATCH = 16
# LoRA rank by goal (ADVISOR.md's rank guide: style/format 4-8, domain 8-16, code/reasoning 16-64)
RANK_BY_GOAL = {"style": 8, "format": 8, "domain": 16, "knowledge": 16, "alignment": 16, "reasoning": 32}
STAGE_BY_DATA = {"instructions": "sft", "raw_text": "sft", "preference_pairs": "dpo", "thumbs": "kto", "verifiable_prompts": "grpo"}
STAGE_DATA = {
    "sft": "instruction/response pairs or raw text", "dpo": "chosen/rejected pairs", "orpo": "chosen/rejected pairs",
    "simpo": "chosen/rejected pairs", "reward": "chosen/rejected pairs", "kto": "good/bad labels",
    "grpo": "prompts and a reward function", "rloo": "prompts and a reward function", "ppo": "prompts and a reward model",
}
# What the advice's run may change from the user's own settings, in the words the reasons use.
COMPARED_SETTINGS = (("method", "method"), ("stage", "stage"), ("batch_size", "micro-batch"), ("seq_len", "sequence length"),
                     ("gradient_checkpointing", "gradient checkpointing"), ("optimizer", "optimizer"), ("num_gpus", "GPUs"),
                     ("parallelism", "parallelism"), ("lora_r", "LoRA rank"))
# Starting learning rates. SFT: ADVISOR.md (LoRA about 2e-4, full 1e-5 to 2e-5). Preference and
# RL stages: TRL's defaults for full training (1e-6), with adapters about ten times higher.
LEARNING_RATE = {
    ("sft", "adapter"): 2e-4, ("sft", "full"): 2e-5,
    ("preference", "adapter"): 5e-6, ("preference", "full"): 1e-6,
    ("rl", "adapter"): 1e-5, ("rl", "full"): 1e-6,
}
# The schedule: a short warmup (3% of the steps; transformers reads a warmup_steps below 1 as that
# fraction) then cosine decay, as TRL's SFT examples and most LoRA recipes run; TRL's own default
# (linear decay, no warmup) takes the first steps at the full rate.
WARMUP_FRACTION = 0.03
LR_SCHEDULER = "cosine"
RL_STAGES = ("grpo", "rloo", "ppo")
CHAT_MARKERS = ("instruct", "chat", "-it", "distill")


class Task(BaseModel):
    """What the user wants to achieve and with what data (the advisor's questions)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    goal: Goal = "domain"
    data_kind: DataKind = "instructions"
    num_examples: int = Field(default=5_000, ge=0, le=10_000_000_000)
    tokens_per_example: int | None = Field(default=None, ge=1, le=10_000_000)
    knowledge_changes_often: StrictBool = False
    tenants: int = Field(default=1, ge=1, le=10_000_000)
    data_must_stay_on_premises: StrictBool = False
    latency_target_ms: float | None = Field(default=None, gt=0)
    has_evaluation: StrictBool = True
    base_model_is_chat: StrictBool | None = None  # None: read from the model id


@dataclass(frozen=True)
class Candidate:
    """One way to run it, with its own plan."""

    label: str
    plan: Plan
    time_cost: TimeCost | None
    why: str
    gpus_needed: int | None = None  # fewest of this GPU (sharded) that fit it, when one does not

    def to_dict(self) -> dict:
        time_cost = self.time_cost.to_dict() if self.time_cost else {}
        return {
            "label": self.label,
            "method": self.plan.options.method,
            "stage": self.plan.options.stage,
            "fits": self.plan.fits,
            "verdict": self.plan.verdict,
            "peak_bytes": self.plan.peak_bytes,
            "peak_high_bytes": self.plan.peak_high_bytes,
            "usable_bytes": self.plan.usable_bytes,
            "num_gpus": self.plan.gpu.count,
            "batch_size": self.plan.options.batch_size,
            "gpus_needed": self.gpus_needed,
            "hours": time_cost.get("hours"),
            "dollars": time_cost.get("dollars"),
            "why": self.why,
        }


@dataclass(frozen=True)
class Advice:
    approach: str  # prompting, rag, fine-tune
    stage: str | None
    method: str | None
    settings: dict
    reasons: tuple[str, ...]
    plan: Plan | None  # the recommended run
    time_cost: TimeCost | None
    alternatives: tuple[Candidate, ...] = field(default=())
    other_approaches: tuple[str, ...] = field(default=())
    deployment: Deployment | None = None  # after training: merge or serve, and the serving GPU's numbers

    def to_dict(self) -> dict:
        return {
            "approach": self.approach,
            "stage": self.stage,
            "method": self.method,
            "settings": self.settings,
            "reasons": list(self.reasons),
            "fits": self.plan.fits if self.plan else None,
            "verdict": self.plan.verdict if self.plan else None,
            "peak_bytes": self.plan.peak_bytes if self.plan else None,
            "peak_low_bytes": self.plan.peak_low_bytes if self.plan else None,
            "peak_high_bytes": self.plan.peak_high_bytes if self.plan else None,
            "gpu": {"name": self.plan.gpu.name, "label": self.plan.gpu.label, "memory_bytes": self.plan.gpu.memory_bytes, "count": self.plan.gpu.count} if self.plan else None,
            "time_cost": self.time_cost.to_dict() if self.time_cost else None,
            "alternatives": [a.to_dict() for a in self.alternatives],
            "other_approaches": list(self.other_approaches),
            "deployment": self.deployment.to_dict() if self.deployment else None,
            "plan": self.plan.to_dict() if self.plan else None,
        }


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def _needs(plan: Plan) -> str:
    """The central peak and the band's high end, which decides whether it fits: "15.4 GiB (up to 18.1)"."""
    return f"{plan.peak_bytes / GIB:.1f} GiB (up to {plan.peak_high_bytes / GIB:.1f})"


def is_chat_model(spec: ModelSpec, task: Task) -> bool:
    if task.base_model_is_chat is not None:
        return task.base_model_is_chat
    name = spec.name.lower()
    return any(marker in name for marker in CHAT_MARKERS)


def decide_approach(task: Task) -> tuple[str, list[str]]:
    """Fine-tune at all? (ADVISOR.md, first question)"""
    if task.goal == "knowledge":
        why = "it changes often" if task.knowledge_changes_often else "fine-tuning does not reliably add facts"
        return "rag", [f"The goal is knowledge and {why}: retrieval (RAG) keeps it current and cheap to update; fine-tune later for format or tone if needed."]
    if task.knowledge_changes_often:
        return "rag", ["The knowledge changes often: retrieval (RAG) is cheap to update, a fine-tune would go stale."]
    if not task.has_evaluation:
        return "prompting", ["There is no way to measure success yet: define the evaluation first and start from prompting; do not ship an unmeasured change."]
    if task.num_examples < MIN_EXAMPLES_TO_FINE_TUNE:
        return "prompting", [
            f"{task.num_examples:,} examples is under about {MIN_EXAMPLES_TO_FINE_TUNE}: few-shot prompting first; a fine-tune on so little data tends to overfit or harm the base model."
        ]
    return "fine-tune", [f"The goal is {task.goal} with {task.num_examples:,} examples and an evaluation: a fine-tune suits behaviour, format, style and domain."]


def decide_stage(spec: ModelSpec, task: Task, chosen: str | None = None) -> tuple[str, list[str]]:
    """The stage the data calls for, unless the user chose one: then theirs, with a word when
    the data they described calls for another."""
    if chosen is not None:
        out = [f"Stage {chosen.upper()}, as chosen."]
        suggested = STAGE_BY_DATA[task.data_kind]
        if "data_kind" in task.model_fields_set and suggested != chosen:
            out.append(f"The data described ({task.data_kind.replace('_', ' ')}) would call for {suggested.upper()}; {chosen.upper()} needs {STAGE_DATA.get(chosen, 'data of its own kind')}.")
        if chosen in ("dpo", "kto", "grpo") and not is_chat_model(spec, task):
            out.append(f"{spec.name} looks like a base (non-chat) model: run SFT on instructions before {chosen.upper()}.")
        return chosen, out
    stage = STAGE_BY_DATA[task.data_kind]
    reasons = {
        "instructions": "Instruction/response pairs: supervised fine-tuning (SFT), loss on the response tokens, chat template applied.",
        "raw_text": "Raw text: SFT as continued pre-training (loss on every token).",
        "preference_pairs": "Chosen/rejected pairs: DPO (beta 0.1) by default.",
        "thumbs": "Only unpaired good/bad labels: KTO, which needs no pairs.",
        "verifiable_prompts": "Prompts with an automatic verifier: GRPO with a group of 8 completions per prompt, rewarded by the verifier.",
    }
    out = [reasons[task.data_kind]]
    if stage in ("dpo", "kto", "grpo") and not is_chat_model(spec, task):
        out.append(f"{spec.name} looks like a base (non-chat) model: run SFT on instructions before {stage.upper()}.")
    return stage, out


# SFT with the methods that train far fewer values, at PEFT's own examples' rates: its causal-LM
# prompt and prefix tuning notebooks use 3e-2, its IA3 ones 1e-3 and 8e-3 (3e-3 between them)
SFT_LEARNING_RATE_BY_METHOD = {"prompt_tuning": 3e-2, "prefix_tuning": 3e-2, "ia3": 3e-3}


def learning_rate(method: str, stage: str) -> float:
    family = "sft" if stage == "sft" else "rl" if stage in RL_STAGES else "preference"
    if family == "sft" and method in SFT_LEARNING_RATE_BY_METHOD:
        return SFT_LEARNING_RATE_BY_METHOD[method]
    return LEARNING_RATE[(family, "full" if method in ("full", "freeze") else "adapter")]


def epochs_for(num_examples: int) -> int:
    return 3 if num_examples <= 5_000 else 2 if num_examples <= 50_000 else 1


def lora_dropout_for(spec: ModelSpec, method: str, targets, num_examples: int) -> float:
    # PEFT's LoRA on fused MoE experts takes no dropout (planner.trainable.fused_expert_dropout)
    experts_adapted = method in ("lora", "qlora") and bool(split_moe_targets(spec, targets)[1])
    return 0.0 if experts_adapted else 0.1 if num_examples < SMALL_DATA_EXAMPLES else 0.05


def accumulation_for(batch_size: int, num_gpus: int) -> int:
    """Gradient accumulation up to the target effective batch (as _with_batch settles it)."""
    return max(1, TARGET_EFFECTIVE_BATCH // (batch_size * num_gpus))


def run_defaults(spec: ModelSpec, options: TrainingOptions, num_examples: int | None = None) -> dict:
    """The advice's training hyperparameters for the method and stage `options` already name, by
    the option or run-setting name each goes under: what a launched run takes where its user gave
    none. `num_examples`: the dataset's rows when known (the advice's default task otherwise).
    GRPO and RLOO get no accumulation: TRL generates for batch x accumulation prompts at once by
    default, so the advice's accumulation there would multiply the generation's KV cache."""
    rows = Task.model_fields["num_examples"].default if num_examples is None else num_examples
    method, stage = options.method, options.stage
    out: dict = {"learning_rate": learning_rate(method, stage), "epochs": epochs_for(rows),
                 "warmup_steps": WARMUP_FRACTION, "lr_scheduler_type": LR_SCHEDULER}
    if stage not in RL_STAGES:
        out["gradient_accumulation_steps"] = accumulation_for(options.batch_size, options.num_gpus)
    if method in ("lora", "qlora", "dora"):
        out["lora_alpha"] = 2 * options.lora_r
        out["lora_dropout"] = lora_dropout_for(spec, method, options.lora_targets, rows)
    return out


def decide_settings(spec: ModelSpec, task: Task, method: str, stage: str) -> tuple[dict, list[str]]:
    rank = RANK_BY_GOAL[task.goal]
    light = task.goal in ("style", "format")
    linear_leaves = {lin.name.rsplit(".", 1)[-1] for lin in spec.linears()}
    targets: list[str] | str = ["q_proj", "v_proj"] if light and {"q_proj", "v_proj"} <= linear_leaves else "all-linear"
    experts_adapted = method in ("lora", "qlora") and bool(split_moe_targets(spec, targets)[1])
    dropout = lora_dropout_for(spec, method, targets, task.num_examples)
    epochs = epochs_for(task.num_examples)
    lr = learning_rate(method, stage)
    settings = {"learning_rate": lr, "epochs": epochs, "warmup_steps": WARMUP_FRACTION, "lr_scheduler_type": LR_SCHEDULER}
    reasons = []
    if method in ("lora", "qlora", "dora"):
        settings.update({"lora_r": rank, "lora_alpha": 2 * rank, "lora_targets": targets, "lora_dropout": dropout})
        reasons.append(
            f"Rank {rank} for {'an' if task.goal[0] in 'aeiou' else 'a'} {task.goal} goal (alpha {2 * rank}), "
            + ("q_proj and v_proj only for a light style change" if targets != "all-linear" else "all linear layers")
            + f", dropout {dropout:g}" + (" for a small dataset" if dropout > 0.05 else " (PEFT's LoRA on fused experts takes none)" if experts_adapted else "")
            + f", learning rate {lr:g}."
        )
    else:
        reasons.append(f"Learning rate {lr:g} for {method} training.")
    reasons.append(f"{epochs} epoch(s) for {task.num_examples:,} examples (1-3; fewer with more data, more risks overfitting); "
                   f"the rate warms up over the first {WARMUP_FRACTION:.0%} of the steps, then decays ({LR_SCHEDULER}).")
    return settings, reasons


def _options_for(base: TrainingOptions, method: str, stage: str, settings: dict) -> TrainingOptions:
    update = {"method": method, "stage": stage, "quantization": None}
    for key in ("lora_r", "lora_alpha", "lora_targets", "lora_dropout"):
        if key in settings:
            update[key] = settings[key]
    if method == "qlora":
        update["optimizer"] = "paged_adamw_8bit"
    if stage == "grpo" and "num_generations" not in base.model_fields_set:
        update["num_generations"] = 8
    return base.model_copy(update=update)


def _with_batch(spec: ModelSpec, options: TrainingOptions) -> tuple[Plan, dict, list[str]]:
    """Largest micro-batch that fits, the band's high end included (up to the target effective
    batch), then accumulation."""
    target = TARGET_EFFECTIVE_BATCH
    # every GPU takes a micro-batch: the per-GPU micro-batch stays within target / GPUs
    per_gpu_target = max(1, target // options.num_gpus)
    # searched as it will run: with accumulation, which keeps the gradients through the next
    # micro-batches (any count past one holds the same memory)
    accumulating = options.model_copy(update={"batch_size": 1, "gradient_accumulation_steps": 2 if target > options.num_gpus else 1})
    found = largest_batch(spec, accumulating, limit=per_gpu_target)
    if found.value is None:
        plan = build_plan(spec, options.model_copy(update={"batch_size": 1, "gradient_accumulation_steps": target}))
        return plan, {"batch_size": 1, "gradient_accumulation_steps": target}, []
    # the largest micro-batch that divides the effective batch, so accumulation lands on it exactly
    micro = max(d for d in range(1, found.value + 1) if per_gpu_target % d == 0)
    accumulation = max(1, target // (micro * found.plan.gpu.count))
    plan = build_plan(spec, options.model_copy(update={"batch_size": micro, "gradient_accumulation_steps": accumulation}))
    reasons = [
        f"Micro-batch {micro} with gradient accumulation {accumulation}: effective batch {micro * accumulation * plan.gpu.count}"
        + (
            f" (up to {found.value} would fit; {micro} divides {per_gpu_target})." if micro != found.value
            else f" ({target} sequences per step over {plan.gpu.count} GPUs)." if micro == per_gpu_target and plan.gpu.count > 1
            else f" ({target} sequences per step)." if micro == per_gpu_target
            else f" ({micro} is the largest that fits)."
        )
        + f" It needs {_needs(plan)} of {_gib(plan.usable_bytes)} usable."
        + (f" Micro-batch {found.beyond_value} would need {found.beyond_peak_bytes / GIB:.1f} GiB (up to {found.beyond_peak_high_bytes / GIB:.1f}): {found.beyond_verdict}"
           + (f" by the formula's band, which searches use; a plan of micro-batch {found.beyond_value} alone simulates the allocator, "
              "and its narrower band may fit." if found.beyond_verdict == "tight" and plan.could_simulate else ".")
           if found.beyond_value is not None else "")
    ]
    # checkpointing costs a third more compute: drop it when the same micro-batch fits without
    if options.gradient_checkpointing:
        without = build_plan(spec, plan.options.model_copy(update={"gradient_checkpointing": False}))
        if without.fits:
            plan = without
            reasons.append(f"Gradient checkpointing off: micro-batch {micro} fits without it ({_needs(without)}), which saves the recomputation.")
        else:
            reasons.append(f"Gradient checkpointing on: without it micro-batch {micro} would need {_needs(without)}: {without.verdict}.")
    return plan, {"batch_size": micro, "gradient_accumulation_steps": accumulation}, reasons


def _time(spec: ModelSpec, plan: Plan, task: Task, epochs: float) -> TimeCost | None:
    workload = Workload(num_examples=max(task.num_examples, 1), tokens_per_example=task.tokens_per_example, epochs=epochs)
    return estimate_time_cost(spec, plan, workload)


def choose_method(spec: ModelSpec, task: Task, options: TrainingOptions, stage: str) -> tuple[str, list[str]]:
    """The first method of ADVISOR.md's order whose plan fits at micro-batch 1."""
    reasons: list[str] = []

    def fits(method: str) -> Plan:
        settings, _ = decide_settings(spec, task, method, stage)
        return build_plan(spec, _options_for(options, method, stage, settings).model_copy(update={"batch_size": 1}))

    if task.tenants >= MANY_TENANTS:
        ia3 = fits("ia3")
        if ia3.fits:
            return "ia3", [f"{task.tenants:,} tenants: adapter size is the binding constraint, so IA3 (a few vectors per layer, {ia3.params['trainable']:,} parameters per tenant)."]
        reasons.append(f"IA3 would suit {task.tenants:,} tenants but needs {_needs(ia3)} of {_gib(ia3.usable_bytes)}: {ia3.verdict}.")
    if task.num_examples > FULL_FT_MIN_EXAMPLES and task.goal in ("domain", "reasoning") and stage == "sft":
        full = fits("full")
        if full.fits:
            return "full", reasons + [
                f"{task.num_examples:,} examples for a large {task.goal} shift, and full fine-tuning fits ({_needs(full)} of {_gib(full.usable_bytes)} per GPU): full FT at a low learning rate; mix in 5-10% general data against forgetting."
            ]
        reasons.append(f"Full fine-tuning would suit {task.num_examples:,} examples but needs {_needs(full)} per GPU of {_gib(full.usable_bytes)} ({full.verdict}): an adapter instead.")
    lora = fits("lora")
    if lora.fits:
        why = f"LoRA fits: {_needs(lora)} of {_gib(lora.usable_bytes)} usable on {lora.gpu.name} at micro-batch 1."
        if task.data_must_stay_on_premises:
            why += " The data stays on premises: train on your own GPU (gpu auto plans for it)."
        return "lora", reasons + [why]
    qlora = fits("qlora")
    reasons.append(f"LoRA needs {_needs(lora)} but {lora.gpu.name} has {_gib(lora.usable_bytes)} usable ({lora.verdict}): QLoRA (NF4 base, double quantization, paged 8-bit AdamW)" + (
        f" needs {_needs(qlora)}." if qlora.fits else f" would still need {_needs(qlora)} ({qlora.verdict})."))
    return "qlora", reasons


def shard_across_given_gpus(options: TrainingOptions) -> tuple[TrainingOptions, list[str]]:
    """Several GPUs and no parallelism chosen: shard with ZeRO-3. The GPUs are there already and
    sharding costs no quality, so it comes before any lever that does."""
    if options.num_gpus > 1 and options.parallelism == "ddp" and "parallelism" not in options.model_fields_set:
        sharded = options.model_copy(update={"parallelism": "zero3"})
        return sharded, [f"{options.num_gpus} GPUs: weights, gradients and optimizer state sharded across them with ZeRO-3 (no quality cost) rather than copied to each."]
    return options, []


def advise(spec: ModelSpec, task: Task, options: TrainingOptions | None = None) -> Advice:
    options, shard_reasons = shard_across_given_gpus(options or TrainingOptions())
    approach, reasons = decide_approach(task)
    untold = [f"{name.replace('_', ' ')} {getattr(task, name)}" for name in ("goal", "data_kind", "num_examples") if name not in task.model_fields_set]
    if untold:
        reasons.append("Assumed, not given: " + ", ".join(untold) + ".")
    reasons += shard_reasons
    stage, stage_reasons = decide_stage(spec, task, options.stage if "stage" in options.model_fields_set else None)
    method, method_reasons = choose_method(spec, task, options, stage)
    settings, setting_reasons = decide_settings(spec, task, method, stage)
    chosen = _options_for(options, method, stage, settings)
    plan, batch_settings, batch_reasons = _with_batch(spec, chosen)
    settings.update(batch_settings)
    settings.update({
        "gradient_checkpointing": plan.options.gradient_checkpointing,
        "optimizer": plan.options.optimizer,
        "seq_len": plan.options.seq_len,
        "precision": plan.options.precision,
    })
    reasons += stage_reasons + method_reasons + setting_reasons + batch_reasons
    if not plan.fits:
        fixes = smallest_fixes(spec, plan.options)
        if fixes.smallest is not None:
            reasons.append(f"{'Tight' if plan.verdict == 'tight' else 'Does not fit'} as is ({_needs(plan)} of {_gib(plan.usable_bytes)}); smallest change that fits: {fixes.smallest.description} ({_needs(fixes.smallest.plan)}).")
            plan = fixes.smallest.plan
            settings.update(fixes.smallest.changes)
        else:
            reasons.append(f"Nothing tried fits: the best needs {_needs(plan)} per GPU; use a larger GPU or more of them.")
    differs = differences_from(options, plan.options)
    if differs:
        reasons.append("Compared with the plan for the settings as given (defaults where none were given), this run has " + ", ".join(differs) + ": hence its different peak.")
    time_cost = _time(spec, plan, task, settings["epochs"])
    alternatives = tuple(_alternatives(spec, task, options, stage, method, settings["epochs"]))
    other = []
    if approach != "fine-tune":
        other.append(f"fine-tune: the plan below is what {method} {stage.upper()} would take once the conditions above are met")
    else:
        other.append("prompting with an evaluation set remains the baseline to beat")
    deployment = _deployment(spec, task, plan)
    return Advice(approach, stage, method, settings, tuple(reasons), plan, time_cost, alternatives, tuple(other), deployment)


def _deployment(spec: ModelSpec, task: Task, plan: Plan) -> Deployment:
    """The deployment advice on the training GPU, for requests of the task's length."""
    from gpu_catalog.catalog import find_gpu
    from gpu_catalog.errors import InputError

    gpu = plan.gpu
    try:
        catalog_gpu = find_gpu(gpu.name)
    except InputError:  # a bare memory size names no catalog GPU: no FP8 assumed
        catalog_gpu = None
    has_fp8 = bool(catalog_gpu and catalog_gpu.fp8)
    memory = gpu.memory_bytes / GIB if gpu.custom_memory or catalog_gpu is None else None
    return deployment_advice(spec, plan.options.method, plan.options.lora_r, task.tenants, task.latency_target_ms,
                             task.tokens_per_example or plan.options.seq_len, gpu.name, memory, has_fp8)


def differences_from(yours: TrainingOptions, advised: TrainingOptions) -> list[str]:
    """The settings the advice changed, as "micro-batch 4 instead of 1"."""
    out = []
    for name, words in COMPARED_SETTINGS:
        mine, theirs = getattr(yours, name), getattr(advised, name)
        if mine != theirs:
            show = (lambda v: "on" if v is True else "off" if v is False else v)
            out.append(f"{words} {show(theirs)} instead of {show(mine)}")
    return out


def _alternatives(spec: ModelSpec, task: Task, options: TrainingOptions, stage: str, chosen: str, epochs: float) -> list[Candidate]:
    whys = {
        "qlora": "least memory: 4-bit base, a little slower and slightly lower quality",
        "lora": "the default adapter: 16-bit base, adapters of a few MB",
        "dora": "when LoRA's quality disappoints and a little more memory is affordable",
        "full": "largest capability shift; needs the most memory and data",
        "ia3": "smallest adapters, for thousands of tenants",
    }
    out = []
    for method in ("lora", "qlora", "dora", "full", "ia3"):
        if method == chosen:
            continue
        settings, _ = decide_settings(spec, task, method, stage)
        try:
            plan = build_plan(spec, _options_for(options, method, stage, settings).model_copy(update={"batch_size": 1}))
        except PlanInputError:
            continue  # e.g. DoRA on fused MoE experts
        needed = None if plan.fits else fewest_gpus(spec, plan.options).value
        out.append(Candidate(f"{method} {stage}", plan, _time(spec, plan, task, epochs), whys[method], needed))
    if stage == "dpo":
        for other, why in (("orpo", "SFT and preference in one stage, no reference model"), ("simpo", "reference-free, length-normalized")):
            settings, _ = decide_settings(spec, task, chosen, other)
            plan = build_plan(spec, _options_for(options, chosen, other, settings).model_copy(update={"batch_size": 1}))
            out.append(Candidate(f"{chosen} {other}", plan, _time(spec, plan, task, epochs), why))
    # fitting first, then the cheaper in memory
    out.sort(key=lambda c: (not c.plan.fits, c.plan.peak_bytes))
    return out
