"""The launcher's commands: `vramplan launch`, `export`, `runs` and `backends`.

Exit codes: 0 succeeded (or a dry run written, or a run started without --wait), 1 refused because
the plan does not fit, 2 bad input, 4 failed, 5 cancelled, 6 lost.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from pydantic import ValidationError

from app.cli.output import (
    GIB,
    UsageError,
    option_flags,
    parse_options,
    validation_message,
    write,
    write_json,
)
from app.cli.plan import single_plan
from planner.components import size_text

EXIT_BY_STATE = {"succeeded": 0, "failed": 4, "cancelled": 5, "lost": 6}


def _supervisor(args):
    from launcher.supervisor import Supervisor

    return Supervisor(Path(args.data_dir) if args.data_dir else None)


def _settings(args):
    from launcher.spec import RunSettings

    return parse_options(args, RunSettings)


class _Advice:
    """The advice's hyperparameters for the run (launcher.spec.with_advice), settled once the model
    is known and before the plan: `settings` and `advised` (name -> value) afterwards."""

    def __init__(self, settings, dataset_check):
        self.settings, self.advised = settings, {}
        self.rows = dataset_check.rows if dataset_check is not None else None

    def __call__(self, model_spec, options):
        from launcher.spec import with_advice

        options, self.settings, self.advised = with_advice(model_spec, options, self.settings, self.rows)
        return options


def _plan(args, for_export: bool = False, advice: _Advice | None = None):
    """(ModelSource, Plan, LaunchTarget) for a launch or, `for_export`, a file for another machine:
    planner/request.py's recipe with the launch defaults and `advice`'s hyperparameters."""
    from planner.request import launch_target

    device = getattr(args, "device", None) or "auto"
    if for_export:
        device = "cpu" if device == "cpu" else "cuda"
    target = launch_target(device, getattr(args, "backend", "local"), for_export=for_export)
    source, plan = single_plan(args.model, parse_options(args), launch=target, adjust=advice)
    return source, plan, target


def _preflight(args, settings, for_export: bool = False):
    """launcher/preflight.py's check of the dataset, before anything is planned; its warnings on stderr."""
    from launcher.preflight import preflight

    options = parse_options(args).model_dump(mode="json")
    check = preflight(settings, options, args.model, for_export=for_export)
    for warning in check.warnings if check is not None else ():
        print(f"vramplan: warning: dataset {check.dataset}: {warning}", file=sys.stderr)
    return check


def _record_text(record) -> str:
    data = record.to_dict() if hasattr(record, "to_dict") else record
    parts = [f"run {data['id'][:8]} {data['state']}"]
    if data.get("reason"):
        parts.append(f"({data['reason']})")
    if data.get("last_step") is not None:
        total = f"/{data['total_steps']}" if data.get("total_steps") else ""
        parts.append(f"step {data['last_step']}{total}")
    if data.get("final_loss") is not None:
        parts.append(f"loss {data['final_loss']:.4f}")
    what = "host peak " if data.get("stage") == "merge" else ""
    parts.append(f"predicted {what}{size_text(data['predicted_peak_bytes'])}")
    if data.get("measured_peak_bytes") is not None:
        parts.append(f"measured {size_text(data['measured_peak_bytes'])} ({data['error_pct']:+.1f}%)")
    line = ", ".join([" ".join(parts[:2])] + parts[2:]) if data.get("reason") else ", ".join(parts)
    if data.get("message"):
        line += f": {data['message']}"
    if data.get("hint") and data.get("state") == "failed":
        line += f"\n  hint: {data['hint']}"
    return line


def cmd_launch(args) -> int:
    from launcher.backend import LaunchError
    from launcher.supervisor import LaunchRefused

    from launcher.spec import advised_words

    settings = _settings(args)
    dataset_check = _preflight(args, settings)  # before the plan: a dataset typo is answered at once
    advice = _Advice(settings, dataset_check)
    source, plan, target = _plan(args, advice=advice)
    settings = advice.settings
    device = target.device
    supervisor = _supervisor(args)
    gpus = tuple(g.strip() for g in (args.gpus or "").split(",") if g.strip())
    backend_options = _backend_options(args)
    try:
        prepared = supervisor.prepare(plan, source.argument, settings, backend=args.backend, device=device, gpus=gpus, backend_options=backend_options,
                                      dataset_check=dataset_check)
    except ValidationError as exc:
        raise UsageError(f"backend option {validation_message(exc)}") from exc
    except (ValueError, LaunchError) as exc:  # an unknown or broken backend, or a layout it cannot place
        raise UsageError(str(exc)) from exc
    prepared = replace(prepared, spec=prepared.spec.with_advised(advice.advised))
    words = advised_words(advice.advised, prepared.spec.method, prepared.spec.stage)
    if args.dry_run:  # shows what a launch would write; writes nothing (the run directory is a launch's)
        data = {**prepared.dry_run_dict(), "advised": advice.advised}
        if args.json:
            write_json(data)
        else:
            write(f"dry run: {prepared.rendered.summary}")
            write(dataset_check.summary())
            if words:
                write(f"settings {words} (a flag sets another)")
            write(f"admission: {'ok' if prepared.admission.ok else 'refused'}: {prepared.admission.message}")
            write(f"files a launch writes into {prepared.run_dir}: {', '.join(prepared.rendered.files)} (--json shows them)")
            write("command: " + " ".join(prepared.rendered.argv))
        return 0
    try:
        record = supervisor.launch(prepared, force=args.force, queue=args.queue)
    except LaunchRefused as exc:
        if args.json:
            write_json({"refused": True, "message": str(exc), **exc.numbers})
        else:
            print(f"vramplan: {exc}", file=sys.stderr)
        return 1
    except LaunchError as exc:
        raise UsageError(str(exc)) from exc
    if not args.json:
        if words:
            print(f"settings {words}", file=sys.stderr)
        print(f"run {record.id} {record.state}: {prepared.rendered.summary}; predicted peak {record.predicted_peak_bytes / GIB:.2f} GiB per GPU "
              f"(up to {record.predicted_high_bytes / GIB:.2f})", file=sys.stderr)
    if not args.wait:
        if args.json:
            write_json(record.to_dict())
        return 0
    record = supervisor.wait(record.id, on_update=None if args.json else _Progress())
    return _finish(args, record)


