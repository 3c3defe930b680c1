"""`vramplan merge`: the memory a merge takes (PEFT merge_and_unload, mergekit), planner/merge.py.

Exit codes as `check`: 0 fits (in the GPU and host memory given), 1 does not, 2 bad input."""

from __future__ import annotations

from app.cli.output import GIB, option_flags, parse_options, write, write_json


def cmd_merge(args) -> int:
    from planner.merge import MergeOptions, plan_merge_request

    options = parse_options(args, MergeOptions)
    plan = plan_merge_request(args.model, options)
    data = plan.to_dict()
    if args.json:
        write_json(data)
        return 0 if plan.fits else 1
    where = f"GPU {data['gpu_peak_bytes'] / GIB:.2f} GiB, " if options.device == "cuda" else ""
    write(f"{data['verdict']}: {options.method} merge of {plan.model_name}: {where}host {data['host_peak_bytes'] / GIB:.2f} GiB, "
          f"disk {data['disk_bytes'] / GIB:.2f} GiB")
    for side in ("gpu_components", "host_components"):
        for c in data[side]:
            write(f"  {side.split('_')[0]:<5} {c['name']:<24} {c['bytes'] / GIB:>8.3f} GiB  {c['note']}")
    for note in plan.notes:
        write(f"  assumed: {note}")
    return 0 if plan.fits else 1


def add_commands(sub) -> None:
    from planner.merge import MergeOptions

    p = sub.add_parser("merge", help="merge memory: PEFT merge_and_unload or mergekit; exit 0 fits, 1 does not, 2 bad input")
    p.add_argument("model", help="the base model: catalog id, a directory or a config.json")
    p.add_argument("--json", action="store_true", help="print JSON")
    option_flags(p, MergeOptions, "merge options (JSON fields use underscores)")
    p.set_defaults(func=cmd_merge)
