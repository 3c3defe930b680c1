"""One plan recipe for every door: the page, the JSON API, the CLI, `vramplan launch` and the runs API.

A plan request is a model (a catalog id, a config.json's text, or a local directory or file), the
options the user gave, and, for a launch, where the run goes. The recipe resolves the model, settles
the options a single plan uses (whether the allocator is simulated, the launch defaults), and builds
the plan. The doors differ only in what they allow, never in how they plan:

- which local paths may be named (`roots`): any the process can read (the CLI), none (a web user
  who is not signed in), or those inside the server's roots (a signed-in user);
- how a config.json becomes a spec and how its step is traced (`builder`): in this process (the
  CLI), or in the server's build worker under its limits (the web).

So the same inputs give the same plan, byte for byte, whichever door they came in by.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from planner.catalog import catalog_ids, closest_ids, find_catalog_model, from_hub
from planner.errors import PlanInputError
from planner.options import TrainingOptions
from planner.spec import ModelSpec

# Set to "off" on a server or in a shell where single plans should use the formula by default
SIMULATE_ENV = "VRAMPLAN_SIMULATE_ALLOCATOR"
# A single plan simulates by default up to this many layers: the trace's cost grows with the layers
# (bench/simulate_cost.py); a larger model's plan can still ask for it
AUTO_MAX_LAYERS = 100
# what a launched run sets, so what its plan must assume (launcher/entry.py)
LAUNCH_ALLOCATOR = "expandable_segments"


class ConfigBuilder(Protocol):
    """Turns a config.json's text into a spec, and traces its step (build_plan's `tracer`; None:
    step_trace traces in this process)."""

    trace: Callable | None

    def build(self, text: str, source: str, name: str | None = None) -> ModelSpec: ...


class InProcessBuilder:
    """The CLI's builder: introspects and traces here (the user's own machine and process)."""

    trace = None

    def build(self, text: str, source: str, name: str | None = None) -> ModelSpec:
        from planner.introspect import spec_from_config
        from planner.model_config import parse_config_text

        config = parse_config_text(text, source)
        return spec_from_config(config, name=name or pasted_name(config))


IN_PROCESS = InProcessBuilder()


def pasted_name(config: dict) -> str:
    """A pasted config's name: the checkpoint it names, else its model type."""
    return str(config.get("_name_or_path") or config.get("model_type") or "pasted config")[:200]


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: `argument` is what a run is launched with (the catalog id as given, or the
    model directory's absolute path); `config` the config.json a non-catalog spec was built from,
    which the allocator's trace needs; `kind` one of catalog, local, pasted, hub."""

    argument: str
    spec: ModelSpec
    config: dict | None
    kind: str


class AnyPath:
    """The CLI's rule: any path this process can read may name a model."""


ANY_PATH = AnyPath()
NO_PATHS: tuple[Path, ...] = ()


def looks_like_path(text: str) -> bool:
    return text.startswith(("/", ".", "~")) or "\\" in text


def inside(path: Path, allowed: Sequence[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in allowed)


def confine(field: str, text: str, allowed: Sequence[Path], must_exist: bool = True) -> Path:
    """`text` as a path inside the roots (relative paths are taken from the first root), symlinks
    resolved; PlanInputError naming the field otherwise."""
    try:
        path = Path(text).expanduser()  # ~nosuchuser: RuntimeError
        if not path.is_absolute():
            path = allowed[0] / path
        resolved = path.resolve(strict=must_exist)
    except FileNotFoundError:
        raise PlanInputError(field, f"{text}: no such file or directory") from None
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, a name too long, a NUL byte
        raise PlanInputError(field, f"{text}: {exc}") from None
    if not inside(resolved, allowed):
        raise PlanInputError(field, f"{text} is outside the directories this server may use ({', '.join(map(str, allowed))}); "
                                    "set VRAMPLAN_ROOTS to add one")
    return resolved


def resolve_source(model: str | None, config_text: str | None = None, *, roots: AnyPath | Sequence[Path] = ANY_PATH,
                   builder: ConfigBuilder = IN_PROCESS) -> ModelSource:
    """The model a request names. A config.json's text wins over `model`; then a catalog id; then a
    local directory or file where `roots` allows one; then an instruct or chat variant of a catalog
    model; then, from the CLI and where the network allows, the hub. Unknown: PlanInputError with
    the closest catalog ids. Blocks while a config builds: the web calls it from a thread."""
    if config_text is not None and config_text.strip():
        spec = builder.build(config_text.strip(), "the pasted config.json")
        from planner.model_config import parse_config_text

        return ModelSource("", spec, parse_config_text(config_text.strip()), "pasted")
    if not isinstance(model, str) or not model.strip():
        raise PlanInputError("model", "give a catalog id, a directory or a config.json path")
    model = model.strip()
    catalog_id = catalog_ids().get(model.lower())
    if catalog_id is not None:
        if isinstance(roots, Sequence) and roots and _exists(roots[0] / model):
            confine("model", model, roots)  # a launcher would take it as that directory: hold it to the roots too
        from planner.catalog import load_catalog_spec

        return ModelSource(model, load_catalog_spec(catalog_id), None, "catalog")
    local = _local_source(model, roots, builder)
    if local is not None:
        return local
    variant = find_catalog_model(model)  # before the hub: a known base needs no network
    if variant is not None:
        return ModelSource(model, variant.spec, None, "catalog")
    if roots is ANY_PATH and os.environ.get("HF_HUB_OFFLINE") not in ("1", "true", "True") and model.count("/") == 1:
        spec = from_hub(model)
        if spec is not None:
            return ModelSource(model, spec, None, "hub")
    hint = closest_ids(model)
    suggestion = f"; did you mean {', '.join(hint)}?" if hint else "; `vramplan models` lists the catalog"
    if roots is ANY_PATH:
        where = "not in the catalog, not a local path"
    elif roots:
        where = "give a catalog id or a model directory inside the server's roots"
    else:
        where = "give a catalog id or paste its config.json"
    raise PlanInputError("model", f"unknown model {model!r} ({where}){suggestion}")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long, a NUL byte: not a path that exists
        return False


def _local_source(model: str, roots: AnyPath | Sequence[Path], builder: ConfigBuilder) -> ModelSource | None:
    """A local directory holding config.json, or (from the CLI) a config file; None when `model`
    names no path that exists, or paths are not this door's to name."""
    if roots is ANY_PATH:
        path = Path(model).expanduser()
        if not _exists(path):
            return None
        resolved = path.resolve()
        config_file = resolved / "config.json" if resolved.is_dir() else resolved
        if not config_file.is_file():
            raise PlanInputError("model", f"no config.json at {config_file}")
    else:
        if not roots or (not looks_like_path(model) and not _exists(roots[0] / model)):
            return None
        resolved = confine("model", model, roots)
        config_file = resolved / "config.json"
        if not resolved.is_dir() or not config_file.is_file():
            raise PlanInputError("model", f"{model}: a run needs a model directory holding config.json and the weights")
    from planner.model_config import MAX_CONFIG_BYTES, parse_config_text

    size = config_file.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise PlanInputError("model", f"{config_file} is {size} bytes; a config.json is at most {MAX_CONFIG_BYTES}")
    text = config_file.read_bytes().decode("utf-8", errors="replace")
    try:
        spec = builder.build(text, str(config_file), name=str(resolved))
    except PlanInputError as exc:
        raise PlanInputError("model", exc.reason) from None
    return ModelSource(str(resolved), spec, parse_config_text(text, str(config_file)), "local")


def resolve_model(model: str) -> ModelSpec:
    """The spec for MODEL as the CLI names it (any local path; in this process)."""
    return resolve_source(model).spec


# -- the options a single plan uses ---------------------------------------------------------------


@dataclass(frozen=True)
class LaunchTarget:
    """Where a planned run goes: `device` cuda or cpu; `detect_gpus`: plan for this machine's GPUs
    when none is named (a local launch; not a cluster's run, not an export for another machine)."""

    device: str
    detect_gpus: bool = True


def launch_target(device: str = "auto", backend: str = "local", for_export: bool = False) -> LaunchTarget:
    """Where a launch runs: `auto` is this machine's GPUs for the local backend (none detected: a
    PlanInputError saying how to run on the CPU), and a cluster's GPUs for any other backend; an
    export is a file for another machine, so nothing here is detected for it."""
    local = backend == "local" and not for_export
    if device == "auto":
        if not local:
            device = "cuda"
        else:
            from gpu_catalog.detect import detect

            found = detect()
            if not found.gpus:
                raise PlanInputError("device", f"{found.reason or 'no GPU detected'}; set device to cpu (--device cpu) to run on the CPU "
                                               "(slow; for small models and tests)")
            device = "cuda"
    return LaunchTarget(device=device, detect_gpus=local)


def simulation_by_default() -> bool:
    return os.environ.get(SIMULATE_ENV, "on").strip().lower() not in ("off", "0", "false", "no")


def single_plan_options(spec: ModelSpec, options: TrainingOptions, launch: LaunchTarget | None = None) -> TrainingOptions:
    """A single plan's options. For a launch, the launch defaults first: expandable segments (what a
    launched run sets) and, on a local GPU run with no GPU named, the GPU detected here. Then, where
    simulate_allocator was not given, it is on (the narrower band is worth seconds for one plan),
    unless SIMULATE_ENV turns it off or the model has more than AUTO_MAX_LAYERS layers or cannot be
    traced. Searches and advice keep the formula: they plan too many candidates to trace each."""
    if launch is not None:
        given = options.model_dump(include=options.model_fields_set)
        given.setdefault("allocator", LAUNCH_ALLOCATOR)
        if launch.device == "cuda" and launch.detect_gpus and "gpu" not in given and "gpu_memory_gib" not in given:
            given["gpu"] = "auto"
        options = TrainingOptions.model_validate(given)
    if options.simulate_allocator is not None:
        return options
    from planner.step_trace import model_unsupported_reason

    simulate = simulation_by_default() and spec.num_layers <= AUTO_MAX_LAYERS and model_unsupported_reason(spec) is None
    return options.model_copy(update={"simulate_allocator": simulate})


def plan_source(source: ModelSource, options: TrainingOptions, *, launch: LaunchTarget | None = None,
                builder: ConfigBuilder = IN_PROCESS):
    """The plan a single-plan door shows for a resolved model."""
    from planner.plan import build_plan

    settled = single_plan_options(source.spec, options, launch)
    return build_plan(source.spec, settled, config=source.config, tracer=builder.trace if source.config is not None else None)
