"""`vramplan serve`: uvicorn (httptools, uvloop) with limits that hold whatever a client does.

Stock uvicorn with httptools buffers a request header of any size, keeps a connection that never
finishes its header open for good, and caps neither open connections nor descriptors; and
uvloop (libuv >= 1.45) accepts one connection per turn of the event loop, so a busy worker lets
new connections wait for seconds in the kernel's queue (the p99 of 12.9 s at 500 connections).
Here, per worker:

- a request line plus headers over `max_header_bytes` is answered 431 and closed, having buffered
  no more than the limit;
- headers must be complete within `header_timeout` of the connection opening or of the previous
  response ending, and a body within `body_timeout` of its headers; else the connection closes;
- an idle keep-alive connection closes after `keep_alive_timeout` (uvicorn's own timer);
- over `limit_concurrency` requests in progress, a request is answered 503 (`retry-after: 1`,
  `connection: close`) at once, so overload sheds instead of queueing. This replaces uvicorn's
  limit_concurrency, which counts open connections too: past it, every request on every
  connection, idle keep-alive ones included, is refused until connections close;
- over `max_connections` open connections, a new connection is closed as soon as it is accepted,
  and so is one past `ClientLimits.connections` open from the same address: one client cannot take
  every connection;
- `GET /healthz` is outside the work limit (never shed with the work, never waiting for a slot),
  and so are event streams (`/api/v1/runs/{id}/events`, open for up to 10 minutes each): they have
  limits of their own, `ClientLimits.streams` per worker and `ClientLimits.streams_per_client`
  per address, past which a new stream is answered 503;
- connections are accepted in batches, so the listening queue drains however busy the loop is,
  and on Linux each worker listens on a socket of its own (SO_REUSEPORT), so the kernel, not a
  race between workers, spreads them;
- the soft RLIMIT_NOFILE is raised to the hard limit, and `max_connections` kept below it.

Only the standard library is imported at the top: `vramplan check` builds the `serve` flags from
ServerLimits and must stay fast. uvicorn, httptools and uvloop load when the server starts.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import logging
import os
import socket
import sys
import time
from typing import ClassVar

from app.http_policy import DEFAULT_ALLOWED_HOSTS

# Connections accepted per readiness event of a listening socket: enough to drain hundreds
# within a few turns of a busy loop.
ACCEPT_BATCH = 64
# On Linux each worker listens on a socket of its own (SO_REUSEPORT) and the kernel spreads new
# connections across them evenly. On one shared socket the first worker awake takes a burst
# whole: 32 keep-alive connections all on one of two workers halved the throughput.
REUSE_PORT = sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")
BACKLOG = 2048
# descriptors a worker needs besides its connections (listening socket, pipes, logs, imports)
FD_RESERVE = 64
# Names the app answers to unless VRAMPLAN_ALLOWED_HOSTS (or --allowed-hosts) says otherwise. A
# page on any site can make the user's browser post to 127.0.0.1, and a rebinding domain can
# resolve to it: refusing other Host names (and cross-site Origins, app/main.py) stops both.
# one warning per this many seconds while shedding: one per 503 would cost the CPU the 503 saved
SHED_NOTE_INTERVAL = 10.0


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """Per worker. Seconds are wall clock; byte counts include the request line."""

    max_header_bytes: int = 64 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: float = 5.0
    limit_concurrency: int = 64
    max_connections: int = 1024

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if not getattr(self, field.name) > 0:
                raise ValueError(f"{field.name} must be positive, got {getattr(self, field.name)}")


@dataclasses.dataclass(frozen=True)
class ClientLimits:
    """Per worker, what one client address may hold, and the event streams in all. Read from the
    environment (VRAMPLAN_MAX_CONNECTIONS_PER_CLIENT, VRAMPLAN_MAX_STREAMS,
    VRAMPLAN_MAX_STREAMS_PER_CLIENT), so spawned workers see the same."""

    connections: int = 128
    streams: int = 256
    streams_per_client: int = 16

    ENV: ClassVar[dict[str, str]] = {"connections": "VRAMPLAN_MAX_CONNECTIONS_PER_CLIENT", "streams": "VRAMPLAN_MAX_STREAMS",
                                     "streams_per_client": "VRAMPLAN_MAX_STREAMS_PER_CLIENT"}

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"{self.ENV[field.name]} must be a positive whole number, got {value!r}")

    @classmethod
    def from_env(cls, environ=None) -> ClientLimits:
        environ = os.environ if environ is None else environ
        given = {}
        for name, var in cls.ENV.items():
            text = environ.get(var, "").strip()
            if text:
                try:
                    given[name] = int(text)
                except ValueError:
                    raise ValueError(f"{var} must be a positive whole number, got {text!r}") from None
        return cls(**given)


def raise_fd_limit() -> int:
    """Raises the soft RLIMIT_NOFILE to the hard limit (workers inherit it); returns the soft limit."""
    try:
        import resource
    except ImportError:  # not POSIX: nothing to raise
        return 1 << 16
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it may resolve to anything
        return False


def _bind(host: str, port: int) -> socket.socket:
    """The address, held (and checked) before the workers start. Listening on it is left to the
    workers where they each have a socket of their own."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if REUSE_PORT:
        # a plain bind first: with SO_REUSEPORT alone, a second `vramplan serve` on a port already
        # served would join the first one's group and take half its connections, silently
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
            port = probe.getsockname()[1]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if REUSE_PORT:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if not REUSE_PORT:
            sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _worker_listener(shared: socket.socket, backlog: int) -> socket.socket | None:
    """A listening socket of this worker's own on the shared socket's address, or None where
    the shared socket is the one to listen on."""
    if shared.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return None
    own = socket.socket(shared.family, socket.SOCK_STREAM)
    own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    own.bind(shared.getsockname())
    own.listen(backlog)
    return own


