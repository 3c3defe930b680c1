"""`vramplan serve`: the web app and the JSON API."""

from __future__ import annotations

import argparse
import os
import sys


def cmd_serve(args) -> int:
    import dataclasses

    from app.server import ClientLimits, ServerLimits, serve

    try:
        limits = ServerLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServerLimits)})
        if args.workers < 1:
            raise ValueError(f"workers must be positive, got {args.workers}")
        for field, variable in ClientLimits.ENV.items():
            value = getattr(args, "client_" + field, None)
            if value is not None:
                if value < 1:  # refused here, not in each worker
                    raise ValueError(f"--{variable.removeprefix('VRAMPLAN_').lower().replace('_', '-')} must be a positive whole number, got {value}")
                os.environ[variable] = str(value)
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


def add_commands(sub) -> None:
    from app.server import ClientLimits, ServerLimits

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
    # per client address and for event streams: read from the environment by every worker
    # (app.server.ClientLimits), so the flags set it
    client = ClientLimits()
    for flag, field, help_text in (
        ("max-connections-per-client", "connections", "open connections one client address may hold; past it a new one is closed on accept"),
        ("max-streams", "streams", "run event streams (SSE) open at once; over it: 503"),
        ("max-streams-per-client", "streams_per_client", "run event streams one client address may hold; over it: 503"),
    ):
        serve_limits.add_argument("--" + flag, dest="client_" + field, type=int, default=argparse.SUPPRESS, metavar="N",
                                  help=f"{help_text} (default: ${ClientLimits.ENV[field]} or {getattr(client, field)})")
    serve_parser.set_defaults(func=cmd_serve)
