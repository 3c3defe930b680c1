"""`vramplan`: the command line. Parses flags into TrainingOptions, prints what the planner returns.

Exit codes (the contract): 0 fits / success, 1 does not fit, 2 bad input or an environment that fails
us (unreadable file, full disk; one readable line), 3 a bug. A reader that leaves early never changes the code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
import typing

from pydantic import ValidationError

from launcher.cli import LaunchInputError
from planner.errors import PlanInputError
from planner.options import TrainingOptions

GIB = 1 << 30


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (the contract), not the whole usage block."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"vramplan: error: {message} (see {self.prog} --help)\n")


class _OutputError(Exception):
    """stdout could not be written (full disk, device gone): the environment, not bad input and not a bug."""


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null, so the bytes still buffered and the interpreter's own flush at exit go
    nowhere quietly instead of failing again ("Exception ignored ...", exit 120)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # not a real file (an in-process caller's capture)
        sys.stdout = open(os.devnull, "w")
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _write(text: str) -> None:
    """print() for command output. A reader that leaves early (`| head -c 1`) is no error and must not
    change the exit code, which is the verdict: stdout goes quiet and the command runs on to its verdict."""
    try:
        print(text)
    except BrokenPipeError:
        _silence_stdout()
    except OSError as exc:
        raise _OutputError(exc.strerror or str(exc)) from exc


def _write_json(data) -> None:
    # NaN and Infinity are not JSON: a reader's parser would refuse the whole output. A non-finite
    # number reaching here is a bug, and the ValueError is reported as one (exit 3).
    _write(json.dumps(data, allow_nan=False))


def _is_bool(annotation) -> bool:
    """bool, or an optional bool (None: not given, the default decides): --flag / --no-flag."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if annotation is bool:
        return True
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1 and _is_bool(args[0])


def _option_flags(parser: argparse.ArgumentParser, model=TrainingOptions, title: str = "plan options (JSON fields use underscores)") -> None:
    group = parser.add_argument_group(title)
    for name, info in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        annotation = info.annotation
        if _is_bool(annotation):
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
            continue
        choices = None
        args = typing.get_args(annotation)
        literal = [a for a in args if typing.get_origin(a) is typing.Literal] or ([annotation] if typing.get_origin(annotation) is typing.Literal else [])
        # a list field takes comma-separated names, which argparse's choices would refuse whole
        if literal and name != "lora_targets" and typing.get_origin(annotation) is not list:
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
    from planner.catalog import local_config, resolve_model
    from planner.plan import build_plan
    from planner.step_trace import single_plan_options, trace_pending

    spec = resolve_model(args.model)
    options = single_plan_options(spec, _parse_options(args))
    config = local_config(args.model)
    if sys.stderr.isatty() and trace_pending(spec, options, config):
        # seconds of tracing: say so, where a person is watching (not for a trace kept from before)
        print("tracing two training steps on the meta device to simulate the allocator (kept for the next check)...", file=sys.stderr, flush=True)
    return spec, options, build_plan(spec, options, config=config)


def cmd_params(args) -> int:
    from planner.catalog import resolve_model
    from planner.trainable import parameter_counts

    options = _parse_options(args)
    spec = resolve_model(args.model)
    counts = parameter_counts(spec, options)
    if args.json:
        _write_json({**counts, "model": spec.name, "method": options.method, "by_role": spec.params_by_role()})
    else:
        pct = 100 * counts["trainable"] / counts["total"] if counts["total"] else 0
        _write(f"{spec.name}: {counts['total']:,} parameters, {counts['trainable']:,} trainable ({pct:.3f}%) with {options.method}")
    return 0


def cmd_plan(args) -> int:
    _, _, plan = _plan(args)
    data = plan.to_dict()
    if args.json:
        _write_json(data)
        return 0
    _write(
        f"{data['model']['name']} on {data['gpu']['name']}: peak {data['peak_bytes'] / GIB:.2f} GiB "
        f"(band {data['peak_low_bytes'] / GIB:.2f}-{data['peak_high_bytes'] / GIB:.2f}), {data['verdict']} "
        f"in {data['usable_bytes'] / GIB:.2f} GiB usable"
    )
    for c in data["components"]:
        _write(f"  {c['name']:<32} {c['bytes'] / GIB:>9.3f} GiB  {c['note']}")
    for a in data["assumptions"]:
        _write(f"  assumed: {a}")
    return 0


