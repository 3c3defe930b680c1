"""One training run's GPU allocations, traced on the meta device, and replayed through the allocator.

`simulate_step` builds the model from its config on the meta device (no memory), applies the
method with PEFT, and runs the steps a training run takes (forward with labels, backward, the
optimizer's state on the first step, `zero_grad(set_to_none=True)`) under a dispatch mode that
records every storage an op creates and, through a finalizer, when it dies. The allocation order
is the real one: the same transformers, PEFT and autograd code runs, only without data. The event
list then goes through planner/allocator.py, which gives the peaks of allocated and reserved
memory a CUDA run of the same step would show.

What runs differently on a GPU is stood in for, each in a few lines below:
- attention: CUDA's SDPA runs the flash kernel (an output and an fp32 log-sum-exp per row; its
  backward's fp32 dq accumulator), where meta would run the math fallback;
- autocast: a CUDA autocast does not act on meta tensors, so linear layers and attention cast
  their inputs to the compute dtype here, caching the casts of trainable leaves in the forward;
- dropout: CUDA's fused dropout keeps a 1-byte mask; meta would keep a mask in the input dtype;
- 4-bit bases (QLoRA): each quantized Linear holds bitsandbytes' packed weight and constants,
  is loaded as a 16-bit weight that is quantized and freed, and dequantizes a 16-bit copy for
  its matmul in forward and again in backward;
- the optimizer: fused AdamW's and bitsandbytes' AdamW8bit's states are allocated as they
  allocate them on the first step (their update allocates nothing); foreach AdamW, SGD and
  Adafactor run as themselves, temporaries included;
- TRL's fused LM head: TRL's own autograd function runs, with the kernels CUDA runs in place (the
  Triton folds of each logits tile, cuBLAS's fp32-output addmm) allocating nothing, and autocast
  answered for meta tensors.

Nothing runs that a config names: no remote code, and the config only sizes transformers' own
classes (planner/introspect.py builds them the same way).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import threading
import time
import types
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

from planner import trace_cache, trace_templates
from planner.allocator import AllocatorPeaks, replay, smallest_capacity
from planner.errors import PlanInputError
from planner.options import BITSANDBYTES_OPTIMIZERS, TrainingOptions
from planner.stage_steps import GENERATING_STAGES, TRACED_STAGES, StageRun, fused_outputs, generation_batch, needs_reference_copy

STEPS = 2  # the first allocates the optimizer state; a third repeats the second (148 catalog steps: identical peaks, bench/results/simulated-matrix-2026-11-28.jsonl)
CUBLAS_WORKSPACE_BYTES = 32 << 20  # cuBLAS's workspace on Hopper, taken from the caching allocator
SIMULATED_METHODS = ("full", "lora", "qlora", "dora", "ia3")
SIMULATED_OPTIMIZERS = ("adamw", "adamw_foreach", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd", "adafactor")
EIGHT_BIT_MIN_NUMEL = 4096  # bitsandbytes keeps 32-bit states for smaller tensors
EIGHT_BIT_BLOCK = 256
# bitsandbytes' paged optimizers put the states of a parameter this large in CUDA managed memory,
# outside PyTorch's caching allocator (Optimizer8bit.get_state_buffer); smaller ones stay in it
PAGED_MIN_NUMEL = 100_000


# The stand-ins patch torch.nn.functional for the whole process while a trace runs, and a
# storage's free is recorded when Python collects it, which another thread's work can move:
# a server's planning threads take turns, build and trace alike
_TRACE_LOCK = threading.Lock()
# A trace holds its planning thread for seconds while the others wait their turn: past this many
# traces running or waiting, a plan keeps the formula at once (not memoized: the next ask traces)
# rather than queue, so a server's planning threads are never all waiting on traces
MAX_TRACES_IN_LINE = 3
_in_line = 0
_in_line_lock = threading.Lock()

class SimulationUnsupported(Exception):
    """The options ask for something the trace does not stand in for; the reason says what."""


class TracesBusy(Exception):
    """Too many traces are running or waiting in this process (MAX_TRACES_IN_LINE)."""


@dataclass(frozen=True)
class SimulatedStep:
    peaks: AllocatorPeaks
    steps: int
    seconds: float
    # paged optimizer states: resident GPU memory the caching allocator never sees
    outside_allocator_bytes: int = 0
    # the same events under the default allocator, for a plan with expandable segments: until a GPU
    # run measures them, the band's high end allows for whichever of the two reserves more
    default_peaks: AllocatorPeaks | None = None
    # the same events with the paged states in the pool, as if paging were no better than the
    # non-paged optimizer: until a GPU run measures it, the band's high end allows for that
    in_pool_peaks: AllocatorPeaks | None = None
    # read from the disk cache (planner/trace_cache.py), not traced in this process
    cached: bool = False
    # replayed from a shipped trace template (planner/trace_templates.py): the events of this very
    # step, recorded for these library versions, without tracing
    from_template: bool = False
    # the libraries a template was recorded with ("torch 2.13.0, transformers 5.24.0, ..."), said in the plan
    recorded_with: str = ""

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"cached": False, "from_template": False, "recorded_with": ""}

    @classmethod
    def from_json(cls, data: dict) -> SimulatedStep:
        def peaks(value):
            return AllocatorPeaks(**value) if value is not None else None

        return cls(peaks(data["peaks"]), data["steps"], data["seconds"], data["outside_allocator_bytes"],
                   peaks(data["default_peaks"]), peaks(data["in_pool_peaks"]), cached=True)


def unsupported_reason(options: TrainingOptions) -> str | None:
    """Why this plan's step cannot be traced, or None."""
    if options.stage not in TRACED_STAGES:
        return f"stage {options.stage}: the traced stages are {', '.join(TRACED_STAGES)}; this one is planned from the formula"
    if options.stage != "sft" and options.effective_loss_implementation != "trl_fused":
        return f"stage {options.stage} runs in TRL's trainer: traced with trainer trl"
    if options.num_gpus != 1 or options.offload != "none":
        return "one GPU without offload only"
    if options.method not in SIMULATED_METHODS:
        return f"method {options.method}: traced methods are {', '.join(SIMULATED_METHODS)}"
    if options.optimizer not in SIMULATED_OPTIMIZERS:
        return f"optimizer {options.optimizer}: traced optimizers are {', '.join(SIMULATED_OPTIMIZERS)}"
    if options.effective_quantization not in ("none", "nf4", "fp4") or (options.effective_quantization != "none" and options.method != "qlora"):
        return "quantization other than QLoRA's 4-bit base"
    if options.batch_layout == "padding_free" and options.attention == "flash":
        return ("padding-free batches under flash attention: flash-attn's varlen kernels do not run on the meta device (nor on CPU); "
                "planned from the formula (planner/activations.py)")
    if options.attention not in ("sdpa", "eager"):
        return f"attention {options.attention}"
    loss = options.effective_loss_implementation
    if loss in ("liger", "cut_cross_entropy"):
        kernel = "Liger's fused linear cross-entropy" if loss == "liger" else "Cut Cross-Entropy"
        return (f"loss_implementation {loss}: {kernel} runs Triton kernels, which do not run on the meta device; "
                "its buffers are planned from its source (planner/logits.py)")
    if options.effective_use_reentrant:
        return ("use_reentrant: the trace checkpoints non-reentrant, as the HF Trainer and TRL do by default; planned from the "
                "formula (planner/activations.py)")
    if options.trainable_token_indices:
        return ("trainable_token_indices: the trace builds PEFT's adapters without its trainable tokens yet; planned from the formula "
                "(planner/trainable.py, measured against PEFT on CPU)")
    missing = [name for name in ("torch", "transformers", "peft", *(("trl",) if loss == "trl_fused" else ())) if not _installed(name)]
    if missing:
        extra = "launch" if "trl" in missing else "introspect"
        return f"{', '.join(missing)} not installed here (pip install 'vramplan[{extra}]')"
    return None


