"""Fit searches: the largest micro-batch and longest sequence that fit, the fewest GPUs, the
cheapest catalog GPU, and the smallest change that makes a failing plan fit.

Every answer is a real plan built by `build_plan`, and each search also reports the plan one step
beyond its answer, which does not fit: the boundary is shown, not asserted. "Fits" is
`Plan.fits`: the high end of the plan's band is within the usable memory, so a search never
answers with a plan that is only "tight". Peak memory grows
with batch and sequence length (a property test holds the planner to that), so the batch and
sequence searches double until a plan fails, then bisect.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from gpu_catalog.catalog import GPU, all_gpus
from planner.errors import PlanInputError
from planner.options import TrainingOptions
from planner.plan import GIB, Plan, build_plan
from planner.spec import ModelSpec

# Sequence lengths are searched in steps of this many tokens: a 3,917-token limit reads as noise.
SEQ_STEP = 64
# GPU counts tried for the fewest-GPUs search: one node of up to 8, then whole nodes.
GPU_COUNTS = (1, 2, 3, 4, 5, 6, 7, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512)
MAX_GPUS_PER_NODE = 8


@dataclass(frozen=True)
class SearchResult:
    """The best value of one option that fits, and the step beyond it that does not."""

    search: str
    option: str
    value: int | None  # None: not even the smallest value fits
    plan: Plan | None
    beyond_value: int | None  # one step more (None when the search hit the option's limit)
    beyond_peak_bytes: int | None
    note: str
    beyond_peak_high_bytes: int | None = None
    beyond_verdict: str | None = None  # "tight" or "does not fit"

    def to_dict(self) -> dict:
        return {
            "search": self.search,
            "option": self.option,
            "value": self.value,
            "fits": self.plan is not None and self.plan.fits,
            "peak_bytes": self.plan.peak_bytes if self.plan else None,
            "peak_high_bytes": self.plan.peak_high_bytes if self.plan else None,
            "usable_bytes": self.plan.usable_bytes if self.plan else None,
            "beyond_value": self.beyond_value,
            "beyond_peak_bytes": self.beyond_peak_bytes,
            "beyond_peak_high_bytes": self.beyond_peak_high_bytes,
            "beyond_verdict": self.beyond_verdict,
            "note": self.note,
        }


def _plan_with(spec: ModelSpec, options: TrainingOptions, **changes) -> Plan:
    return build_plan(spec, options.model_copy(update=changes))


def _largest(spec: ModelSpec, options: TrainingOptions, option: str, step: int, limit: int) -> tuple[int | None, Plan | None, Plan | None]:
    """Largest multiple of `step` up to `limit` whose plan fits: (value, plan, plan one step beyond)."""
    cache: dict[int, Plan] = {}

    def plan_at(units: int) -> Plan:
        if units not in cache:
            cache[units] = _plan_with(spec, options, **{option: units * step})
        return cache[units]

    max_units = limit // step
    if not plan_at(1).fits:
        return None, None, plan_at(1)
    good = 1
    bad = None
    # Every phase's total is affine in batch and sequence length (quadratic in length only with
    # eager attention), and so is the band's high end, which decides `fits`: the secant through
    # the first two points usually lands on the answer, and two more plans confirm it. Otherwise
    # the bracket below still finds it.
    if max_units >= 2 and plan_at(2).fits:
        good = 2
        first, second = plan_at(1).peak_high_bytes, plan_at(2).peak_high_bytes
        if second > first:
            guess = min(max_units, 2 + (plan_at(2).usable_bytes - second) // (second - first))
            if guess > good and plan_at(guess).fits:
                good = guess
                if guess == max_units:
                    return good * step, plan_at(good), None
                if not plan_at(guess + 1).fits:
                    bad = guess + 1
            elif guess > good:
                bad = guess
    while bad is None:
        trial = min(good * 2, max_units)
        if trial == good:
            return good * step, plan_at(good), None
        if plan_at(trial).fits:
            good = trial
        else:
            bad = trial
    while bad - good > 1:
        middle = (good + bad) // 2
        if plan_at(middle).fits:
            good = middle
        else:
            bad = middle
    return good * step, plan_at(good), plan_at(good + 1)


def largest_batch(spec: ModelSpec, options: TrainingOptions, limit: int = 65536) -> SearchResult:
    value, plan, beyond = _largest(spec, options, "batch_size", 1, limit)
    return SearchResult(
        "largest_batch",
        "batch_size",
        value,
        plan,
        beyond.options.batch_size if beyond else None,
        beyond.peak_bytes if beyond else None,
        _boundary_note("micro-batch", value, plan, beyond, f"at sequence length {options.seq_len:,}"),
        *_beyond(beyond),
    )


def longest_sequence(spec: ModelSpec, options: TrainingOptions, limit: int = 1 << 20) -> SearchResult:
    value, plan, beyond = _largest(spec, options, "seq_len", SEQ_STEP, limit)
    return SearchResult(
        "longest_sequence",
        "seq_len",
        value,
        plan,
        beyond.options.seq_len if beyond else None,
        beyond.peak_bytes if beyond else None,
        _boundary_note("sequence length", value, plan, beyond, f"at micro-batch {options.batch_size} (searched in steps of {SEQ_STEP} tokens)"),
        *_beyond(beyond),
    )


def _beyond(beyond: Plan | None) -> tuple[int | None, str | None]:
    return (beyond.peak_high_bytes, beyond.verdict) if beyond is not None else (None, None)


def _needs(plan: Plan) -> str:
    """"18.62 GiB (up to 20.73)": the central figure and the band's high end, which decides."""
    return f"{plan.peak_bytes / GIB:.2f} GiB (up to {plan.peak_high_bytes / GIB:.2f})"


