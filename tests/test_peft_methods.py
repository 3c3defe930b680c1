"""PEFT methods beyond LoRA (IA3, prompt tuning, prefix tuning) against the real stack on CPU.

Counts: PEFT's own get_peft_model on tiny models built from configs, trainable and total equal to
the plan's. Activations: the bytes autograd saves in a real forward under bf16 autocast
(saved-tensor hooks, deduplicated by storage, parameters left out), within the 10% that
tests/test_activations.py holds the other methods to.
"""

import pytest
import torch

from planner.activations import activation_components, peft_method_notes, training_tokens
from planner.errors import PlanInputError
from planner.introspect import spec_from_config
from planner.logits import logits_components
from planner.options import TrainingOptions
from planner.trainable import parameter_counts
from tests.conftest import TINY
from tests.realstack import _autocast, build_model, saved_activation_bytes

BATCH, SEQ = 2, 64
TOLERANCE = 0.10


def _peft_config(method: str, targets=None, feedforward=None, tokens: int = 5):
    from peft import IA3Config, PrefixTuningConfig, PromptTuningConfig

    if method == "ia3":
        return IA3Config(task_type="CAUSAL_LM", target_modules=targets, feedforward_modules=feedforward)
    if method == "prompt_tuning":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens)
    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens)


def _options(method: str, targets=None, feedforward=None, tokens: int = 5, **extra) -> TrainingOptions:
    given = dict(method=method, weights_dtype="bf16", precision="bf16", num_virtual_tokens=tokens, batch_size=BATCH, seq_len=SEQ,
                 trainer="hf", gpu_memory_gib=80, gradient_checkpointing=False)
    if targets is not None:
        given["lora_targets"] = targets
    if feedforward is not None:
        given["feedforward_modules"] = feedforward
    return TrainingOptions(**(given | extra))


def _peft_model(arch: str, method: str, attention: str | None = None, **kw):
    from peft import get_peft_model

    return get_peft_model(build_model(TINY[arch], "bf16", attention=attention), _peft_config(method, **kw))


def _counts(model) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def _measured(arch: str, method: str, attention: str = "sdpa", ckpt: bool = False, **kw) -> int:
    model = _peft_model(arch, method, attention, **kw)
    if ckpt:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.train()
    torch.manual_seed(0)
    ids = torch.randint(3, TINY[arch]["vocab_size"], (BATCH, SEQ))

    def forward():
        with _autocast(True):
            return model(input_ids=ids, labels=ids)

    saved, _ = saved_activation_bytes(model, forward)
    return saved


def _planned(arch: str, options: TrainingOptions) -> int:
    """Activations saved in the forward (the layer recomputed in backward left out) and the logits."""
    spec = spec_from_config(TINY[arch], arch)
    parts = activation_components(spec, options) + logits_components(spec, options, training_tokens(options))
    return sum(c.bytes for c in parts if c.name != "activations.recompute" and not c.name.startswith("temporary"))


def _close(planned: int, measured: int) -> None:
    assert abs(planned - measured) / measured <= TOLERANCE, (planned, measured, (planned - measured) / measured)


# -- counts -------------------------------------------------------------------------------------

