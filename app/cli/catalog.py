"""The catalogs: `vramplan models` and `vramplan gpus` (the GPU catalog and the GPUs detected here)."""

from __future__ import annotations

from app.cli.output import GIB, write, write_json


def cmd_models(args) -> int:
    from planner.catalog import catalog_ids

    ids = sorted(catalog_ids().values())
    if args.json:
        write_json(ids)
    else:
        write("\n".join(ids))
    return 0


def cmd_gpus(args) -> int:
    from gpu_catalog.catalog import all_gpus
    from gpu_catalog.detect import detect

    found = detect()
    rows = [g.to_dict() for g in all_gpus()]
    if args.json:
        write_json({"detected": [g.to_dict() for g in found.gpus], "driver_version": found.driver_version, "reason": found.reason, "catalog": rows})
    else:
        for g in found.gpus:
            write(f"detected {g.index}: {g.name}, {g.free_bytes / GIB:.1f} of {g.total_bytes / GIB:.1f} GiB free, cc {g.compute_capability}")
        if found.reason:
            write(found.reason)
        for r in rows:
            write(f"{r['name']:<36} {r['memory_bytes'] / GIB:6.1f} GiB  cc {r['compute_capability']}")
    return 0


def add_commands(sub) -> None:
    for name, func, help_text in (("models", cmd_models, "list the model catalog"), ("gpus", cmd_gpus, "list GPUs")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)
