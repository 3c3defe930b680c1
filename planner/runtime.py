"""Memory outside PyTorch's allocated tensors: the CUDA context and the caching allocator's slack.

Neither shows in `torch.cuda.max_memory_allocated`, both count against the GPU. The constants
are fitted to measured peaks (see `RUNTIME_SOURCE`); refit them when new results land in
bench/results/.
"""

from __future__ import annotations

from planner.components import Component

GIB = 1 << 30

# NVML-used minus torch-reserved was 1.22 GiB in every run of the H100 calibration set
# (torch 2.11 + CUDA 13.0: context, cuBLAS/cuDNN workspaces, NCCL not loaded).
CUDA_CONTEXT_BYTES = int(1.22 * GIB)
# Reserved minus allocated ranged 0.43 to 1.23 GiB in that set; this fraction-plus-floor covers
# every row within 3% below to 7% above NVML (fragmentation follows the number of distinct
# block sizes more than the total, so a floor matters more than the fraction).
ALLOCATOR_FLOOR_BYTES = int(0.5 * GIB)
ALLOCATOR_FRACTION = 0.03
RUNTIME_SOURCE = "shared/calibration/h100-example.md (H100 80GB HBM3, torch 2.11.0+cu130, 2026-11-22)"


def runtime_components(allocated_bytes: int) -> list[Component]:
    slack = ALLOCATOR_FLOOR_BYTES + int(ALLOCATOR_FRACTION * allocated_bytes)
    return [
        Component("runtime.cuda_context", CUDA_CONTEXT_BYTES, f"CUDA context and library workspaces, measured on H100 ({RUNTIME_SOURCE})"),
        Component(
            "runtime.allocator",
            slack,
            f"caching-allocator reserve above allocated: {ALLOCATOR_FLOOR_BYTES / GIB:.1f} GiB + {ALLOCATOR_FRACTION:.0%} of allocated, fitted to the same runs",
        ),
    ]
