"""Logits and loss buffers, which differ by loss path (`loss_implementation`; auto is the
trainer's own: `trl_fused` for `trainer trl`, `fp32_upcast` for `trainer hf`).

- `hf`: a plain transformers forward with `labels` (hand-written loops, the transformers
  Trainer). lm_head returns full logits in the compute dtype; the loss upcasts them to fp32 and
  cross_entropy saves the fp32 log-softmax (4 bytes per logit) plus int64 labels. In backward
  the gradient w.r.t. that fp32 tensor and the fp32 gradient it produces exist together (8 more
  bytes per logit) before the cast back to the compute dtype.
- `trl`: TRL 1.16's trainers (SFT, DPO, KTO, GRPO, RLOO) compute log-probs through a fused LM
  head (trl/kernels/chunked_logprob.py) on tiles of 4096 tokens x 32768 vocabulary entries, so
  full logits never exist. It saves an fp32 log-normalizer per token; its backward allocates an
  fp32 gradient for the hidden states and, when lm_head trains, an fp32 gradient of lm_head.
  ORPO and CPO/SimPO live in trl.experimental and still run the old code: one forward over the
  chosen + rejected batch returns full logits in the compute dtype, kept for the log-prob
  backward; ORPO adds an NLL on the chosen half (a contiguous copy of its logits and an fp32
  log-softmax). SimPO is CPO with the NLL weight at 0, so it has no NLL term.

The paths a trainer can be told to take for sft's cross-entropy (BT tokens, h the hidden size, V
the vocabulary, e the compute dtype's bytes, w the weights' and so the hidden states' bytes):
- `fp32_upcast`: the `hf` path above (transformers' ForCausalLMLoss: `logits.float()`).
- `fp32_upcast_shifted`: transformers 4.46-4.48's ForCausalLMLoss (loss/loss_utils.py), which
  shifts the upcast logits into a contiguous copy (`logits[..., :-1, :].contiguous()`) where 4.49
  on pads the labels instead. While its cross-entropy runs, the compute-dtype logits (still held
  by the model's output), their fp32 upcast, its shifted fp32 copy and the fp32 log-softmax are
  alive together: e + 8 bytes per logit beside the saved log-softmax, more than the backward's 8
  (measured on CPU: tests/test_loss_paths.py). Before 4.46 each model upcast its own logits and
  returned the upcast, freeing the compute-dtype ones: the forward's 8 bytes, `fp32_upcast`'s peak.
- `no_upcast`: cross-entropy on the compute-dtype logits: log_softmax saves its output in that
  dtype (e per logit, plus the tanh of soft-capped logits), and its backward holds the gradient
  in and out (2e per logit). This is what runs outside autocast (pure 16-bit training, a loss
  computed after the autocast forward); under a CUDA autocast log_softmax runs in fp32 whatever
  the trainer writes, which is `fp32_upcast`'s memory.
- `liger`: Liger-Kernel's LigerFusedLinearCrossEntropyFunction (ops/fused_linear_cross_entropy.py)
  computes the gradients in the forward, chunk by chunk: chunks of next_power_of_2(ceil(BT /
  ceil(V / h))) tokens (at most BT), one chunk x V logits buffer in the matmul's dtype, into which
  its Triton kernel writes the logits' gradient in place; it saves for backward grad_input
  (zeros_like the hidden states, BT x h x w) and, when lm_head trains, grad_weight (zeros_like the
  weight); the int64 shifted labels, an fp32 loss per token and a bool mask live while it runs.
  The hidden states themselves are not saved. Under autocast over fp32 weights each chunk's
  matmul casts lm_head to the compute dtype (one V x h copy alive).
- `cut_cross_entropy`: Apple's Cut Cross-Entropy (cut_cross_entropy/cce.py) saves the hidden
  states and the classifier (nothing new but the lm_head input), an fp32 log-sum-exp per token,
  the int64 indices of the valid tokens, and an fp32 average logit per vocabulary entry
  (filter_eps "auto"); its backward (cce_backward.py) allocates de (zeros_like the hidden
  states), dc when lm_head trains (zeros_like the weight), and sorts the vocabulary (int64
  argsort, int32 order); no logits are materialized.
- `trl_fused`: the `trl` path above.
"""

