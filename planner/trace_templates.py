"""Shipped trace templates: a catalog model's traced step for any batch size and sequence length,
without torch.

A trace's event list (planner/step_trace.py) has the same allocations and frees in the same order
whatever the batch size b and sequence length s, within a region where no code path changes (TRL's
fused head, for one, loops over tiles of 4096 tokens); only the sizes move, each one
`constant + per_seq * s + per_batch * b + per_token * b * s` bytes (b * (s - 1) tokens of shifted
labels, b * s * hidden activations, fixed weights and optimizer state). `python -m
planner.template_build` traces four (b, s) points, solves each allocation's four integers, and
keeps the template only where it reproduces, event for event, further traces at the region's
corners: the default (1, 2048), the longest sequence and the largest batch.

Here a plan whose model, options and installed libraries are those of a template replays its
events through planner/allocator.py: the simulated plan's very numbers in a fraction of a second,
where tracing takes torch's import and seconds a layer. Anything else (another transformers,
another option, a size outside the region) is traced as before, and so is everything with
`VRAMPLAN_TRACE_TEMPLATES=off`. Where the trace cannot run (torch, transformers or PEFT not
installed, as in the Docker image) a template recorded with other versions still serves, and the
plan says which. Templates are data this module reads (JSON, no pickle): nothing in
them runs.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import lzma
import os
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from planner.trace_cache import LIBRARIES

FORMAT = 1
TEMPLATES_DIR = Path(__file__).resolve().parent / "catalog" / "templates"
TRACING_LIBRARIES = ("torch", "transformers", "peft")  # without any of them nothing is traced here
# the code that decides which storages a step creates (the replay, allocator.py, runs at use):
# these modules' syntax trees, less docstrings and step_trace's glue below, so that a comment, a
# layout change or an edit to how a trace is cached or refused does not make every template stale
TRACE_CODE = ("step_trace.py", "stage_steps.py")
GLUE = frozenset({
    "_TRACE_LOCK", "MAX_TRACES_IN_LINE", "_in_line", "_in_line_lock", "SimulationUnsupported", "TracesBusy", "SimulatedStep",
    "SIMULATED_METHODS", "SIMULATED_OPTIMIZERS", "unsupported_reason", "model_unsupported_reason", "_installed", "simulate_step",
    "_simulate", "step_from_events", "_config_for", "simulated_for", "_traced_or_cached", "template_options", "from_template",
    "_traced_options", "_simulation_key", "trace_pending", "_config_to_trace", "simulation_memoized", "template_pending",
    "_template",
})
# options that only size the step: a template's variables, not part of its key
SIZING_OPTIONS = ("batch_size", "seq_len")
# options that do not change the step's events at all (the GPU, the band, whether to simulate)
UNTRACED_OPTIONS = ("gpu", "gpu_memory_gib", "headroom", "simulate_allocator")


# a plan replays a template's events about eight times (the peaks, then the least pool's bisection)
REPLAY_S_PER_EVENT = 8e-6
# past this, a page shows the formula's plan first and replays the template in the background,
# as it does a trace, so that no first byte waits a second (a 70B model's template: 130,000 events)
SLOW_REPLAY_S = 0.6


@dataclass(frozen=True)
class Region:
    """Where a template holds: every (b, s) with b <= max_batch, min_seq <= s <= max_seq,
    min_tokens <= b * s <= max_tokens and s a multiple of seq_multiple, each corner reproduced by
    a trace. The multiple: FlashAttention's backward pads the sequence to 128 for two of its
    workspaces (step_trace's stand-in does too), so between multiples a size is not linear in s."""

    max_batch: int
    min_seq: int
    max_seq: int
    max_tokens: int
    min_tokens: int = 1
    seq_multiple: int = 128

    def holds(self, batch_size: int, seq_len: int) -> bool:
        return (1 <= batch_size <= self.max_batch and self.min_seq <= seq_len <= self.max_seq
                and self.min_tokens <= batch_size * seq_len <= self.max_tokens and seq_len % self.seq_multiple == 0)


@dataclass(frozen=True)
class Template:
    options: dict  # the step's options less SIZING_OPTIONS and UNTRACED_OPTIONS
    region: Region
    sizes: tuple  # per distinct size: (constant, per_seq, per_batch, per_token) bytes
    # an allocation: an index into `sizes`; a free: minus how many allocations back it was made
    events: tuple
    recorded_with: str = ""  # "torch 2.13.0, transformers 5.24.0, ...": what traced it

    @classmethod
    def from_entry(cls, entry: dict, recorded_with: str = "") -> Template:
        """A template as write() keeps it."""
        return cls(entry["options"], Region(**entry["region"]), tuple(tuple(size) for size in entry["sizes"]),
                   tuple(entry["events"]), recorded_with)

    @property
    def replay_seconds(self) -> float:
        """About how long a plan takes to replay it: its peaks and the least pool's search, about
        eight replays at roughly a microsecond an event on a busy core."""
        return len(self.events) * REPLAY_S_PER_EVENT

    @property
    def slow_to_replay(self) -> bool:
        return self.replay_seconds >= SLOW_REPLAY_S

    def events_for(self, batch_size: int, seq_len: int) -> list[tuple]:
        """The step's event list at this size, in planner/allocator.py's form."""
        nbytes = [c + per_seq * seq_len + per_batch * batch_size + per_token * batch_size * seq_len
                  for c, per_seq, per_batch, per_token in self.sizes]
        events, made = [], 0
        for code in self.events:
            if code >= 0:
                made += 1
                events.append(("alloc", made, nbytes[code]))
            else:
                events.append(("free", made + 1 + code))
        return events


def enabled() -> bool:
    """`VRAMPLAN_TRACE_TEMPLATES=off` traces every step (to check a template, or the trace itself)."""
    return os.environ.get("VRAMPLAN_TRACE_TEMPLATES", "").strip().lower() not in ("off", "0", "false", "no")


def config_digest(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


@lru_cache(maxsize=1)
def fingerprint() -> dict:
    """The installed libraries and the trace's own code: a template recorded under others is not used."""
    libraries = {}
    for name in LIBRARIES:
        try:
            # found as step_trace finds it (a package the process may not import counts as absent)
            libraries[name] = version(name) if importlib.util.find_spec(name) is not None else None
        except (PackageNotFoundError, ValueError):
            libraries[name] = None
    planner_dir = Path(__file__).resolve().parent
    code = hashlib.sha256("".join(name + _code_shape((planner_dir / name).read_text()) for name in TRACE_CODE).encode()).hexdigest()
    return {"libraries": libraries, "code": code}


def _code_shape(source: str) -> str:
    """A module's code as its syntax tree (no comments, no layout), less docstrings, imports and GLUE."""
    tree = ast.parse(source)
    kept = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)) or _docstring(node) or _defines(node) & GLUE:
            continue
        for inner in ast.walk(node):
            body = getattr(inner, "body", None)
            if isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and body and _docstring(body[0]):
                inner.body = body[1:] or [ast.Pass()]
        kept.append(ast.dump(node))
    return "\n".join(kept)