def _boundary_note(what: str, value: int | None, plan: Plan | None, beyond: Plan | None, context: str) -> str:
    if value is None:
        return f"no {what} fits {context}: the smallest needs {_needs(beyond)} of {beyond.usable_bytes / GIB:.2f} GiB usable ({beyond.verdict})"
    text = f"{what} {value:,} fits {context}: {_needs(plan)} of {plan.usable_bytes / GIB:.2f} GiB usable"
    if beyond is not None:
        shown = beyond.options.batch_size if what == "micro-batch" else beyond.options.seq_len
        text += f"; {shown:,} would need {_needs(beyond)}, {beyond.verdict}"
    return text


def _sharded(options: TrainingOptions) -> TrainingOptions:
    """DDP copies everything to every GPU, so more GPUs only help once the model is sharded."""
    if options.parallelism == "ddp":
        return options.model_copy(update={"parallelism": "zero3"})
    return options


def fewest_gpus(spec: ModelSpec, options: TrainingOptions, counts: tuple[int, ...] = GPU_COUNTS) -> SearchResult:
    sharded = _sharded(options)
    previous: Plan | None = None
    for count in counts:
        candidate = sharded if count > 1 else options.model_copy(update={"parallelism": "ddp"})
        plan = build_plan(spec, candidate.model_copy(update={"num_gpus": count}))
        if plan.fits:
            layout = "one GPU" if count == 1 else f"{count} GPUs with {candidate.parallelism}"
            note = f"{layout}: {_needs(plan)} per GPU of {plan.usable_bytes / GIB:.2f} GiB usable"
            if previous is not None:
                note += f"; {previous.gpu.count} would need {_needs(previous)} per GPU, {previous.verdict}"
            return SearchResult("fewest_gpus", "num_gpus", count, plan, previous.gpu.count if previous else None,
                                previous.peak_bytes if previous else None, note, *_beyond(previous))
        previous = plan
    return SearchResult(
        "fewest_gpus", "num_gpus", None, None, previous.gpu.count, previous.peak_bytes,
        f"even {previous.gpu.count} GPUs with {sharded.parallelism} need {_needs(previous)} per GPU ({previous.verdict})", *_beyond(previous),
    )


@dataclass(frozen=True)
class GpuChoice:
    gpu: GPU
    count: int
    plan: Plan
    price_per_hour_usd: float | None  # for all `count` GPUs

    def to_dict(self) -> dict:
        return {
            "gpu": self.gpu.name,
            "count": self.count,
            "parallelism": self.plan.options.parallelism,
            "peak_bytes": self.plan.peak_bytes,
            "peak_high_bytes": self.plan.peak_high_bytes,
            "memory_bytes": self.plan.gpu.memory_bytes,
            "price_per_hour_usd": self.price_per_hour_usd,
        }


def gpu_options(spec: ModelSpec, options: TrainingOptions, max_gpus: int = MAX_GPUS_PER_NODE) -> list[GpuChoice]:
    """For every catalog GPU, the fewest of it (up to one node) that fits, cheapest per hour first;
    GPUs with no public price come last, smallest memory first."""
    base = options.model_copy(update={"gpu_memory_gib": None})
    counts = tuple(c for c in GPU_COUNTS if c <= max_gpus)
    choices = []
    for gpu in all_gpus():
        found = fewest_gpus(spec, base.model_copy(update={"gpu": gpu.name}), counts)
        if found.plan is None:
            continue
        price = gpu.price_per_hour_usd * found.value if gpu.price_per_hour_usd is not None else None
        choices.append(GpuChoice(gpu, found.value, found.plan, price))
    choices.sort(key=lambda c: (c.price_per_hour_usd is None, c.price_per_hour_usd or 0, c.count * c.gpu.memory_mib))
    return choices


