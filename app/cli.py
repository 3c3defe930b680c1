"""`vramplan`: the command line. Parses flags into TrainingOptions, prints what the planner returns.

Exit codes (the contract): 0 fits / success, 1 does not fit, 2 bad input (one readable line).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing

from pydantic import ValidationError

from planner.errors import PlanInputError
from planner.options import TrainingOptions

GIB = 1 << 30


def _option_flags(parser: argparse.ArgumentParser, model=TrainingOptions, title: str = "plan options (JSON fields use underscores)") -> None:
    group = parser.add_argument_group(title)
    for name, info in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        annotation = info.annotation
        if annotation is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
            continue
        choices = None
        args = typing.get_args(annotation)
        literal = [a for a in args if typing.get_origin(a) is typing.Literal] or ([annotation] if typing.get_origin(annotation) is typing.Literal else [])
        if literal and name != "lora_targets":
            choices = typing.get_args(literal[0])
        group.add_argument(flag, dest=name, default=argparse.SUPPRESS, metavar=name.upper(), help=f"one of {', '.join(choices)}" if choices else None)


def _parse_options(namespace: argparse.Namespace, model=TrainingOptions):
    given = {k: v for k, v in vars(namespace).items() if k in model.model_fields}
    return model.model_validate(given)


def _validation_message(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int)) or "options"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}"


def _plan(args):
    from planner.catalog import resolve_model
    from planner.plan import build_plan

    options = _parse_options(args)
    spec = resolve_model(args.model)
    return spec, options, build_plan(spec, options)


def cmd_params(args) -> int:
    from planner.catalog import resolve_model
    from planner.trainable import parameter_counts

    options = _parse_options(args)
    spec = resolve_model(args.model)
    counts = parameter_counts(spec, options)
    if args.json:
        print(json.dumps({**counts, "model": spec.name, "method": options.method, "by_role": spec.params_by_role()}))
    else:
        pct = 100 * counts["trainable"] / counts["total"] if counts["total"] else 0
        print(f"{spec.name}: {counts['total']:,} parameters, {counts['trainable']:,} trainable ({pct:.3f}%) with {options.method}")
    return 0


def cmd_plan(args) -> int:
    _, _, plan = _plan(args)
    data = plan.to_dict()
    if args.json:
        print(json.dumps(data))
        return 0
    print(f"{data['model']['name']} on {data['gpu']['name']}: peak {data['peak_bytes'] / GIB:.2f} GiB")
    for c in data["components"]:
        print(f"  {c['name']:<32} {c['bytes'] / GIB:>9.3f} GiB  {c['note']}")
    for a in data["assumptions"]:
        print(f"  assumed: {a}")
    return 0


def cmd_check(args) -> int:
    _, _, plan = _plan(args)
    verdict = "fits" if plan.fits else "does not fit"
    print(
        f"{verdict}: {plan.model_name} needs {plan.peak_bytes / GIB:.2f} GiB per GPU; "
        f"{plan.usable_bytes / GIB:.2f} GiB usable on {plan.gpu.name} "
        f"({plan.options.headroom:.0%} headroom kept)"
    )
    return 0 if plan.fits else 1


def cmd_advise(args) -> int:
    from planner.advisor import Task, advise
    from planner.catalog import resolve_model

    task = _parse_options(args, Task)
    options = _parse_options(args)
    spec = resolve_model(args.model)
    advice = advise(spec, task, options)
    if args.json:
        print(json.dumps(advice.to_dict()))
        return 0
    head = f"{advice.approach}"
    if advice.plan is not None:
        head += f": {advice.method} {advice.stage} on {advice.plan.gpu.count} x {advice.plan.gpu.name}, peak {advice.plan.peak_bytes / GIB:.2f} GiB of {advice.plan.usable_bytes / GIB:.2f} GiB usable"
    print(head)
    print("settings: " + ", ".join(f"{k}={v}" for k, v in advice.settings.items()))
    if advice.time_cost is not None and advice.time_cost.hours is not None:
        cost = f", ${advice.time_cost.dollars:,.2f}" if advice.time_cost.dollars is not None else ""
        print(f"time: {advice.time_cost.hours:.2f} h{cost}")
    for reason in advice.reasons:
        print(f"  - {reason}")
    for alt in advice.alternatives:
        fit = "fits" if alt.plan.fits else f"does not fit (needs {alt.gpus_needed} GPUs)" if alt.gpus_needed else "does not fit"
        print(f"  alternative {alt.label}: {alt.plan.peak_bytes / GIB:.2f} GiB, {fit}; {alt.why}")
    for other in advice.other_approaches:
        print(f"  also: {other}")
    return 0


def cmd_fit(args) -> int:
    from planner.catalog import resolve_model
    from planner.fit import fit_report

    options = _parse_options(args)
    report = fit_report(resolve_model(args.model), options)
    if args.json:
        print(json.dumps(report))
        return 0
    verdict = "fits" if report["fits"] else "does not fit"
    print(f"{report['model']} on {report['gpu']['name']}: {verdict} ({report['peak_bytes'] / GIB:.2f} of {report['usable_bytes'] / GIB:.2f} GiB usable)")
    for key in ("largest_batch", "longest_sequence", "fewest_gpus"):
        print(f"  {key.replace('_', ' ')}: {report[key]['note']}")
    cheapest = report["cheapest_gpu"]
    if cheapest is not None:
        print(f"  cheapest GPU: {cheapest['count']} x {cheapest['gpu']} at ${cheapest['price_per_hour_usd']:.2f}/h ({cheapest['peak_bytes'] / GIB:.2f} GiB per GPU)")
    smallest = report["fixes"]["smallest"]
    if smallest is not None:
        print(f"  smallest fix: {smallest['description']} -> {smallest['peak_bytes'] / GIB:.2f} GiB")
    return 0


def cmd_serve(args) -> int:
    import uvicorn

    uvicorn.run("app.main:app", host=args.host, port=args.port, workers=args.workers, log_level="warning")
    return 0


def cmd_models(args) -> int:
    from planner.catalog import catalog_ids

    ids = sorted(catalog_ids().values())
    print(json.dumps(ids) if args.json else "\n".join(ids))
    return 0


def cmd_gpus(args) -> int:
    from gpu_catalog.catalog import all_gpus
    from gpu_catalog.detect import detect

    found = detect()
    rows = [g.to_dict() for g in all_gpus()]
    if args.json:
        print(json.dumps({"detected": [g.to_dict() for g in found.gpus], "driver_version": found.driver_version, "reason": found.reason, "catalog": rows}))
    else:
        for g in found.gpus:
            print(f"detected {g.index}: {g.name}, {g.free_bytes / GIB:.1f} of {g.total_bytes / GIB:.1f} GiB free, cc {g.compute_capability}")
        if found.reason:
            print(found.reason)
        for r in rows:
            print(f"{r['name']:<36} {r['memory_bytes'] / GIB:6.1f} GiB  cc {r['compute_capability']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vramplan", description="Plan GPU memory for fine-tuning a causal LM.")
    sub = parser.add_subparsers(dest="command", required=True)
    from planner.advisor import Task

    for name, func, help_text, asks_task in (
        ("params", cmd_params, "parameter counts (total, trainable) for a method", False),
        ("plan", cmd_plan, "the memory plan, component by component", False),
        ("check", cmd_check, "one line; exit 0 fits, 1 does not fit, 2 bad input", False),
        ("advise", cmd_advise, "what to run and why: approach, stage, method, settings, alternatives", True),
        ("fit", cmd_fit, "searches: largest batch, longest sequence, fewest GPUs, cheapest GPU, smallest fix", False),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("model", help="catalog id (e.g. meta-llama/Llama-3.1-8B), a directory or a config.json")
        p.add_argument("--json", action="store_true", help="print JSON")
        if asks_task:
            _option_flags(p, Task, "the task (the advisor's questions)")
        _option_flags(p)
        p.set_defaults(func=func)
    serve_parser = sub.add_parser("serve", help="the web app and the JSON API (127.0.0.1:8000)")
    serve_parser.add_argument("--host", default="127.0.0.1")
    serve_parser.add_argument("--port", type=int, default=8000)
    serve_parser.add_argument("--workers", type=int, default=1)
    serve_parser.set_defaults(func=cmd_serve)
    for name, func, help_text in (("models", cmd_models, "list the model catalog"), ("gpus", cmd_gpus, "list GPUs")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)
    return parser



def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed its one-line usage error
        return int(exc.code or 0)
    try:
        return args.func(args)
    except ValidationError as exc:
        print(f"vramplan: error: {_validation_message(exc)}", file=sys.stderr)
    except PlanInputError as exc:
        print(f"vramplan: error: {exc.field}: {exc.reason}", file=sys.stderr)
    except BrokenPipeError:  # `vramplan plan ... | head`: the reader left, nothing to report
        sys.stdout = open(os.devnull, "w")
        return 0
    except Exception as exc:  # a bug, not bad input: one line, and a code of its own
        print(f"vramplan: internal error: {type(exc).__name__}: {exc} (please report it)", file=sys.stderr)
        return 3
    return 2


if __name__ == "__main__":
    sys.exit(main())
