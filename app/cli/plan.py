"""The planning commands: params, plan, check, advise and fit."""

from __future__ import annotations

import sys

from app.cli.output import GIB, option_flags, parse_options, write, write_json


# the trace's cost, roughly: 0.12 s a layer on 2 quiet cores (bench/results/simulate-cost-2026-11-29.json)
# and more on a busy machine, after importing torch and transformers (2 to 3 s, bench/cold_check.py)
TRACE_S_PER_LAYER = 0.2
TRACE_IMPORT_S = 3.0


def single_plan(model: str, options, launch=None, adjust=None):
    """planner/request.py's recipe, as the CLI's doors take it (plan, check, launch, export). When
    it is about to trace for seconds (not for a trace kept from before), it first says on stderr,
    in one line and whoever reads it (a terminal, a CI log, a pipe), the formula's fast answer and
    that the traced one follows; stdout gets the traced answer. `adjust(spec, options) -> options`:
    a launch's own defaults (the advice's hyperparameters), once the model is known. Returns
    (ModelSource, Plan)."""
    from planner.request import plan_source, resolve_source, single_plan_options
    from planner.step_trace import trace_pending

    source = resolve_source(model)
    if adjust is not None:
        options = adjust(source.spec, options)
    settled = single_plan_options(source.spec, options, launch)
    if trace_pending(source.spec, settled, source.config):
        line = fast_answer_line(source, settled)
        if line is not None:
            print(line, file=sys.stderr, flush=True)
    return source, plan_source(source, settled)


def fast_answer_line(source, settled) -> str | None:
    """`vramplan: fast answer (formula): …; tracing …`: the calibrated formula's plan of the same
    options (no torch: milliseconds), or None when the options are refused (the traced plan's
    own error says why)."""
    from planner.errors import PlanInputError
    from planner.request import plan_source

    try:
        fast = plan_source(source, settled.model_copy(update={"simulate_allocator": False}))
    except PlanInputError:
        return None
    from planner.step_trace import template_pending

    template = template_pending(source.spec, settled, source.config)
    if template is not None:
        coming = f"replaying its shipped trace template for the exact one (about {max(1, round(template.replay_seconds))} s)…"
    else:
        coming = f"tracing two training steps for the exact one (about {TRACE_IMPORT_S + TRACE_S_PER_LAYER * source.spec.num_layers:.0f} s)…"
    return (f"vramplan: fast answer (formula): {fast.peak_bytes / GIB:.1f} GiB per GPU (band {fast.peak_low_bytes / GIB:.1f}-"
            f"{fast.peak_high_bytes / GIB:.1f}) of {fast.usable_bytes / GIB:.1f} GiB usable on {fast.gpu.name}, {fast.verdict}; {coming}")


def _trace_origin(trace: dict) -> str:
    if trace.get("from_template"):
        return f"replayed from the shipped trace template of this step ({trace['seconds']:.2f} s; VRAMPLAN_TRACE_TEMPLATES=off traces it)"
    return "kept in the trace cache" if trace["kept_in_trace_cache"] else f"{trace['seconds']:.1f} s"


def _plan(args):
    return single_plan(args.model, parse_options(args))[1]


def cmd_params(args) -> int:
    from planner.request import resolve_model
    from planner.trainable import parameter_counts

    options = parse_options(args)
    spec = resolve_model(args.model)
    counts = parameter_counts(spec, options)
    if args.json:
        write_json({**counts, "model": spec.name, "method": options.method, "by_role": spec.params_by_role()})
    else:
        pct = 100 * counts["trainable"] / counts["total"] if counts["total"] else 0
        write(f"{spec.name}: {counts['total']:,} parameters, {counts['trainable']:,} trainable ({pct:.3f}%) with {options.method}")
    return 0


