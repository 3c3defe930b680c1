"""A memory component: one named term of the peak, with a note on where its number comes from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Component:
    name: str  # family, then an optional detail after a dot: "weights.base"
    bytes: int
    note: str
    # bytes every GPU keeps whole when the rest is sharded (per-tensor optimizer step counters)
    replicated_bytes: int = 0

    @property
    def family(self) -> str:
        return self.name.split(".", 1)[0]

    def to_dict(self) -> dict:
        return {"name": self.name, "bytes": self.bytes, "note": self.note}

    @property
    def outside_allocator(self) -> bool:
        """Held outside PyTorch's caching allocator, so in no max_memory_reserved/allocated figure."""
        return self.name in OUTSIDE_ALLOCATOR


# the CUDA context and library workspaces; NCCL's channel and proxy buffers
OUTSIDE_ALLOCATOR = ("runtime.cuda_context", "sharding.nccl")


def size_text(n: int) -> str:
    """GiB to two places; under a GiB (a small model's merge on the host) in MiB, which 0.02 GiB hides."""
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"