def _docstring(node) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _defines(node) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    return {target.id for target in targets if isinstance(target, ast.Name)}


def step_options(options_dump: dict) -> dict:
    """The options that key a template: what shapes the step, less its size."""
    return {k: v for k, v in options_dump.items() if k not in SIZING_OPTIONS and k not in UNTRACED_OPTIONS}


@lru_cache(maxsize=1)
def _option_defaults() -> dict:
    from planner.options import TrainingOptions

    return json.loads(TrainingOptions().model_dump_json())


def _set_options(options: dict) -> dict:
    """The options a step was keyed with that differ from today's defaults: an option added since
    a template was recorded (absent from its key) stands at its default, so the template still
    holds for plans that leave it there; a default changed since then leaves the template's
    recorded value apart from it, so the template no longer matches."""
    defaults = _option_defaults()
    return {k: v for k, v in options.items() if k not in defaults or v != defaults[k]}


def template_path(config: dict) -> Path:
    return _path_of(config_digest(config))


def _path_of(digest: str) -> Path:
    return TEMPLATES_DIR / f"{digest[:24]}.json.xz"


# a model's templates read back are about 1 MB of Python lists: a server keeps the last few models'
@lru_cache(maxsize=8)
def _read(path: Path) -> dict | None:
    try:
        data = json.loads(lzma.decompress(path.read_bytes()))
    except (OSError, ValueError, lzma.LZMAError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def find(config: dict, options_dump: dict, batch_size: int, seq_len: int) -> Template | None:
    """The shipped template for this config and these options (step_options of the traced
    options), recorded with the installed libraries and trace code, whose region holds the size;
    or None."""
    if not enabled():
        return None
    digest = config_digest(config)
    data = _read(_path_of(digest))
    if data is None or data.get("config") != digest or not usable(data.get("fingerprint") or {}):
        return None
    wanted = _set_options(options_dump)
    for entry in data.get("templates", ()):
        if _set_options(entry["options"]) == wanted and Region(**entry["region"]).holds(batch_size, seq_len):
            return Template.from_entry(entry, recorded_with(data["fingerprint"]))
    return None


def usable(recorded: dict) -> bool:
    """A template recorded by this trace code, with the installed libraries; or with any, where
    the trace cannot run here (torch, transformers or PEFT not installed, as in the Docker image):
    then it is the best answer there is, and the plan says which versions it stands for."""
    here = fingerprint()
    if recorded.get("code") != here["code"]:
        return False
    return recorded.get("libraries") == here["libraries"] or not all(here["libraries"][name] for name in TRACING_LIBRARIES)


def recorded_with(recorded: dict) -> str:
    libraries = recorded.get("libraries") or {}
    return ", ".join(f"{name} {libraries[name]}" for name in LIBRARIES if libraries.get(name))


def write(path: Path, config: dict, templates: list[Template]) -> None:
    """Keep a config's templates (planner/template_build.py), compressed: the layers repeat."""
    data = {
        "format": FORMAT,
        "config": config_digest(config),
        "fingerprint": fingerprint(),
        "templates": [{"options": t.options, "region": t.region.__dict__, "sizes": [list(size) for size in t.sizes],
                       "events": list(t.events)} for t in templates],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(lzma.compress(json.dumps(data, separators=(",", ":"), sort_keys=True).encode(), preset=9))
    _read.cache_clear()  # a later read in this process (the builder's next model) sees what was written