def cheapest_gpu(spec: ModelSpec, options: TrainingOptions, max_gpus: int = MAX_GPUS_PER_NODE) -> GpuChoice | None:
    return _cheapest(gpu_options(spec, options, max_gpus))


def _cheapest(choices: list[GpuChoice]) -> GpuChoice | None:
    """gpu_options sorts the priced choices first, cheapest first."""
    return next((c for c in choices if c.price_per_hour_usd is not None), None)


@dataclass(frozen=True)
class Fix:
    """One change to the options, with the plan it gives."""

    lever: str
    description: str
    changes: dict
    plan: Plan

    def to_dict(self) -> dict:
        return {
            "lever": self.lever,
            "description": self.description,
            "changes": self.changes,
            "peak_bytes": self.plan.peak_bytes,
            "peak_high_bytes": self.plan.peak_high_bytes,
            "fits": self.plan.fits,
            "verdict": self.plan.verdict,
        }


@dataclass(frozen=True)
class FixReport:
    fits_already: bool
    fixes: tuple[Fix, ...]  # every lever tried alone, in the order they cost least quality
    smallest: Fix | None  # the first lever that fits alone, else the shortest chain of levers that fits
    combined: tuple[str, ...] = field(default=())  # the levers of `smallest` when it is a chain

    def to_dict(self) -> dict:
        return {
            "fits_already": self.fits_already,
            "smallest": self.smallest.to_dict() if self.smallest else None,
            "combined": list(self.combined),
            "fixes": [f.to_dict() for f in self.fixes],
        }


# Each lever, in ADVISOR.md's order (least quality cost first): a function from the options to
# (changes, description), or None when the lever does not apply.
Lever = Callable[[ModelSpec, TrainingOptions], "tuple[dict, str] | None"]


def _checkpointing(spec: ModelSpec, options: TrainingOptions):
    if options.gradient_checkpointing:
        return None
    return {"gradient_checkpointing": True}, "turn on gradient checkpointing (about a third more compute)"


def _eight_bit_optimizer(spec: ModelSpec, options: TrainingOptions):
    if options.optimizer not in ("adamw", "adamw_foreach", "paged_adamw_32bit"):
        return None
    return {"optimizer": "paged_adamw_8bit"}, "paged 8-bit AdamW: optimizer state at 2 bytes per parameter, spikes paged to CPU"


