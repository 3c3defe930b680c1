"""The GPU table and a forgiving name lookup ("4090", "RTX 4000 Ada", "a100 80gb")."""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

from planner.errors import PlanInputError

DATA = Path(__file__).with_name("gpus.json")
MIB = 1 << 20


@dataclass(frozen=True)
class GPU:
    name: str  # as the driver reports it (NVML's device name)
    aliases: tuple[str, ...]
    memory_mib: int  # as the driver reports it, not the marketing GB
    compute_capability: str | None  # CUDA compute capability; None for AMD
    bf16: bool
    fp8: bool
    vendor: str = "nvidia"
    segment: str = ""
    arch: str | None = None
    bf16_tflops_dense: float | None = None  # dense tensor-core TFLOP/s (fp16 where there is no bf16)
    memory_bandwidth_gbs: float | None = None
    price_per_hour_usd: float | None = None
    memory_measured: bool = False  # memory_mib read from real driver output, not derived

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "vendor": self.vendor,
            "segment": self.segment,
            "memory_mib": self.memory_mib,
            "memory_bytes": self.memory_bytes,
            "compute_capability": self.compute_capability,
            "arch": self.arch,
            "bf16": self.bf16,
            "fp8": self.fp8,
            "bf16_tflops_dense": self.bf16_tflops_dense,
            "memory_bandwidth_gbs": self.memory_bandwidth_gbs,
            "price_per_hour_usd": self.price_per_hour_usd,
            "aliases": list(self.aliases),
        }


_FIELDS = {f.name for f in fields(GPU)}


@lru_cache(maxsize=1)
def all_gpus() -> tuple[GPU, ...]:
    """The catalog; rows may carry sources and notes for reviewers, which the planner ignores."""
    rows = json.loads(DATA.read_text())["gpus"]
    return tuple(GPU(**{k: v for k, v in {**row, "aliases": tuple(row["aliases"])}.items() if k in _FIELDS}) for row in rows)


def _norm(text: str) -> str:
    text = text.lower().replace("nvidia", "").replace("geforce", "").replace("generation", "")
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text).split())


def gpu_by_name(name: str) -> GPU | None:
    """The entry whose name is exactly the driver's name for the device (case aside)."""
    wanted = name.strip().lower()
    return next((g for g in all_gpus() if g.name.lower() == wanted), None)


def find_gpu(query: str) -> GPU:
    """Exact name or alias first, then the GPUs whose names contain every word of the query."""
    wanted = _norm(query)
    if not wanted:
        raise PlanInputError("gpu", "give a GPU name, e.g. 'RTX 4090' or 'H100'")
    for gpu in all_gpus():
        if wanted == _norm(gpu.name) or wanted in (_norm(a) for a in gpu.aliases):
            return gpu
    words = wanted.split()
    hits = [g for g in all_gpus() if all(w in " ".join([_norm(g.name), *map(_norm, g.aliases)]).split() for w in words)]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise PlanInputError("gpu", f"{query!r} is ambiguous: {', '.join(g.name for g in hits)}")
    raise PlanInputError("gpu", f"unknown GPU {query!r}; closest: {', '.join(closest_gpus(query))} (vramplan gpus lists them all)")


def closest_gpus(query: str, n: int = 4) -> list[str]:
    """Catalog names nearest to a query that matched nothing, by their names and aliases."""
    wanted = _norm(query)
    scored = []
    for gpu in all_gpus():
        keys = [_norm(gpu.name), *map(_norm, gpu.aliases)]
        scored.append((max(difflib.SequenceMatcher(None, wanted, key).ratio() for key in keys), gpu.name))
    scored.sort(key=lambda pair: -pair[0])
    return [name for _, name in scored[:n]]
