"""One micro-batch of each traced stage, as TRL 1.16's trainers run it, on meta tensors.

planner/step_trace.py builds the model and records the allocations; this module says what a
micro-batch does with it:

- `sft`: a forward with labels (transformers' loss, TRL's fused LM head, or cross-entropy on
  compute-dtype logits), then backward.
- `dpo` (DPOTrainer._compute_loss): chosen and rejected rows in one batch of 2 x batch_size
  (DataCollatorForPreference), the policy's forward through TRL's fused head asking for the
  trainer's metrics outputs; then, unless reference log-probs are precomputed, the reference's
  forward under no_grad (a PEFT policy with its adapter disabled, otherwise a frozen copy loaded
  like the policy) while the policy's saved activations wait; the sigmoid loss on the summed
  log-probs; backward.
- `kto` (KTOTrainer._compute_loss): the KL batch's forward under no_grad (as many mismatched rows
  as the batch), the policy's forward over batch_size rows, the reference's KL and main forwards
  under no_grad, the desirable and undesirable losses; backward.
- `grpo` and `rloo` (GRPOTrainer, RLOOTrainer: the same generation and fused head): once every `steps_per_generation` micro-batches, `generate` under
  no_grad, gradient checkpointing off, over batch_size x steps_per_generation prompts, each
  `max_new_tokens` long (no EOS: the longest case), into a DynamicCache whose layers grow by
  `torch.cat` every token; with a non-zero beta the reference's log-probs for the whole generation
  batch, in chunks of batch_size; then each micro-batch's forward over prompt + completion with
  TRL's fused head (log-probs and entropy), the clipped-ratio loss with its KL term, backward.
  Colocated vLLM generates in its own reserved memory, so nothing of generation is traced then.

What the trace does not run, and stands in for: generate's decode steps between the prefill and
the last one allocate exactly their cache growth (each layer's keys and values one token longer,
the old freed), their ids and mask, and their next-token scores (the compute-dtype logits of the
last position, generate's fp32 copy and its softmax), not their per-layer temporaries, which the
last decode step, run for real at the longest cache, has at their largest. Tracing every decode
step costs about half a second each on a 0.5B model.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

from planner.options import PEFT_METHODS, TrainingOptions

# what TRL 1.16's trainers ask their fused LM head for
SFT_FUSED_OUTPUTS = ("log_probs", "entropy", "is_top1")
DPO_FUSED_OUTPUTS = ("log_probs", "entropy", "mean_logits", "is_top1")
KTO_FUSED_OUTPUTS = ("log_probs", "entropy", "mean_logits")
GRPO_FUSED_OUTPUTS = ("log_probs", "entropy")  # RLOO asks for the same
TRACED_STAGES = ("sft", "dpo", "kto", "grpo", "rloo")
GENERATING_STAGES = ("grpo", "rloo")


def fused_outputs(stage: str) -> tuple[str, ...]:
    return {"dpo": DPO_FUSED_OUTPUTS, "kto": KTO_FUSED_OUTPUTS, "grpo": GRPO_FUSED_OUTPUTS, "rloo": GRPO_FUSED_OUTPUTS}.get(stage, SFT_FUSED_OUTPUTS)


def traces_reference(options: TrainingOptions) -> bool:
    """The stage runs a reference forward: DPO and KTO without precomputed log-probs, GRPO and
    RLOO with a non-zero beta."""
    if options.stage in ("dpo", "kto"):
        return not options.precompute_ref_log_probs
    if options.stage in GENERATING_STAGES:
        return options.effective_beta > 0
    return False


def needs_reference_copy(options: TrainingOptions) -> bool:
    """A frozen copy of the model is loaded: a reference forward without a PEFT adapter to disable."""
    return traces_reference(options) and options.method not in PEFT_METHODS


def generation_batch(options: TrainingOptions) -> int:
    """Completions generated at once: TRL's generation_batch_size on one process."""
    return options.batch_size * options.effective_steps_per_generation


