"""Logits and loss buffers, which differ by training stack (`trainer`).

- `hf`: a plain transformers forward with `labels` (hand-written loops, the transformers
  Trainer). lm_head returns full logits in the compute dtype; the loss upcasts them to fp32 and
  cross_entropy saves the fp32 log-softmax (4 bytes per logit) plus int64 labels. In backward
  the gradient w.r.t. that fp32 tensor and the fp32 gradient it produces exist together (8 more
  bytes per logit) before the cast back to the compute dtype.
- `trl`: TRL's trainers compute the loss through a fused LM head in chunks of tokens, so only one
  chunk's logits exist at a time (see CHUNK_TOKENS).
"""

from __future__ import annotations

from planner.components import Component
from planner.dtypes import dtype_bytes
from planner.options import TrainingOptions
from planner.spec import ModelSpec

LABEL_BYTES = 8  # int64 labels saved by cross_entropy
# Tokens per chunk of TRL's fused LM-head loss; one chunk's fp32 logits, their log-softmax
# and gradient are live at a time.
CHUNK_TOKENS = 1024


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
    chunk = min(tokens, CHUNK_TOKENS)
    return [
        Component("logits", tokens * LABEL_BYTES, "TRL's fused LM-head loss: labels only; logits are never materialized in full"),
        Component("temporary.loss_backward", chunk * vocab * 12, f"one chunk of {chunk:,} tokens: fp32 logits, log-softmax and gradient"),
    ]
