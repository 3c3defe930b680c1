"""The GPU table and a forgiving name lookup ("4090", "RTX4000ada", "a100 80gb", "a100").

A name that covers several variants of one card ("a100", "h100", "3080") resolves to the
variant most people have (USUAL_VARIANT) and the lookup says which it picked and what else the
name covers, so a plan never silently means one card while another name is refused.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

from gpu_catalog.errors import InputError

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


# The variant a bare line name means: the one most rented and sold (SXM data-centre boards,
# the original memory size). Lines not listed fall back to the variant with the most memory.
USUAL_VARIANT = {
    "v100": "Tesla V100-SXM2-16GB",
    "a100": "NVIDIA A100-SXM4-80GB",
    "h100": "NVIDIA H100 80GB HBM3",
    "3080": "NVIDIA GeForce RTX 3080",
    "4000": "NVIDIA RTX 4000 Ada Generation",
    "6000": "NVIDIA RTX 6000 Ada Generation",
}


@dataclass(frozen=True)
class GpuMatch:
    gpu: GPU
    note: str | None = None  # set when the name covered several cards and one was picked


def _norm(text: str) -> str:
    text = text.lower().replace("nvidia", "").replace("geforce", "").replace("generation", "")
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text).split())


def _compact(key: str) -> str:
    """A normalized name without its spaces: "RTX4090", "rtx-4000-ada" and "rtx 4000 ada" are typed alike."""
    return key.replace(" ", "")


def _keys(gpu: GPU) -> list[str]:
    return [_norm(gpu.name), *map(_norm, gpu.aliases)]


def _line(gpu: GPU) -> str:
    """The card line, the first word with a digit: "a100", "3080", "4000", "mi300x"."""
    return next((word for word in _norm(gpu.name).split() if any(ch.isdigit() for ch in word)), _norm(gpu.name))


def gpu_by_name(name: str) -> GPU | None:
    """The entry whose name is exactly the driver's name for the device (case aside)."""
    wanted = name.strip().lower()
    return next((g for g in all_gpus() if g.name.lower() == wanted), None)


def _candidates(wanted: str) -> list[GPU]:
    """Cards whose names hold every word of the query; failing that, glued words ("rtx4000")
    found inside a name with its spaces dropped."""
    words = wanted.split()
    hits = [g for g in all_gpus() if all(w in " ".join(_keys(g)).split() for w in words)]
    if not hits:
        hits = [g for g in all_gpus() if any(_compact(wanted) in _compact(key) for key in _keys(g))]
    return hits


def _usual(hits: list[GPU]) -> GPU:
    usual = USUAL_VARIANT.get(_line(hits[0]))
    by_name = {g.name: g for g in hits}
    # max() keeps the first of equals: catalog order breaks a tie in memory
    return by_name.get(usual) or max(hits, key=lambda g: g.memory_mib)


# a plan resolves its GPU's name every time (the API's hot path: a fifth of a quick plan);
# bounded, since the names are user input
@lru_cache(maxsize=512)
def lookup_gpu(query: str) -> GpuMatch:
    """Exact name or alias first (spaces, hyphens and case aside); then the cards whose names hold
    every word of the query: one card is the answer, one line of cards gives its usual variant
    with a note, cards of several lines are ambiguous."""
    wanted = _norm(query)
    if not wanted:
        raise InputError("gpu", "give a GPU name, e.g. 'RTX 4090' or 'H100'")
    for gpu in all_gpus():
        if _compact(wanted) in map(_compact, _keys(gpu)):
            return GpuMatch(gpu)
    hits = _candidates(wanted)
    if len(hits) == 1:
        return GpuMatch(hits[0])
    if hits and len({_line(g) for g in hits}) == 1:
        pick = _usual(hits)
        why = "the usual one" if pick.name == USUAL_VARIANT.get(_line(pick)) else "the one with the most memory"
        others = [g.name for g in hits if g is not pick]
        choice = others[0] if len(others) == 1 else "one of " + ", ".join(others)
        note = f"GPU {query.strip()!r} covers {len(hits)} cards: planned on {pick.name} ({why}); name {choice} to plan on it instead"
        return GpuMatch(pick, note)
    if hits:
        raise InputError("gpu", f"{query!r} is ambiguous: {', '.join(g.name for g in hits)}")
    raise InputError("gpu", f"unknown GPU {query!r}; closest: {', '.join(closest_gpus(query))} (vramplan gpus lists them all)")


def find_gpu(query: str) -> GPU:
    """The card a name means (lookup_gpu without its note)."""
    return lookup_gpu(query).gpu


def closest_gpus(query: str, n: int = 4) -> list[str]:
    """Catalog names nearest to a query that matched nothing, by their names and aliases."""
    wanted = _norm(query)
    scored = []
    for gpu in all_gpus():
        keys = [_norm(gpu.name), *map(_norm, gpu.aliases)]
        scored.append((max(difflib.SequenceMatcher(None, wanted, key).ratio() for key in keys), gpu.name))
    scored.sort(key=lambda pair: -pair[0])
    return [name for _, name in scored[:n]]