@dataclass
class StageRun:
    """A traced run's model, its reference (a frozen copy, or None), and the batches it reads."""

    model: object
    options: TrainingOptions
    ids: object
    batch: dict
    loss_path: str
    reference: object = None
    prompts: object = None
    # GRPO: the generation batch's tensors TRL keeps on the device until its last micro-batch
    kept: list = field(default_factory=list)
    micro_batches_run: int = 0
    # a context in which the model runs without the training forward's autocast: TRL calls
    # `generate` on the unwrapped model, outside accelerate's autocast (its log-prob forwards run
    # inside it); the trace's autocast stand-in provides it
    without_autocast: Callable[[], AbstractContextManager] = nullcontext

    def generate_if_due(self) -> None:
        """GRPO's generation, before the first micro-batch it feeds (outside the forward's
        autocast: its casts are not cached for the training forward)."""
        if self.options.stage in GENERATING_STAGES and self.micro_batches_run % self.options.effective_steps_per_generation == 0:
            self.kept.clear()
            if not self.options.use_vllm:
                self.kept.extend(self._generate())

    def micro_batch(self):
        """One micro-batch's loss, its graph alive; the caller runs backward."""
        stage = self.options.stage
        self.micro_batches_run += 1
        if stage in GENERATING_STAGES:
            return self._grpo_loss()
        if stage == "dpo":
            return self._dpo_loss()
        if stage == "kto":
            return self._kto_loss()
        return self._sft_loss()

    def _sft_loss(self):
        if self.loss_path == "no_upcast":
            return _loss_without_upcast(self.model(input_ids=self.ids, **self.batch).logits, self.ids)
        if self.loss_path == "fp32_upcast_shifted":
            # the model's output holds its logits while the loss runs, as in the Trainer's compute_loss
            outputs = self.model(input_ids=self.ids, **self.batch)
            return _loss_shifted_upcast(outputs.logits, self.ids)
        extra = {"fused_lm_head": True} if self.loss_path == "trl_fused" else {}
        return self.model(input_ids=self.ids, labels=self.ids, **self.batch, **extra).loss

    def _reference_log_probs(self, ids, batch):
        """The reference's per-token log-probs under no_grad: the base with the adapter disabled,
        or the frozen copy."""
        import torch

        with torch.no_grad():
            if self.reference is None:
                with self.model.disable_adapter():
                    out = self.model(input_ids=ids, labels=ids, use_cache=False, fused_lm_head=True, **batch)
            else:
                out = self.reference(input_ids=ids, labels=ids, use_cache=False, fused_lm_head=True, **batch)
        return out.log_probs

    def _dpo_loss(self):
        import torch.nn.functional as F

        beta = self.options.effective_beta
        outputs = self.model(input_ids=self.ids, labels=self.ids, use_cache=False, fused_lm_head=True, **self.batch)
        logps = outputs.log_probs.sum(dim=1)
        if traces_reference(self.options):
            ref_logps = self._reference_log_probs(self.ids, self.batch).sum(dim=1)
        else:  # precomputed: two numbers per pair, read from the dataset
            ref_logps = logps.detach().clone()
        chosen, rejected = logps.chunk(2, dim=0)
        ref_chosen, ref_rejected = ref_logps.chunk(2, dim=0)
        delta = (chosen - ref_chosen) - (rejected - ref_rejected)
        return -F.logsigmoid(beta * delta).mean()

    def _kto_loss(self):
        """KTOTrainer._compute_loss: the KL batch's log-probs under no_grad (mismatched prompt and
        completion pairs, as many rows as the batch), the policy's forward, the reference's two
        forwards under no_grad, the desirable and undesirable halves' losses."""
        import torch

        beta = self.options.effective_beta
        with torch.no_grad():
            kl_logps = self.model(input_ids=self.ids, labels=self.ids, use_cache=False, fused_lm_head=True, **self.batch).log_probs.sum(-1)
        outputs = self.model(input_ids=self.ids, labels=self.ids, use_cache=False, fused_lm_head=True, **self.batch)
        logps = outputs.log_probs.sum(-1)
        if traces_reference(self.options):
            ref_kl = self._reference_log_probs(self.ids, self.batch).sum(-1)
            ref_logps = self._reference_log_probs(self.ids, self.batch).sum(-1)
        else:  # precomputed with the dataset
            ref_kl, ref_logps = kl_logps.clone(), logps.detach().clone()
        kl = (kl_logps - ref_kl).mean().clamp(min=0)
        half = logps.shape[0] // 2
        desirable = 1 - torch.sigmoid(beta * (logps[:half] - ref_logps[:half] - kl))
        undesirable = 1 - torch.sigmoid(beta * (kl - (logps[half:] - ref_logps[half:])))
        return torch.cat([desirable, undesirable]).mean()

    def _generate(self) -> list:
        """generate's allocations for the generation batch; the tensors TRL keeps from it."""
        import torch
        from transformers import DynamicCache
        from trl.models.utils import disable_gradient_checkpointing

        options = self.options
        prompts, mask = self.prompts
        new_tokens = options.max_new_tokens
        with torch.no_grad(), disable_gradient_checkpointing(self.model, {"use_reentrant": False}), self.without_autocast():
            cache = DynamicCache(config=self.model.config)
            cached = {_cache_argument(self.model): cache, "use_cache": True}
            out = self.model(input_ids=prompts, attention_mask=mask, logits_to_keep=1, **cached)
            ids = prompts
            for step in range(1, new_tokens + 1):
                next_tokens = _sample(out.logits)
                del out
                ids = torch.cat([ids, next_tokens[:, None]], dim=-1)
                if step == new_tokens:
                    break  # the last token is sampled and never fed back
                mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
                if step == new_tokens - 1:
                    # the longest decode step runs for real: its per-layer temporaries at their largest
                    out = self.model(input_ids=next_tokens[:, None], attention_mask=mask, **cached)
                else:
                    _grow_cache(cache)
                    out = _NextScores(torch.empty(ids.shape[0], 1, self.model.config.get_text_config().vocab_size,
                                                  dtype=_logits_dtype(self.model), device="meta"))
            del cache
        kept = [ids, torch.ones_like(ids)]  # prompt + completion ids and their mask
        if traces_reference(options):
            chunks = [self._reference_log_probs(ids[start:start + options.batch_size], {"attention_mask": kept[1][start:start + options.batch_size]})
                      [:, -new_tokens:].contiguous() for start in range(0, ids.shape[0], options.batch_size)]
            kept.append(torch.cat(chunks, dim=0))
        return kept

    def _grpo_loss(self):
        import torch

        options = self.options
        rows = options.batch_size
        new_tokens = options.max_new_tokens
        if self.kept:
            start = (self.micro_batches_run - 1) % options.effective_steps_per_generation * rows
            ids, mask = self.kept[0][start:start + rows], self.kept[1][start:start + rows]
            ref = self.kept[2][start:start + rows] if len(self.kept) > 2 else None
        else:  # colocated vLLM generated the batch: its ids reach the trainer as new tensors
            ids = torch.zeros(rows, options.seq_len + new_tokens, dtype=torch.long, device="meta")
            mask = torch.ones_like(ids)
            ref = None
            if traces_reference(options):
                ref = self._reference_log_probs(ids, {"attention_mask": mask})[:, -new_tokens:]
        labels = ids.clone()
        labels[:, :-new_tokens] = -100  # only the completion is scored
        outputs = self.model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        logps = outputs.log_probs[:, -new_tokens:]
        advantages = torch.zeros(rows, 1, dtype=torch.float32, device="meta")
        ratio = torch.exp(logps - logps.detach())
        clipped = torch.clamp(ratio, 0.8, 1.28)
        per_token = -torch.min(ratio * advantages, clipped * advantages)
        if ref is not None:
            log_ratio = ref - logps
            per_token = per_token + options.effective_beta * (torch.exp(log_ratio) - log_ratio - 1)
        completion_mask = mask[:, -new_tokens:]
        return (per_token * completion_mask).sum() / completion_mask.sum().clamp(min=1.0)


