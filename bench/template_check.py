"""The shipped trace templates against fresh traces, at sizes they were not recorded at.

For every template in planner/catalog/templates/ (a catalog model, a method, the default options):
a batch size and sequence length drawn at random inside its region, away from the points the
builder traced; the plan's simulated step replayed from the template and traced afresh, their
allocator peaks compared, and their event lists, size for size. The fast path's error against the
simulated plan on configurations it never saw: zero bytes is the claim (planner/trace_templates.py).
Results go to bench/results/template-check-<date>.json.

    python bench/template_check.py [--per-template 1] [--seed 0] [MODEL ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from planner import step_trace, trace_templates
from planner.catalog import catalog_ids, load_catalog_spec
from planner.options import TrainingOptions
from planner.template_build import ONE_TILE, TWO_TILES, UNTILED, encoded

TRACED_POINTS = {point for plan in (ONE_TILE, TWO_TILES, UNTILED) for point in (*plan.fit, *plan.checks)}


def sizes_in(region: trace_templates.Region, rng: random.Random, count: int) -> list[tuple[int, int]]:
    drawn = []
    while len(drawn) < count:
        batch = rng.randint(1, region.max_batch)
        seq = rng.randint(region.min_seq // region.seq_multiple, region.max_seq // region.seq_multiple) * region.seq_multiple
        if region.holds(batch, seq) and (batch, seq) not in TRACED_POINTS:
            drawn.append((batch, seq))
    return drawn


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", nargs="*")
    parser.add_argument("--per-template", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    rows = []
    for catalog_id in args.models or sorted(set(catalog_ids().values())):
        spec = load_catalog_spec(catalog_id)
        if step_trace.model_unsupported_reason(spec):
            continue
        config = step_trace._config_to_trace(spec, None)
        data = trace_templates._read(trace_templates.template_path(config))
        if data is None:
            continue
        for entry in data["templates"]:
            region = trace_templates.Region(**entry["region"])
            for batch, seq in sizes_in(region, rng, args.per_template):
                options = TrainingOptions(**entry["options"], batch_size=batch, seq_len=seq, simulate_allocator=True)
                started = time.perf_counter()
                templated = step_trace.from_template(config, options)
                replay_s = time.perf_counter() - started
                started = time.perf_counter()
                events = step_trace.traced_events(config, options)
                traced = step_trace.step_from_events(events, options, step_trace.STEPS, 0.0)
                trace_s = time.perf_counter() - started
                # and event for event: a size the template gets wrong that the allocator's rounding hides
                template = trace_templates.find(config, step_trace.template_options(options), batch, seq)
                same_events = template is not None and encoded(template.events_for(batch, seq)) == encoded(events.events)
                row = {
                    "model": catalog_id, "method": options.method, "trainer": options.trainer, "batch_size": batch, "seq_len": seq,
                    "found": templated is not None,
                    "same_events": same_events,
                    "reserved_difference_bytes": templated.peaks.peak_reserved - traced.peaks.peak_reserved if templated else None,
                    "allocated_difference_bytes": templated.peaks.peak_allocated - traced.peaks.peak_allocated if templated else None,
                    "smallest_capacity_difference_bytes": (templated.peaks.smallest_capacity - traced.peaks.smallest_capacity) if templated else None,
                    "peak_reserved_gib": round(traced.peaks.peak_reserved / 2**30, 3),
                    "replay_s": round(replay_s, 3), "trace_s": round(trace_s, 2),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    exact = [r for r in rows if r["found"] and r["same_events"] and r["reserved_difference_bytes"] == 0
             and r["allocated_difference_bytes"] == 0 and r["smallest_capacity_difference_bytes"] == 0]
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
        "recorded_with": trace_templates.recorded_with(trace_templates.fingerprint()),
        "seed": args.seed,
        "configurations": len(rows),
        "exact": len(exact),
        "worst_reserved_difference_bytes": max((abs(r["reserved_difference_bytes"]) for r in rows if r["found"]), default=None),
        "median_replay_s": sorted(r["replay_s"] for r in rows)[len(rows) // 2] if rows else None,
        "median_trace_s": sorted(r["trace_s"] for r in rows)[len(rows) // 2] if rows else None,
        "rows": rows,
    }
    out = Path(__file__).parent / "results" / f"template-check-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))
    return 0 if len(exact) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