class _Progress:
    """Progress on stderr while --wait follows a run: every state change, and about every tenth of the steps."""

    def __init__(self):
        self.state = None
        self.shown_step = -1

    def __call__(self, record) -> None:
        total = record.total_steps or 0
        stride = max(1, total // 10)
        step = record.last_step or 0
        if record.state != self.state or (step - self.shown_step >= stride) or (total and step == total and step != self.shown_step):
            self.state, self.shown_step = record.state, step
            print(_record_text(record), file=sys.stderr)


def _backend_options(args) -> dict:
    options: dict = {}
    for item in args.backend_option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--backend-option {item!r}: write KEY=VALUE")
        options[key.strip().replace("-", "_")] = value.strip()
    if args.grace_period is not None:
        options["grace_period_s"] = args.grace_period
    return options


def _finish(args, record) -> int:
    if args.json:
        write_json(record.to_dict())
    else:
        write(_record_text(record))
    return EXIT_BY_STATE.get(record.state, 0)


def cmd_export(args) -> int:
    from launcher.exports import PLACEHOLDER_DATASET, export_notes, render
    from launcher.spec import RunSettings, launch_spec

    given = {k: v for k, v in vars(args).items() if k in RunSettings.model_fields}
    given.setdefault("dataset", PLACEHOLDER_DATASET)
    given.setdefault("output_dir", "output")
    settings = RunSettings.model_validate(given)
    check = _preflight(args, settings, for_export=True)  # a dataset here is read; one for another machine is not
    advice = _Advice(settings, check)
    source, plan, target = _plan(args, for_export=True, advice=advice)
    spec = launch_spec(plan, source.argument, advice.settings, device=target.device, for_export=True).with_advised(advice.advised)
    notes = export_notes(spec, args.format, set(vars(args)))
    try:
        text = render(spec, args.format, notes)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    for note in notes:
        if not note.startswith("advised"):  # the file says the advice's values; stderr what needs a hand
            print(f"vramplan: {note}", file=sys.stderr)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out} ({args.format})", file=sys.stderr)
    else:
        write(text.rstrip("\n"))
    return 0


def cmd_runs(args) -> int:
    supervisor = _supervisor(args)
    action = args.action
    if action == "list":
        records = [supervisor.refresh(r.id) for r in supervisor.store.list()]
        if args.json:
            write_json([r.to_dict() for r in records])
        elif not records:
            write("no runs yet (vramplan launch MODEL --dataset FILE starts one)")
        else:
            for r in records:
                started = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.started_at or r.created_at))
                measured = size_text(r.measured_peak_bytes) if r.measured_peak_bytes is not None else "-"
                write(f"{r.id[:8]}  {r.state:<10} {r.method:<5} {r.stage:<6} {r.model:<32} {started}  "
                      f"predicted {size_text(r.predicted_peak_bytes)}  measured {measured}")
        return 0
    if action == "export":
        rows = supervisor.calibration_rows()
        text = "\n".join(json.dumps(r, allow_nan=False) for r in rows)
        if args.out:
            Path(args.out).write_text(text + ("\n" if text else ""))
            print(f"wrote {len(rows)} run(s) to {args.out}", file=sys.stderr)
        elif text:
            write(text)
        else:
            print("vramplan: no finished runs with a measured peak to export yet", file=sys.stderr)
        return 0
    if not args.run_id:
        raise UsageError(f"runs {action} needs a run id")
    from launcher.backend import LaunchError
    from launcher.supervisor import RunNotFound

    try:
        if action == "show":
            record = supervisor.refresh(args.run_id)
            if args.json:
                write_json({**record.to_dict(), "transitions": supervisor.store.transitions(record.id),
                                 "metrics": supervisor.store.metrics(record.id)})
            else:
                write(_record_text(record))
                for t in supervisor.store.transitions(record.id):
                    write(f"  {time.strftime('%H:%M:%S', time.localtime(t['at']))} {t['from_state'] or '':>10} -> {t['to_state']}"
                               + (f" ({t['reason']})" if t["reason"] else "") + (f": {t['message']}" if t["message"] else ""))
            return EXIT_BY_STATE.get(record.state, 0) if record.terminal else 0
        if action == "logs":
            record = supervisor.get(args.run_id)
            offset = 0
            while True:
                chunk = supervisor.logs(record.id, offset)
                if chunk.text:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                offset = chunk.next_offset
                if chunk.eof:
                    record = supervisor.refresh(record.id)
                    if not args.follow or record.terminal:
                        if record.terminal and args.follow:
                            rest = supervisor.logs(record.id, offset)
                            sys.stdout.write(rest.text)
                        return 0
                    time.sleep(0.5)
        if action == "cancel":
            record = supervisor.cancel(args.run_id)
            if not record.terminal and args.wait:
                record = supervisor.wait(record.id)
            return _finish(args, record) if record.terminal else (write(_record_text(record)) or 0)
        if action == "resume":
            record = supervisor.resume(args.run_id, force=args.force)
            if args.wait:
                record = supervisor.wait(record.id, on_update=None if args.json else _Progress())
                return _finish(args, record)
            return _finish(args, record) if record.terminal else (write_json(record.to_dict()) if args.json else write(_record_text(record))) or 0
    except RunNotFound as exc:
        raise UsageError(str(exc)) from exc
    except LaunchError as exc:
        raise UsageError(str(exc)) from exc
    raise UsageError(f"unknown action {action}")


