"""Which tensors train under each method, with their shapes and dtypes, exactly as PEFT makes them.

PEFT names and shapes (checked against `get_nb_trainable_parameters` in tests):
- LoRA: per targeted Linear, lora_A (r, in) and lora_B (out, r); no bias.
- DoRA: LoRA plus a magnitude vector (out,) per targeted Linear.
- IA3: a vector per targeted Linear: (1, in) for feed-forward modules, (out, 1) otherwise; PEFT's
  per-architecture feed-forward default applies to targets the user names, unless feedforward_modules is given.
- Prompt tuning: an embedding (virtual tokens, hidden).
- Prefix tuning: an embedding (virtual tokens, layers x 2 x kv_heads x head_dim): the per-layer
  keys and values, sized for grouped-query attention.
- modules_to_save (any of these): a trainable copy of each named module (the embedding, lm_head)
  in the module's dtype, beside the frozen original.
PEFT keeps adapter weights in fp32 (autocast_adapter_dtype=True) whatever the base dtype, unless
the plan turns it off (the option of that name), or TRL does: under ZeRO-3 for unquantized bases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from planner.errors import PlanInputError
from planner.options import ADAPTER_METHODS, TrainingOptions, check_consistency
from planner.spec import LinearSpec, ModelSpec, TensorSpec


@dataclass(frozen=True)
class TrainableTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str
    # part of the base model (full / freeze) rather than an adapter PEFT added
    base: bool
    # a trainable copy PEFT made of a whole module (modules_to_save), not an adapter weight
    saved_copy: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _matches(module_name: str, target: str) -> bool:
    return module_name == target or module_name.endswith(f".{target}")


def split_moe_targets(spec: ModelSpec, targets: list[str] | str) -> tuple[list[str] | str, list[tuple[TensorSpec, int]]]:
    """PEFT's remapping for transformers-5 MoE models: (module targets, [(parameter, rank multiplier)]).

    Names of the old per-expert Linears (and the router `gate`) move from module targets to
    parameter targets on the fused tensors; a fused pair (gate + up) trains at twice the rank.
    """
    target_map = dict(spec.peft_defaults.moe_target_map)
    if not target_map:
        return targets, []
    fused = dict(spec.peft_defaults.moe_fused)
    if targets == "all-linear":
        leaves = {lin.name.rsplit(".", 1)[-1] for lin in spec.linears() if lin.role != "lm_head"}
        targets = sorted(leaves | set(target_map))
    module_targets: list[str] = []
    matched: dict[str, set[str]] = {}
    for target in targets:
        old = next((o for o in target_map if target == o or target.endswith(f".{o}")), None)
        if old is None:
            module_targets.append(target)
        else:
            matched.setdefault(target_map[old], set()).add(old)
    params: list[tuple[TensorSpec, int]] = []
    for new_name, olds in matched.items():
        required = set(fused.get(new_name, ()))
        if required and olds != required:
            raise PlanInputError("lora_targets", f"{', '.join(sorted(olds))} is fused with {', '.join(sorted(required - olds))} into {new_name}; target both")
        multiplier = len(required) if len(required) > 1 else 1
        for t in spec.tensors:
            if t.name == new_name or t.name.endswith(f".{new_name}"):
                params.append((t, multiplier))
    return module_targets, params


def resolve_targets(spec: ModelSpec, targets: list[str] | str, field: str = "lora_targets", strict: bool = True) -> list[LinearSpec]:
    """The Linear modules a PEFT target list selects; `all-linear` as PEFT resolves it.

    PEFT skips names that match nothing as long as one matches; a user's name that matches
    nothing is almost always a typo, so `strict` reports it. PEFT's own defaults are not strict
    (Mixtral's IA3 default `w2` no longer exists once transformers 5 fuses the experts).
    """
    linears = spec.linears()
    if targets == "all-linear":
        # every Linear except the output layer (lm_head); PEFT leaves it out.
        return [lin for lin in linears if lin.role != "lm_head"]
    chosen = [lin for lin in linears if any(_matches(lin.name, t) for t in targets)]
    unmatched = [t for t in targets if not any(_matches(lin.name, t) for lin in linears)]
    if unmatched and (strict or not chosen):
        names = sorted({lin.name.rsplit(".", 1)[-1] for lin in linears if lin.role != "lm_head"})
        raise PlanInputError(
            field, f"{', '.join(unmatched)} matches no Linear module of {spec.name}; its Linear modules are {', '.join(names)}"
        )
    return chosen


def ia3_modules(spec: ModelSpec, options: TrainingOptions) -> tuple[list[str] | str, list[str], bool]:
    """(target_modules, feedforward_modules, targets are PEFT's default) as PEFT's IA3Model settles them.

    lora_targets all-linear stands for IA3Config's target_modules=None: PEFT's default for the
    architecture, or every Linear where it has none. feedforward_modules None is PEFT's default for
    the architecture, applied to named targets too (IA3Model._prepare_adapter_config fills it
    whenever it is None); an architecture without one gets none here, where PEFT would refuse.
    """
    default_targets = options.lora_targets == "all-linear" and bool(spec.peft_defaults.ia3_targets)
    targets = list(spec.peft_defaults.ia3_targets) if default_targets else options.lora_targets
    feedforward = list(spec.peft_defaults.ia3_feedforward) if options.feedforward_modules is None else list(options.feedforward_modules)
    if options.feedforward_modules is not None and isinstance(options.lora_targets, list):
        # IA3Config.__post_init__: both given as lists, feed-forward must be a subset of the targets
        extra = [f for f in feedforward if f not in options.lora_targets]
        if extra:
            raise PlanInputError("feedforward_modules", f"{', '.join(extra)} is not in lora_targets; PEFT's IA3 requires feedforward_modules to be a subset of the target modules")
    return targets, feedforward, default_targets


def ia3_linears(spec: ModelSpec, options: TrainingOptions) -> list[tuple[LinearSpec, bool]]:
    """IA3's targeted Linears, each with whether PEFT treats it as feed-forward (its vector then
    scales the input: in_features values, else out_features). PEFT's feed-forward test is a plain
    suffix match on the module's full name (IA3Model._check_target_module_feedforward)."""
    targets, feedforward, default_targets = ia3_modules(spec, options)
    chosen = resolve_targets(spec, targets, strict=not default_targets)
    return [(lin, any(lin.name.endswith(f) for f in feedforward)) for lin in chosen]


def adapter_dtype(options: TrainingOptions) -> str:
    """fp32 (PEFT's autocast_adapter_dtype), or the base's dtype where it is off: asked for, or
    turned off by TRL under ZeRO-3 for an unquantized base."""
    if not options.autocast_adapter_dtype or (options.parallelism == "zero3" and options.effective_quantization == "none"):
        return options.effective_weights_dtype
    return "fp32"


def trainable_tensors(spec: ModelSpec, options: TrainingOptions) -> tuple[TrainableTensor, ...]:
    """The tensors that train, memoized per spec on the options that decide them."""
    return spec.memoized(("trainable",) + _trainable_key(options), lambda: tuple(_trainable_tensors(spec, options)))


def _trainable_key(options: TrainingOptions) -> tuple:
    targets = options.lora_targets if isinstance(options.lora_targets, str) else tuple(options.lora_targets)
    return (
        options.method, options.effective_weights_dtype, adapter_dtype(options), targets,
        options.lora_r, options.num_virtual_tokens, options.freeze_trainable_layers,
        None if options.feedforward_modules is None else tuple(options.feedforward_modules),
        tuple(options.modules_to_save or ()), options.ensure_weight_tying, options.embedding_dtype,
        # the count sizes the delta; the largest id decides the refusal past the vocabulary
        (len(set(options.trainable_token_indices)), max(options.trainable_token_indices)) if options.trainable_token_indices else None,
    )


# What modules_to_save is planned for: the embedding and the LM head (new tokens' rows, as TRL's
# SFTTrainer trains lm_head when a chat template adds tokens). What training them saves for the
# backward (the lm_head's input, the embedding's token ids) is planner/activations.py's; a Linear
# inside the layers trains through lora_targets.
SAVABLE_ROLES = ("embedding", "lm_head")


def _parameter_owners(spec: ModelSpec) -> dict[str, list[TensorSpec]]:
    """Each module that holds parameters, with them; a tied model's lm_head holds the embedding's
    weight, which the spec counts once, under the embedding."""
    owners: dict[str, list[TensorSpec]] = {}
    for t in spec.tensors:
        owners.setdefault(t.module, []).append(t)
    if spec.tie_word_embeddings and not any(t.role == "lm_head" for t in spec.tensors):
        embedding = input_embedding(spec)
        if embedding is not None:
            owners["lm_head"] = [TensorSpec("lm_head.weight", embedding.shape, "lm_head")]
    return owners


def _chosen_modules(spec: ModelSpec, options: TrainingOptions) -> dict[str, list[TensorSpec]]:
    """The modules_to_save PEFT wraps, matched as PEFT matches them (a module whose name ends with
    the given string), with their parameters."""
    owners = _parameter_owners(spec)
    chosen: dict[str, list[TensorSpec]] = {}
    for name in options.modules_to_save or ():
        matched = {module: tensors for module, tensors in owners.items() if module.endswith(name)}
        if not matched:
            savable = sorted(module for module, tensors in owners.items() if all(t.role in SAVABLE_ROLES for t in tensors))
            raise PlanInputError("modules_to_save", f"{name} matches no module of {spec.name}; its embedding and LM head are {', '.join(savable)}")
        for module, tensors in matched.items():
            other = sorted({t.role for t in tensors} - set(SAVABLE_ROLES))
            if other:
                raise PlanInputError("modules_to_save", f"{module} is a {'/'.join(other)} module: modules_to_save is planned for the embedding "
                                                        "and the LM head (a Linear in the layers trains through lora_targets)")
            chosen[module] = tensors
    return chosen


def modules_to_save_tensors(spec: ModelSpec, options: TrainingOptions) -> list[TrainableTensor]:
    """PEFT's trainable copies of the modules_to_save (ModulesToSaveWrapper deep-copies the module,
    in its dtype: the embeddings' and lm_head's). A tied lm_head is copied apart from the embedding
    (two tensors) unless ensure_weight_tying keeps the two copies one."""
    if not options.modules_to_save or options.method in ("full", "freeze"):
        return []
    chosen = _chosen_modules(spec, options)
    roles = {t.role for tensors in chosen.values() for t in tensors}
    tied_once = options.ensure_weight_tying and spec.tie_word_embeddings and roles >= {"embedding", "lm_head"}
    dtype = options.embedding_dtype
    out = []
    for module, tensors in chosen.items():
        for t in tensors:
            if tied_once and t.role == "lm_head":
                continue  # ensure_weight_tying: the lm_head copy is the embedding copy
            out.append(TrainableTensor(f"{module}.modules_to_save.default.{t.name.rsplit('.', 1)[-1]}", t.shape, dtype, False, saved_copy=True))
    return out


def trained_roles(spec: ModelSpec, options: TrainingOptions) -> frozenset[str]:
    """Which of the embedding and lm_head train: both under full fine-tuning (freeze trains the
    last layers and the final norm only), else those modules_to_save names."""
    if options.method == "full":
        return frozenset(SAVABLE_ROLES)
    tokens = frozenset({"embedding"}) if options.trainable_token_indices and options.method in ADAPTER_METHODS else frozenset()
    if not options.modules_to_save or options.method == "freeze":
        return tokens
    return tokens | spec.memoized(("trained_roles", tuple(options.modules_to_save)),
                                  lambda: frozenset(t.role for tensors in _chosen_modules(spec, options).values() for t in tensors))


def fused_expert_dropout(spec: ModelSpec, options: TrainingOptions) -> tuple[TrainingOptions, list[str]]:
    """PEFT's LoRA on fused MoE expert parameters (lora.ParamWrapper) refuses any dropout, so a run
    with it fails before its first step: the default dropout becomes 0 (and the plan says so), a
    dropout the user asked for is refused with the way out."""
    if options.method not in ("lora", "qlora") or options.lora_dropout == 0:
        return options, []
    _, fused = split_moe_targets(spec, options.lora_targets)
    if not fused:
        return options, []
    names = ", ".join(sorted({".".join(t.name.split(".")[-2:]) for t, _ in fused}))  # experts.gate_up_proj, gate.weight
    if "lora_dropout" in options.model_fields_set:
        raise PlanInputError("lora_dropout", f"PEFT's LoRA on fused MoE expert parameters ({names}) takes no dropout "
                                             "(lora.ParamWrapper refuses lora_dropout != 0): set lora_dropout 0, or leave the experts out of lora_targets")
    return (options.model_copy(update={"lora_dropout": 0.0}),
            [f"lora_dropout 0, not the default {options.lora_dropout:g}: PEFT's LoRA on the fused MoE expert parameters ({names}) takes no dropout"])


def _trainable_tensors(spec: ModelSpec, options: TrainingOptions) -> list[TrainableTensor]:
    return _method_tensors(spec, options) + modules_to_save_tensors(spec, options) + trainable_token_tensors(spec, options)


# the name PEFT gives a trainable-tokens delta (static memory keeps its original rows beside it)
TOKEN_DELTA = "token_adapter.trainable_tokens_delta"


def input_embedding(spec: ModelSpec) -> TensorSpec | None:
    """The vocabulary-sized embedding (a position embedding is an embedding too), or None."""
    return next((t for t in spec.tensors if t.role == "embedding" and t.shape[0] == spec.vocab_size), None)


def trainable_token_tensors(spec: ModelSpec, options: TrainingOptions) -> list[TrainableTensor]:
    """LoraConfig's trainable_token_indices: PEFT's TrainableTokensLayer on the input embedding
    trains a delta of the listed rows (in the adapters' dtype; an untrained copy of the original
    rows beside it is a buffer, planner/static_memory.py). A tied model's LM head would follow
    the embedding through the same merged weight, which is not planned: refused."""
    tokens = len(set(options.trainable_token_indices or ()))
    if not tokens or options.method not in ADAPTER_METHODS:
        return []
    embedding = input_embedding(spec)
    if spec.tie_word_embeddings:
        raise PlanInputError("trainable_token_indices", f"{spec.name} ties its LM head to the embedding, which PEFT then trains through the "
                                                        "same merged weight: not planned yet; use an untied model, or modules_to_save")
    if "embedding" in {t.role for tensors in _chosen_modules(spec, options).values() for t in tensors}:
        raise PlanInputError("trainable_token_indices", "modules_to_save already trains the whole embedding: leave trainable_token_indices out")
    if max(options.trainable_token_indices) >= spec.vocab_size:
        raise PlanInputError("trainable_token_indices", f"token {max(options.trainable_token_indices)} is past the vocabulary ({spec.vocab_size:,} entries)")
    return [TrainableTensor(f"{embedding.module}.{TOKEN_DELTA}", (tokens, spec.hidden_size), adapter_dtype(options), False)]


def _method_tensors(spec: ModelSpec, options: TrainingOptions) -> list[TrainableTensor]:
    method = options.method
    weights_dtype = options.effective_weights_dtype
    if method == "full":
        return [TrainableTensor(t.name, t.shape, weights_dtype, True) for t in spec.tensors]
    if method == "freeze":
        return [TrainableTensor(t.name, t.shape, weights_dtype, True) for t in frozen_split(spec, options)[1]]
    dtype = adapter_dtype(options)
    if method in ADAPTER_METHODS:
        module_targets, param_targets = split_moe_targets(spec, options.lora_targets)
        r = options.lora_r
        out = []
        if module_targets:
            for lin in resolve_targets(spec, module_targets):
                out.append(TrainableTensor(f"{lin.name}.lora_A", (r, lin.in_features), dtype, False))
                out.append(TrainableTensor(f"{lin.name}.lora_B", (lin.out_features, r), dtype, False))
                if method == "dora":
                    out.append(TrainableTensor(f"{lin.name}.lora_magnitude_vector", (lin.out_features,), dtype, False))
        if param_targets and method == "dora":
            raise PlanInputError("method", "PEFT has no DoRA for fused MoE expert parameters; use lora, or name attention modules in lora_targets")
        for tensor, multiplier in param_targets:
            rank = r * multiplier
            # a 3-D (experts, out, in) parameter gets one rank-r pair per expert, stacked
            experts = tensor.shape[0] if len(tensor.shape) == 3 else 1
            out_features, in_features = tensor.shape[-2], tensor.shape[-1]
            out.append(TrainableTensor(f"{tensor.name}.lora_A", (rank * experts, in_features), dtype, False))
            out.append(TrainableTensor(f"{tensor.name}.lora_B", (out_features, rank * experts), dtype, False))
        return out
    if method == "ia3":
        out = []
        for lin, feedforward in ia3_linears(spec, options):
            if feedforward:
                out.append(TrainableTensor(f"{lin.name}.ia3_l", (1, lin.in_features), dtype, False))
            else:
                out.append(TrainableTensor(f"{lin.name}.ia3_l", (lin.out_features, 1), dtype, False))
        return out
    if method == "prompt_tuning":
        # created fresh by PEFT in the default dtype (fp32), never cast to the base dtype
        return [TrainableTensor("prompt_encoder.embedding", (options.num_virtual_tokens, spec.hidden_size), "fp32", False)]
    if method == "prefix_tuning":
        width = spec.num_layers * 2 * spec.kv_dim
        return [TrainableTensor("prompt_encoder.embedding", (options.num_virtual_tokens, width), "fp32", False)]
    raise PlanInputError("method", f"unknown method {method!r}")  # pragma: no cover - options validate it


def frozen_split(spec: ModelSpec, options: TrainingOptions) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(frozen, trainable) base tensors for method `freeze`: the last N blocks and the final norm train."""
    n = options.freeze_trainable_layers
    if n > spec.num_layers:
        raise PlanInputError("freeze_trainable_layers", f"{n} is more than the model's {spec.num_layers} layers")
    first_trained = spec.num_layers - n
    frozen, trained = [], []
    for t in spec.tensors:
        is_final_norm = t.layer is None and t.role == "norm"
        (trained if is_final_norm or (t.layer is not None and t.layer >= first_trained) else frozen).append(t)
    return frozen, trained


def parameter_counts(spec: ModelSpec, options: TrainingOptions) -> dict[str, int]:
    check_consistency(options)
    return dict(spec.memoized(("counts",) + _trainable_key(options), lambda: _parameter_counts(spec, options)))


def _parameter_counts(spec: ModelSpec, options: TrainingOptions) -> dict[str, int]:
    tensors = trainable_tensors(spec, options)
    trainable = sum(t.numel for t in tensors)
    adapter = sum(t.numel for t in tensors if not t.base)
    return {
        "total": spec.total_params + adapter,
        "trainable": trainable,
        "base": spec.total_params,
        "adapter": adapter,
    }
