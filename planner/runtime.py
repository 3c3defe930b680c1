"""Memory outside PyTorch's allocated tensors: the CUDA context and the caching allocator's reserve.

Neither shows in `torch.cuda.max_memory_allocated`, both count against the GPU and decide an
out-of-memory error. The reserve is what the caching allocator holds above what is allocated:
freed blocks it keeps for reuse and cannot hand to a request of another size. It grows with the
short-lived blocks of a step, so it is modelled from them, not as a share of the total:

    reserve = floor + a x (one layer's activations, when checkpointing recomputes each layer)
                    + b x (logits and loss buffers, the largest blocks of a step)

The constants live in calibration.json, written by `python bench/calibrate.py` from measured
runs (bench/results/calibration-runs.jsonl); a plan names the calibration it used.

The band: weights, gradients and optimizer state are exact (held to the byte on CPU) and the CUDA
context is a measured constant, so a plan falls short in its dynamic part: activations, logits,
temporaries, KV cache and the allocator's reserve. The high end is the central figure plus the
dynamic part times the largest under-prediction of the calibration's leave-one-out fits (each run
predicted by a fit that never saw it), relative to that run's dynamic part. The low end is the
central figure less the largest over-prediction, relative to the whole peak (those come from small
runs, where the reserve's floor is a large share of a small dynamic part: scaled to the dynamic
part they would put a large plan's low end at a third of its activations), and never below the
exact part. With n runs, a new run's error falls within the smallest and largest of n
exchangeable ones with probability (n - 1) / (n + 1): 91% for 22 runs.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from planner.components import Component

GIB = 1 << 30
CALIBRATION_FILE = Path(__file__).with_name("calibration.json")
# The families held exact (to the byte, tests/test_static_exact.py): the band leaves them as they are.
STATIC_FAMILIES = ("weights", "gradients", "optimizer_state", "reference_model", "reward_model", "value_model")


@dataclass(frozen=True)
class Calibration:
    name: str
    description: str
    cuda_context_bytes: int
    reserve_floor_bytes: int
    reserve_per_recompute_byte: float
    reserve_per_logits_byte: float
    # the band: low end relative to the whole peak (<= 0), high end relative to the dynamic part
    # (activations, logits, temporaries, KV cache, allocator reserve; >= 0)
    band_low: float = 0.0
    band_high: float = 0.0
    # full fine-tuning's gradients fragment the allocator's pool beside the recomputed layers:
    # its high end adds this share of the gradients too (0 for the simulated band, which sees it)
    band_high_gradients: float = 0.0
    band_runs: int = 0
    # the band of plans whose reserve was simulated (planner/step_trace.py): the same two
    # figures, from the simulation's errors on the measured runs
    simulated_band_low: float = 0.0
    simulated_band_high: float = 0.0
    simulated_band_runs: int = 0

    def reserve_bytes(self, recompute_bytes: int, logits_bytes: int, allocator: str = "default") -> int:
        # expandable segments get the default allocator's reserve until a GPU run measures them:
        # replayed over the team's 15 runs (planner/allocator.py), they reserve within -9% to +4%
        # of what the default allocator does, so planning them lower would risk "fits" for an OOM
        return int(self.reserve_floor_bytes + self.reserve_per_recompute_byte * recompute_bytes + self.reserve_per_logits_byte * logits_bytes)


@lru_cache(maxsize=1)
def calibration() -> Calibration:
    data = json.loads(CALIBRATION_FILE.read_text())
    constants = data["constants"]
    band = data.get("band", {})
    return Calibration(
        name=data["name"],
        description=data["description"],
        cuda_context_bytes=int(constants["cuda_context_bytes"]),
        reserve_floor_bytes=int(constants["reserve_floor_bytes"]),
        reserve_per_recompute_byte=float(constants["reserve_per_recompute_byte"]),
        reserve_per_logits_byte=float(constants["reserve_per_logits_byte"]),
        # a calibration written before bench/calibrate.py fitted a band has none: low = high = central
        band_low=float(band.get("peak_low", 0.0)),
        band_high=float(band.get("dynamic_high", 0.0)),
        band_high_gradients=float(band.get("gradients_high", 0.0)),
        band_runs=int(band.get("runs", 0)),
        simulated_band_low=float(data.get("simulated_band", {}).get("peak_low", 0.0)),
        simulated_band_high=float(data.get("simulated_band", {}).get("dynamic_high", 0.0)),
        simulated_band_runs=int(data.get("simulated_band", {}).get("runs", 0)),
    )


def is_static(component: Component) -> bool:
    """Exact memory (static weights, gradients, optimizer state; the measured CUDA context)."""
    return component.family in STATIC_FAMILIES or component.name == "runtime.cuda_context"


def band_constants(cal: Calibration, simulated: bool) -> tuple[float, float, float]:
    """(low, high, share of the gradients) band constants: the simulated reserve's own, once a
    calibration has them (the simulation sees the gradients' fragmentation: no share of them)."""
    if simulated and cal.simulated_band_runs:
        return cal.simulated_band_low, cal.simulated_band_high, 0.0
    return cal.band_low, cal.band_high, cal.band_high_gradients


def step_gradients_bytes(components) -> int:
    """The step's gradients among these components (pass every phase's): the band's second term."""
    return sum(c.bytes for c in components if c.family == "gradients")


def band_bytes(components, cal: Calibration | None = None, simulated: bool = False, gradients_bytes: int = 0,
               allowance_bytes: int = 0) -> tuple[int, int]:
    """(low, high) of a peak made of these components: the high end adds the calibration's largest
    under-prediction of the dynamic part, for the formula a share of the step's gradients
    (`gradients_bytes`, whichever phase peaks), and `allowance_bytes` for simulated parts no GPU run
    has checked; the low end takes off its largest over-prediction of the whole, down to the exact
    part at most."""
    cal = cal or calibration()
    band_low, band_high, gradients_share = band_constants(cal, simulated)
    total = sum(c.bytes for c in components)
    exact = sum(c.bytes for c in components if is_static(c))
    low = max(min(exact, total), total + math.floor(total * min(0.0, band_low)))
    return low, total + math.ceil((total - exact) * max(0.0, band_high)) + math.ceil(gradients_bytes * max(0.0, gradients_share)) + allowance_bytes


def reserve_inputs(components: list[Component]) -> tuple[int, int]:
    """(one recomputed layer's activations, logits and loss buffers) from a plan's components."""
    recompute = sum(c.bytes for c in components if c.name == "activations.recompute")
    logits = sum(c.bytes for c in components if c.family == "logits" or c.name == "temporary.loss_backward")
    return recompute, logits


def simulated_runtime_components(peak_reserved: int, tensors_at_peak: int, allocations: int, steps: int, cal: Calibration | None = None,
                                 outside_allocator_bytes: int = 0) -> list[Component]:
    """The CUDA context and the reserve that brings the plan's tensors up to the simulated reserved
    peak; `outside_allocator_bytes` of those tensors (paged optimizer state, colocated vLLM's
    reservation) are not in that pool."""
    cal = cal or calibration()
    reserve = max(0, peak_reserved - (tensors_at_peak - outside_allocator_bytes))
    outside = (f"; {outside_allocator_bytes / GIB:.2f} GiB of the planned tensors lies outside the traced pool (a paged optimizer's state "
               "in CUDA managed memory, colocated vLLM's reservation), counted as resident" if outside_allocator_bytes else "")
    return [
        Component("runtime.cuda_context", cal.cuda_context_bytes, f"CUDA context and library workspaces (calibration {cal.name})"),
        Component("runtime.allocator", reserve,
                  f"caching-allocator reserve: PyTorch's allocator replayed over this run's {allocations:,} allocations in {steps} traced steps "
                  f"reserves {peak_reserved / GIB:.2f} GiB at its peak, {reserve / GIB:.2f} GiB above the planned tensors in it{outside}"),
    ]


def runtime_components(recompute_bytes: int, logits_bytes: int, allocator: str = "default", cal: Calibration | None = None) -> list[Component]:
    cal = cal or calibration()
    reserve = cal.reserve_bytes(recompute_bytes, logits_bytes, allocator)
    how = (
        f"{cal.reserve_floor_bytes / GIB:.2f} GiB + {cal.reserve_per_recompute_byte:.2f} x one recomputed layer's activations "
        f"({recompute_bytes / GIB:.2f} GiB) + {cal.reserve_per_logits_byte:.2f} x logits and loss buffers ({logits_bytes / GIB:.2f} GiB)"
    )
    if allocator == "expandable_segments":
        how += (" (with expandable_segments:True planned as the default allocator until measured: replayed over the team's runs, "
                "it reserves about as much)")
    return [
        Component("runtime.cuda_context", cal.cuda_context_bytes, f"CUDA context and library workspaces (calibration {cal.name})"),
        Component("runtime.allocator", reserve, f"caching-allocator reserve above allocated: {how}; calibration {cal.name}"),
    ]
