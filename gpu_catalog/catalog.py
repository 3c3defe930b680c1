"""The GPU table and a forgiving name lookup ("4090", "RTX 4000 Ada", "a100 80gb")."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from planner.errors import PlanInputError

DATA = Path(__file__).with_name("gpus.json")
MIB = 1 << 20


@dataclass(frozen=True)
class GPU:
    name: str
    aliases: tuple[str, ...]
    memory_mib: int
    compute_capability: str
    bf16: bool
    fp8: bool

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB


@lru_cache(maxsize=1)
def all_gpus() -> tuple[GPU, ...]:
    rows = json.loads(DATA.read_text())["gpus"]
    return tuple(GPU(**{**row, "aliases": tuple(row["aliases"])}) for row in rows)


def _norm(text: str) -> str:
    text = text.lower().replace("nvidia", "").replace("geforce", "").replace("generation", "")
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text).split())


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
    raise PlanInputError("gpu", f"unknown GPU {query!r}; known: {', '.join(g.name for g in all_gpus())}")