def _simulated_words(plan) -> str:
    if plan.reserve_source != "simulated":
        return ""
    if not plan.unmeasured_parts:
        return ", allocator simulated"
    return (f", allocator simulated; the high end allows {plan.unmeasured_allowance_bytes / GIB:.2f} GiB for "
            f"{' and '.join(plan.unmeasured_parts)} until a GPU run measures {'it' if len(plan.unmeasured_parts) == 1 else 'them'}")


def cmd_check(args) -> int:
    """One line: the verdict, the central peak with its band, the usable memory.

    The verdict uses the band's high end (planner/plan.py): "fits" only when even the high end is
    within the usable memory, "tight" when the usable memory falls inside the band, "does not fit"
    when it is below the low end. Exit 0 only for "fits"; "tight" exits 1 like "does not fit":
    the contract's 0 means it fits, and a tight plan may run out of memory. `--json` prints
    Plan.check_dict(), whose "verdict" tells tight from does not fit.
    """
    _, _, plan = _plan(args)
    if args.json:
        _write_json(plan.check_dict())
    else:
        why = {"fits": "", "tight": ": inside the band, it may run out of memory", "does not fit": ""}[plan.verdict]
        if plan.verdict == "tight" and plan.could_simulate:
            why += " (--simulate-allocator narrows the band, in seconds)"
        _write(
            f"{plan.verdict}: {plan.model_name} needs {plan.peak_bytes / GIB:.2f} GiB per GPU "
            f"(band {plan.peak_low_bytes / GIB:.2f}-{plan.peak_high_bytes / GIB:.2f}{_simulated_words(plan)}); "
            f"{plan.usable_bytes / GIB:.2f} GiB usable on {plan.gpu.name} "
            f"({plan.options.headroom:.0%} headroom kept){why}"
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
        _write_json(advice.to_dict())
        return 0
    head = f"{advice.approach}"
    if advice.plan is not None:
        plan = advice.plan
        head += (f": {advice.method} {advice.stage} on {plan.gpu.count} x {plan.gpu.name}, peak {plan.peak_bytes / GIB:.2f} GiB "
                 f"(band {plan.peak_low_bytes / GIB:.2f}-{plan.peak_high_bytes / GIB:.2f}) of {plan.usable_bytes / GIB:.2f} GiB usable: {plan.verdict}")
    _write(head)
    _write("settings: " + ", ".join(f"{k}={v}" for k, v in advice.settings.items()))
    if advice.time_cost is not None and advice.time_cost.hours is not None:
        cost = f", ${advice.time_cost.dollars:,.2f}" if advice.time_cost.dollars is not None else ""
        _write(f"time: {advice.time_cost.hours:.2f} h{cost}")
    for reason in advice.reasons:
        _write(f"  - {reason}")
    for alt in advice.alternatives:
        fit = alt.plan.verdict + (f" (needs {alt.gpus_needed} GPUs)" if not alt.plan.fits and alt.gpus_needed else "")
        _write(f"  alternative {alt.label}: {alt.plan.peak_bytes / GIB:.2f} GiB (up to {alt.plan.peak_high_bytes / GIB:.2f}), {fit}; {alt.why}")
    for other in advice.other_approaches:
        _write(f"  also: {other}")
    return 0


def cmd_fit(args) -> int:
    from planner.catalog import resolve_model
    from planner.fit import fit_report

    options = _parse_options(args)
    report = fit_report(resolve_model(args.model), options)
    if args.json:
        _write_json(report)
        return 0
    _write(f"{report['model']} on {report['gpu']['name']}: {report['verdict']} ({report['peak_bytes'] / GIB:.2f} GiB, band "
           f"{report['peak_low_bytes'] / GIB:.2f}-{report['peak_high_bytes'] / GIB:.2f}, of {report['usable_bytes'] / GIB:.2f} GiB usable)")
    _write("  every search below answers with a plan whose band's high end fits")
    for key in ("largest_batch", "longest_sequence", "fewest_gpus"):
        _write(f"  {key.replace('_', ' ')}: {report[key]['note']}")
    cheapest = report["cheapest_gpu"]
    if cheapest is not None:
        _write(f"  cheapest GPU: {cheapest['count']} x {cheapest['gpu']} at ${cheapest['price_per_hour_usd']:.2f}/h "
               f"({cheapest['peak_bytes'] / GIB:.2f} GiB per GPU, up to {cheapest['peak_high_bytes'] / GIB:.2f})")
    smallest = report["fixes"]["smallest"]
    if smallest is not None:
        _write(f"  smallest fix: {smallest['description']} -> {smallest['peak_bytes'] / GIB:.2f} GiB (up to {smallest['peak_high_bytes'] / GIB:.2f})")
    return 0


def cmd_serve(args) -> int:
    import dataclasses

    from app.server import ServerLimits, serve

    try:
        limits = ServerLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerLimits)})
        if args.workers < 1:
            raise ValueError(f"workers must be positive, got {args.workers}")
    except ValueError as exc:
        print(f"vramplan: error: {exc}", file=sys.stderr)
        return 2
    if args.allowed_hosts is not None:  # the app (and each worker it spawns) reads it from the environment
        os.environ["VRAMPLAN_ALLOWED_HOSTS"] = args.allowed_hosts
    for flag, name in ((args.auth, "VRAMPLAN_AUTH"), (args.data_dir, "VRAMPLAN_DATA_DIR"), (args.roots, "VRAMPLAN_ROOTS")):
        if flag is not None:
            os.environ[name] = flag
    return serve(args.host, args.port, args.workers, limits, sign_in=_sign_in_line())


