"""`vramplan merge`: the memory a merge takes (PEFT merge_and_unload, mergekit), planner/merge.py;
`--run` merges for real and measures it beside the plan (app/merge_run.py): a PEFT adapter into its
base (`--adapter-dir`), or MODEL with other models by a mergekit method (`--merge-with DIR`, once per
model); `--export mergekit` prints the mergekit YAML of a mergekit plan.

Exit codes as `check`: 0 fits (in the GPU and host memory given), 1 does not, 2 bad input.
With `--run`: 0 merged, 1 refused (the plan does not fit), 2 bad input, 4 the merge failed.
`--launch` starts the same merge as a run of the launcher (launcher/merge_job.py): exit codes as
`vramplan launch` (with `--wait`, as the run ended)."""

from __future__ import annotations

import sys

from app.cli.output import (
    GIB,
    UsageError,
    option_flags,
    parse_options,
    write,
    write_json,
)

MIB = 1 << 20


def _checked_plan(args, options, flag: str):
    """The merge to run, its inputs checked (app/merge_run.py): a dict of the plan, the base, the
    adapter (PEFT) or the other models and mergekit's config, the output and a line saying what is
    merged; None, with the refusal written, when the plan does not fit."""
    from app.merge_run import plan_mergekit_run, plan_run

    if options.method == "peft":
        if not args.adapter_dir or not args.output:
            raise UsageError(f"merge {flag} needs --adapter-dir DIR (the PEFT adapter) and --output DIR (new or empty)")
        if args.merge_with:
            raise UsageError("--merge-with is for mergekit's methods (--method linear, ties, ...); a PEFT merge takes --adapter-dir")
        plan, base, adapter, output = plan_run(args.model, args.adapter_dir, args.output, options)
        run = {"plan": plan, "base": base, "adapter": adapter, "others": [], "config": None, "output": output,
               "what": f"PEFT merge of {adapter['path']} into {base}"}
    else:
        if not args.output:
            raise UsageError(f"merge {flag} needs --output DIR (new or empty)")
        if args.adapter_dir:
            raise UsageError("--adapter-dir is for a PEFT merge (--method peft); mergekit's methods take --merge-with DIR")
        plan, base, others, output, config = plan_mergekit_run(args.model, args.merge_with, args.output, options)
        run = {"plan": plan, "base": base, "adapter": None, "others": others, "config": config, "output": output,
               "what": f"mergekit {options.method} of {base} with {', '.join(map(str, others))}"}
    if plan.fits:
        return run
    if args.json:
        write_json({"plan": plan.to_dict(), "refused": True})
    else:
        write(f"refused: the plan does not fit: host {plan.host_peak_bytes / GIB:.2f} GiB")
    return None


def _run(args, options) -> int:
    from app.merge_run import MergeFailed, run_merge

    run = _checked_plan(args, options, "--run")
    if run is None:
        return 1
    plan = run["plan"]
    try:
        result = run_merge(plan, run["base"], run["adapter"], run["output"], mergekit_config=run["config"])
    except MergeFailed as exc:
        if args.json:
            write_json({"plan": plan.to_dict(), "failed": str(exc)})
        else:
            write(f"failed: {exc}")
        return 4
    if args.json:
        write_json(result)
        return 0
    c, m = result["comparison"], result["measured"]
    write(f"merged: {run['what']} -> {run['output']} ({len(m['files'])} files, {m['output_bytes'] / MIB:.1f} MiB, {m['seconds']:.1f} s)")
    write(f"  host peak above the runtime: measured {c['host_measured_bytes'] / MIB:.1f} MiB, planned {c['host_planned_bytes'] / MIB:.1f} MiB "
          f"({c['host_error']:+.1%}; {'within' if c['host_within_band'] else 'outside'} the planned range "
          f"{c['host_floor_bytes'] / MIB:.1f}-{c['host_planned_bytes'] / MIB:.1f} MiB ±{c['host_band']:.0%})")
    if "host_page_cache_measured_bytes" in c:
        write(f"  checkpoint pages read by memory map (reclaimable, outside the peak): measured {c['host_page_cache_measured_bytes'] / MIB:.1f} MiB, "
              f"planned {c['host_page_cache_planned_bytes'] / MIB:.1f} MiB; resident peak with them {c['host_resident_measured_bytes'] / MIB:.1f} MiB")
    write(f"  runtime (torch, transformers, {'mergekit' if run['config'] else 'PEFT'} imported): measured {c['runtime_measured_bytes'] / MIB:.0f} MiB, "
          f"planned {c['runtime_planned_bytes'] / MIB:.0f} MiB")
    if "gpu_measured_bytes" in c:
        write(f"  GPU peak: measured {c['gpu_measured_bytes'] / MIB:.1f} MiB, planned {c['gpu_planned_bytes'] / MIB:.1f} MiB")
    return 0