def model_unsupported_reason(spec) -> str | None:
    """Why this model's step cannot be traced whatever the options, or None."""
    if spec.num_experts:
        # on the meta device there are no router scores to pick experts with (tried: the step
        # fails after seconds, in the experts' index ops)
        return "a mixture-of-experts model: which experts take each token depends on real router scores, which the meta device has none of"
    return None


@functools.cache
def _installed(package: str) -> bool:
    # found, not imported: a plan without the trace must not pay for importing torch
    return importlib.util.find_spec(package) is not None


class _Tracer:
    """A dispatch mode: every storage an op creates, and when it dies."""

    def __init__(self, masked: bool = False):
        from torch.utils._python_dispatch import TorchDispatchMode

        # a padded or packed batch: transformers' data-dependent checks (is the mask all ones? is
        # there one sequence per row?) answer no, as the real batch would
        self.masked = masked

        tracer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
                return tracer.dispatch(func, args, kwargs or {})

        self.mode = Mode()
        self.events: list[tuple] = []
        self._handles: dict[int, int] = {}
        self._next = 0

    def _died(self, cdata: int, handle: int) -> None:
        self.events.append(("free", handle))
        if self._handles.get(cdata) == handle:
            del self._handles[cdata]

    def record(self, tensor) -> None:
        # A storage's PyObject is kept alive with its StorageImpl, so the finalizer runs when the
        # storage really dies (autograd's saved tensors included), not when a Python name goes.
        if tensor.device.type != "meta":
            return  # a CPU scalar (an optimizer's step count, a Python number made a tensor)
        storage = tensor.untyped_storage()
        cdata = storage._cdata
        if cdata in self._handles:
            return
        self._next += 1
        self._handles[cdata] = self._next
        self.events.append(("alloc", self._next, storage.nbytes()))
        weakref.finalize(storage, self._died, cdata, self._next)

    def handle_of(self, tensor) -> int:
        """The event handle of a live recorded tensor's storage."""
        return self._handles[tensor.untyped_storage()._cdata]

    def dispatch(self, func, args, kwargs):
        import torch
        from torch.utils._pytree import tree_flatten

        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            # data-dependent checks (transformers' packed-sequence test): no padding, no packing
            return (not self.masked) if args[0].dtype == torch.bool else 0
        out = func(*args, **kwargs)
        for leaf in tree_flatten(out)[0]:
            if isinstance(leaf, torch.Tensor):
                self.record(leaf)
        return out