def _sign_in_line() -> str:
    """Made at the first start, printed at each (as Jupyter does): the URL that signs a browser in."""
    from urllib.parse import quote

    from app.auth import TOKEN_FILE, TokenError, data_dir, read_or_create_token

    try:
        token, created = read_or_create_token()
    except (TokenError, OSError) as exc:
        return f"vramplan: warning: launching runs is off until this is fixed: {exc}"
    where = "VRAMPLAN_TOKEN" if os.environ.get("VRAMPLAN_TOKEN") else f"{data_dir() / TOKEN_FILE}, mode 0600"
    return (f"vramplan: to launch runs, sign in at {{url}}/login?token={quote(token)} "
            f"(the token {'was made now and is kept' if created else 'is kept'} in {where}; API clients send Authorization: Bearer TOKEN)")


def cmd_models(args) -> int:
    from planner.catalog import catalog_ids

    ids = sorted(catalog_ids().values())
    if args.json:
        _write_json(ids)
    else:
        _write("\n".join(ids))
    return 0


def cmd_gpus(args) -> int:
    from gpu_catalog.catalog import all_gpus
    from gpu_catalog.detect import detect

    found = detect()
    rows = [g.to_dict() for g in all_gpus()]
    if args.json:
        _write_json({"detected": [g.to_dict() for g in found.gpus], "driver_version": found.driver_version, "reason": found.reason, "catalog": rows})
    else:
        for g in found.gpus:
            _write(f"detected {g.index}: {g.name}, {g.free_bytes / GIB:.1f} of {g.total_bytes / GIB:.1f} GiB free, cc {g.compute_capability}")
        if found.reason:
            _write(found.reason)
        for r in rows:
            _write(f"{r['name']:<36} {r['memory_bytes'] / GIB:6.1f} GiB  cc {r['compute_capability']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vramplan", description="Plan GPU memory for fine-tuning a causal LM.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
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
    from app.server import ServerLimits

    limits = ServerLimits()
    serve_parser = sub.add_parser("serve", help="the web app and the JSON API (127.0.0.1:8000)",
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    serve_parser.add_argument("--host", default="127.0.0.1", help="a non-loopback address makes the server reachable from the network")
    serve_parser.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one")
    serve_parser.add_argument("--workers", type=int, default=1, help="processes; the limits below apply to each")
    serve_parser.add_argument("--auth", default=None, choices=("launch", "all"),
                              help="what needs the token: launch (runs and their pages; planning stays open) or all (default: $VRAMPLAN_AUTH or launch)")
    serve_parser.add_argument("--data-dir", default=None, metavar="DIR", help="where runs and the token are kept (default: $VRAMPLAN_DATA_DIR or ~/.local/share/vramplan)")
    serve_parser.add_argument("--roots", default=None, metavar="DIRS",
                              help="directories (':'-separated) a launched run's model, dataset and output may be in (default: $VRAMPLAN_ROOTS or the working directory)")
    serve_parser.add_argument("--allowed-hosts", default=None, metavar="NAMES",
                              help="Host names the server answers to, comma-separated ('*' for any; default: $VRAMPLAN_ALLOWED_HOSTS or localhost,127.0.0.1,::1)")
    serve_limits = serve_parser.add_argument_group("limits (per worker; defaults suit a local or small shared server)")
    for flag, kind, help_text in (
        ("max-header-bytes", int, "request line plus headers; over it: 431 and close"),
        ("header-timeout", float, "seconds from connection or previous response until headers are complete; then close"),
        ("body-timeout", float, "seconds from headers until the body is complete; then close"),
        ("keep-alive-timeout", float, "seconds an idle keep-alive connection stays open"),
        ("limit-concurrency", int, "requests in progress; over it: 503 at once, not a wait in a queue"),
        ("max-connections", int, "open connections; over it a new one is closed as soon as accepted"),
    ):
        name = flag.replace("-", "_")
        serve_limits.add_argument("--" + flag, dest=name, type=kind, default=getattr(limits, name), metavar="N" if kind is int else "S", help=help_text)
    serve_parser.set_defaults(func=cmd_serve)
    for name, func, help_text in (("models", cmd_models, "list the model catalog"), ("gpus", cmd_gpus, "list GPUs")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)
    from launcher.cli import add_commands

    add_commands(sub, _option_flags)
    return parser



def _fail(message: str) -> int:
    print(f"vramplan: error: {message}", file=sys.stderr)
    return 2


def _os_message(exc: OSError) -> str:
    # the planner's only file access is reading a model's config.json; anything else says what the system said
    what = f"cannot read {exc.filename}" if exc.filename else "system error"
    return f"{what}: {exc.strerror or exc}"


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or _Parser.error's one line: argparse already printed it
        return int(exc.code or 0)
    try:
        return args.func(args)
    except ValidationError as exc:
        return _fail(_validation_message(exc))
    except PlanInputError as exc:
        return _fail(f"{exc.field}: {exc.reason}")
    except LaunchInputError as exc:
        return _fail(str(exc))
    except _OutputError as exc:
        _silence_stdout()
        return _fail(f"cannot write the output: {exc}")
    except OSError as exc:  # an unreadable file, not a bug: the environment, reported as such
        return _fail(_os_message(exc))
    except Exception as exc:  # a bug, not bad input: one line, and a code of its own
        print(f"vramplan: internal error: {type(exc).__name__}: {exc} (please report it)", file=sys.stderr)
        return 3


def _flush_output(code: int) -> int:
    """Flush stdout here, not at interpreter exit: a pipe or a file is block-buffered, so this is where
    writing usually fails, and past main() a failure can only print "Exception ignored" and exit 120."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # the reader left early: the verdict stands
        _silence_stdout()
    except OSError as exc:
        _silence_stdout()
        _fail(f"cannot write the output: {exc.strerror or exc}")
        return max(code, 2)  # a lost answer is no success, and a bug (3) stays a bug
    return code


def main(argv: list[str] | None = None) -> int:
    return _flush_output(_run(argv))


if __name__ == "__main__":
    sys.exit(main())
