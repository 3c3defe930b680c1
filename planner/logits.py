"""Logits and loss buffers, which differ by training stack (`trainer`).

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
"""

from __future__ import annotations

from planner.components import Component
from planner.dtypes import dtype_bytes
from planner.options import TrainingOptions
from planner.spec import ModelSpec

LABEL_BYTES = 8  # int64 labels saved by cross_entropy
# Tile of TRL's fused LM head (TOKEN_CHUNK_SIZE and _CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16)
TRL_TOKEN_TILE = 4096
TRL_VOCAB_TILE = 32768
TRL_SAVED_PER_TOKEN = LABEL_BYTES + 4  # int64 target and fp32 log-normalizer, saved for backward
TRL_FORWARD_FP32_PER_TOKEN = 5  # running sums while the tiles stream


def logits_components(spec: ModelSpec, options: TrainingOptions, tokens: int) -> list[Component]:
    vocab = spec.vocab_size
    if options.stage == "reward":
        # a sequence classifier: one score per sequence, no vocabulary-sized logits
        return [Component("logits", tokens * LABEL_BYTES, "reward model: a scalar score per sequence; no vocabulary logits")]
    if options.trainer == "hf":
        softcap = vocab * dtype_bytes(options.precision) if spec.final_logit_softcap else 0
        return [
            Component(
                "logits",
                tokens * (vocab * 4 + LABEL_BYTES + softcap),
                f"fp32 log-softmax of {tokens:,} x {vocab:,} logits saved by cross-entropy, and int64 labels"
                + (" plus the tanh of the soft-capped logits" if softcap else ""),
            ),
            Component("temporary.loss_backward", tokens * vocab * 8, "cross-entropy backward: the fp32 gradient in and out (8 bytes per logit)"),
        ]
    e = dtype_bytes(options.precision)
    if options.stage in ("orpo", "simpo"):
        return _experimental_trl_logits(vocab, e, tokens, with_nll=options.stage == "orpo")
    # the tile buffer is always TRL_VOCAB_TILE wide, even for a smaller vocabulary (Llama 2's
    # 32,000); each tile casts its lm_head slice to the compute dtype, a copy only when the
    # weights are stored in another dtype (fp32 master weights)
    slice_copy = min(vocab, TRL_VOCAB_TILE) * spec.hidden_size * e if options.effective_weights_dtype != options.precision else 0
    tile = min(tokens, TRL_TOKEN_TILE) * TRL_VOCAB_TILE * e + slice_copy
    lm_head_trains = options.method == "full"
    lm_head_grad = spec.vocab_size * spec.hidden_size * 4 if lm_head_trains else 0
    return [
        Component(
            "logits",
            tokens * TRL_SAVED_PER_TOKEN,
            "TRL's fused LM head saves a target and an fp32 log-normalizer per token; full logits are never materialized",
        ),
        Component(
            "temporary.loss_backward",
            tile + tokens * (spec.hidden_size + TRL_FORWARD_FP32_PER_TOKEN) * 4 + lm_head_grad,
            f"fused LM head backward: one {min(tokens, TRL_TOKEN_TILE):,} x {TRL_VOCAB_TILE:,} logits tile buffer" + (" and a cast lm_head slice" if slice_copy else "") + ", "
            "the fp32 hidden-state gradient" + (", and an fp32 lm_head gradient" if lm_head_grad else ""),
        ),
    ]


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
