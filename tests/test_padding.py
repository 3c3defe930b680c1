"""Padded, padding-free and fixed-length batches (issue 23, item 5) against what autograd saves.

A padded batch keeps its attention mask: transformers 5 then builds a boolean causal-and-padding
mask, SDPA loses is_causal (and its flash kernel), grouped-query keys and values are expanded to
every head, and the masked kernel keeps the mask per layer. Padding-free batching (TRL's
padding_free, or packing with bfd) is one row of packed sequences with position_ids; without
flash attention transformers builds a block-diagonal mask over the whole row. Each case runs the
real transformers (+ PEFT) forward on CPU under bf16 autocast, as tests/test_activations.py does.
"""

from __future__ import annotations

import gc
import weakref

import pytest

from planner.introspect import spec_from_config
from planner.options import TrainingOptions
from tests.conftest import TINY

BATCH, SEQ = 2, 64


def _options(**overrides) -> TrainingOptions:
    base = dict(method="lora", weights_dtype="bf16", precision="bf16", attention="sdpa", gradient_checkpointing=False, batch_size=BATCH,
                seq_len=SEQ, trainer="hf", lora_r=8, lora_dropout=0.0, gpu_memory_gib=80)
    return TrainingOptions(**(base | overrides))


def _batch(layout: str, config: dict):
    """The collator's batch for each layout (TRL 1.16's DataCollatorForLanguageModeling): a mask
    with one pad in the last row, or one flattened row with position_ids restarting per sequence."""
    import torch

    torch.manual_seed(0)
    ids = torch.randint(3, config["vocab_size"], (BATCH, SEQ))
    if layout == "padded":
        mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        mask[-1, -1] = 0
        return {"input_ids": ids, "labels": ids, "attention_mask": mask}
    if layout == "padding_free":
        flat = ids.reshape(1, BATCH * SEQ)
        return {"input_ids": flat, "labels": flat, "position_ids": torch.arange(SEQ).repeat(BATCH)[None]}
    return {"input_ids": ids, "labels": ids}


def _measured(arch: str, method: str, attention: str, layout: str, checkpointing: bool = False) -> int:
    import torch

    from tests.realstack import apply_method, build_model, saved_activation_bytes

    model = apply_method(build_model(TINY[arch], "bf16", attention=attention), method, 8, checkpointing)
    model.train()
    batch = _batch(layout, TINY[arch])

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            # the trainers forward with use_cache False (TRL's compute_loss, the Trainer's args):
            # with a cache transformers skips its packed-sequence detection
            return model(**batch, use_cache=False)

    saved, _ = saved_activation_bytes(model, forward)
    return saved


def _planned(arch: str, options: TrainingOptions) -> int:
    from tests.realstack import predicted_saved

    spec = spec_from_config(TINY[arch], arch)
    # predicted_saved's options, with the layout's fields
    from planner.activations import activation_components, training_tokens
    from planner.logits import logits_components

    parts = activation_components(spec, options) + logits_components(spec, options, training_tokens(options))
    del predicted_saved
    return sum(c.bytes for c in parts if c.name not in ("activations.recompute", "activations.attention_mask") and not c.name.startswith("temporary"))


LAYOUT_OPTIONS = {"fixed": {}, "padded": {"padding": "longest"}, "padding_free": {"padding_free": True, "packing": True}}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("layout", ["padded", "padding_free"])
def test_masked_batches_save_what_autograd_saves(arch, method, layout):
    measured = _measured(arch, method, "sdpa", layout)
    planned = _planned(arch, _options(method=method, **LAYOUT_OPTIONS[layout]))
    assert abs(planned - measured) / measured <= 0.10, (planned, measured)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_padded_gqa_saves_more_than_fixed(method):
    """The tiny Llama has 4 query heads over 2 key/value heads: with a padding mask SDPA's keys and
    values are expanded to 4 heads and the mask is kept per layer, and the plan grows by what the
    forward grows by (within 10%)."""
    fixed, padded = _measured("llama", method, "sdpa", "fixed"), _measured("llama", method, "sdpa", "padded")
    assert padded > fixed
    planned_fixed = _planned("llama", _options(method=method))
    planned_padded = _planned("llama", _options(method=method, padding="longest"))
    assert planned_padded > planned_fixed
    assert abs((planned_padded - planned_fixed) - (padded - fixed)) <= 0.10 * (padded - fixed), (planned_padded - planned_fixed, padded - fixed)
    # an all-ones mask is dropped by transformers: fixed-length rows save what no mask saves
    assert _measured("llama", method, "sdpa", "fixed") == fixed


def test_eager_padding_changes_nothing():
    """Eager attention builds its float mask whatever the padding: the padded plan is the fixed one."""
    assert _measured("llama", "lora", "eager", "padded") == _measured("llama", "lora", "eager", "fixed")
    assert _planned("llama", _options(attention="eager", padding="longest")) == _planned("llama", _options(attention="eager"))