IA3_COUNT_CASES = [
    # PEFT's per-architecture defaults
    ("llama", None, None),
    ("qwen2", None, None),
    ("gemma2", None, None),
    ("qwen3", None, None),
    ("mixtral", None, None),
    # named targets: PEFT still takes the architecture's feed-forward default (down_proj), whose
    # vector has in_features (intermediate) values
    ("llama", ["q_proj", "v_proj", "down_proj"], None),
    ("qwen2", ["k_proj", "up_proj", "down_proj"], None),
    ("llama", ["q_proj", "up_proj", "down_proj"], ["up_proj"]),
    ("llama", ["k_proj", "down_proj"], []),
    ("gemma2", None, ["down_proj", "v_proj"]),
    # no PEFT default for the architecture: both named
    ("phi3", ["qkv_proj", "down_proj"], ["down_proj"]),
    ("olmo2", ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
]


@pytest.mark.parametrize("arch,targets,feedforward", IA3_COUNT_CASES)
def test_ia3_counts_equal_peft(tiny_specs, arch, targets, feedforward):
    trainable, total = _counts(_peft_model(arch, "ia3", targets=targets, feedforward=feedforward))
    counts = parameter_counts(tiny_specs[arch], _options("ia3", targets, feedforward))
    assert (counts["trainable"], counts["total"]) == (trainable, total)


def test_named_ia3_targets_keep_peft_feedforward_default(tiny_specs):
    """Named targets once dropped the feed-forward default: down_proj planned at its out_features
    (hidden) rather than in_features (intermediate), half PEFT's count on a published config."""
    spec = tiny_specs["llama"]
    named = parameter_counts(spec, _options("ia3", ["k_proj", "v_proj", "down_proj"]))["trainable"]
    # 2 layers x (k 32 + v 32 + down_proj's input 160)
    assert named == 2 * (32 + 32 + 160) == parameter_counts(spec, _options("ia3"))["trainable"]
    assert parameter_counts(spec, _options("ia3", ["k_proj", "v_proj", "down_proj"], []))["trainable"] == 2 * (32 + 32 + 64)


def test_feedforward_modules_outside_the_targets_are_refused_as_peft_refuses(tiny_specs):
    with pytest.raises(ValueError, match="subset"):
        _peft_config("ia3", ["q_proj"], ["down_proj"])
    with pytest.raises(PlanInputError) as refused:
        parameter_counts(tiny_specs["llama"], _options("ia3", ["q_proj"], ["down_proj"]))
    assert refused.value.field == "feedforward_modules"


def test_feedforward_modules_parse_as_a_comma_list():
    assert TrainingOptions(feedforward_modules="down_proj, up_proj").feedforward_modules == ["down_proj", "up_proj"]
    assert TrainingOptions(feedforward_modules="").feedforward_modules == []
    assert TrainingOptions().feedforward_modules is None


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen3", "phi3"])
@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
@pytest.mark.parametrize("tokens", [5, 30])
def test_prompt_method_counts_equal_peft(tiny_specs, arch, method, tokens):
    trainable, total = _counts(_peft_model(arch, method, tokens=tokens))
    counts = parameter_counts(tiny_specs[arch], _options(method, tokens=tokens))
    assert (counts["trainable"], counts["total"]) == (trainable, total)


# -- activations --------------------------------------------------------------------------------

IA3_ACTIVATION_CASES = [
    ("llama", "sdpa", None, None),
    ("llama", "sdpa", ["q_proj", "up_proj", "down_proj"], None),
    ("llama", "sdpa", ["q_proj", "up_proj", "down_proj"], ["up_proj"]),
    ("qwen2", "sdpa", None, None),
    ("llama", "eager", None, None),
    ("gemma2", "eager", None, None),
]


@pytest.mark.parametrize("arch,attention,targets,feedforward", IA3_ACTIVATION_CASES)
def test_ia3_activations_within_10_percent(arch, attention, targets, feedforward):
    measured = _measured(arch, "ia3", attention, targets=targets, feedforward=feedforward)
    _close(_planned(arch, _options("ia3", targets, feedforward, attention=attention)), measured)


def test_ia3_activations_follow_the_targets():
    """IA3 keeps each scaled output (or a feed-forward module's fp32 input) for its vector's
    gradient: more targets save more, and the plan follows, checkpointed or not."""
    small, large = ["q_proj"], ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    measured_small = _measured("llama", "ia3", targets=small, feedforward=[])
    measured_large = _measured("llama", "ia3", targets=large)
    planned_small, planned_large = (_planned("llama", _options("ia3", small, [])), _planned("llama", _options("ia3", large)))
    assert measured_large > 1.3 * measured_small
    _close(planned_small, measured_small)
    _close(planned_large, measured_large)
    assert planned_large - planned_small == pytest.approx(measured_large - measured_small, rel=0.15)
    spec = spec_from_config(TINY["llama"], "llama")

    def recompute(targets, feedforward=None):
        options = _options("ia3", targets, feedforward, gradient_checkpointing=True)
        return next(c.bytes for c in activation_components(spec, options) if c.name == "activations.recompute")

    assert recompute(large) > recompute(small, [])


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("tokens", [5, 40])
def test_prompt_tuning_activations_within_10_percent(attention, ckpt, tokens):
    measured = _measured("llama", "prompt_tuning", attention, ckpt, tokens=tokens)
    _close(_planned("llama", _options("prompt_tuning", tokens=tokens, attention=attention, gradient_checkpointing=ckpt)), measured)


def test_prompt_tuning_lengthens_every_layer_and_the_logits():
    """PEFT prepends the virtual tokens to the embeddings: every layer and the logits see
    seq_len + num_virtual_tokens positions (the logits come back that long)."""
    model = _peft_model("llama", "prompt_tuning", tokens=40)
    ids = torch.randint(3, 128, (BATCH, SEQ))
    assert model(input_ids=ids, labels=ids).logits.shape[1] == SEQ + 40
    short, long = _options("prompt_tuning", tokens=5), _options("prompt_tuning", tokens=40)
    assert training_tokens(long) == BATCH * (SEQ + 40)
    spec = spec_from_config(TINY["llama"], "llama")
    logits = next(c.bytes for c in logits_components(spec, long, training_tokens(long)) if c.name == "logits")
    assert logits == BATCH * (SEQ + 40) * (128 * 4 + 8)
    grown_measured = _measured("llama", "prompt_tuning", tokens=40) - _measured("llama", "prompt_tuning", tokens=5)
    grown_planned = _planned("llama", long) - _planned("llama", short)
    assert grown_measured > 0 and grown_planned == pytest.approx(grown_measured, rel=0.10)
    assert any("40 virtual tokens" in note for note in peft_method_notes(spec, long))


@pytest.mark.parametrize("arch,attention", [("llama", "sdpa"), ("llama", "eager"), ("qwen2", "sdpa"), ("gemma2", "eager")])
@pytest.mark.parametrize("tokens", [5, 40])
def test_prefix_tuning_activations_within_10_percent(arch, attention, tokens):
    measured = _measured(arch, "prefix_tuning", attention, tokens=tokens)
    _close(_planned(arch, _options("prefix_tuning", tokens=tokens, attention=attention)), measured)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_prefix_tuning_grows_with_its_tokens(attention):
    """Keys and values are prefix + sequence long in every layer; under SDPA the causal mask
    that then has to be passed is saved per layer, and grouped-query keys and values expanded."""
    grown_measured = _measured("llama", "prefix_tuning", attention, tokens=40) - _measured("llama", "prefix_tuning", attention, tokens=5)
    grown_planned = (_planned("llama", _options("prefix_tuning", tokens=40, attention=attention))
                     - _planned("llama", _options("prefix_tuning", tokens=5, attention=attention)))
    assert grown_measured > 0 and grown_planned == pytest.approx(grown_measured, rel=0.10)


def test_prefix_tuning_under_checkpointing_fails_and_the_plan_says_so():
    model = _peft_model("llama", "prefix_tuning", tokens=5)
    model.gradient_checkpointing_enable()
    model.train()
    ids = torch.randint(3, 128, (BATCH, SEQ))
    with pytest.raises(RuntimeError, match="must match"):
        model(input_ids=ids, labels=ids)
    spec = spec_from_config(TINY["llama"], "llama")
    notes = peft_method_notes(spec, _options("prefix_tuning", gradient_checkpointing=True))
    assert any("gradient_checkpointing false" in note for note in notes)
    assert not any("gradient_checkpointing false" in note for note in peft_method_notes(spec, _options("prefix_tuning")))


def test_ia3_notes_name_peft_modules(tiny_specs):
    notes = peft_method_notes(tiny_specs["llama"], _options("ia3"))
    assert any("k_proj, v_proj, down_proj (PEFT's default for llama); feed-forward (input-scaled): down_proj" in n for n in notes)
    phi3 = peft_method_notes(tiny_specs["phi3"], _options("ia3"))
    assert any("no default IA3 feedforward_modules for phi3" in n for n in phi3)