def serve(host: str = "127.0.0.1", port: int = 8000, workers: int = 1, limits: ServerLimits = ServerLimits(),
          app: str = "app.main:app", sign_in: str | None = None) -> int:
    """Serves `app` until Ctrl+C or SIGTERM. Returns an exit code: 0; 2 when the address is taken
    or the installed uvicorn cannot enforce the limits; 3 when the server did not start.
    `sign_in`: a line to print once the address is known, "{url}" standing for the server's URL."""
    try:
        import httptools  # noqa: F401  (uvicorn would fall back to h11, which has none of these limits)
        import uvicorn
        from uvicorn.supervisors import Multiprocess
    except ImportError as exc:
        print(f"vramplan: error: serving needs uvicorn[standard] ({exc.name} is missing): pip install 'vramplan[web]'", file=sys.stderr)
        return 2
    try:
        _classes()
    except RuntimeError as exc:
        print(f"vramplan: error: {exc}", file=sys.stderr)
        return 2
    fd_limit = raise_fd_limit()
    if limits.max_connections > fd_limit - FD_RESERVE:
        limits = dataclasses.replace(limits, max_connections=max(1, fd_limit - FD_RESERVE))
        print(f"vramplan: note: at most {limits.max_connections} connections per worker (RLIMIT_NOFILE is {fd_limit})", file=sys.stderr)
    try:
        client_limits = ClientLimits.from_env()
    except ValueError as exc:
        print(f"vramplan: error: {exc}", file=sys.stderr)
        return 2
    try:
        sock = _bind(host, port)
    except OSError as exc:
        print(f"vramplan: error: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app,
        host=host,
        port=sock.getsockname()[1],
        workers=workers,
        # a string, not the class: with --workers the config is pickled into spawned processes
        http=f"{__name__}:http_protocol",
        loop=f"{__name__}:new_event_loop",
        timeout_keep_alive=limits.keep_alive_timeout,
        backlog=BACKLOG,
        ws="none",  # no WebSocket routes: an upgrade is an ordinary request
        log_level="warning",
    )
    config.vramplan_limits = limits  # travels with the config to each worker
    config.vramplan_client_limits = client_limits
    shown = f"[{host}]" if ":" in host else host
    print(f"vramplan: serving on http://{shown}:{config.port} (API docs at /docs); Ctrl+C stops", file=sys.stderr)
    if sign_in:
        reachable = "127.0.0.1" if host in ("0.0.0.0", "::") else shown
        print(sign_in.replace("{url}", f"http://{reachable}:{config.port}"), file=sys.stderr)
    if not is_loopback(host):
        print(f"vramplan: note: {host} is not a loopback address: the server is reachable from the network. Planning is open to anyone "
              "who reaches it (--auth all closes it); launching needs the token, which plain http sends unencrypted: put TLS in front", file=sys.stderr)
        allowed = os.environ.get("VRAMPLAN_ALLOWED_HOSTS", DEFAULT_ALLOWED_HOSTS)
        if "*" not in allowed:
            print(f"vramplan: note: it answers to the Host names {allowed} only; add the name others use with --allowed-hosts NAME[,NAME] ('*' for any)", file=sys.stderr)
    sys.stderr.flush()
    try:
        if workers > 1:
            Multiprocess(config, sockets=[sock]).run()
            return 0
        server = uvicorn.Server(config)
        server.run(sockets=[sock])
        return 0 if server.started else 3
    except KeyboardInterrupt:
        return 0
    finally:
        sock.close()


