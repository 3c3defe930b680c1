"""Fit searches: every answer is a plan that fits, and one step more does not."""

import pytest

from gpu_catalog.catalog import all_gpus
from planner.catalog import load_catalog_spec
from planner.fit import SEQ_STEP, cheapest_gpu, fewest_gpus, gpu_options, largest_batch, longest_sequence, smallest_fixes
from planner.options import TrainingOptions
from planner.plan import build_plan

LLAMA8B = load_catalog_spec("meta-llama/Llama-3.1-8B")
LLAMA70B = load_catalog_spec("meta-llama/Llama-2-70b-hf")
QWEN_SMALL = load_catalog_spec("Qwen/Qwen2.5-0.5B")

CASES = [
    (LLAMA8B, dict(method="lora", gpu="RTX 4090")),
    (LLAMA8B, dict(method="qlora", gpu="RTX 4000 Ada", attention="eager")),
    (LLAMA70B, dict(method="qlora", gpu="H100", gradient_checkpointing=False, seq_len=512)),
    (QWEN_SMALL, dict(method="full", gpu="A100 80GB SXM", stage="dpo")),
]


@pytest.mark.parametrize("spec,options", CASES)
def test_largest_batch_fits_and_one_more_does_not(spec, options):
    options = TrainingOptions(**options)
    found = largest_batch(spec, options)
    assert found.value is not None and found.plan.fits and found.plan.peak_high_bytes <= found.plan.usable_bytes
    again = build_plan(spec, options.model_copy(update={"batch_size": found.value}))
    assert again.fits and again.peak_bytes == found.plan.peak_bytes
    beyond = build_plan(spec, options.model_copy(update={"batch_size": found.value + 1}))
    assert not beyond.fits and beyond.peak_bytes == found.beyond_peak_bytes
    assert beyond.peak_high_bytes == found.beyond_peak_high_bytes > beyond.usable_bytes and beyond.verdict == found.beyond_verdict


@pytest.mark.parametrize("spec,options", CASES)
def test_longest_sequence_fits_and_one_step_more_does_not(spec, options):
    options = TrainingOptions(**options)
    found = longest_sequence(spec, options)
    assert found.value % SEQ_STEP == 0
    assert build_plan(spec, options.model_copy(update={"seq_len": found.value})).fits
    assert not build_plan(spec, options.model_copy(update={"seq_len": found.value + SEQ_STEP})).fits
    assert found.beyond_value == found.value + SEQ_STEP


def test_nothing_fits_is_reported_not_raised():
    found = largest_batch(LLAMA70B, TrainingOptions(method="full", gpu="RTX 4090"))
    assert found.value is None and found.plan is None
    assert "no micro-batch fits" in found.note and found.beyond_peak_bytes > 24 * 2**30


def test_search_respects_its_limit():
    found = largest_batch(QWEN_SMALL, TrainingOptions(method="qlora", gpu="H100", seq_len=64), limit=5)
    assert found.value == 5 and found.beyond_value is None


def test_fewest_gpus_shards_with_zero3_and_one_fewer_does_not_fit():
    options = TrainingOptions(method="full", gpu="H100")
    found = fewest_gpus(LLAMA70B, options)
    assert found.value > 1 and found.plan.fits and found.plan.options.parallelism == "zero3"
    fewer = build_plan(LLAMA70B, found.plan.options.model_copy(update={"num_gpus": found.beyond_value}))
    assert not fewer.fits
    assert found.beyond_value < found.value


def test_fewest_gpus_is_one_when_it_already_fits():
    found = fewest_gpus(QWEN_SMALL, TrainingOptions(method="lora", gpu="H100"))
    assert found.value == 1 and found.beyond_value is None


def test_cheapest_gpu_fits_and_no_cheaper_catalog_gpu_does():
    options = TrainingOptions(method="qlora", seq_len=1024)
    best = cheapest_gpu(LLAMA8B, options, max_gpus=1)
    assert best is not None and best.plan.fits
    for gpu in all_gpus():
        if gpu.price_per_hour_usd is not None and gpu.price_per_hour_usd < best.price_per_hour_usd:
            assert not build_plan(LLAMA8B, options.model_copy(update={"gpu": gpu.name})).fits, gpu.name


def test_gpu_options_each_fit_with_the_fewest_of_that_gpu():
    options = TrainingOptions(method="lora")
    for choice in gpu_options(LLAMA8B, options)[:6]:
        assert choice.plan.fits and choice.plan.gpu.name == choice.gpu.name
        if choice.count > 1:
            fewer = choice.plan.options.model_copy(update={"num_gpus": choice.count - 1})
            if choice.count - 1 == 1:
                fewer = fewer.model_copy(update={"parallelism": "ddp"})
            assert not build_plan(LLAMA8B, fewer).fits