def _smaller_batch(spec: ModelSpec, options: TrainingOptions):
    if options.batch_size == 1:
        return None
    # searched with accumulation, which keeps the gradients through the next micro-batches
    found = largest_batch(spec, options.model_copy(update={"gradient_accumulation_steps": 2}), limit=options.batch_size - 1)
    effective = options.batch_size * options.gradient_accumulation_steps
    if found.value is None:
        return ({"batch_size": 1, "gradient_accumulation_steps": effective},
                f"micro-batch 1 with gradient accumulation {effective} (same effective batch)")
    accumulation = -(-effective // found.value)
    return ({"batch_size": found.value, "gradient_accumulation_steps": accumulation},
            f"micro-batch {found.value} with gradient accumulation {accumulation} (same effective batch or more)")


def _shorter_sequence(spec: ModelSpec, options: TrainingOptions):
    if options.seq_len <= SEQ_STEP:
        return None
    found = longest_sequence(spec, options, limit=options.seq_len - 1)
    if found.value is None:
        return None
    return {"seq_len": found.value}, f"sequence length {found.value:,} instead of {options.seq_len:,} (truncate or split longer examples)"


def _qlora(spec: ModelSpec, options: TrainingOptions):
    if options.method not in ("lora", "dora", "full", "freeze"):
        return None
    changes = {"method": "qlora", "optimizer": "paged_adamw_8bit", "quantization": None}
    return changes, "QLoRA: a 4-bit NF4 base with double quantization, LoRA adapters, paged 8-bit AdamW"


def _zero3(spec: ModelSpec, options: TrainingOptions):
    found = fewest_gpus(spec, options.model_copy(update={"num_gpus": 1, "parallelism": "ddp"}), tuple(c for c in GPU_COUNTS if c > 1))
    if found.value is None:
        return None
    return {"num_gpus": found.value, "parallelism": found.plan.options.parallelism}, f"ZeRO-3 across {found.value} GPUs: weights, gradients and optimizer state sharded"


def _offload_optimizer(spec: ModelSpec, options: TrainingOptions):
    if options.offload != "none":
        return None
    return {"offload": "optimizer"}, "offload the optimizer state to CPU memory (DeepSpeed ZeRO-Offload: slower steps, needs host RAM)"


def _offload_params(spec: ModelSpec, options: TrainingOptions):
    if options.offload == "params" or options.parallelism not in ("zero3", "fsdp"):
        return None
    return {"offload": "params"}, "offload parameters and optimizer state to CPU memory (ZeRO-Infinity style: much slower steps)"


LEVERS: tuple[tuple[str, Lever], ...] = (
    ("gradient_checkpointing", _checkpointing),
    ("8bit_optimizer", _eight_bit_optimizer),
    ("smaller_micro_batch", _smaller_batch),
    ("shorter_sequence", _shorter_sequence),
    ("qlora", _qlora),
    ("zero3", _zero3),
    ("offload_optimizer", _offload_optimizer),
    ("offload_params", _offload_params),
)


def _try(spec: ModelSpec, options: TrainingOptions, name: str, lever: Lever) -> Fix | None:
    try:
        proposal = lever(spec, options)
        if proposal is None:
            return None
        changes, description = proposal
        return Fix(name, description, changes, build_plan(spec, options.model_copy(update=changes)))
    except PlanInputError:
        return None  # the lever makes a combination no stack runs (e.g. offload without ZeRO)


def smallest_fixes(spec: ModelSpec, options: TrainingOptions) -> FixReport:
    """The smallest change that fits, ranked first by the GPUs it needs, then by quality cost:
    each lever alone, in order, and the levers stacked in order. A lever that fits on the GPUs
    the user has wins outright; when only more GPUs make it fit, the stack (say QLoRA, then
    ZeRO-3 on 3 GPUs) is preferred to a lever alone that needs more of them (ZeRO-3 on 16),
    which is also what the advisor recommends."""
    if build_plan(spec, options).fits:
        return FixReport(True, (), None)
    fixes = tuple(fix for name, lever in LEVERS if (fix := _try(spec, options, name, lever)) is not None)
    alone = next((f for f in fixes if f.plan.fits), None)
    if alone is not None and alone.plan.gpu.count <= options.num_gpus:
        return FixReport(False, fixes, alone)
    chain, levers = _stacked(spec, options)
    if chain is not None and (alone is None or chain.plan.gpu.count < alone.plan.gpu.count):
        return FixReport(False, fixes, chain, levers)
    return FixReport(False, fixes, alone, () if alone is not None else levers)


def _stacked(spec: ModelSpec, options: TrainingOptions) -> tuple[Fix | None, tuple[str, ...]]:
    """The levers applied one after another, in order, each kept when it lowers the peak's high
    end, until the plan fits: (the chain as one Fix, or None when it never fits; the levers applied)."""
    current = build_plan(spec, options)
    steps: list[Fix] = []
    for name, lever in LEVERS:
        fix = _try(spec, current.options, name, lever)
        if fix is None or fix.plan.peak_high_bytes >= current.peak_high_bytes:
            continue
        current = fix.plan
        steps.append(fix)
        if fix.plan.fits:
            changes = {k: v for step in steps for k, v in step.changes.items()}
            description = "; then ".join(step.description for step in steps)
            chain = tuple(step.lever for step in steps)
            return Fix("+".join(chain), description, changes, fix.plan), chain
    return None, tuple(step.lever for step in steps)


def fit_report(spec: ModelSpec, options: TrainingOptions) -> dict:
    """Every search at once, as `vramplan fit --json` and `POST /api/v1/fit` return it."""
    plan = build_plan(spec, options)
    choices = gpu_options(spec, options)
    cheapest = _cheapest(choices)
    return {
        "model": spec.name,
        "gpu": {"name": plan.gpu.name, "label": plan.gpu.label, "memory_bytes": plan.gpu.memory_bytes, "count": plan.gpu.count},
        "fits": plan.fits,
        "verdict": plan.verdict,
        "peak_bytes": plan.peak_bytes,
        "peak_low_bytes": plan.peak_low_bytes,
        "peak_high_bytes": plan.peak_high_bytes,
        "usable_bytes": plan.usable_bytes,
        "largest_batch": largest_batch(spec, options).to_dict(),
        "longest_sequence": longest_sequence(spec, options).to_dict(),
        "fewest_gpus": fewest_gpus(spec, options).to_dict(),
        "cheapest_gpu": cheapest.to_dict() if cheapest else None,
        "gpu_options": [c.to_dict() for c in choices],
        "fixes": smallest_fixes(spec, options).to_dict(),
    }
