"""Record the shipped trace templates (planner/trace_templates.py): `python -m planner.template_build
[MODEL ...] [--methods lora qlora full] [--long] [--trainers trl hf]`, with torch, transformers, PEFT and TRL at the
versions CI pins. A model's templates are its step with each method and every other option at
its default; run it again after a change to planner/step_trace.py, planner/stage_steps.py or a
pinned library (tests/test_trace_templates.py fails until then, and plans trace as before).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import warnings
from dataclasses import dataclass
from fractions import Fraction

from planner import trace_templates
from planner.trace_templates import Region, Template

DEFAULT_METHODS = ("lora", "qlora", "full")
# (b, s) points: four to solve each size's four integers, then the region's corners to check it.
# TRL's fused head loops over tiles of 4096 tokens (a tile's buffers are min(tokens, 4096) long):
# its templates stay within one tile
# its templates stay within one tile, or two (8,192 tokens: one sequence of 8k)
@dataclass(frozen=True)
class RegionPlan:
    fit: tuple
    checks: tuple
    min_tokens: int = 1
    required: tuple = ()  # checks the template is refused without


ONE_TILE = RegionPlan(((2, 1024), (3, 1024), (2, 1280), (3, 1280)), ((1, 2048), (1, 4096), (8, 512)), 1, ((1, 2048),))
TWO_TILES = RegionPlan(((2, 2304), (3, 2304), (2, 2560), (3, 2560)), ((1, 8192), (8, 1024), (1, 4608)), 4097, ((1, 8192),))
UNTILED = RegionPlan(((2, 1024), (3, 1024), (2, 1536), (3, 1536)), ((1, 2048), (1, 16384), (8, 2048)), 1, ((1, 2048),))


class NotATemplate(Exception):
    """The traces do not share one event order, or a size is not of the template's form."""


def encoded(events: list) -> tuple[list[int], list[int]]:
    """(structure, sizes): an allocation as 0 and a free as minus how many allocations back it was
    made; the allocations' sizes in order."""
    structure, sizes, made = [], [], 0
    for event in events:
        if event[0] == "alloc":
            made += 1
            if event[1] != made:
                raise NotATemplate("the trace's handles are not numbered in allocation order")
            structure.append(0)
            sizes.append(event[2])
        else:
            structure.append(-(made - event[1] + 1))
    return structure, sizes


def solve(points: tuple, traced: dict) -> list[tuple[int, int, int, int]]:
    """Each allocation's (constant, per_seq, per_batch, per_token) from the four fit points' sizes."""
    (b1, s1), (b2, _), (_, s2), _ = points
    f11, f21, f12, f22 = (traced[point] for point in points)
    db, ds = b2 - b1, s2 - s1
    solved = []
    for a, b, c, d in zip(f11, f21, f12, f22):
        per_token = Fraction(d - b - c + a, db * ds)
        per_seq = Fraction(c - a, ds) - per_token * b1
        per_batch = Fraction(b - a, db) - per_token * s1
        constant = a - per_seq * s1 - per_batch * b1 - per_token * b1 * s1
        terms = (constant, per_seq, per_batch, per_token)
        if any(term.denominator != 1 for term in terms):
            raise NotATemplate(f"an allocation of {a:,} bytes is not linear in b, s and b*s")
        solved.append(tuple(int(term) for term in terms))
    return solved


def region_plans(options, long: bool) -> tuple[RegionPlan, ...]:
    if options.effective_loss_implementation != "trl_fused":
        return (UNTILED,)
    return (ONE_TILE, TWO_TILES) if long else (ONE_TILE,)