def test_smallest_fix_follows_the_levers_order():
    # LoRA on a 13B does not fit a 20 GB card; checkpointing is on and batch is 1, so QLoRA is
    # the first lever that fits on one GPU
    spec = load_catalog_spec("meta-llama/Llama-2-13b-hf")
    report = smallest_fixes(spec, TrainingOptions(method="lora", gpu="RTX 4000 Ada"))
    assert not report.fits_already
    assert report.smallest.lever == "qlora" and report.smallest.plan.fits
    earlier = [f for f in report.fixes if f.lever in ("gradient_checkpointing", "8bit_optimizer", "smaller_micro_batch", "shorter_sequence")]
    assert all(not f.plan.fits for f in earlier)


def test_checkpointing_is_the_first_fix_when_it_is_enough():
    options = TrainingOptions(method="lora", gpu="RTX 4090", gradient_checkpointing=False, seq_len=4096)
    report = smallest_fixes(LLAMA8B, options)
    assert report.smallest.lever == "gradient_checkpointing"
    assert report.smallest.plan.fits and not build_plan(LLAMA8B, options).fits


def test_levers_chain_when_none_fits_alone():
    options = TrainingOptions(method="full", gpu="RTX 4090", batch_size=4, gradient_checkpointing=False)
    report = smallest_fixes(LLAMA70B, options)
    assert report.smallest is not None and report.smallest.plan.fits
    assert not any(f.plan.fits for f in report.fixes)
    assert len(report.combined) >= 2


def test_a_fitting_plan_needs_no_fix():
    assert smallest_fixes(QWEN_SMALL, TrainingOptions(method="lora", gpu="H100")).fits_already


def test_a_stack_on_fewer_gpus_beats_one_lever_on_many_and_matches_the_advice():
    """Full fine-tuning a 70B on a 4090: ZeRO-3 alone needs many GPUs; QLoRA then ZeRO-3 needs
    few. The page's first fix and the advisor must give the same answer."""
    from planner.advisor import Task, advise

    options = TrainingOptions(method="full", gpu="RTX 4090")
    report = smallest_fixes(LLAMA70B, options)
    zero3_alone = next(f for f in report.fixes if f.lever == "zero3")
    assert zero3_alone.plan.fits
    assert report.smallest.lever.startswith("qlora") or "qlora" in report.combined
    assert report.smallest.plan.fits and report.smallest.plan.gpu.count < zero3_alone.plan.gpu.count
    advice = advise(LLAMA70B, Task(), options)
    assert (advice.plan.options.method, advice.plan.gpu.count) == (report.smallest.plan.options.method, report.smallest.plan.gpu.count)


# -- the searches use the band's high end ------------------------------------------------------

LLAMA13B = load_catalog_spec("meta-llama/Llama-2-13b-hf")
FLAGSHIP = TrainingOptions(method="qlora", gpu="RTX 4000 Ada")


def test_largest_batch_is_the_largest_whose_high_end_fits_not_whose_central_figure_does():
    """The flagship: at some micro-batch the central figure is within the usable memory but the
    band's high end is not. The search stops before it (it used to answer with it)."""
    found = largest_batch(LLAMA13B, FLAGSHIP)
    assert found.plan.peak_high_bytes <= found.plan.usable_bytes
    beyond = build_plan(LLAMA13B, FLAGSHIP.model_copy(update={"batch_size": found.value + 1}))
    assert beyond.verdict == "tight" and beyond.peak_bytes <= beyond.usable_bytes < beyond.peak_high_bytes
    assert found.to_dict()["beyond_verdict"] == "tight" and "tight" in found.note


def test_longest_sequence_and_fewest_gpus_answer_with_plans_whose_high_end_fits():
    found = longest_sequence(LLAMA13B, FLAGSHIP)
    assert found.plan.peak_high_bytes <= found.plan.usable_bytes
    assert found.beyond_peak_high_bytes > found.plan.usable_bytes
    gpus = fewest_gpus(LLAMA70B, TrainingOptions(method="full", gpu="H100"))
    assert gpus.plan.peak_high_bytes <= gpus.plan.usable_bytes and gpus.beyond_peak_high_bytes > gpus.plan.usable_bytes


def test_cheapest_gpu_and_smallest_fix_fit_at_the_high_end():
    best = cheapest_gpu(LLAMA13B, FLAGSHIP.model_copy(update={"batch_size": 4}), max_gpus=1)
    assert best.plan.peak_high_bytes <= best.plan.usable_bytes
    report = smallest_fixes(LLAMA13B, TrainingOptions(method="lora", gpu="RTX 4000 Ada"))
    assert report.smallest.plan.peak_high_bytes <= report.smallest.plan.usable_bytes


def test_a_tight_plan_is_not_fitting_already_and_gets_a_fix():
    tight = FLAGSHIP.model_copy(update={"batch_size": largest_batch(LLAMA13B, FLAGSHIP).value + 1})
    assert build_plan(LLAMA13B, tight).verdict == "tight"
    report = smallest_fixes(LLAMA13B, tight)
    assert not report.fits_already and report.smallest.plan.fits