def cmd_backends(args) -> int:
    from launcher.registry import describe_backends

    infos = describe_backends()
    if args.json:
        write_json([i.to_dict() for i in infos])
    else:
        for info in infos:
            write(f"{info.name:<10} {'available' if info.available else 'unavailable':<12} {info.detail}")
    return 0


def add_commands(sub) -> None:
    from launcher.exports import FORMATS
    from launcher.spec import RunSettings

    def data_dir(p):
        p.add_argument("--data-dir", default=None, help="where runs are kept (default: $VRAMPLAN_DATA_DIR or ~/.local/share/vramplan)")

    launch = sub.add_parser("launch", help="start the planned run: exit 0 started/succeeded, 1 refused (does not fit), 2 bad input, 4 failed, 5 cancelled, 6 lost")
    launch.add_argument("model", help="a model directory with weights, or a hub id")
    launch.add_argument("--backend", default="local", help="a backend from `vramplan backends`")
    launch.add_argument("--gpus", default=None, metavar="UUIDS", help="comma-separated NVML UUIDs or indexes (default: the ones with most free memory)")
    launch.add_argument("--dry-run", action="store_true", help="write the files and print the command; start nothing")
    launch.add_argument("--force", action="store_true", help="start even when the GPUs' free memory is short of the plan")
    launch.add_argument("--queue", action="store_true", help="when memory is short, wait in the queue instead of refusing")
    launch.add_argument("--wait", action="store_true", help="follow the run to its end; the exit code says how it ended")
    launch.add_argument("--grace-period", type=float, default=None, metavar="S", help="seconds a cancelled run has to checkpoint before it is killed (120)")
    launch.add_argument("--backend-option", action="append", default=[], metavar="KEY=VALUE",
                        help="a backend's own option, e.g. partition=gpu or time_limit=4:00:00 (`vramplan backends --json` lists them)")
    launch.add_argument("--json", action="store_true", help="print JSON (with --wait: the run record at the end)")
    data_dir(launch)
    option_flags(launch, RunSettings, "run settings (what the plan does not decide)")
    option_flags(launch)
    launch.set_defaults(func=cmd_launch)

    export = sub.add_parser("export", help="the plan as a trl, accelerate, axolotl or llamafactory config file")
    export.add_argument("model", help="catalog id, a model directory or hub id")
    export.add_argument("--format", required=True, choices=FORMATS)
    export.add_argument("--out", default=None, metavar="FILE", help="write here instead of stdout")
    option_flags(export, RunSettings, "run settings (what the plan does not decide)")
    option_flags(export)
    export.set_defaults(func=cmd_export)

    runs = sub.add_parser("runs", help="launched runs: list, show, logs, cancel, resume, export (calibration pairs)")
    runs.add_argument("action", nargs="?", default="list", choices=("list", "show", "logs", "cancel", "resume", "export"))
    runs.add_argument("run_id", nargs="?", default=None, help="a run id or its first characters")
    runs.add_argument("--json", action="store_true")
    runs.add_argument("--follow", action="store_true", help="logs: keep printing until the run ends")
    runs.add_argument("--wait", action="store_true", help="cancel/resume: follow the run to its end")
    runs.add_argument("--force", action="store_true", help="resume: start even when memory is short")
    runs.add_argument("--out", default=None, metavar="FILE", help="export: write the calibration rows here")
    data_dir(runs)
    runs.set_defaults(func=cmd_runs)

    backends = sub.add_parser("backends", help="the trainer backends installed, and whether each can run here")
    backends.add_argument("--json", action="store_true")
    backends.set_defaults(func=cmd_backends)
