"""Activation memory: the bytes autograd saves for backward, derived from what HF code saves.

Per token and decoder layer of a Llama-family block (Llama, Mistral, Qwen2/3, and by default the
others), with e = bytes of the compute dtype, h hidden, q = heads x head_dim, kv = kv_heads x
head_dim, H heads, i intermediate, s sequence length. Each term was read off the tensors the
real forward passes to autograd (tests/test_activations.py holds the model to that measurement):

- RMSNorm (x2): its fp32 input (4h) and fp32 rsqrt (4); the normalized e-copy (e h) only when
  the norm weight trains; its output (e h), saved by the next Linear only when that Linear trains.
- SDPA/flash: q, k, v (e(q + 2kv), grouped-query k/v are not expanded), the output (e q, shared
  with o_proj's input) and an fp32 log-sum-exp per head (4H).
- eager: k and v expanded to all heads, q, the fp32 softmax (4Hs) and its e-copy (e Hs), and a
  contiguous copy of the output for o_proj: 4 e q + 6 H s (the s x s scores make it quadratic).
- gated MLP: gate output, activation output, up output (3 e i) and their product (e i) when
  down_proj trains.
- LoRA (adapters in fp32): per adapted Linear a copy of its input cast to fp32, which lora_A
  saves (4 in) in a plain loop, or autocast's 16-bit copy of that (e in), and the rank-r
  activation (4 r or e r); with dropout, the dropped copy replaces the plain copy and a 1-byte mask per
  input value is added.
- DoRA: LoRA's terms, the base output in e and fp32 (6 out) per token, and per adapted Linear
  three fp32 vectors of its output size (weight norm, scale, scale - 1). The weight-sized norm
  computation is a temporary freed within the forward (about 24 bytes per weight, measured);
  with dropout, though, PEFT recomputes the base output against a copy of the whole base
  weight that autograd keeps (in x out per Linear).
- Under autocast every adapted Linear also keeps 16-bit copies of its adapter matrices.
- Adapters in the base's dtype (autocast_adapter_dtype false): nothing is cast, so without dropout
  lora_A saves the input itself, one tensor for the adapters that read it (q, k, v; gate, up), and
  o_proj's input is the attention output already counted; no 16-bit copies of the matrices.
- prepare_model_for_kbit_training (QLoRA): the residual stream is fp32 (fp32 norms, embedding and
  lm_head), and bitsandbytes' Linear layers return their input's dtype, so checkpointed inputs and
  the MLP's outputs are 4 bytes a value; the first layer's input is bf16 again where TRL's
  peft_module_casting_to_bf16 cast the embedding back. A frozen fp32 lm_head's autocast copy is
  kept for the backward (planner/logits.py). Measured on CPU with PEFT: tests/test_kbit_prepare.py.
- IA3 (vectors in fp32): per targeted Linear the base output it scales (e out), or for a
  feed-forward module its input cast to fp32 (4 in), and per layer the fp32 copy of the vector.
- Prompt tuning: every layer, the final norm and the logits see seq_len + num_virtual_tokens
  positions (PEFT prepends the virtual tokens to the input embeddings and pads the labels).
- Prefix tuning: keys and values are seq_len + num_virtual_tokens long in every layer. SDPA then
  gets an explicit causal mask, which it saves in the compute dtype (e s (s + tokens) per layer
  and sequence), and transformers expands grouped-query keys and values to all heads before it.
- Padded batches (padding longest): rows padded to the longest keep the collator's attention
  mask, and transformers 5 (masking_utils.sdpa_mask) then builds a boolean causal-and-padding mask,
  batch x 1 x s x s, once per forward, instead of SDPA's is_causal. With a mask, its SDPA
  integration expands grouped-query keys and values to all heads (repeat_kv; enable_gqa only
  without a mask) and SDPA's masked kernel keeps the mask converted to the compute dtype, per
  layer: e (q + 2 q) + e q + 4 H + e s per token (measured: tests/test_padding.py). Under
  checkpointing the boolean mask (s s bytes per sequence) stays referenced by every layer's
  checkpoint until the backward ends. Eager attention builds its mask in any case: unchanged. Flash
  (transformers' unpad path, from the code: flash-attn does not run on CPU) gathers the real tokens
  of q, k and v and scatters the output back: one more e q output copy and int64 indices per token.
- Padding-free (padding_free, or packing with a bfd strategy): the batch is one row of
  batch x seq_len tokens with position_ids restarting per sequence and no mask. Flash's varlen
  kernel keeps what the fixed-length case keeps. Without flash, transformers 5 finds the packed
  sequences in position_ids and builds a block-diagonal mask over the whole row: under SDPA the
  masked terms above with s the row's length (batch x seq_len: quadratic in the batch), under
  eager a row-long softmax.
- Gradient checkpointing keeps each layer's input (e h) and recomputes one layer at a time; the
  backward frees each input once it has recomputed that layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.components import Component
from planner.dtypes import dtype_bytes
from planner.logits import saves_head_input
from planner.options import ADAPTER_METHODS, TrainingOptions
from planner.spec import LinearSpec, ModelSpec
from planner.trainable import (
    adapter_dtype,
    ia3_linears,
    ia3_modules,
    resolve_targets,
    split_moe_targets,
    trained_roles,
)

# bytes of the token ids the embedding saves (int64)
TOKEN_ID_BYTES = 8


@dataclass(frozen=True)
class ActivationTerms:
    per_layer_per_token: int  # bytes, one decoder layer, one token, no checkpointing
    per_layer_fixed: int  # bytes per layer independent of tokens (adapter weight copies, DoRA norms)
    layer_input_per_token: int  # what checkpointing keeps per layer and token
    outside_layers_per_token: int  # embedding ids, final norm, lm_head input
    notes: tuple[str, ...] = ()
    per_layer_per_sequence: int = 0  # bytes per layer and sequence that do not scale with its tokens (a prefix's keys and values)
    # the first layer's input is the embedding's output, in the embedding's dtype (bf16 where
    # peft_module_casting_to_bf16 cast it back and the stream after it is fp32); None: the same as the others
    first_layer_input_per_token: int | None = None


def compute_bytes(options: TrainingOptions) -> int:
    return dtype_bytes(options.precision)


def _adapted_linears(spec: ModelSpec, options: TrainingOptions) -> dict[str, LinearSpec]:
    """Adapted Linear leaf name -> the first layer's Linear, for LoRA-family methods (memoized per
    spec: the caller must not change it)."""
    if options.method not in ADAPTER_METHODS:
        return {}
    targets = options.lora_targets if isinstance(options.lora_targets, str) else tuple(options.lora_targets)
    return spec.memoized(("adapted_linears", targets), lambda: _first_layer_linears(spec, options.lora_targets))


def _adapted(spec: ModelSpec, options: TrainingOptions) -> dict[str, tuple[int, int]]:
    """Adapted Linear leaf name -> (in, out) for LoRA-family methods (the first layer's shapes)."""
    return {name: (lin.in_features, lin.out_features) for name, lin in _adapted_linears(spec, options).items()}


# adapted Linears reading one tensor: the attention's input, the MLP's input
_INPUT_GROUPS = {"attention.q": "attention_input", "attention.k": "attention_input", "attention.v": "attention_input",
                 "attention.qkv": "attention_input", "mlp.gate": "mlp_input", "mlp.up": "mlp_input", "mlp.gate_up": "mlp_input"}


def _first_layer_linears(spec: ModelSpec, targets: list[str] | str) -> dict[str, LinearSpec]:
    modules, _ = split_moe_targets(spec, targets)
    if not modules:
        return {}
    return {lin.name.rsplit(".", 1)[-1]: lin for lin in resolve_targets(spec, modules) if lin.layer in (0, None)}


def activation_terms(spec: ModelSpec, options: TrainingOptions) -> ActivationTerms:
    """Saved bytes per token. Training runs under autocast whenever the compute dtype is 16-bit
    (the transformers Trainer, TRL and accelerate all wrap the forward in it) unless the options
    say it is a plain loop without one."""
    e = compute_bytes(options)
    autocast = options.effective_autocast
    # the residual stream, norms and everything not cast by autocast stay in the dtype of the
    # embedding's output: the weights' (fp32 after prepare_model_for_kbit_training)
    w = dtype_bytes(options.residual_stream_dtype)
    # bitsandbytes' Linear layers cast their input to the compute dtype and their output back to
    # the input's: a quantized MLP's outputs are in the stream's dtype, not autocast's
    linear_out = w if options.effective_quantization != "none" else e
    h, q, kv, heads = spec.hidden_size, spec.num_attention_heads * spec.head_dim, spec.kv_dim, spec.num_attention_heads
    i = spec.intermediate_size
    s = sequence_length(options)
    layout = options.batch_layout
    # how far each query's mask and scores reach: the padded row, or the padding-free row
    row = attention_row(options)
    # prefix tuning's keys and values: its virtual tokens, then the sequence's
    prefix = options.num_virtual_tokens if options.method == "prefix_tuning" else 0
    keys = s + prefix
    per_sequence = 0
    base_trains = options.method in ("full", "freeze")
    adapted = _adapted(spec, options)
    r = options.lora_r
    # autocast gives each Linear its own 16-bit copy of an input held in a wider dtype
    casts_inputs = autocast and w > e

    # RMSNorm: its fp32 input (an upcast copy, or the fp32 residual itself) and rsqrt; the
    # normalized tensor when the weight trains: in the stream dtype, or in fp32 where the weight
    # multiplies before the cast back (Gemma, OLMo 2).
    norm_elem = 4 if spec.norm_style == "fp32" else w
    normalized = norm_elem * h
    norm = 4 * h + 4 + (normalized if base_trains else 0)
    mlp_linears = 0 if spec.num_experts else 2  # a MoE block gathers its own expert inputs
    if base_trains:
        # inputs of q/k/v (one tensor, or three autocast copies) and of gate/up
        linear_inputs = (3 + mlp_linears) * e * h if casts_inputs else (1 + mlp_linears // 2) * w * h
    else:
        linear_inputs = 0
    if options.attention == "eager" or spec.attn_softcap:
        # soft-capping saves the tanh of the scores too
        # q, k and v expanded to all heads, and a contiguous copy of the output that o_proj saves
        # when it trains or carries LoRA; a frozen o_proj under IA3 or a prompt method saves none
        copies = 4 if options.method in ("full", "freeze") or options.method in ADAPTER_METHODS else 3
        attention = copies * e * q + (6 + (e if spec.attn_softcap else 0)) * heads * (row if layout == "padding_free" else keys)
        per_sequence += 2 * e * q * prefix  # the prefix's keys and values, expanded to all heads
    elif layout != "fixed" and options.attention == "sdpa":
        # a padding or block-diagonal packed mask: no is_causal, keys and values expanded to all
        # heads, the mask saved per layer in the compute dtype (a prefix's keys lengthen it)
        width = q if kv < q else kv
        attention = e * (q + 2 * width) + e * q + 4 * heads + e * (row + prefix)
        per_sequence += 2 * e * width * prefix
    elif layout == "padded" and options.attention == "flash":
        # transformers' unpad path: gathered q, k, v and the flash output, the output scattered
        # back to the padded rows (o_proj's input), int64 token indices
        attention = e * (q + 2 * kv) + 2 * e * q + 4 * heads + TOKEN_ID_BYTES
        per_sequence += 2 * e * kv * prefix
    elif prefix and options.attention == "sdpa":
        # keys longer than queries: no is_causal, an explicit mask (saved in the compute dtype), and
        # with a mask transformers expands grouped-query keys and values to all heads
        width = q if kv < q else kv
        attention = e * (q + 2 * width) + e * q + 4 * heads + e * keys
        per_sequence += 2 * e * width * prefix
    else:
        attention = e * (q + 2 * kv) + e * q + 4 * heads
        per_sequence += 2 * e * kv * prefix
    if spec.num_experts:
        mlp = moe_bytes_per_token(spec, e)
    else:
        mlp = 3 * linear_out * i + (e * i if base_trains else 0)
    per_token = spec.norms_per_layer * norm + linear_inputs + attention + mlp + qk_norm_bytes_per_token(spec, norm_elem, base_trains)

    fixed = 0
    notes = []
    a = dtype_bytes(adapter_dtype(options))
    # PEFT casts each adapted input to the adapter dtype (fp32 by default); under autocast lora_A
    # then saves a 16-bit copy of it, without autocast the adapter-dtype copy itself. Where no cast
    # copies anything (16-bit adapters on a stream of their dtype, no dropout) lora_A saves the
    # input itself, which the adapters reading it share (q, k and v; gate and up), and o_proj's
    # input is the attention output already counted above.
    adapter_elem = e if autocast else a
    shares_input = a == e and w == e and options.lora_dropout == 0
    inputs_seen: set[str] = {"attention.o"}
    roles = {name: lin.role for name, lin in _adapted_linears(spec, options).items()}
    for name, (fan_in, fan_out) in adapted.items():
        group = _INPUT_GROUPS.get(roles[name], roles[name])
        if not shares_input or group not in inputs_seen:
            per_token += adapter_elem * fan_in
        inputs_seen.add(group)
        per_token += adapter_elem * r
        if autocast and a != e:
            # autocast's 16-bit copies of lora_B and lora_A, cached for the forward and saved
            fixed += e * r * (fan_out + fan_in)
        if options.lora_dropout > 0:
            per_token += fan_in  # the dropout mask, one byte per value on CUDA
        if options.method == "dora":
            # the base output and the scaled LoRA output, both kept for the magnitude's gradient
            per_token += 2 * e * fan_out if autocast else (w + 4) * fan_out
            # fp32 weight norm, scale and (scale - 1), each one value per output feature
            fixed += 12 * fan_out
            if options.lora_dropout > 0:
                # with dropout PEFT recomputes the base output from the dropped input against a
                # copy of the whole base weight in the adapter dtype, and autograd keeps that copy
                fixed += adapter_elem * fan_in * fan_out
    if adapted:
        notes.append(f"{len(adapted)} adapted Linear(s) per layer save a copy of their input")
    if options.method == "ia3":
        for lin, feedforward in ia3_linears(spec, options):
            if lin.layer not in (0, None):
                continue
            if feedforward:
                # x.to(vector dtype) * vector: the input in the vector's dtype, kept for its gradient
                per_token += a * lin.in_features
                fixed += a * lin.in_features
            else:
                # base output * vector: the base output, kept for the vector's gradient
                per_token += e * lin.out_features
                fixed += a * lin.out_features
    if spec.num_experts:
        notes.append(f"MoE: {spec.experts_per_token} of {spec.num_experts} experts per token")
        if options.method in ADAPTER_METHODS:
            # PEFT's LoRA on fused expert parameters materializes W + BA for the grouped matmul
            _, params = split_moe_targets(spec, options.lora_targets)
            fixed += sum(t.numel for t, _ in params if t.layer == 0) * e

    # final norm; the lm_head input (saved by lm_head when it trains, always by a loss path that
    # keeps it: TRL's fused head, Cut Cross-Entropy); int64 ids when the embedding trains
    trained = trained_roles(spec, options)
    head_input_saved = base_trains or "lm_head" in trained or saves_head_input(options)
    # the fused loss paths keep the final norm's output as it is (fp32 on an fp32 stream); a trained
    # lm_head keeps the copy autocast made of it
    head_input = (w if saves_head_input(options) or not casts_inputs else e) * h
    outside = norm + (head_input if head_input_saved else 0) + (TOKEN_ID_BYTES if base_trains or "embedding" in trained else 0)
    embedding_elem = dtype_bytes(options.embedding_dtype)
    first_input = embedding_elem * h if embedding_elem != w else None
    return ActivationTerms(per_token, fixed, w * h, outside, tuple(notes), per_sequence, first_input)


def dora_weight_norm_bytes(spec: ModelSpec, options: TrainingOptions) -> int:
    """DoRA's forward, per adapted Linear, builds an fp32 identity of its input size, the
    weight-sized LoRA product, fp32 copies of the base weight and of their sum and its norm,
    then scales the output through fp32 temporaries of tokens x out: about 4 in^2 + 24 in out
    + 8 tokens out bytes, measured with PyTorch's memory profiler on single DoRA Linears (the
    weight-sized part came out at 26 to 45 bytes per weight with the token part included; 24 plus
    8 bytes per token and output is the fit).
    All freed before the next module: the peak is the largest module's set, repeated during
    recomputation under checkpointing."""
    if options.method != "dora":
        return 0
    tokens = training_tokens(options)
    return max((4 * fan_in * fan_in + 24 * fan_in * fan_out + 8 * tokens * fan_out for fan_in, fan_out in _adapted(spec, options).values()), default=0)


def layer_backward_bytes(spec: ModelSpec, options: TrainingOptions) -> int:
    """The gradients one decoder layer's backward holds at once, on top of what it saved, per
    token and unit of (MLP width + hidden size). Measured with PyTorch's memory profiler on CPU
    (Llama blocks, hidden 256-512, intermediate 1024-2048, 1024-2048 tokens, with and without
    checkpointing): full fine-tuning 3.3-3.6 bytes in bf16, planned as two values in the compute
    dtype; adapters under autocast 6.0, three values (the fp32 adapter branch's gradients are cast
    back through extra buffers); fp32 adapters without autocast 6.5-8.5, planned at 9. Routed MoE
    tokens count once per expert they reach."""
    e = compute_bytes(options)
    if options.method not in ADAPTER_METHODS:
        per_unit = 2 * e
    elif options.effective_autocast or e == 4 or adapter_dtype(options) != "fp32":
        per_unit = 3 * e
    else:
        per_unit = 9
    width = max(spec.experts_per_token, 1) * spec.moe_intermediate_size if spec.num_experts else spec.intermediate_size
    return training_tokens(options) * per_unit * (width + spec.hidden_size)


def fused_split_grad_bytes(spec: ModelSpec, options: TrainingOptions) -> int:
    """A fused projection's output is split (Phi-3's qkv_proj, gate_up_proj chunked in two); in
    backward the split's gradient is one new buffer of the whole output, alive beside the parts'
    gradients. Unfused blocks (Llama) have no such buffer. Found with PyTorch's memory profiler:
    tiny Phi-3 with LoRA and checkpointing measured 5% above the plan without it."""
    widths = [max(t.shape) for t in spec.tensors if t.layer == 0 and t.is_weight and t.role in ("mlp.gate_up", "attention.qkv")]
    if not widths:
        return 0
    return training_tokens(options) * compute_bytes(options) * max(widths)


def qk_norm_bytes_per_token(spec: ModelSpec, w: int, base_trains: bool) -> int:
    """RMSNorm on queries and keys (Qwen3 per head, OLMo 2 over the whole projection): fp32
    input, one fp32 rsqrt per normalized group, the normalized tensor when the weight trains."""
    total = 0
    for t in spec.tensors:
        if t.layer != 0 or t.role != "norm" or t.shape == (spec.hidden_size,):
            continue
        leaf = t.module.rsplit(".", 1)[-1]
        width = spec.num_attention_heads * spec.head_dim if leaf.startswith("q") else spec.kv_dim if leaf.startswith("k") else 0
        if width:
            total += 4 * width + 4 * (width // t.shape[0]) + (w * width if base_trains else 0)
    return total


def moe_bytes_per_token(spec: ModelSpec, e: int) -> int:
    """transformers 5's grouped-matmul MoE block (integrations/moe.py), per token: the router's
    input, fp32 softmax over experts, top-k indices and weights; then per routed copy (k per
    token) the permutation indices, the gathered input, gate/up output, activation, product, the
    expert output and its routing weight."""
    h, m, k, experts = spec.hidden_size, spec.moe_intermediate_size, max(spec.experts_per_token, 1), spec.num_experts
    router = e * h + 4 * experts + 12 * k + 4
    per_routed = 2 * e * h + 4 * e * m + 28
    return router + k * per_routed


def sequence_length(options: TrainingOptions) -> int:
    """Positions per sequence in the training forward: prompt plus completion for the stages that
    generate; prompt tuning's virtual tokens come first in every sequence."""
    s = options.seq_len + (options.max_new_tokens if options.generates else 0)
    return s + (options.num_virtual_tokens if options.method == "prompt_tuning" else 0)


def attention_row(options: TrainingOptions) -> int:
    """Positions one attention row spans: a sequence, or under padding-free batching the whole
    flattened batch (the block-diagonal mask and eager's scores are that wide)."""
    if options.batch_layout == "padding_free":
        return training_tokens(options)
    return sequence_length(options)


def attention_mask_bytes(options: TrainingOptions) -> int:
    """The boolean 4D mask transformers builds once per forward for SDPA when the batch is padded
    or packed padding-free (1 byte per query and key position of each row). Without checkpointing
    it is gone when the forward returns; under it every layer's checkpoint keeps it for the
    recompute until the backward ends (measured: tests/test_padding.py)."""
    if options.batch_layout == "fixed" or options.attention != "sdpa" or not options.gradient_checkpointing:
        return 0
    row = attention_row(options)
    rows = 1 if options.batch_layout == "padding_free" else training_sequences(options)
    return rows * row * row


def batch_layout_notes(options: TrainingOptions) -> list[str]:
    """Which batch layout the plan assumed, and what it cannot plan: lines for its assumptions."""
    layout, attention = options.batch_layout, options.attention
    if layout == "fixed":
        if not options.packing:
            return []  # the default: fixed-length rows without padding, as every plan before the option (docs/plan.md says so)
        return [f"batches: packing with strategy wrapped cuts fixed-length rows of {options.seq_len:,} tokens without padding (their all-ones mask is dropped: "
                "SDPA runs its causal flash kernel)"]
    if layout == "padded":
        out = [f"batches padded to the longest sequence (up to {options.seq_len:,} tokens), with an attention mask: planned at "
               f"{options.seq_len:,} tokens every step, pads computed like tokens"]
        if attention == "sdpa":
            out.append("with a padding mask SDPA leaves its flash kernel: each layer keeps the mask in the compute dtype and "
                       "grouped-query keys and values expanded to every query head (transformers 5's repeat_kv)")
        elif attention == "flash":
            out.append("flash attention unpads each layer's q, k and v and pads its output back (planned from transformers' code, "
                       "not measured)")
        out.append("lengths that vary from step to step leave cached blocks of many sizes in the allocator: the reserve over "
                   "many steps can exceed the two fixed-length steps planned (not planned)")
        return out
    source = "packing (strategy " + options.packing_strategy + ") turns padding_free on" if options.packing else "padding_free"
    out = [f"padding-free batches ({source}): one row of up to {training_tokens(options):,} tokens, position_ids per sequence, no mask"]
    if attention == "flash":
        out.append("flash attention's varlen kernel per sequence: the fixed-length terms (planned from the code; flash-attn does not "
                   "run on CPU or the meta device)")
    else:
        out.append(f"padding-free without flash attention (TRL supports it with FlashAttention 2 or 3 only): transformers 5 builds a "
                   f"block-diagonal mask over the whole row, {training_tokens(options):,} x {training_tokens(options):,} positions"
                   + (", kept per layer in the compute dtype with keys and values expanded to every head" if attention == "sdpa" else
                      ", and eager attention's scores span the row") + "; use attention flash")
    return out


def training_sequences(options: TrainingOptions) -> int:
    """Sequences in one training forward: pairs for preference stages. KTO's KL batch runs under
    no_grad before it (TRL 1.16's KTOTrainer), so it saves nothing: KTO trains on batch_size rows."""
    if not options.generates and options.stage in ("dpo", "orpo", "simpo", "reward"):
        return 2 * options.batch_size
    return options.batch_size


def training_tokens(options: TrainingOptions) -> int:
    """Tokens in one training forward: pairs for preference stages, prompt
    plus completion for the stages that generate, with prompt tuning's virtual tokens."""
    return training_sequences(options) * sequence_length(options)


def trained_layers(spec: ModelSpec, options: TrainingOptions) -> int:
    """Layers that save activations: a frozen prefix before the first trained layer saves none."""
    if options.method == "freeze":
        return min(options.freeze_trainable_layers, spec.num_layers)
    return spec.num_layers


def activation_components(spec: ModelSpec, options: TrainingOptions) -> list[Component]:
    terms = activation_terms(spec, options)
    tokens = training_tokens(options)
    # per layer, whatever does not scale with tokens: adapter copies, a prefix's keys and values
    fixed = terms.per_layer_fixed + training_sequences(options) * terms.per_layer_per_sequence
    layers = trained_layers(spec, options)
    out = []
    if options.gradient_checkpointing:
        # the backward frees each layer's input after recomputing it, last layer first: the
        # first trained layer's input is the one still held when all gradients exist
        if layers > 1:
            out.append(
                Component(
                    "activations.checkpoints",
                    (layers - 1) * tokens * terms.layer_input_per_token,
                    f"gradient checkpointing keeps the input of each of the other {layers - 1} layers ({tokens:,} tokens), freed as the backward passes it",
                )
            )
        first_input = terms.layer_input_per_token if terms.first_layer_input_per_token is None else terms.first_layer_input_per_token
        out.append(
            Component(
                "activations.first_layer_input",
                tokens * first_input,
                "the first trained layer's checkpointed input, the last one the backward frees",
            )
        )
        out.append(
            Component(
                "activations.recompute",
                tokens * terms.per_layer_per_token + fixed,
                "one layer's full activations while it is recomputed in backward" + _method_note(options),
            )
        )
        if options.effective_use_reentrant:
            asked = options.use_reentrant or options.reentrant_checkpoint_around_fsdp_unit
            why = "use_reentrant" if asked else "TRL's trainers set use_reentrant for a PEFT model under ZeRO-3"
            out.append(
                Component(
                    "temporary.reentrant_input_grad",
                    tokens * terms.layer_input_per_token,
                    f"{why}: the reentrant checkpoint recomputes each layer on a detached copy of its input and fills that copy's "
                    "gradient before handing it on, one layer input more in backward than the non-reentrant checkpoint "
                    "(measured on CPU: one layer input, whatever the number of layers)",
                )
            )
    else:
        out.append(
            Component(
                "activations.layers",
                layers * (tokens * terms.per_layer_per_token + fixed),
                f"{layers} layers x {tokens:,} tokens x {terms.per_layer_per_token:,} bytes saved per token"
                + (f" + {fixed:,} bytes per layer that do not scale with tokens (adapter weight copies, DoRA norms, prefix keys and values)" if fixed else "")
                + f" ({options.attention} attention)" + _method_note(options),
            )
        )
    out.append(Component("activations.outside_layers", tokens * terms.outside_layers_per_token, "token ids, final norm and the lm_head input"))
    mask = attention_mask_bytes(options)
    if mask:
        out.append(Component("activations.attention_mask", mask,
                             "the boolean attention mask transformers builds for a " + options.batch_layout.replace("_", "-")
                             + " batch, kept by every layer's checkpoint until the backward ends"))
    return out


def _method_note(options: TrainingOptions) -> str:
    if options.method == "prompt_tuning":
        return f"; each sequence is {options.num_virtual_tokens} virtual tokens + {options.seq_len:,}"
    if options.method == "prefix_tuning":
        return (f"; keys and values are {options.num_virtual_tokens} prefix tokens + the sequence long"
                + ("; prefix tuning fails under gradient checkpointing with transformers 5: the run needs gradient_checkpointing false"
                   if options.gradient_checkpointing else ""))
    return ""


def peft_method_notes(spec: ModelSpec, options: TrainingOptions) -> list[str]:
    """What the plan assumes of a PEFT method beyond LoRA, and what it cannot plan faithfully:
    lines for the plan's assumptions; then the batch layout's (batch_layout_notes), which reach the
    assumptions through here."""
    method, n = options.method, options.num_virtual_tokens
    out: list[str] = []
    if method == "ia3":
        targets, feedforward, default_targets = ia3_modules(spec, options)
        named = ", ".join(targets) if isinstance(targets, list) else targets
        out.append(f"IA3 on {named}" + (" (PEFT's default for " + spec.model_type + ")" if default_targets else "")
                   + f"; feed-forward (input-scaled): {', '.join(feedforward) or 'none'}"
                   + (" (PEFT's default)" if options.feedforward_modules is None and spec.peft_defaults.ia3_feedforward else ""))
        if options.feedforward_modules is None and not spec.peft_defaults.ia3_feedforward:
            out.append(f"PEFT has no default IA3 feedforward_modules for {spec.model_type} and refuses to run without them: planned with none; "
                       "set feedforward_modules ([] for none)")
        if options.lora_targets == "all-linear" and not spec.peft_defaults.ia3_targets:
            out.append(f"PEFT has no default IA3 target modules for {spec.model_type}: planned on every Linear (target_modules='all-linear')")
    elif method == "prompt_tuning":
        out.append(f"prompt tuning: PEFT prepends {n} virtual tokens, so every layer, the final norm and the logits see "
                   f"{options.seq_len:,} + {n} positions per sequence")
    elif method == "prefix_tuning":
        out.append(f"prefix tuning: every layer attends to {n} prefix keys and values + the sequence's (prefix_projection false, PEFT's default); "
                   "with SDPA that takes an explicit causal mask, saved per layer, and grouped-query keys and values expanded to all heads; "
                   "the past-key-value cache also holds every layer's keys and values until the forward's output is dropped (not planned)")
        if options.gradient_checkpointing:
            out.append("prefix tuning fails under gradient checkpointing with transformers 5 (the causal mask is built for the sequence, "
                       "not sequence + prefix): the run needs gradient_checkpointing false; planned as if it ran")
        if options.attention == "flash":
            out.append("prefix tuning with flash attention: planned with unexpanded keys and values and no mask, not measured")
    return out + batch_layout_notes(options)
