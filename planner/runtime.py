"""Memory outside PyTorch's allocated tensors: the CUDA context and the caching allocator's reserve.

Neither shows in `torch.cuda.max_memory_allocated`, both count against the GPU and decide an
out-of-memory error. The reserve is what the caching allocator holds above what is allocated:
freed blocks it keeps for reuse and cannot hand to a request of another size. It grows with the
short-lived blocks of a step, so it is modelled from them, not as a share of the total:

    reserve = floor + a x (one layer's activations, when checkpointing recomputes each layer)
                    + b x (logits and loss buffers, the largest blocks of a step)

The constants live in calibration.json, written by `python bench/calibrate.py` from measured
runs (bench/results/calibration-runs.jsonl); a plan names the calibration it used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from planner.components import Component

GIB = 1 << 30
CALIBRATION_FILE = Path(__file__).with_name("calibration.json")


@dataclass(frozen=True)
class Calibration:
    name: str
    description: str
    cuda_context_bytes: int
    reserve_floor_bytes: int
    reserve_per_recompute_byte: float
    reserve_per_logits_byte: float

    def reserve_bytes(self, recompute_bytes: int, logits_bytes: int, allocator: str = "default") -> int:
        if allocator == "expandable_segments":
            # segments grow in place, so freed blocks of other sizes are not stranded; not yet
            # measured, planned as the floor alone
            return self.reserve_floor_bytes
        return int(self.reserve_floor_bytes + self.reserve_per_recompute_byte * recompute_bytes + self.reserve_per_logits_byte * logits_bytes)


@lru_cache(maxsize=1)
def calibration() -> Calibration:
    data = json.loads(CALIBRATION_FILE.read_text())
    constants = data["constants"]
    return Calibration(
        name=data["name"],
        description=data["description"],
        cuda_context_bytes=int(constants["cuda_context_bytes"]),
        reserve_floor_bytes=int(constants["reserve_floor_bytes"]),
        reserve_per_recompute_byte=float(constants["reserve_per_recompute_byte"]),
        reserve_per_logits_byte=float(constants["reserve_per_logits_byte"]),
    )


def reserve_inputs(components: list[Component]) -> tuple[int, int]:
    """(one recomputed layer's activations, logits and loss buffers) from a plan's components."""
    recompute = sum(c.bytes for c in components if c.name == "activations.recompute")
    logits = sum(c.bytes for c in components if c.family == "logits" or c.name == "temporary.loss_backward")
    return recompute, logits


def runtime_components(recompute_bytes: int, logits_bytes: int, allocator: str = "default", cal: Calibration | None = None) -> list[Component]:
    cal = cal or calibration()
    reserve = cal.reserve_bytes(recompute_bytes, logits_bytes, allocator)
    if allocator == "expandable_segments":
        how = f"with expandable_segments:True: the fitted floor, {reserve / GIB:.2f} GiB (this setting is not yet measured)"
    else:
        how = (
            f"{cal.reserve_floor_bytes / GIB:.2f} GiB + {cal.reserve_per_recompute_byte:.2f} x one recomputed layer's activations "
            f"({recompute_bytes / GIB:.2f} GiB) + {cal.reserve_per_logits_byte:.2f} x logits and loss buffers ({logits_bytes / GIB:.2f} GiB)"
        )
    return [
        Component("runtime.cuda_context", cal.cuda_context_bytes, f"CUDA context and library workspaces (calibration {cal.name})"),
        Component("runtime.allocator", reserve, f"caching-allocator reserve above allocated: {how}; calibration {cal.name}"),
    ]
