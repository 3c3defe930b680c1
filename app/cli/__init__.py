"""`vramplan`: the command line. One module per command group, each owning its parser and handler
(plan.py: params, plan, check, advise, fit; serve.py; catalog.py: models, gpus; runs.py: launch,
export, runs, backends), sharing output.py. Each parses flags into the planner's or the launcher's
models and prints what they return.

Exit codes (the contract): 0 fits / success, 1 does not fit, 2 bad input or an environment that fails
us (unreadable file, full disk; one readable line), 3 a bug. A reader that leaves early never changes the code.
The launcher's commands add theirs (app/cli/runs.py).
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from app.cli import catalog, inference, merge, plan, runs, serve
from app.cli.output import (
    OutputError,
    Parser,
    UsageError,
    fail,
    silence_stdout,
    validation_message,
)
from planner.errors import PlanInputError


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="vramplan", description="Plan GPU memory for fine-tuning a causal LM.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for group in (plan, serve, catalog, runs, inference, merge):
        group.add_commands(sub)
    return parser


def _os_message(exc: OSError) -> str:
    # the planner's only file access is reading a model's config.json; anything else says what the system said
    what = f"cannot read {exc.filename}" if exc.filename else "system error"
    return f"{what}: {exc.strerror or exc}"


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or Parser.error's one line: argparse already printed it
        return int(exc.code or 0)
    try:
        return args.func(args)
    except ValidationError as exc:
        return fail(validation_message(exc))
    except PlanInputError as exc:
        return fail(f"{exc.field}: {exc.reason}")
    except UsageError as exc:
        return fail(str(exc))
    except OutputError as exc:
        silence_stdout()
        return fail(f"cannot write the output: {exc}")
    except OSError as exc:  # an unreadable file, not a bug: the environment, reported as such
        return fail(_os_message(exc))
    except Exception as exc:  # a bug, not bad input: one line, and a code of its own
        print(f"vramplan: internal error: {type(exc).__name__}: {exc} (please report it)", file=sys.stderr)
        return 3


def _flush_output(code: int) -> int:
    """Flush stdout here, not at interpreter exit: a pipe or a file is block-buffered, so this is where
    writing usually fails, and past main() a failure can only print "Exception ignored" and exit 120."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # the reader left early: the verdict stands
        silence_stdout()
    except OSError as exc:
        silence_stdout()
        fail(f"cannot write the output: {exc.strerror or exc}")
        return max(code, 2)  # a lost answer is no success, and a bug (3) stays a bug
    return code


def main(argv: list[str] | None = None) -> int:
    return _flush_output(_run(argv))


if __name__ == "__main__":
    sys.exit(main())