from __future__ import annotations

from planner.components import Component
from planner.dtypes import dtype_bytes
from planner.options import TrainingOptions
from planner.spec import ModelSpec
from planner.trainable import trained_roles

LABEL_BYTES = 8  # int64 labels saved by cross_entropy
# Tile of TRL's fused LM head (TOKEN_CHUNK_SIZE and _CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16)
TRL_TOKEN_TILE = 4096
TRL_VOCAB_TILE = 32768
TRL_SAVED_PER_TOKEN = LABEL_BYTES + 4  # int64 target and fp32 log-normalizer, saved for backward
TRL_FORWARD_FP32_PER_TOKEN = 5  # running sums while the tiles stream
# Cut Cross-Entropy's saved tensors per token: fp32 lse and the int64 valid-token indices
CCE_SAVED_PER_TOKEN = 4 + 8
CCE_VOCAB_ORDER_PER_ENTRY = 8 + 4  # argsort's int64 result and its int32 copy, in backward
LIGER_FORWARD_PER_TOKEN = 4 + 1  # the fp32 loss per token and the bool mask of valid targets


def liger_chunk_tokens(tokens: int, vocab: int, hidden: int) -> int:
    """Liger's chunk rule: inc_factor = ceil(V / h), chunk = next_power_of_2(ceil(BT / inc_factor)),
    at most BT (chunk_mem_const 1, its default)."""
    inc_factor = -(-vocab // hidden)
    per = -(-tokens // inc_factor)
    return min(1 << (per - 1).bit_length(), tokens)


def saves_head_input(options: TrainingOptions) -> bool:
    """Whether the loss path keeps the lm_head's input for its backward (TRL's head and Cut
    Cross-Entropy do; a trained lm_head keeps it too): planner/activations.py counts it."""
    return options.effective_loss_implementation in ("trl_fused", "cut_cross_entropy")


def logits_components(spec: ModelSpec, options: TrainingOptions, tokens: int) -> list[Component]:
    vocab = spec.vocab_size
    if options.stage == "reward":
        # a sequence classifier: one score per sequence, no vocabulary-sized logits
        return [Component("logits", tokens * LABEL_BYTES, "reward model: a scalar score per sequence; no vocabulary logits")]
    path = options.effective_loss_implementation
    if path == "no_upcast":
        return _no_upcast_logits(spec, options, tokens)
    if path == "liger":
        return _liger_logits(spec, options, tokens)
    if path == "cut_cross_entropy":
        return _cce_logits(spec, options, tokens)
    if path in ("fp32_upcast", "fp32_upcast_shifted"):
        softcap = vocab * dtype_bytes(options.precision) if spec.final_logit_softcap else 0
        head_cast = frozen_head_cast_bytes(spec, options)
        saved = Component(
            "logits",
            tokens * (vocab * 4 + LABEL_BYTES + softcap) + head_cast,
            f"fp32 log-softmax of {tokens:,} x {vocab:,} logits saved by cross-entropy, and int64 labels"
            + (" plus the tanh of the soft-capped logits" if softcap else "") + (HEAD_CAST_NOTE if head_cast else ""),
        )
        if path == "fp32_upcast":
            return [saved, Component("temporary.loss_backward", tokens * vocab * 8, "cross-entropy backward: the fp32 gradient in and out (8 bytes per logit)")]
        return [saved, _shifted_copy_transient(options, tokens, vocab)]
    e = dtype_bytes(options.precision)
    if options.stage in ("orpo", "simpo"):
        return _experimental_trl_logits(vocab, e, tokens, with_nll=options.stage == "orpo")
    # the tile buffer is always TRL_VOCAB_TILE wide, even for a smaller vocabulary (Llama 2's
    # 32,000); each tile casts its lm_head slice to the compute dtype, a copy only when the
    # weights are stored in another dtype (fp32 master weights)
    slice_copy = min(vocab, TRL_VOCAB_TILE) * spec.hidden_size * e if options.embedding_dtype != options.precision else 0
    tile = min(tokens, TRL_TOKEN_TILE) * TRL_VOCAB_TILE * e + slice_copy
    # a trained lm_head: TRL's fp32 gradient, and its cast to the weight's dtype (the parameter's
    # .grad) made while the fp32 one is alive
    head_grad_bytes = 4 + dtype_bytes(options.embedding_dtype)
    lm_head_grad = spec.vocab_size * spec.hidden_size * head_grad_bytes if "lm_head" in trained_roles(spec, options) else 0
    return [
        Component(
            "logits",
            tokens * TRL_SAVED_PER_TOKEN,
            "TRL's fused LM head saves a target and an fp32 log-normalizer per token (the lm_head input it keeps is in "
            "activations.outside_layers); full logits are never materialized",
        ),
        Component(
            "temporary.loss_backward",
            tile + tokens * (spec.hidden_size + TRL_FORWARD_FP32_PER_TOKEN) * 4 + lm_head_grad,
            f"fused LM head backward: one {min(tokens, TRL_TOKEN_TILE):,} x {TRL_VOCAB_TILE:,} logits tile buffer" + (" and a cast lm_head slice" if slice_copy else "") + ", "
            "the fp32 hidden-state gradient" + (", and an fp32 lm_head gradient with its cast to the weight's dtype" if lm_head_grad else ""),
        ),
    ]


def _shifted_copy_transient(options: TrainingOptions, tokens: int, vocab: int) -> Component:
    """transformers 4.46-4.48's loss: the forward's logits in the compute dtype (fp32 ones are their
    own upcast), the upcast and its shifted copy, beside the log-softmax, or the backward's fp32
    gradient in and out, whichever is larger."""
    e = dtype_bytes(options.precision)
    forward = (e if e != 4 else 0) + 4 + 4
    if forward <= 8:
        return Component("temporary.loss_backward", tokens * vocab * 8,
                         "cross-entropy backward: the fp32 gradient in and out (8 bytes per logit; the shifted fp32 copy of the "
                         "forward is no larger)")
    return Component(
        "temporary.loss_backward", tokens * vocab * forward,
        f"transformers 4.46-4.48's loss, as its cross-entropy runs: the {options.precision} logits the model's output holds, their fp32 "
        f"upcast and its shifted contiguous copy ({forward} bytes per logit, more than the backward's 8)",
    )


def _experimental_trl_logits(vocab: int, e: int, tokens: int, with_nll: bool) -> list[Component]:
    """trl.experimental's ORPO and CPO/SimPO trainers: full logits, no fused head."""
    nll_tokens = tokens // 2 if with_nll else 0  # the chosen half of the concatenated batch
    return [
        Component(
            "logits",
            tokens * (vocab * e + LABEL_BYTES) + nll_tokens * vocab * (e + 4),
            f"trl.experimental keeps the full {tokens:,} x {vocab:,} logits ({e} bytes each) for the log-prob backward"
            + (", plus a contiguous copy of the chosen half and its fp32 log-softmax for the NLL term" if with_nll else ""),
        ),
        Component(
            "temporary.loss_backward",
            tokens * vocab * e + nll_tokens * vocab * 8,
            "the gradient of the full logits" + (" and the NLL's fp32 gradient in and out" if with_nll else ""),
        ),
    ]


def frozen_head_cast_bytes(spec: ModelSpec, options: TrainingOptions) -> int:
    """A frozen lm_head stored wider than the compute dtype (fp32, as prepare_model_for_kbit_training
    leaves it) runs under autocast on a cast copy, and the matmul keeps that copy to pass the
    gradient to its input: vocabulary x hidden in the compute dtype (measured on CPU with PEFT)."""
    if options.method == "full" or not options.effective_autocast:
        return 0
    e, w = dtype_bytes(options.precision), dtype_bytes(options.embedding_dtype)
    return spec.vocab_size * spec.hidden_size * e if w > e else 0


HEAD_CAST_NOTE = "; the frozen fp32 lm_head's autocast copy, which its matmul keeps for the backward"


def _no_upcast_logits(spec: ModelSpec, options: TrainingOptions, tokens: int) -> list[Component]:
    vocab, e = spec.vocab_size, dtype_bytes(options.precision)
    softcap = vocab * e if spec.final_logit_softcap else 0
    head_cast = frozen_head_cast_bytes(spec, options)
    return [
        Component(
            "logits",
            tokens * (vocab * e + LABEL_BYTES + softcap) + head_cast,
            f"log-softmax of {tokens:,} x {vocab:,} logits kept in {options.precision} ({e} bytes each, no fp32 upcast) by cross-entropy, "
            "and int64 labels" + (" plus the tanh of the soft-capped logits" if softcap else "") + (HEAD_CAST_NOTE if head_cast else ""),
        ),
        Component("temporary.loss_backward", tokens * vocab * 2 * e,
                  f"cross-entropy backward in {options.precision}: the gradient in and out ({2 * e} bytes per logit)"),
    ]


def _liger_logits(spec: ModelSpec, options: TrainingOptions, tokens: int) -> list[Component]:
    vocab, h = spec.vocab_size, spec.hidden_size
    e, w = dtype_bytes(options.precision), dtype_bytes(options.residual_stream_dtype)
    chunk = liger_chunk_tokens(tokens, vocab, h)
    lm_head_grad = vocab * h * w if "lm_head" in trained_roles(spec, options) else 0
    weight_cast = vocab * h * e if options.effective_autocast and dtype_bytes(options.embedding_dtype) != e else 0
    return [
        Component(
            "logits",
            tokens * (h * w + LABEL_BYTES) + lm_head_grad,
            "Liger's fused linear cross-entropy computes the gradients in the forward and keeps them for backward: grad_input "
            f"({tokens:,} x {h:,}, {w} bytes)" + (", grad_weight (lm_head's size)" if lm_head_grad else "") + ", with the int64 shifted labels",
        ),
        Component(
            "temporary.loss_backward",
            chunk * vocab * e + tokens * LIGER_FORWARD_PER_TOKEN + weight_cast,
            f"Liger's logits buffer for one chunk of {chunk:,} tokens (next_power_of_2(ceil(BT / ceil(V / h)))) x {vocab:,} ({e} bytes, "
            "its gradient written in place), an fp32 loss and a mask per token" + (", and lm_head cast to the compute dtype" if weight_cast else ""),
        ),
    ]


def _cce_logits(spec: ModelSpec, options: TrainingOptions, tokens: int) -> list[Component]:
    vocab, h = spec.vocab_size, spec.hidden_size
    w = dtype_bytes(options.residual_stream_dtype)
    lm_head_grad = vocab * h * w if "lm_head" in trained_roles(spec, options) else 0
    return [
        Component(
            "logits",
            tokens * CCE_SAVED_PER_TOKEN + vocab * 4,
            "Cut Cross-Entropy saves an fp32 log-sum-exp and an int64 index per valid token and an fp32 average logit per vocabulary entry "
            "(the lm_head input it keeps is in activations.outside_layers); no logits are materialized",
        ),
        Component(
            "temporary.loss_backward",
            tokens * h * w + lm_head_grad + vocab * CCE_VOCAB_ORDER_PER_ENTRY,
            f"Cut Cross-Entropy's backward: the hidden states' gradient ({tokens:,} x {h:,}, {w} bytes)"
            + (", lm_head's gradient" if lm_head_grad else "") + " and the sorted vocabulary order",
        ),
    ]