def _launch(args, options) -> int:
    """The merge as a run of the launcher: through a backend, kept in the run store with its measured
    peak beside the plan's (`vramplan runs show ID`)."""
    from app.cli.runs import EXIT_BY_STATE, _backend_options, _record_text, _supervisor
    from launcher.backend import LaunchError

    run = _checked_plan(args, options, "--launch")
    if run is None:
        return 1
    supervisor = _supervisor(args)
    try:
        prepared = supervisor.prepare_merge(run["plan"], str(run["base"]), run["adapter"]["path"] if run["adapter"] else None, str(run["output"]),
                                            backend=args.backend, backend_options=_backend_options(args), mergekit_config=run["config"])
        record = supervisor.launch(prepared)
    except (ValueError, LaunchError) as exc:  # an unknown backend, or one that cannot start it
        raise UsageError(str(exc)) from exc
    if not args.json:
        print(f"run {record.id} {record.state}: {run['what']} -> {run['output']}; predicted "
              f"{'GPU' if options.device == 'cuda' else 'host'} peak {record.predicted_peak_bytes / MIB:.1f} MiB", file=sys.stderr)
    if args.wait:
        record = supervisor.wait(record.id)
    if args.json:
        write_json(record.to_dict())
    else:
        write(_record_text(record))
    return EXIT_BY_STATE.get(record.state, 0) if args.wait else 0


def cmd_merge(args) -> int:
    from planner.merge import MergeOptions, mergekit_yaml, plan_merge_request

    options = parse_options(args, MergeOptions)
    if args.run and args.launch:
        raise UsageError("--run merges here and now; --launch starts it as a run of the launcher: give one")
    if args.run:
        return _run(args, options)
    if args.launch:
        return _launch(args, options)
    plan = plan_merge_request(args.model, options)
    data = plan.to_dict()
    if args.export == "mergekit":
        if options.method == "peft":
            raise UsageError("--export mergekit is for mergekit's methods (--method linear, slerp, ties, ...); a PEFT merge has no mergekit config")
        write(mergekit_yaml(plan).rstrip("\n"))
        return 0 if plan.fits else 1
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
    p.add_argument("model", help="the base model: catalog id, a directory or a config.json (with --run: the base's directory)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--export", choices=("mergekit",), default=None, help="print the mergekit YAML of this plan")
    p.add_argument("--run", action="store_true", help="merge for real (PEFT merge_and_unload) and measure the peaks beside the plan")
    p.add_argument("--launch", action="store_true", help="start the merge as a run of the launcher (a backend, the run store, `vramplan runs`)")
    p.add_argument("--adapter-dir", default=None, help="with --run or --launch: the PEFT adapter's directory")
    p.add_argument("--merge-with", action="append", default=[], metavar="DIR",
                   help="with --run or --launch and a mergekit method: another model merged with MODEL (once per model; MODEL is the base where the method takes one)")
    p.add_argument("--output", default=None, help="with --run or --launch: where the merged model is saved (new or empty directory)")
    p.add_argument("--backend", default="local", help="with --launch: a backend from `vramplan backends`")
    p.add_argument("--backend-option", action="append", default=[], metavar="KEY=VALUE", help="with --launch: a backend's option")
    p.add_argument("--grace-period", type=float, default=None, metavar="S", help="with --launch: seconds a cancelled merge has before it is killed")
    p.add_argument("--wait", action="store_true", help="with --launch: follow the run to its end; the exit code says how it ended")
    p.add_argument("--data-dir", default=None, help="with --launch: where runs are kept (default: $VRAMPLAN_DATA_DIR or ~/.local/share/vramplan)")
    option_flags(p, MergeOptions, "merge options (JSON fields use underscores)")
    p.set_defaults(func=cmd_merge)