def build(config: dict, options, plan: RegionPlan, log=print) -> Template:
    """The template of this step (its batch size and sequence length are the template's variables)."""
    from planner.step_trace import (
        SimulationUnsupported,
        template_options,
        traced_events,
        unsupported_reason,
    )

    reason = unsupported_reason(options)
    if reason is not None:
        raise NotATemplate(reason)
    if options.optimizer.startswith("paged"):
        raise NotATemplate("a paged optimizer keeps states outside the pool: not templated")
    fit, checks = plan.fit, plan.checks
    structures, sizes = {}, {}
    for point in (*fit, *checks):
        started = time.perf_counter()
        sized = options.model_copy(update={"batch_size": point[0], "seq_len": point[1]})
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*deprecated and will be removed in v6", category=FutureWarning)
            try:
                traced = traced_events(config, sized)
            except SimulationUnsupported as exc:
                if point in fit:
                    raise NotATemplate(str(exc)) from None
                log(f"  b={point[0]} s={point[1]} is not traced ({exc}): outside the region")
                continue
        if traced.paged_handles:
            raise NotATemplate("paged optimizer states")
        structures[point], sizes[point] = encoded(traced.events)
        log(f"  traced b={point[0]} s={point[1]}: {len(traced.events):,} events, {time.perf_counter() - started:.1f} s")
    structure = structures[fit[0]]
    if any(structures[point] != structure for point in fit):
        raise NotATemplate("the fit points' traces differ in their order of events")
    per_allocation = solve(fit, sizes)
    kept = list(fit)
    for point in checks:
        b, s = point
        predicted = [c + ps * s + pb * b + pt * b * s for c, ps, pb, pt in per_allocation]
        if point in structures and structures[point] == structure and sizes[point] == predicted:
            kept.append(point)
        else:
            log(f"  b={b} s={s} is not reproduced: outside the region")
    for point in plan.required:
        if point not in kept:
            raise NotATemplate(f"the size {point} is not reproduced")
    region = Region(max_batch=max(b for b, _ in kept), min_seq=min(s for _, s in kept),
                    max_seq=max(s for _, s in kept), max_tokens=max(b * s for b, s in kept), min_tokens=plan.min_tokens)
    table: dict[tuple, int] = {}
    events, allocation = [], 0
    for code in structure:
        if code == 0:
            events.append(table.setdefault(per_allocation[allocation], len(table)))
            allocation += 1
        else:
            events.append(code)
    return Template(template_options(options), region, tuple(table), tuple(events))


def templates_for(catalog_id: str, methods=DEFAULT_METHODS, long: bool = False, trainers=("trl",), log=print,
                  kept: bool = True) -> tuple[dict, list[Template]]:
    """A catalog model's templates; `kept`: skip those its file already holds, recorded as these would be."""
    from planner.catalog import load_catalog_spec
    from planner.options import TrainingOptions
    from planner.request import single_plan_options
    from planner.step_trace import (
        _config_for,
        _config_to_trace,
        model_unsupported_reason,
        template_options,
    )

    spec = load_catalog_spec(catalog_id)
    refused = model_unsupported_reason(spec)
    if refused:
        raise NotATemplate(refused)
    config = _config_to_trace(spec, _config_for(spec))
    have = {_key(t) for t in merged(trace_templates.template_path(config), [])} if kept else set()
    templates = []
    for trainer, method in ((trainer, method) for trainer in trainers for method in methods):
        options = single_plan_options(spec, TrainingOptions(method=method, trainer=trainer), None)
        for plan in region_plans(options, long):
            if (json.dumps(template_options(options), sort_keys=True), plan.min_tokens) in have:
                continue
            log(f"{catalog_id} {method} under {trainer}, from {plan.min_tokens} tokens:")
            try:
                templates.append(build(config, options, plan, log))
            except NotATemplate as exc:
                log(f"  no template: {exc}")
    return config, templates


def _key(template: Template) -> tuple[str, int]:
    return (json.dumps(template.options, sort_keys=True), template.region.min_tokens)


def merged(path, new: list[Template]) -> list[Template]:
    """The templates already kept for this config (recorded as these are), less those the new ones replace."""
    data = trace_templates._read(path) if path.exists() else None
    kept = {}
    if data is not None and data.get("fingerprint") == trace_templates.fingerprint():
        for entry in data["templates"]:
            old = Template.from_entry(entry)
            kept[_key(old)] = old
    for template in new:
        kept[_key(template)] = template
    return list(kept.values())


def main(argv=None) -> int:
    from planner.catalog import catalog_ids

    parser = argparse.ArgumentParser(prog="python -m planner.template_build", description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", help="catalog ids (default: every catalog model the trace takes)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    parser.add_argument("--long", action="store_true", help="also TRL's second tile: 4,097 to 8,192 tokens a micro-batch")
    parser.add_argument("--trainers", nargs="+", default=["trl"], help="trl (the default trainer), hf (the HF Trainer's loss)")
    args = parser.parse_args(argv)
    models = args.models or sorted(set(catalog_ids().values()))
    missing = [name for name in trace_templates.TRACING_LIBRARIES if importlib.util.find_spec(name) is None]
    if missing:
        # every step would be refused as untraceable, and the builder would record nothing
        print(f"{', '.join(missing)} not found by this Python ({sys.executable}): run it where CI's pinned versions are installed",
              file=sys.stderr)
        return 2
    for catalog_id in models:
        started = time.perf_counter()
        try:
            config, templates = templates_for(catalog_id, args.methods, args.long, args.trainers)
        except NotATemplate as exc:
            print(f"{catalog_id}: skipped: {exc}")
            continue
        if templates:
            path = trace_templates.template_path(config)
            templates = merged(path, templates)
            trace_templates.write(path, config, templates)
            print(f"{catalog_id}: {len(templates)} templates, {path.stat().st_size:,} bytes, {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