def _flash_attention():
    import torch

    class FlashAttention(torch.autograd.Function):
        """The allocations of CUDA's flash SDPA kernel (causal, no mask)."""

        @staticmethod
        def forward(ctx, q, k, v):
            batch, heads, seq, dim = q.shape
            out = torch.empty(batch, seq, heads, dim, dtype=q.dtype, device=q.device).transpose(1, 2)
            log_sum_exp = torch.empty(batch, heads, seq, dtype=torch.float32, device=q.device)
            ctx.save_for_backward(q, k, v, out, log_sum_exp)
            return out

        @staticmethod
        def backward(ctx, grad):
            q, k, _v, _, _ = ctx.saved_tensors
            batch, heads, seq, dim = q.shape
            kv_heads = k.shape[1]
            padded = -(-seq // 128) * 128
            # FlashAttention-2's mha_bwd, in its order: the gradients, then its workspaces
            dq = torch.empty(batch, seq, heads, dim, dtype=q.dtype, device=q.device)
            dk = torch.empty(batch, seq, kv_heads, dim, dtype=q.dtype, device=q.device)
            dv = torch.empty_like(dk)
            softmax_d = torch.empty(batch, heads, padded, dtype=torch.float32, device=q.device)
            dq_accum = torch.empty(batch, padded, heads, -(-dim // 32) * 32, dtype=torch.float32, device=q.device)
            if kv_heads != heads:  # grouped queries: per-query-head dk/dv, then summed into dk/dv
                expanded = (torch.empty(batch, seq, heads, dim, dtype=q.dtype, device=q.device), torch.empty(batch, seq, heads, dim, dtype=q.dtype, device=q.device))
                del expanded
            del softmax_d, dq_accum
            return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)

    return FlashAttention


def _masked_attention():
    import torch

    class MaskedAttention(torch.autograd.Function):
        """SDPA with a boolean mask on CUDA, from aten's source (not measured on a GPU): the mask
        converted to the compute dtype, which the memory-efficient kernel keeps for backward with
        its output and fp32 log-sum-exp (rows rounded up to 32); keys and values arrive expanded to
        every head (transformers' repeat_kv), so their gradients are per query head."""

        @staticmethod
        def forward(ctx, q, k, v, mask):
            batch, heads, seq, dim = q.shape
            bias = torch.empty(mask.shape[0], 1, mask.shape[-2], -(-mask.shape[-1] // 16) * 16, dtype=q.dtype, device=q.device)
            out = torch.empty(batch, seq, heads, dim, dtype=q.dtype, device=q.device).transpose(1, 2)
            log_sum_exp = torch.empty(batch, heads, -(-seq // 32) * 32, dtype=torch.float32, device=q.device)
            ctx.save_for_backward(q, k, v, out, log_sum_exp, bias)
            return out

        @staticmethod
        def backward(ctx, grad):
            q, k, v, _, _, _ = ctx.saved_tensors
            batch, heads, seq, dim = q.shape
            grads = torch.empty(3, batch, seq, heads, dim, dtype=q.dtype, device=q.device)
            delta = torch.empty(batch, heads, -(-seq // 32) * 32, dtype=torch.float32, device=q.device)
            del delta
            return grads[0].transpose(1, 2), grads[1].transpose(1, 2), grads[2].transpose(1, 2), None

    return MaskedAttention


def _in_place(*args, **kwargs) -> None:
    """A kernel that works in place on CUDA: it allocates nothing."""


class _AutocastOnMeta:
    """The `torch` TRL's fused head sees during a trace: CUDA's autocast does not act on meta
    tensors, so it answers for the run's autocast (TRL asks it for the dtype of its tiles)."""

    def __init__(self, autocast: bool, compute_dtype):
        import torch

        self._torch, self._autocast, self._dtype = torch, autocast, compute_dtype

    def __getattr__(self, name):
        return getattr(self._torch, name)

    def is_autocast_enabled(self, *args):
        return self._autocast if args and args[0] == "meta" else self._torch.is_autocast_enabled(*args)

    def get_autocast_dtype(self, device_type):
        return self._dtype if device_type == "meta" else self._torch.get_autocast_dtype(device_type)


class _CudaStandIns:
    """Autocast, fused dropout and flash attention as a CUDA run has them, patched into
    torch.nn.functional for the trace: checkpointing recomputes layers on autograd's thread, where
    a thread-local mode would not reach."""

    def __init__(self, compute_dtype, autocast: bool, trl: bool, layout: str = "fixed"):
        self.compute_dtype, self.autocast, self.trl = compute_dtype, autocast, trl
        self.layout = layout  # a padded or padding-free batch's mask goes to the masked kernel's stand-in
        self.cache: dict = {}
        self.caching = True
        self.flash = _flash_attention()
        self.masked = _masked_attention()

    def cast(self, tensor):
        if tensor is None or not tensor.is_floating_point() or tensor.dtype == self.compute_dtype or not self.autocast:
            return tensor
        if tensor.is_leaf and tensor.requires_grad and self.caching and self._grad_enabled():
            # autocast caches the casts of trainable leaves until the forward's context exits; a cast
            # made under no_grad (KTO's KL forward) is not kept for the graph's forward
            if tensor not in self.cache:
                self.cache[tensor] = tensor.to(self.compute_dtype)
            return self.cache[tensor]
        return tensor.to(self.compute_dtype)

    @contextmanager
    def without_autocast(self):
        """The model as it runs outside autocast: TRL's `generate` (PEFT's fp32 adapters then give
        fp32 outputs before their cast back)."""
        autocast, self.autocast = self.autocast, False
        try:
            yield
        finally:
            self.autocast = autocast

    def __enter__(self):
        import torch
        import torch.nn.functional as F

        self.saved = (F.linear, F.dropout, F.scaled_dot_product_attention, torch.matmul)
        self._grad_enabled = torch.is_grad_enabled  # looked up once: cast runs for every linear and matmul
        linear, matmul = F.linear, torch.matmul

        def cast_linear(x, weight, bias=None):
            return linear(self.cast(x), self.cast(weight), self.cast(bias))

        def cast_matmul(a, b):
            return matmul(self.cast(a), self.cast(b))

        def fused_dropout(x, p=0.5, training=True, inplace=False):
            return torch.native_dropout(x, p, True)[0] if training and 0 < p < 1 else x

        def flash_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
            if attn_mask is not None and self.layout != "fixed":
                return self.masked.apply(self.cast(q), self.cast(k), self.cast(v), attn_mask)
            if attn_mask is not None:
                # the trace has no padding: a mask comes from a sliding window no longer than the
                # sequence. SDPA then runs a masked kernel (memory-efficient or cuDNN on CUDA, which
                # of them not known here) and keeps a converted mask for backward: unmeasured
                raise SimulationUnsupported("an attention mask, from a sliding window no longer than the sequence: SDPA's masked kernels "
                                            "have no stand-in yet (not measured on a GPU)")
            return self.flash.apply(self.cast(q), self.cast(k), self.cast(v))

        F.linear, F.dropout, F.scaled_dot_product_attention, torch.matmul = cast_linear, fused_dropout, flash_sdpa, cast_matmul
        import torch.fx.experimental._config as fx_config

        # a boolean mask picks every position on meta (TRL's compact path; every label here is valid)
        self.saved_nonzero = getattr(fx_config, "meta_nonzero_assume_all_nonzero", False)
        fx_config.meta_nonzero_assume_all_nonzero = True
        if self.trl:
            import trl.kernels.chunked_logprob as chunked
            import trl.trainer.utils as trl_utils

            # TRL's own ChunkedLogProbFunction runs, its buffers and casts allocated by its own code;
            # what CUDA does in place allocates nothing: the Triton folds of each logits tile into
            # the running statistics, and cuBLAS's addmm with fp32 output into the gradients
            self.saved_trl = (trl_utils._use_triton, chunked.torch, chunked._forward_tile, chunked._backward_tile, chunked._addmm_fp32)
            trl_utils._use_triton = lambda device: True  # CUDA's compact path: only labelled positions are scored
            chunked.torch = _AutocastOnMeta(self.autocast, self.compute_dtype)
            chunked._forward_tile = chunked._backward_tile = chunked._addmm_fp32 = _in_place
        return self

    def __exit__(self, *exc):
        import torch
        import torch.fx.experimental._config as fx_config
        import torch.nn.functional as F

        F.linear, F.dropout, F.scaled_dot_product_attention, torch.matmul = self.saved
        fx_config.meta_nonzero_assume_all_nonzero = self.saved_nonzero
        if self.trl:
            import trl.kernels.chunked_logprob as chunked
            import trl.trainer.utils as trl_utils

            trl_utils._use_triton, chunked.torch, chunked._forward_tile, chunked._backward_tile, chunked._addmm_fp32 = self.saved_trl


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _four_bit(tracer: _Tracer, modules: list, compute_dtype) -> None:
    """bitsandbytes' 4-bit Linear layers, by their allocations (double quantization)."""
    import torch
    import torch.nn.functional as F

    class Dequantized(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, packed, module):
            ctx.module = module
            return F.linear(x, module.dequantize())

        @staticmethod
        def backward(ctx, grad):
            return grad @ ctx.module.dequantize(), None, None

    def dequantize(self):
        absmax = torch.empty(self.quant_constants[0].numel(), dtype=torch.float32, device="meta")
        weight = torch.empty(self.out_features, self.in_features, dtype=compute_dtype, device="meta")
        del absmax
        return weight

    def forward(self, x):
        # Linear4bit.forward: the input cast to the compute dtype, the output back to the input's
        # (fp32 after prepare_model_for_kbit_training); no copy when they agree
        return Dequantized.apply(x.to(compute_dtype), self.weight, self).to(x.dtype)

    for module in modules:
        numel = module.weight.numel()
        # loaded in 16 bit, quantized on the GPU, the 16-bit copy freed
        loaded = torch.empty(numel, dtype=compute_dtype, device="meta")
        tracer.record(loaded)
        packed = torch.empty(numel // 2, dtype=torch.uint8, device="meta")
        constants = (
            torch.empty(numel // 64, dtype=torch.uint8, device="meta"),
            torch.empty(-(-numel // 64 // 256), dtype=torch.float32, device="meta"),
            torch.empty(256, dtype=torch.float32, device="meta"),
        )
        for tensor in (packed, *constants):
            tracer.record(tensor)
        del loaded
        module.weight = torch.nn.Parameter(packed, requires_grad=False)
        module.quant_constants = constants
        module.dequantize = types.MethodType(dequantize, module)
        module.forward = types.MethodType(forward, module)


def _real_optimizer(options: TrainingOptions, trainable: list):
    """The optimizers that run on meta tensors as they are (foreach kernels fall back to per-tensor
    ops with the same outputs); fused AdamW and bitsandbytes' are stood in for by their states."""
    import torch

    if options.optimizer == "adamw_foreach":
        return torch.optim.AdamW(trainable, lr=1e-5, foreach=True)
    if options.optimizer == "sgd":
        return torch.optim.SGD(trainable, lr=1e-5, momentum=options.sgd_momentum, foreach=True)
    if options.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(trainable, lr=1e-5, scale_parameter=False, relative_step=False)
    return None


def _optimizer_state(param, optimizer: str, shared: dict) -> tuple:
    """A bitsandbytes or fused AdamW state as its first step allocates it; a paged optimizer's
    large states are listed in shared["paged"], which the replay leaves out of the pool."""
    import torch

    def state_buffers(dtype):
        buffers = (torch.zeros(param.shape, dtype=dtype, device="meta"), torch.zeros(param.shape, dtype=dtype, device="meta"))
        if optimizer.startswith("paged_") and param.numel() >= PAGED_MIN_NUMEL:
            shared.setdefault("paged", []).extend(buffers)
        return buffers

    if optimizer in ("adamw_8bit", "paged_adamw_8bit") and param.numel() >= EIGHT_BIT_MIN_NUMEL:
        if "quantile_maps" not in shared:
            shared["quantile_maps"] = (torch.empty(256, device="meta"), torch.empty(256, device="meta"))
        blocks = -(-param.numel() // EIGHT_BIT_BLOCK)
        return (*state_buffers(torch.uint8), torch.zeros(blocks, device="meta"), torch.zeros(blocks, device="meta"))
    if optimizer in BITSANDBYTES_OPTIMIZERS:
        return state_buffers(torch.float32)
    # fused AdamW: a step counter on the device, then exp_avg and exp_avg_sq per parameter
    return (torch.zeros((), dtype=torch.float32, device="meta"), torch.zeros_like(param), torch.zeros_like(param))


def _build(config: dict, options: TrainingOptions, tracer: _Tracer):
    import torch

    from planner.introspect import (
        _load_transformers,
        bitsandbytes_linears,
        build_config,
    )

    _load_transformers()
    from transformers import AutoModelForCausalLM

    hf_config = build_config(config)
    hf_config.use_cache = False
    weights_dtype = torch_dtype(options.effective_weights_dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=weights_dtype, attn_implementation=options.attention, trust_remote_code=False)
    if options.effective_loss_implementation == "trl_fused":
        try:
            from trl.trainer.utils import add_fused_lm_head
        except ImportError:
            raise SimulationUnsupported("trainer trl: TRL is not installed here") from None
        add_fused_lm_head(model, outputs=fused_outputs(options.stage))  # before PEFT, as TRL's trainers add it
    method = options.method
    # which Linear layers bitsandbytes would quantize, named as in the model it loads (before PEFT)
    quantized = bitsandbytes_linears(model) if method == "qlora" else []
    if options.kbit_prepared:
        # prepare_model_for_kbit_training, before PEFT: every 16-bit parameter that is not a 4-bit
        # weight to fp32 (the quantized weights here are still their 16-bit stand-ins)
        quantized_weights = {id(module.weight) for module in quantized}
        for param in model.parameters():
            if id(param) not in quantized_weights and param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.to(torch.float32)
    if method != "full":
        from peft import IA3Config, LoraConfig, get_peft_model

        # whole modules trained through PEFT's copies, and LoraConfig's tying of a tied model's two
        saved = {"modules_to_save": list(options.modules_to_save)} if options.modules_to_save else {}
        if method == "ia3":
            # the targets the plan counts (planner/trainable.py): PEFT's defaults unless named
            peft_config = IA3Config(target_modules=None if options.lora_targets == "all-linear" else options.lora_targets,
                                    feedforward_modules=options.feedforward_modules, task_type="CAUSAL_LM", **saved)
        else:
            tying = {"ensure_weight_tying": True} if options.ensure_weight_tying else {}
            peft_config = LoraConfig(r=options.lora_r, lora_alpha=options.effective_lora_alpha, target_modules=options.lora_targets,
                                     lora_dropout=options.lora_dropout, use_dora=method == "dora", task_type="CAUSAL_LM", **saved, **tying)
        model = get_peft_model(model, peft_config)
    if options.peft_module_casting_to_bf16:
        # TRL's peft_module_casting_to_bf16 after PEFT: norms stay fp32, the embeddings and lm_head
        # go back to bf16 (by module name, as TRL picks them)
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if ("norm" not in name and any(part in name for part in ("lm_head", "embed_tokens", "wte", "wpe"))
                    and isinstance(weight, torch.nn.Parameter) and weight.dtype == torch.float32):
                module.to(torch.bfloat16)
    if options.gradient_checkpointing:
        # the new name where transformers has it (the old one warns on the CLI's stderr)
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method != "full":
            model.enable_input_require_grads()
    model.train()
    quantized_weights = {id(module.weight) for module in quantized}
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in quantized_weights:
            tracer.record(tensor)
    _four_bit(tracer, quantized, torch_dtype(options.precision))
    return model


def _build_reference(config: dict, options: TrainingOptions, tracer: _Tracer):
    """The frozen reference copy TRL loads like the policy (same class and dtype), in eval mode,
    with the fused head its trainer adds (log-probs only)."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from planner.introspect import build_config

    hf_config = build_config(config)
    hf_config.use_cache = False
    with torch.device("meta"):
        reference = AutoModelForCausalLM.from_config(hf_config, dtype=torch_dtype(options.effective_weights_dtype),
                                                     attn_implementation=options.attention, trust_remote_code=False)
    reference.requires_grad_(False)
    reference.eval()
    add_fused_lm_head(reference)
    for tensor in [*reference.parameters(), *reference.buffers()]:
        tracer.record(tensor)
    return reference


def simulate_step(config: dict, options: TrainingOptions, steps: int = STEPS) -> SimulatedStep:
    """The allocator's peaks over `steps` training steps of this plan's run."""
    global _in_line
    reason = unsupported_reason(options)
    if reason is not None:
        raise SimulationUnsupported(reason)
    with _in_line_lock:
        if _in_line >= MAX_TRACES_IN_LINE:
            raise TracesBusy(f"{_in_line} other plans are being traced here: the formula's reserve for now; ask again in a few seconds")
        _in_line += 1
    try:
        with _TRACE_LOCK, warnings.catch_warnings():
            # transformers 5 deprecates names PEFT and TRL still read (is_gradient_checkpointing):
            # each plan would print their FutureWarning on the CLI's stderr
            warnings.filterwarnings("ignore", message=".*deprecated and will be removed in v6", category=FutureWarning)
            return _simulate(config, options, steps)
    finally:
        with _in_line_lock:
            _in_line -= 1


def _simulate(config: dict, options: TrainingOptions, steps: int) -> SimulatedStep:
    started = time.perf_counter()
    traced = traced_events(config, options, steps)
    return step_from_events(traced, options, steps, time.perf_counter() - started)


@dataclass(frozen=True)
class TracedEvents:
    """What a trace recorded: every storage's allocation and free, in program order, and which of
    them a paged optimizer keeps in CUDA managed memory instead of the pool."""

    events: list
    paged_handles: frozenset
    outside_allocator_bytes: int


def step_from_events(traced: TracedEvents, options: TrainingOptions, steps: int, seconds: float, **extra) -> SimulatedStep:
    """The allocator's peaks over a traced step's events (planner/trace_templates.py replays a
    shipped template's events through the same function)."""
    paged = traced.paged_handles
    events = [event for event in traced.events if event[1] not in paged] if paged else traced.events
    peaks = replay(events, options.allocator)
    peaks = dataclasses.replace(peaks, smallest_capacity=smallest_capacity(events, options.allocator, peaks))
    return SimulatedStep(
        peaks, steps, seconds,
        outside_allocator_bytes=traced.outside_allocator_bytes,
        default_peaks=replay(events, "default") if options.allocator != "default" else None,
        in_pool_peaks=replay(traced.events, options.allocator) if paged else None,
        **extra,
    )


def traced_events(config: dict, options: TrainingOptions, steps: int = STEPS) -> TracedEvents:
    """The event list of `steps` training steps of this plan's run (the caller holds _TRACE_LOCK)."""
    import torch

    # GRPO's and RLOO's prompts are padded on the left and their completions on the right: always a mask
    generating = options.stage in GENERATING_STAGES
    tracer = _Tracer(masked=options.batch_layout != "fixed" or generating)
    try:
        model = _build(config, options, tracer)
        reference = _build_reference(config, options, tracer) if needs_reference_copy(options) else None
    except (SimulationUnsupported, PlanInputError):
        raise
    except Exception as exc:  # noqa: BLE001 - a model the trace cannot build is reported, not raised
        raise SimulationUnsupported(f"the model could not be built for the trace: {str(exc)[:200]}") from None
    trainable = [p for p in model.parameters() if p.requires_grad]
    loss_path = options.effective_loss_implementation
    layout = "padded" if generating else options.batch_layout
    stand_ins = _CudaStandIns(torch_dtype(options.precision), options.effective_autocast, loss_path == "trl_fused", layout)
    state: dict = {}
    optimizer = _real_optimizer(options, trainable)
    # with accumulation the second micro-batch runs beside the first's gradients; a third repeats it
    micro_batches = min(options.gradient_accumulation_steps, 2)
    try:
        with tracer.mode, stand_ins:
            workspace = torch.empty(CUBLAS_WORKSPACE_BYTES, dtype=torch.uint8, device="meta")
            ids, batch = _traced_batch(options)
            tracer.record(ids)
            run = StageRun(model, options, ids, batch, loss_path, reference=reference, prompts=_traced_prompts(options),
                           without_autocast=stand_ins.without_autocast)
            for _ in range(steps):
                for _ in range(micro_batches):
                    stand_ins.caching = False
                    run.generate_if_due()
                    stand_ins.caching = True
                    loss = run.micro_batch()
                    stand_ins.cache.clear()
                    stand_ins.caching = False
                    loss.backward()
                    del loss
                if optimizer is not None:
                    optimizer.step()
                else:
                    for param in trainable:
                        if param.grad is not None and param not in state:
                            state[param] = _optimizer_state(param, options.optimizer, state)
                for param in trainable:
                    param.grad = None
            del workspace
    except SimulationUnsupported:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. a model whose forward needs real data (MoE routing)
        raise SimulationUnsupported(f"the step could not be traced: {str(exc)[:200]}") from None
    # a paged optimizer's large states live in CUDA managed memory: not in the pool
    paged = frozenset(tracer.handle_of(buffer) for buffer in state.get("paged", ()))
    # a copy: the model's storages die after this returns, and their finalizers append to tracer.events
    return TracedEvents(list(tracer.events), paged, sum(buffer.untyped_storage().nbytes() for buffer in state.get("paged", ())))


def _traced_batch(options: TrainingOptions):
    """The token ids and what the collator adds (TRL 1.16's DataCollatorForLanguageModeling):
    fixed-length rows alone (an all-ones mask is dropped by transformers); padded rows with their
    attention mask; padding-free, one flattened row with position_ids restarting per sequence."""
    import torch

    layout = options.batch_layout
    if options.stage == "dpo":
        # DataCollatorForPreference: the chosen rows, then the rejected, padded to one length
        ids = torch.zeros(2 * options.batch_size, options.seq_len, dtype=torch.long, device="meta")
        extra = {"attention_mask": torch.ones_like(ids)} if layout == "padded" else {}
        return ids, extra
    if layout == "padding_free":
        ids = torch.zeros(1, options.batch_size * options.seq_len, dtype=torch.long, device="meta")
        positions = torch.arange(options.seq_len, device="meta").repeat(options.batch_size)[None]
        extra = {"position_ids": positions}
    else:
        ids = torch.zeros(options.batch_size, options.seq_len, dtype=torch.long, device="meta")
        extra = {"attention_mask": torch.ones(options.batch_size, options.seq_len, dtype=torch.long, device="meta")} if layout == "padded" else {}
    return ids, extra


def _traced_prompts(options: TrainingOptions):
    """GRPO's and RLOO's generation batch: prompts (left-padded to seq_len) and their mask; None otherwise."""
    import torch

    if options.stage not in GENERATING_STAGES or options.use_vllm:
        return None
    prompts = torch.zeros(generation_batch(options), options.seq_len, dtype=torch.long, device="meta")
    return prompts, torch.ones_like(prompts)


def _config_for(spec) -> dict:
    """The catalog config a catalog model's spec was built from. Anything else is traced only from
    the config its caller passes (the CLI's config file): a spec's name is the user's to choose (a
    pasted config may call itself a catalog id or a path on the server), so it is never looked up."""
    import json

    from planner.catalog import CONFIGS_DIR, catalog_ids, file_stem, load_catalog_spec

    catalog_id = catalog_ids().get(spec.name.lower())
    if catalog_id is None or load_catalog_spec(catalog_id) != spec:
        raise SimulationUnsupported("only a catalog model or a config file given to the CLI is traced (a pasted config is not kept)")
    return json.loads((CONFIGS_DIR / f"{file_stem(catalog_id)}.json").read_text())


def simulated_for(spec, options: TrainingOptions, config: dict | None = None, tracer=None) -> SimulatedStep | str:
    """The simulation of this plan's run, or why there is none. Memoized on the spec: a page
    re-plans the same options for its charts and exports. `tracer(config, options)` traces in
    place of simulate_step (the server traces a pasted config in its build worker)."""

    refused = model_unsupported_reason(spec)
    if refused is not None:
        return refused

    def compute():
        try:
            traced = _config_to_trace(spec, config)
            if tracer is not None:  # a pasted config, traced in the server's build worker: kept in memory only
                return tracer(traced, options)
            return _traced_or_cached(traced, options)
        except SimulationUnsupported as exc:
            return str(exc)

    try:
        return spec.memoized(_simulation_key(options, config), compute)
    except TracesBusy as exc:
        return str(exc)


def _traced_or_cached(config: dict, options: TrainingOptions) -> SimulatedStep:
    key = trace_cache.trace_key(config, _traced_options(options))
    found = trace_cache.load(key)
    if found is not None:
        try:
            return SimulatedStep.from_json(found)
        except (KeyError, TypeError):
            pass  # an entry of another shape: trace again
    templated = from_template(config, options)
    if templated is not None:
        return templated
    step = simulate_step(config, options)
    trace_cache.store(key, step.to_json())
    return step


def template_options(options: TrainingOptions) -> dict:
    """What keys this step's shipped template: the traced options less the batch size and length."""
    import json

    return trace_templates.step_options(json.loads(_traced_options(options)))


def from_template(config: dict, options: TrainingOptions) -> SimulatedStep | None:
    """This step's simulation replayed from a shipped trace template, or None where none holds."""
    template = _template(config, options)
    if template is None:
        return None
    started = time.perf_counter()
    events = template.events_for(options.batch_size, options.seq_len)
    return step_from_events(TracedEvents(events, frozenset(), 0), options, STEPS, time.perf_counter() - started,
                            from_template=True, recorded_with=template.recorded_with)


def _traced_options(options: TrainingOptions) -> str:
    # the GPU and the headroom do not change the step: a cheapest-GPU search traces it once; nor
    # does accumulation past two micro-batches (the trace runs two)
    accumulating = options.model_copy(update={"gradient_accumulation_steps": min(options.gradient_accumulation_steps, 2)})
    return accumulating.model_dump_json(exclude={"gpu", "gpu_memory_gib", "headroom"})


def _simulation_key(options: TrainingOptions, config: dict | None) -> tuple:
    return ("simulated_step", _traced_options(options), repr(sorted(config.items())) if config else None)


def trace_pending(spec, options: TrainingOptions, config: dict | None = None) -> bool:
    """simulated_for would take a second or more now: not memoized, not refused, not in the disk
    cache, and either traced (seconds) or replayed from a template of a large model (a 70B
    model's: about a second, its least pool searched over 130,000 events)."""
    if not options.simulate_allocator or simulation_memoized(spec, options, config):
        return False
    try:
        traced = _config_to_trace(spec, config)
    except SimulationUnsupported:
        return False
    if trace_cache.load(trace_cache.trace_key(traced, _traced_options(options))) is not None:
        return False
    template = _template(traced, options)
    return template is None or template.slow_to_replay


def template_pending(spec, options: TrainingOptions, config: dict | None = None):
    """The shipped template simulated_for would replay (planner/trace_templates.Template), or None."""
    try:
        traced = _config_to_trace(spec, config)
    except SimulationUnsupported:
        return None
    return _template(traced, options)


def _template(config: dict, options: TrainingOptions):
    return trace_templates.find(config, template_options(options), options.batch_size, options.seq_len)


def _config_to_trace(spec, config: dict | None) -> dict:
    """The given config, or the catalog's for a catalog spec, less what only names the
    checkpoint's classes and dtype (the trace builds its own)."""
    found = config if config is not None else _config_for(spec)
    return {k: v for k, v in found.items() if k not in ("architectures", "torch_dtype", "dtype", "auto_map")}


def simulation_memoized(spec, options: TrainingOptions, config: dict | None = None) -> bool:
    """simulated_for returns at once: the trace was memoized, or is refused before it starts."""
    return (model_unsupported_reason(spec) is not None or unsupported_reason(options) is not None
            or spec.is_memoized(_simulation_key(options, config)))
