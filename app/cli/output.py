"""What every command shares: the parser that errs in one line, the plan options as flags, and
writing the output so that a reader leaving early never changes the exit code (the verdict)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
import typing

from pydantic import ValidationError

from planner.options import TrainingOptions

GIB = 1 << 30


class UsageError(Exception):
    """Bad input a command found itself (not pydantic, not the planner): exit 2 with this line."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (the contract), not the whole usage block."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"vramplan: error: {message} (see {self.prog} --help)\n")


class OutputError(Exception):
    """stdout could not be written (full disk, device gone): the environment, not bad input and not a bug."""


def silence_stdout() -> None:
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


def write(text: str) -> None:
    """print() for command output. A reader that leaves early (`| head -c 1`) is no error and must not
    change the exit code, which is the verdict: stdout goes quiet and the command runs on to its verdict."""
    try:
        print(text)
    except BrokenPipeError:
        silence_stdout()
    except OSError as exc:
        raise OutputError(exc.strerror or str(exc)) from exc


def write_json(data) -> None:
    # NaN and Infinity are not JSON: a reader's parser would refuse the whole output. A non-finite
    # number reaching here is a bug, and the ValueError is reported as one (exit 3).
    write(json.dumps(data, allow_nan=False))


def is_bool(annotation) -> bool:
    """bool, or an optional bool (None: not given, the default decides): --flag / --no-flag."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if annotation is bool:
        return True
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1 and is_bool(args[0])


def option_flags(parser: argparse.ArgumentParser, model=TrainingOptions, title: str = "plan options (JSON fields use underscores)") -> None:
    group = parser.add_argument_group(title)
    for name, info in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        annotation = info.annotation
        if is_bool(annotation):
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
            continue
        choices = None
        args = typing.get_args(annotation)
        literal = [a for a in args if typing.get_origin(a) is typing.Literal] or ([annotation] if typing.get_origin(annotation) is typing.Literal else [])
        # a list field takes comma-separated names, which argparse's choices would refuse whole
        if literal and name != "lora_targets" and typing.get_origin(annotation) is not list:
            choices = typing.get_args(literal[0])
        group.add_argument(flag, dest=name, default=argparse.SUPPRESS, metavar=name.upper(), help=f"one of {', '.join(choices)}" if choices else None)


def parse_options(namespace: argparse.Namespace, model=TrainingOptions):
    given = {k: v for k, v in vars(namespace).items() if k in model.model_fields}
    return model.model_validate(given)


def validation_message(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int)) or "options"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}"


def fail(message: str) -> int:
    print(f"vramplan: error: {message}", file=sys.stderr)
    return 2
