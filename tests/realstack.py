"""The real training stack on CPU, for ground truth: transformers + PEFT + bitsandbytes + optimizers.

`run_one_step` builds a tiny model from a config dict the way a user's run would (quantized load
through transformers' BitsAndBytesConfig, PEFT adapters, the named optimizer), takes one optimizer
step, and counts the bytes every tensor holds, deduplicated by storage.
"""

from __future__ import annotations

import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Measured:
    weights: int
    adapter: int
    gradients: int
    optimizer_state: int
    total_params: int
    trainable_params: int


def _storage_key(t: torch.Tensor):
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes())


def unique_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if t is None or not torch.is_tensor(t) or t.device.type == "meta":
            continue
        seen[_storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def quant_state_tensors(param) -> list[torch.Tensor]:
    qs = getattr(param, "quant_state", None)
    out = []
    if qs is not None:
        out += [qs.absmax, qs.code]
        if qs.nested:
            out += [qs.offset, qs.state2.absmax, qs.state2.code]
    scb = getattr(param, "SCB", None)
    if scb is not None:
        out.append(scb)
    return out


def _state_tensors(value):
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _state_tensors(v)
    elif hasattr(value, "ortho_matrix"):  # GaLore's projector object
        yield from _state_tensors(value.ortho_matrix)


_saved: dict[str, str] = {}


def build_model(config: dict, weights_dtype: str, quantization: str = "none", double_quant: bool = True, attention: str | None = None,
                device: str = "cpu"):
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    hf_config = AutoConfig.for_model(**config)
    torch.manual_seed(0)
    if quantization == "none":
        # built where it runs: initialising a GPU run's weights on the GPU takes seconds, not minutes
        with torch.device(device):
            return AutoModelForCausalLM.from_config(hf_config, dtype=TORCH_DTYPES[weights_dtype], attn_implementation=attention)
    key = repr(sorted(config.items()))
    if key not in _saved:
        path = Path(tempfile.mkdtemp(prefix="vramplan-tiny-"))
        # the checkpoint bitsandbytes quantizes from, built on CPU so nothing of it stays cached on a
        # GPU; for a GPU run in the compute dtype, half the bytes to write (the 4-bit load is the same)
        save_dtype = torch.float32 if device == "cpu" else TORCH_DTYPES[weights_dtype]
        AutoModelForCausalLM.from_config(hf_config, dtype=save_dtype).save_pretrained(path)
        _saved[key] = str(path)
    if quantization == "int8":
        qconf = BitsAndBytesConfig(load_in_8bit=True)
    else:
        qconf = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quantization,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=TORCH_DTYPES[weights_dtype],
        )
    return AutoModelForCausalLM.from_pretrained(_saved[key], quantization_config=qconf, dtype=TORCH_DTYPES[weights_dtype], device_map=device,
                                                attn_implementation=attention)


def peft_config(method: str, r: int, targets, num_virtual_tokens: int, modules_to_save=None, ensure_weight_tying: bool = False,
                trainable_token_indices=None):
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig

    saved = {"modules_to_save": modules_to_save} if modules_to_save else {}
    if method in ("lora", "qlora", "dora"):
        tokens = {"trainable_token_indices": {"embed_tokens": list(trainable_token_indices)}} if trainable_token_indices else {}
        return LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0, use_dora=method == "dora", task_type="CAUSAL_LM",
                          ensure_weight_tying=ensure_weight_tying, **saved, **tokens)
    if method == "ia3":
        return IA3Config(task_type="CAUSAL_LM", **saved)
    if method == "prompt_tuning":
        return PromptTuningConfig(num_virtual_tokens=num_virtual_tokens, task_type="CAUSAL_LM", **saved)
    if method == "prefix_tuning":
        return PrefixTuningConfig(num_virtual_tokens=num_virtual_tokens, task_type="CAUSAL_LM", **saved)
    return None