def cmd_plan(args) -> int:
    plan = _plan(args)
    data = plan.to_dict()
    if args.json:
        write_json(data)
        return 0
    write(
        f"{data['model']['name']} on {data['gpu']['name']}: peak {data['peak_bytes'] / GIB:.2f} GiB "
        f"(band {data['peak_low_bytes'] / GIB:.2f}-{data['peak_high_bytes'] / GIB:.2f}"
        + (f"; runs within {data['runs_within_bytes'] / GIB:.2f}" if data["allocator_release_bytes"] else "") + f"), {data['verdict']} "
        f"in {data['usable_bytes'] / GIB:.2f} GiB usable"
    )
    for c in data["components"]:
        write(f"  {c['name']:<32} {c['bytes'] / GIB:>9.3f} GiB  {c['note']}")
    for a in data["assumptions"]:
        write(f"  assumed: {a}")
    if data["trace"] is not None:
        write("  traced: " + _trace_origin(data["trace"]))
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

    The verdict asks whether the step runs (planner/plan.py): "fits" only when even the high end of
    the least memory it runs in is within the usable memory, "tight" when the usable memory falls
    inside that band, "does not fit" when it is below the low end. Exit 0 only for "fits"; "tight" exits 1 like "does not fit":
    the contract's 0 means it fits, and a tight plan may run out of memory. `--json` prints
    Plan.check_dict(), whose "verdict" tells tight from does not fit.
    """
    plan = _plan(args)
    if args.json:
        write_json(plan.check_dict())
    else:
        why = {"fits": "", "tight": ": inside the band, it may run out of memory", "does not fit": ""}[plan.verdict]
        if plan.verdict == "tight" and plan.could_simulate:
            why += " (--simulate-allocator narrows the band, in seconds)"
        write(
            f"{plan.verdict}: {plan.model_name} needs {plan.peak_bytes / GIB:.2f} GiB per GPU "
            f"(band {plan.peak_low_bytes / GIB:.2f}-{plan.peak_high_bytes / GIB:.2f}{_simulated_words(plan)}); "
            + (f"runs within {plan.runs_within_bytes / GIB:.2f} (up to {plan.runs_within_high_bytes / GIB:.2f}), the allocator releasing its cache; "
               if plan.allocator_release_bytes else "")
            + f"{plan.usable_bytes / GIB:.2f} GiB usable on {plan.gpu.label} "
            f"({plan.options.headroom:.0%} headroom kept){why}"
        )
    return 0 if plan.fits else 1


def cmd_advise(args) -> int:
    from planner.advisor import Task, advise
    from planner.request import resolve_model

    task = parse_options(args, Task)
    options = parse_options(args)
    spec = resolve_model(args.model)
    advice = advise(spec, task, options)
    if args.json:
        write_json(advice.to_dict())
        return 0
    head = f"{advice.approach}"
    if advice.plan is not None:
        plan = advice.plan
        head += (f": {advice.method} {advice.stage} on {plan.gpu.count} x {plan.gpu.label}, peak {plan.peak_bytes / GIB:.2f} GiB "
                 f"(band {plan.peak_low_bytes / GIB:.2f}-{plan.peak_high_bytes / GIB:.2f}) of {plan.usable_bytes / GIB:.2f} GiB usable: {plan.verdict}")
    write(head)
    write("settings: " + ", ".join(f"{k}={v}" for k, v in advice.settings.items()))
    if advice.time_cost is not None and advice.time_cost.hours is not None:
        cost = f", ${advice.time_cost.dollars:,.2f}" if advice.time_cost.dollars is not None else ""
        write(f"time: {advice.time_cost.hours:.2f} h{cost}")
    for reason in advice.reasons:
        write(f"  - {reason}")
    for alt in advice.alternatives:
        fit = alt.plan.verdict + (f" (needs {alt.gpus_needed} GPUs)" if not alt.plan.fits and alt.gpus_needed else "")
        write(f"  alternative {alt.label}: {alt.plan.peak_bytes / GIB:.2f} GiB (up to {alt.plan.peak_high_bytes / GIB:.2f}), {fit}; {alt.why}")
    for other in advice.other_approaches:
        write(f"  also: {other}")
    if advice.deployment is not None:
        write(f"after training: {advice.deployment.action}" + (f", {advice.deployment.quantization} weights" if advice.deployment.quantization else ""))
        for reason in advice.deployment.reasons:
            write(f"  - {reason}")
    return 0


def cmd_fit(args) -> int:
    from planner.fit import fit_report
    from planner.request import resolve_model

    options = parse_options(args)
    report = fit_report(resolve_model(args.model), options)
    if args.json:
        write_json(report)
        return 0
    write(f"{report['model']} on {report['gpu']['name']}: {report['verdict']} ({report['peak_bytes'] / GIB:.2f} GiB, band "
           f"{report['peak_low_bytes'] / GIB:.2f}-{report['peak_high_bytes'] / GIB:.2f}, of {report['usable_bytes'] / GIB:.2f} GiB usable)")
    write("  every search below answers with a plan whose band's high end fits")
    for key in ("largest_batch", "longest_sequence", "fewest_gpus"):
        write(f"  {key.replace('_', ' ')}: {report[key]['note']}")
    cheapest = report["cheapest_gpu"]
    if cheapest is not None:
        write(f"  cheapest GPU: {cheapest['count']} x {cheapest['gpu']} at ${cheapest['price_per_hour_usd']:.2f}/h "
               f"({cheapest['peak_bytes'] / GIB:.2f} GiB per GPU, up to {cheapest['peak_high_bytes'] / GIB:.2f})")
    smallest = report["fixes"]["smallest"]
    if smallest is not None:
        write(f"  smallest fix: {smallest['description']} -> {smallest['peak_bytes'] / GIB:.2f} GiB (up to {smallest['peak_high_bytes'] / GIB:.2f})")
    return 0


def add_commands(sub) -> None:
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
            option_flags(p, Task, "the task (the advisor's questions)")
        option_flags(p)
        p.set_defaults(func=func)