def http_protocol(config, server_state, app_state, _loop=None):
    """What uvicorn calls per connection (`http=`); builds the protocol class on first use."""
    return _classes()[0](config, server_state, app_state, _loop)


def new_event_loop():
    """The loop factory (`loop=`): uvloop, accepting in batches; asyncio's own loop without uvloop.
    In a worker of `--workers N` (a spawned process) it is the first thing to run: the worker
    starts watching its parent then, and ends with it (app/lifetime.py)."""
    import multiprocessing

    if multiprocessing.parent_process() is not None:
        from app.lifetime import exit_with_parent

        exit_with_parent()
    loop_class = _classes()[1]
    if loop_class is None:
        import asyncio

        return asyncio.new_event_loop()
    return loop_class()


@functools.cache
def _classes():
    import asyncio
    import errno
    import re

    import httptools
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

    if not hasattr(HttpToolsProtocol, "_start_asgi_task"):  # older uvicorn: the limit would count nothing
        import uvicorn

        raise RuntimeError(f"vramplan serve needs uvicorn 0.54 or newer (this is {uvicorn.__version__})")
    log = logging.getLogger("uvicorn.error")
    # what the app's guard adds to every response, for the two answered before the app: the 503 and the 431
    guard_headers = [(b"x-content-type-options", b"nosniff"), (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
                     (b"x-frame-options", b"DENY"), (b"referrer-policy", b"same-origin"), (b"cross-origin-opener-policy", b"same-origin"),
                     (b"cross-origin-resource-policy", b"same-origin"), (b"cache-control", b"no-store")]
    shed_headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"19"),
                    (b"retry-after", b"1"), (b"connection", b"close"), *guard_headers]

    async def shed(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 503, "headers": shed_headers})
        await send({"type": "http.response.body", "body": b"Service Unavailable"})

    stream_path = re.compile(r"^/api/v1/runs/[^/]+/events$")

    class Streams:
        """The app, for event streams: counted apart from the work (a stream waits, it does not
        work), per worker and per client address."""

        def __init__(self, app) -> None:
            self.app = app
            self.open = 0
            self.by_client: dict[str, int] = {}

        def admits(self, client: str, limits: ClientLimits) -> bool:
            return self.open < limits.streams and self.by_client.get(client, 0) < limits.streams_per_client

        def app_for(self, client: str):
            self.open += 1
            self.by_client[client] = self.by_client.get(client, 0) + 1

            async def stream(scope, receive, send) -> None:
                try:
                    await self.app(scope, receive, send)
                finally:
                    self.open -= 1
                    left = self.by_client[client] - 1
                    if left:
                        self.by_client[client] = left
                    else:
                        del self.by_client[client]

            return stream

    class Admission:
        """The app, counting the requests it is running. Counted from the moment a request's
        task is created to the moment the app returns: a burst arriving in one turn of the loop
        sees every request admitted before it (uvicorn's len(tasks) lags a turn behind, and counts
        the 503s too, so once overloaded it refuses everything)."""

        def __init__(self, app) -> None:
            self.app = app
            self.running = 0
            self.shed = 0
            self.noted = float("-inf")

        def note_shed(self, limit: int, what: str = "") -> None:
            self.shed += 1
            now = time.monotonic()
            if now - self.noted >= SHED_NOTE_INTERVAL:
                if what:
                    log.warning("%d request(s) answered 503: too many open %s (ClientLimits)", self.shed, what)
                else:
                    log.warning("%d request(s) answered 503: %d requests in progress is the limit (--limit-concurrency)", self.shed, limit)
                self.shed, self.noted = 0, now

        async def __call__(self, scope, receive, send) -> None:
            try:
                await self.app(scope, receive, send)
            finally:
                self.running -= 1

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        """HttpToolsProtocol with a header size limit, header and body timeouts and a cap on
        open connections. One timer per connection: headers, then body, then the next headers."""

        def __init__(self, config, server_state, app_state, _loop=None):
            super().__init__(config, server_state, app_state, _loop)
            self.limits: ServerLimits = getattr(config, "vramplan_limits", None) or ServerLimits()
            self.client_limits: ClientLimits = getattr(config, "vramplan_client_limits", None) or ClientLimits()
            self.address: str | None = None  # counted in the per-client table while open
            self.awaiting_headers = True
            self.header_bytes = 0
            self.read_timer: asyncio.TimerHandle | None = None
            self.refused = False
            self.headers_seen = 0

        def connection_made(self, transport):
            peer = transport.get_extra_info("peername")
            address = str(peer[0]) if isinstance(peer, tuple) and peer else ""
            per_client = self.server_state.__dict__.setdefault("per_client", {})
            if len(self.connections) >= self.limits.max_connections or per_client.get(address, 0) >= self.client_limits.connections:
                # before uvicorn registers it: never counted, never read, descriptor freed now
                self.transport, self.refused = transport, True
                transport.close()
                return
            per_client[address] = per_client.get(address, 0) + 1
            self.address = address
            super().connection_made(transport)
            self._arm(self.limits.header_timeout)

        def connection_lost(self, exc):
            self._disarm()
            if self.address is not None:
                per_client = self.server_state.per_client
                left = per_client.get(self.address, 1) - 1
                if left > 0:
                    per_client[self.address] = left
                else:
                    per_client.pop(self.address, None)
                self.address = None
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.refused:  # bytes that were already on their way when it was closed
                return
            while self.awaiting_headers and len(data) > self.limits.max_header_bytes - self.header_bytes:
                # feed only what the limit allows; if a header ends inside it, go on with the rest
                # (a body, or the next of several pipelined requests, on a budget of its own)
                room = max(self.limits.max_header_bytes - self.header_bytes, 0)
                head, data = data[:room], data[room:]
                self.header_bytes += len(head)
                seen = self.headers_seen
                if head:
                    super().data_received(head)
                if self.transport.is_closing() or self.parser is None:
                    return
                if self.headers_seen == seen:
                    self._refuse_header()
                    return
            if self.awaiting_headers:
                self.header_bytes += len(data)
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self.awaiting_headers = False
            self.headers_seen += 1
            self._arm(self.limits.body_timeout)
            admission = self.server_state.__dict__.get("admission")
            if admission is None:
                admission = self.server_state.admission = Admission(self.config.loaded_app)
                self.server_state.streams = Streams(self.config.loaded_app)
            # uvicorn takes self.app for the request while it builds the cycle
            method = self.parser.get_method()
            try:
                path = httptools.parse_url(self.url).path
            except httptools.HttpParserInvalidURLError:
                path = b""
            if path == b"/healthz" and method in (b"GET", b"HEAD"):
                self.app = self.config.loaded_app  # outside the work limit: a health check never waits for a slot
            elif stream_path.match(path.decode("latin-1")) and method == b"GET":
                streams = self.server_state.streams
                if streams.admits(self.address or "", self.client_limits):
                    self.app = streams.app_for(self.address or "")
                else:
                    self.app = shed
                    admission.note_shed(self.limits.limit_concurrency, what="event streams")
            elif admission.running < self.limits.limit_concurrency:
                self.app = admission
            else:
                self.app = shed
                admission.note_shed(self.limits.limit_concurrency)
            try:
                super().on_headers_complete()
            finally:
                self.app = self.config.loaded_app

        def _start_asgi_task(self, cycle, app) -> None:
            # counted here, not at admission: a pipelined request waiting in self.pipeline
            # may never start, and an upgrade never starts a task
            if isinstance(app, Admission):
                app.running += 1
            super()._start_asgi_task(cycle, app)

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()
            self.awaiting_headers = True
            self.header_bytes = 0

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # uvicorn arms its keep-alive timer only when idle (no pipelined request waiting);
            # data cancels that one, so a header trickled byte by byte needs this one
            if self.awaiting_headers and self.timeout_keep_alive_task is not None:
                self._arm(self.limits.header_timeout)

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self.read_timer = self.loop.call_later(seconds, self._timed_out)

        def _disarm(self) -> None:
            if self.read_timer is not None:
                self.read_timer.cancel()
                self.read_timer = None

        def _timed_out(self) -> None:
            self.read_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def send_400_response(self, msg: str) -> None:
            # uvicorn's own answer to a request it cannot parse, with the guard's headers
            body = msg.encode("ascii", "replace")
            self.transport.write(b"".join([
                STATUS_LINE[400], b"content-type: text/plain; charset=utf-8\r\n",
                *(b"%s: %s\r\n" % header for header in guard_headers),
                b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body), body,
            ]))
            self.transport.close()

        def _refuse_header(self) -> None:
            if self.transport.is_closing():
                return
            if self.cycle is None or self.cycle.response_complete:  # never in the middle of a response
                body = b"request line and headers over %d bytes" % self.limits.max_header_bytes
                self.transport.write(b"".join([
                    STATUS_LINE[431], b"content-type: text/plain; charset=utf-8\r\n",
                    *(b"%s: %s\r\n" % header for header in guard_headers),
                    b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body), body,
                ]))
            self.transport.close()

    try:
        import uvloop
    except ImportError:  # asyncio's loop accepts up to the backlog at once already
        return LimitedHttpToolsProtocol, None

    class BatchAcceptServer:
        """Accepts up to ACCEPT_BATCH connections per readiness event (uvloop's own server takes
        one per turn of the loop). Stands in for the asyncio.Server that uvicorn keeps, which it
        only closes."""

        def __init__(self, loop, sock: socket.socket, protocol_factory, backlog: int):
            self.own = _worker_listener(sock, backlog)
            self.loop, self.sock, self.protocol_factory = loop, self.own or sock, protocol_factory
            self.sock.setblocking(False)
            self.closed = False
            loop.add_reader(self.sock, self._accept)

        def _accept(self) -> None:
            for _ in range(ACCEPT_BATCH):
                try:
                    conn, _ = self.sock.accept()
                except (BlockingIOError, InterruptedError):
                    return
                except ConnectionAbortedError:
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        raise
                    # out of descriptors: the kernel keeps queueing; retrying now would only spin
                    log.warning("accept paused for 1 s: %s", exc.strerror)
                    self.loop.remove_reader(self.sock)
                    self.loop.call_later(1.0, self._resume)
                    return
                if self._answered_at_accept(conn):
                    continue
                task = self.loop.create_task(self.loop.connect_accepted_socket(self.protocol_factory, conn))
                task.add_done_callback(_drop_result)

        def _answered_at_accept(self, conn: socket.socket) -> bool:
            """A health probe whose whole request is already here is answered now, in this turn of
            the loop, and closed (app/health.py answer_at_accept): never behind the turns a new
            connection otherwise waits, each running every plan that is ready."""
            try:
                head = conn.recv(2048, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except OSError:
                return False
            if not head.startswith((b"GET /healthz ", b"HEAD /healthz ")):
                return False
            try:
                from app.health import answer_at_accept

                reply = answer_at_accept(head)
            except Exception:
                log.exception("answering a health probe at accept failed")
                return False
            if reply is None:
                return False
            try:
                conn.recv(len(head), socket.MSG_DONTWAIT)  # consumed: the close is then a FIN, not a reset
                conn.send(reply, socket.MSG_DONTWAIT)
            except OSError:
                pass
            conn.close()
            return True

        def _resume(self) -> None:
            if not self.closed:
                self.loop.add_reader(self.sock, self._accept)

        def close(self) -> None:
            if not self.closed:
                self.closed = True
                self.loop.remove_reader(self.sock)
                if self.own is not None:
                    self.own.close()

        async def wait_closed(self) -> None:
            return None

    def _drop_result(task) -> None:
        if not task.cancelled():
            task.exception()  # a peer that left before the transport was made: nothing to report

    class BatchAcceptLoop(uvloop.Loop):
        async def create_server(self, protocol_factory, host=None, port=None, *, sock=None, ssl=None, backlog=100, **kwargs):
            if sock is None or ssl is not None:
                return await super().create_server(protocol_factory, host, port, sock=sock, ssl=ssl, backlog=backlog, **kwargs)
            return BatchAcceptServer(self, sock, protocol_factory, backlog)

    return LimitedHttpToolsProtocol, BatchAcceptLoop