def _cache_argument(model) -> str:
    """The forward's name for the cache: `cache` (transformers 5.24 on), else `past_key_values`."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


class _NextScores:
    """A decode step's output as generate reads it: the last position's logits."""

    def __init__(self, logits):
        self.logits = logits


def _logits_dtype(model):
    return model.get_output_embeddings().weight.dtype


def _sample(logits):
    """generate's sampling: an fp32 copy of the last position's logits, its softmax, one draw."""
    import torch

    scores = logits[:, -1, :].to(copy=True, dtype=torch.float32)
    probs = torch.softmax(scores, dim=-1)
    del scores
    return torch.multinomial(probs, num_samples=1).squeeze(1)


def _grow_cache(cache) -> None:
    """DynamicLayer.update's `torch.cat` for one new token, each layer's old keys and values freed."""
    import torch

    for layer in cache.layers:
        keys, values = layer.keys, layer.values
        layer.keys = torch.empty((*keys.shape[:-2], keys.shape[-2] + 1, keys.shape[-1]), dtype=keys.dtype, device=keys.device)
        del keys
        layer.values = torch.empty((*values.shape[:-2], values.shape[-2] + 1, values.shape[-1]), dtype=values.dtype, device=values.device)
        del values


def _loss_shifted_upcast(logits, labels):
    """transformers 4.46-4.48's ForCausalLMLoss: the logits upcast to fp32, then shifted into a
    contiguous copy (4.49 on pads the labels instead)."""
    import torch.nn.functional as F

    logits = logits.float()
    shifted = logits[..., :-1, :].contiguous()
    return F.cross_entropy(shifted.view(-1, shifted.shape[-1]), labels[..., 1:].contiguous().view(-1), ignore_index=-100)


def _loss_without_upcast(logits, labels):
    """transformers' ForCausalLMLoss without its `logits.float()`: cross-entropy on the logits in
    the compute dtype (on meta no autocast acts, as outside one on CUDA)."""
    import torch.nn.functional as F

    shift_labels = F.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), shift_labels.view(-1), ignore_index=-100)