def test_checkpointing_keeps_the_boolean_mask():
    """Under checkpointing the 4D boolean mask is referenced by every layer's checkpoint until the
    backward ends; without it the mask dies with the forward. The plan counts it only under checkpointing."""
    import torch

    import transformers.models.llama.modeling_llama as llama
    from tests.realstack import apply_method, build_model

    from planner.activations import activation_components

    spec = spec_from_config(TINY["llama"], "llama")
    for checkpointing in (False, True):
        made = []
        original = llama.create_causal_mask

        def keep(*args, **kwargs):
            mask = original(*args, **kwargs)
            made.append(weakref.ref(mask))
            return mask

        llama.create_causal_mask = keep
        try:
            model = apply_method(build_model(TINY["llama"], "bf16", attention="sdpa"), "lora", 8, checkpointing)
            model.train()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(**_batch("padded", TINY["llama"]), use_cache=False)
        finally:
            llama.create_causal_mask = original
        gc.collect()
        mask = made[-1]()
        assert (mask is not None) == checkpointing
        planned = {c.name: c.bytes for c in activation_components(spec, _options(padding="longest", gradient_checkpointing=checkpointing))}
        if checkpointing:
            assert mask.dtype == torch.bool and planned["activations.attention_mask"] == mask.numel() == BATCH * SEQ * SEQ
        else:
            assert "activations.attention_mask" not in planned
        del mask, out


def test_default_plan_is_unchanged():
    """No padding, no packing: the fields at their defaults add nothing to a plan (no component, no
    line in its assumptions), and wrapped packing, which cuts the same fixed-length rows, plans the
    same bytes and says so."""
    from planner.plan import build_plan

    def body(plan):
        return {k: v for k, v in plan.to_dict().items() if k != "options"}

    spec = spec_from_config(TINY["llama"], "llama")
    for attention in ("sdpa", "eager", "flash"):
        for checkpointing in (False, True):
            plain = TrainingOptions(gpu_memory_gib=80, attention=attention, gradient_checkpointing=checkpointing, batch_size=4)
            assert plain.batch_layout == "fixed"
            plan = build_plan(spec, plain)
            assert "activations.attention_mask" not in {c.name for c in plan.components}
            assert not any("batch" in note or "padding" in note for note in plan.assumptions)
            wrapped = build_plan(spec, plain.model_copy(update={"packing": True, "packing_strategy": "wrapped"}))
            assert [note for note in wrapped.assumptions if "wrapped" not in note] == list(plan.assumptions)
            assert {k: v for k, v in body(wrapped).items() if k != "assumptions"} == {k: v for k, v in body(plan).items() if k != "assumptions"}
            padded = build_plan(spec, plain.model_copy(update={"padding": "longest"}))
            assert (padded.peak_bytes > plan.peak_bytes) == (attention != "eager")


@pytest.mark.parametrize("overrides,words", [
    ({"padding": "longest"}, ("padded to the longest", "expanded to every query head", "many steps")),
    ({"padding_free": True, "attention": "flash"}, ("padding-free", "varlen")),
    ({"packing": True}, ("packing (strategy bfd) turns padding_free on", "block-diagonal mask", "use attention flash")),
])
def test_assumptions_name_the_case(overrides, words):
    from planner.plan import build_plan

    plan = build_plan(spec_from_config(TINY["llama"], "llama"), TrainingOptions(gpu_memory_gib=80, batch_size=4, **overrides))
    text = " ".join(plan.assumptions)
    for word in words:
        assert word in text, (word, plan.assumptions)


def test_padding_free_with_flash_plans_the_fixed_terms_and_sdpa_a_row_wide_mask():
    from planner.activations import activation_terms

    spec = spec_from_config(TINY["llama"], "llama")
    flash = activation_terms(spec, _options(attention="flash")).per_layer_per_token
    assert activation_terms(spec, _options(attention="flash", padding_free=True)).per_layer_per_token == flash
    # the block-diagonal mask spans the flattened row: per token e x (batch x seq_len), quadratic in the batch
    one = activation_terms(spec, _options(padding_free=True, batch_size=1)).per_layer_per_token
    four = activation_terms(spec, _options(padding_free=True, batch_size=4)).per_layer_per_token
    assert four - one == 2 * 3 * SEQ


def test_option_checks():
    from planner.errors import PlanInputError
    from planner.options import check_consistency

    with pytest.raises(PlanInputError) as err:
        check_consistency(TrainingOptions(stage="dpo", packing=True))
    assert err.value.field == "packing"
    with pytest.raises(PlanInputError) as err:
        check_consistency(TrainingOptions(padding="longest", padding_free=True))
    assert err.value.field == "padding"
    assert TrainingOptions(packing=True, packing_strategy="wrapped").batch_layout == "fixed"
    assert TrainingOptions(packing=True, packing_strategy="bfd_split").batch_layout == "padding_free"


def test_the_option_reaches_exports():
    """TRL's trl.yaml gets packing, packing_strategy and padding_free under their own names; the
    default export names none of them."""
    import yaml

    from launcher.exports import render
    from tests.test_exports import make_spec as _spec

    default = yaml.safe_load(render(_spec(), "trl"))
    assert not {"packing", "padding_free", "packing_strategy"} & set(default)
    packed = yaml.safe_load(render(_spec(packing=True), "trl"))
    assert packed["packing"] is True and packed["packing_strategy"] == "bfd"
    both = yaml.safe_load(render(_spec(packing=True, padding_free=True), "trl"))
    assert both["padding_free"] is True and both["packing"] is True
    with pytest.raises(ValueError, match="padding_free without packing"):
        render(_spec(padding_free=True), "trl")
    assert yaml.safe_load(render(_spec(packing=True), "axolotl"))["sample_packing"] is True