def make_optimizer(name: str, model, spec_linear_weights: set[str], galore_rank: int, sgd_momentum: float):
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-3)
    if name == "adamw_foreach":
        return torch.optim.AdamW(params, lr=1e-3, foreach=True)
    import bitsandbytes as bnb

    if name == "adamw_8bit":
        return bnb.optim.AdamW8bit(params, lr=1e-3)
    if name == "paged_adamw_8bit":
        return bnb.optim.PagedAdamW8bit(params, lr=1e-3)
    if name == "paged_adamw_32bit":
        return bnb.optim.PagedAdamW32bit(params, lr=1e-3)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=1e-3, scale_parameter=False, relative_step=False)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3, momentum=sgd_momentum)
    if name == "galore":
        from galore_torch import GaLoreAdamW

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        galore = [p for n, p in named if n in spec_linear_weights and p.dim() == 2]
        ids = {id(p) for p in galore}
        rest = [p for n, p in named if id(p) not in ids]
        return GaLoreAdamW(
            [{"params": rest}, {"params": galore, "rank": galore_rank, "update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}],
            lr=1e-3,
        )
    raise ValueError(name)


def run_one_step(
    config: dict,
    *,
    method: str = "full",
    weights_dtype: str = "bf16",
    optimizer: str = "adamw",
    quantization: str = "none",
    double_quant: bool = True,
    lora_r: int = 8,
    lora_targets="all-linear",
    num_virtual_tokens: int = 5,
    freeze_trainable_layers: int = 1,
    galore_rank: int = 4,
    sgd_momentum: float = 0.0,
    modules_to_save=None,
    ensure_weight_tying: bool = False,
    trainable_token_indices=None,
) -> Measured:
    from peft import get_peft_model

    model = build_model(config, weights_dtype, quantization, double_quant)
    pconf = peft_config(method, lora_r, lora_targets, num_virtual_tokens, modules_to_save, ensure_weight_tying, trainable_token_indices)
    if pconf is not None:
        model = get_peft_model(model, pconf)
    elif method == "freeze":
        n_layers = config["num_hidden_layers"]
        for name, p in model.named_parameters():
            layer = _layer_of(name)
            p.requires_grad = (layer is not None and layer >= n_layers - freeze_trainable_layers) or (layer is None and name.endswith("norm.weight"))
    base = model.get_base_model() if pconf is not None else model
    linear_weights = {
        f"{n}.weight" for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and m is not base.get_output_embeddings()
    }
    opt = make_optimizer(optimizer, model, linear_weights, galore_rank, sgd_momentum)
    # Trainers step in train mode. In eval mode, bitsandbytes >= 0.50 repacks a 4-bit weight for
    # its CPU kernel on the first forward whose input needs no grad (layer 0's q/k/v under
    # QLoRA), replacing the double-quantized constants with 16-bit ones: a CPU-only layout that
    # no training run holds.
    model.train()
    ids = torch.randint(0, config["vocab_size"], (2, 8))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()

    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    quant = [t for p in params for t in quant_state_tensors(p)]
    # LLM.int8 moves its row scales from the parameter to the module's state on first forward
    for module in model.modules():
        state = getattr(module, "state", None)
        quant += [getattr(state, "SCB", None), getattr(state, "CB", None)]
    state = [t for st in opt.state.values() for v in st.values() for t in _state_tensors(v)]
    if pconf is not None:
        trainable_count, total_count = model.get_nb_trainable_parameters()
    else:
        trainable_count = sum(p.numel() for p in trainable)
        total_count = sum(p.numel() for p in params)
    return Measured(
        weights=unique_bytes(params + quant),
        adapter=unique_bytes(trainable) if pconf is not None else 0,
        gradients=unique_bytes(p.grad for p in params),
        optimizer_state=unique_bytes(state),
        total_params=total_count,
        trainable_params=trainable_count,
    )


def _layer_of(name: str):
    import re

    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


class _SavedTensor:
    """What the pack hook hands autograd instead of the tensor, so we can tell afterwards which
    saved tensors are still alive (weakref-able, unlike a plain holder tuple)."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


def _autocast(on: bool, device: str = "cpu"):
    """bf16 autocast as the trainers run it, or none: a plain loop over bf16 weights."""
    import contextlib

    return torch.autocast(device, dtype=torch.bfloat16) if on else contextlib.nullcontext()


def saved_activation_bytes(model, run_forward) -> int:
    """Bytes autograd holds for backward after `run_forward()`, deduplicated by storage.

    Only tensors still held when the forward returns count: a graph built and dropped inside the
    forward (DoRA's weight-norm pass) frees its saved tensors, and deduplicating by address at save
    time would count the freed storage and miss a later tensor that reuses its address.
    Parameters (and anything sharing their storage) are not activations and are left out.
    """
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    packed: list[weakref.ref] = []

    def pack(t):
        if t.device.type == "meta":
            return t
        holder = _SavedTensor(t)
        packed.append(weakref.ref(holder))
        return holder

    def unpack(holder):
        return holder.tensor if isinstance(holder, _SavedTensor) else holder

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = run_forward()
    live_storages: dict[int, int] = {}
    for ref in packed:
        holder = ref()
        if holder is None:
            continue
        storage = holder.tensor.untyped_storage()
        if storage.data_ptr() not in param_storages:
            live_storages[storage.data_ptr()] = storage.nbytes()
    return sum(live_storages.values()), out


def apply_method(model, method: str, lora_r: int, checkpointing: bool):
    """PEFT on all linear layers (dropout 0, so CPU and GPU save the same) and checkpointing,
    the way the trainers set them up: inputs require grad when the base is frozen."""
    pconf = peft_config(method, lora_r, "all-linear", 5)
    if pconf is not None:
        from peft import get_peft_model

        pconf.lora_dropout = 0.0
        model = get_peft_model(model, pconf)
    if checkpointing:
        model.gradient_checkpointing_enable()
        if pconf is not None:
            model.enable_input_require_grads()
    return model


def measure_saved_forward(config: dict, method: str, attention: str, checkpointing: bool, sequences: int, seq_len: int, lora_r: int = 8, trainer: str = "hf",
                          autocast: bool = True) -> int:
    """Saved-for-backward bytes of one real forward with labels under bf16 autocast, as trainers run it.

    trainer "hf" is a plain forward with labels; "trl" goes through TRL's fused LM head, as its
    trainers do."""
    model = build_model(config, "bf16", attention=attention)
    extra = {}
    if trainer == "trl":
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)
        extra["fused_lm_head"] = True
    model = apply_method(model, method, lora_r, checkpointing)
    model.train()
    torch.manual_seed(0)
    ids = torch.randint(3, config["vocab_size"], (sequences, seq_len))

    def forward():
        with _autocast(autocast):
            return model(input_ids=ids, labels=ids, **extra)

    saved, _ = saved_activation_bytes(model, forward)
    return saved


def predicted_saved(spec, method: str, attention: str, checkpointing: bool, stage: str, batch_size: int, seq_len: int, lora_r: int = 8, trainer: str = "hf",
                    autocast: bool = True) -> int:
    """The planner's saved-activation terms for the same run: activations (without the layer
    recomputed in backward, which is not saved in forward) plus the saved logits."""
    from planner.activations import activation_components, training_tokens
    from planner.logits import logits_components
    from planner.options import TrainingOptions

    options = TrainingOptions(
        method=method, stage=stage, weights_dtype="bf16", precision="bf16", attention=attention,
        gradient_checkpointing=checkpointing, batch_size=batch_size, seq_len=seq_len, trainer=trainer, lora_r=lora_r,
        lora_dropout=0.0, precompute_ref_log_probs=True, gpu_memory_gib=80, autocast=autocast,
    )
    parts = activation_components(spec, options) + logits_components(spec, options, training_tokens(options))
    return sum(c.bytes for c in parts if c.name != "activations.recompute" and not c.name.startswith("temporary"))


def measure_step_peak(config: dict, method: str, attention: str, checkpointing: bool, sequences: int, seq_len: int, lora_r: int = 8, trainer: str = "hf",
                      optimizer: str = "adamw", autocast: bool = True) -> StepPeak:
    """Peak CPU memory of one whole training step (forward with labels under bf16 autocast,
    backward, AdamW step, zero_grad), from PyTorch's memory profiler timeline.

    A warm-up step runs first, so optimizer state exists before the measured step, as in every
    step of a real run but the first."""
    quantization = "nf4" if method == "qlora" else "none"  # bitsandbytes quantizes on CPU
    model = build_model(config, "bf16", quantization=quantization, attention=attention)
    extra = {}
    if trainer == "trl":  # TRL's trainers compute the loss through its fused LM head
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model)
        extra["fused_lm_head"] = True
    model = apply_method(model, method, lora_r, checkpointing)
    model.train()
    torch.manual_seed(0)
    ids = torch.randint(3, config["vocab_size"], (sequences, seq_len))
    return training_step_peak(model, ids, autocast, foreach=optimizer == "adamw_foreach", **extra)


def training_step_peak(model, ids, autocast: bool = True, foreach: bool = False, **forward_kwargs) -> StepPeak:
    """Peak CPU memory of one training step of `model` on `ids` (forward with labels, backward,
    AdamW step over the trainable parameters, zero_grad), after a warm-up step.

    fused is the plan's adamw (in place); on CPU torch's own default is the per-tensor loop, whose
    temporaries are one tensor's size; foreach=True is the multi-tensor path CUDA takes by default."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=foreach)

    def step():
        with _autocast(autocast):
            loss = model(input_ids=ids, labels=ids, **forward_kwargs).loss
        loss.backward()
        del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()

    def without_onednn() -> int:
        with torch.backends.mkldnn.flags(enabled=False):
            return profiled_peak(step)

    return StepPeak(profiled_peak(step), without_onednn)


class StepPeak:
    """One step's peak as this CPU runs it, and, when a check needs it, with oneDNN off.

    On a CPU with native bf16 (AVX512-BF16, AMX) oneDNN's bf16 matmuls allocate reordered copies of
    their operands through the allocator; CUDA's kernels make no such copies, and torch's own CPU
    kernels (oneDNN off) make none either. So the same LoRA step with checkpointing read 1,151,352
    bytes on such a CPU and 1,105,656 with oneDNN off, and which reading a check saw depended on
    the machine CI drew. A plan is held to both: no more than the low tolerance under the lower
    reading, no more than the high tolerance over the higher. The second reading (one more step)
    is taken only when the first alone does not hold, since holding against one reading implies
    holding against the pair."""

    def __init__(self, with_onednn: int, reread_without_onednn):
        self.with_onednn = with_onednn
        self._reread = reread_without_onednn
        self._without = None

    @property
    def without_onednn(self) -> int:
        if self._without is None:
            self._without = self._reread()
        return self._without

    def __repr__(self) -> str:
        return f"StepPeak(with_onednn={self.with_onednn}, without_onednn={self._without if self._without is not None else 'not read'})"

    def errors(self, planned: int) -> tuple[float, float]:
        """(planned - lower reading) / lower, (planned - higher reading) / higher."""
        floor, ceiling = sorted((self.with_onednn, self.without_onednn))
        return (planned - floor) / floor, (planned - ceiling) / ceiling

    def holds(self, planned: int, low: float = -0.05, high: float = 0.10) -> bool:
        error = (planned - self.with_onednn) / self.with_onednn
        if low <= error <= high:
            return True
        over_floor, over_ceiling = self.errors(planned)
        return over_floor >= low and over_ceiling <= high


def profiled_peak(step) -> int:
    """Peak CPU memory while `step()` runs, from PyTorch's memory profiler timeline."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    return timeline_peak(prof)


def timeline_peak(prof) -> int:
    """The peak of a finished profile's CPU memory timeline."""
    import json

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    return max(sum(categories) for categories in sizes)


def predicted_step_peak(spec, method: str, attention: str, checkpointing: bool, batch_size: int, seq_len: int, lora_r: int = 8, trainer: str = "hf", optimizer: str = "adamw",
                        autocast: bool = True):
    """The plan's peak for the same step, without the CUDA-only runtime components."""
    from planner.options import TrainingOptions
    from planner.plan import build_plan

    options = TrainingOptions(
        method=method, weights_dtype="bf16", precision="bf16", attention=attention, gradient_checkpointing=checkpointing,
        batch_size=batch_size, seq_len=seq_len, trainer=trainer, lora_r=lora_r, lora_dropout=0.0, gpu_memory_gib=80, optimizer=optimizer,
        autocast=autocast,
    )
    return step_bytes_and_phase(build_plan(spec, options))


def step_bytes_and_phase(plan) -> tuple[int, str]:
    """A plan's peak without its CUDA-only runtime components (what a CPU step can be held to), and its phase."""
    return sum(c.bytes for c in plan.components if c.family != "runtime"), plan.peak_phase
