"""`vramplan serve` holds its limits against clients that misbehave: the real server in a
subprocess (`python -m app.cli serve`, small limits given as flags), spoken to over raw sockets.

Assertions are on behaviour (status lines, closed connections); time appears only as generous
upper bounds, seconds above the limit under test.
"""

import contextlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from app.server import ServerLimits, is_loopback

SLACK = 3.0  # seconds allowed beyond a timeout before the test calls it not enforced


class Server:
    def __init__(self, *flags: str, env: dict | None = None):
        self.flags = flags
        self.env = env or {}

    def __enter__(self):
        self.stderr = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", "0", *self.flags],
            stdout=subprocess.DEVNULL, stderr=self.stderr, start_new_session=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", **self.env},
        )
        try:
            self._wait_ready(time.monotonic() + 60)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            match = re.search(r"serving on http://127\.0\.0\.1:(\d+) ", self.err())
            if match:
                self.port = int(match.group(1))
                break
            assert self.proc.poll() is None, self.err()
            time.sleep(0.05)
        else:
            raise AssertionError("no 'serving on' line: " + self.err())
        while time.monotonic() < deadline:
            if self.health() == 200:
                return
            time.sleep(0.1)
        raise AssertionError("not healthy: " + self.err())

    def __exit__(self, *exc):
        # the whole group: workers and any process the app started go with the server
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        with contextlib.suppress(ProcessLookupError):  # stragglers that outlived the server
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.stderr.close()

    def err(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def health(self) -> int | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:
            return None

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def wait_healthy(self, seconds: float = 5) -> int | None:
        deadline = time.monotonic() + seconds
        while (status := self.health()) != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        return status


def read_all(sock: socket.socket, seconds: float = 10) -> bytes:
    """Everything the server sends until it closes; b"" for a reset."""
    sock.settimeout(seconds)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def status(reply: bytes) -> int | None:
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", reply)
    return int(match.group(1)) if match else None


def closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> float | None:
    """Seconds until the server closes `sock` (sending `trickle` every 0.25 s meanwhile, as a
    slowloris does), or None if it is still open after `seconds`."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        readable, _, _ = select.select([sock], [], [], 0.25)
        try:
            if readable and sock.recv(65536) == b"":
                return time.monotonic() - started
            if trickle:
                sock.sendall(trickle)
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - started
    return None


HEAD = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"


@pytest.fixture(scope="module")
def workers2():
    with Server("--workers", "2", "--max-header-bytes", "8192", "--header-timeout", "1", "--keep-alive-timeout", "1") as server:
        yield server


@pytest.fixture(scope="module")
def worker1():
    with Server("--workers", "1", "--header-timeout", "2", "--body-timeout", "3",
                "--limit-concurrency", "2", "--max-connections", "6") as server:
        yield server


def test_startup_line_names_the_url_and_only_loopback_is_quiet(workers2):
    lines = workers2.err().splitlines()
    assert lines[0] == f"vramplan: serving on http://127.0.0.1:{workers2.port} (API docs at /docs); Ctrl+C stops"
    assert not any("reachable from the network" in line for line in lines)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.org")


def test_serve_help_shows_the_limits_and_their_defaults():
    run = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0
    for flag, default in (("--max-header-bytes", 65536), ("--header-timeout", 10.0), ("--keep-alive-timeout", 5.0),
                          ("--limit-concurrency", 64), ("--max-connections", 1024)):
        assert flag in run.stdout
        assert getattr(ServerLimits(), flag[2:].replace("-", "_")) == default
        assert f"(default: {default})" in " ".join(run.stdout.split())


def test_the_client_limits_are_serve_flags_that_reach_every_worker(monkeypatch):
    """--max-connections-per-client and the stream limits set what each worker reads (ClientLimits.from_env)."""
    import argparse

    from app.cli import serve as serve_cli
    from app.server import ClientLimits

    seen = {}
    monkeypatch.setattr("app.server.serve", lambda *a, **k: seen.setdefault("limits", ClientLimits.from_env()) and 0)
    monkeypatch.setattr(serve_cli, "_sign_in_line", lambda: "")
    for variable in ClientLimits.ENV.values():
        monkeypatch.setenv(variable, "1")  # recorded as absent before: undone after the test, whatever cmd_serve sets
        monkeypatch.delenv(variable)
    parser = argparse.ArgumentParser()
    serve_cli.add_commands(parser.add_subparsers())
    args = parser.parse_args(["serve", "--max-connections-per-client", "7", "--max-streams-per-client", "3"])
    assert serve_cli.cmd_serve(args) == 0
    assert (seen["limits"].connections, seen["limits"].streams, seen["limits"].streams_per_client) == (7, 256, 3)
    refused = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--max-streams", "0"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and refused.stderr == "vramplan: error: --max-streams must be a positive whole number, got 0\n"


def test_a_limit_of_zero_is_refused_in_one_line():
    run = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--header-timeout", "0"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr == "vramplan: error: header_timeout must be positive, got 0.0\n"


def test_oversized_header_is_431_and_the_server_keeps_answering(workers2):
    with workers2.connect() as sock:
        sock.sendall(HEAD + b"X-Big: " + b"a" * 9000)  # unfinished, over the 8 KiB limit
        reply = read_all(sock)
    assert status(reply) == 431, reply[:200]
    # the tester's case, 8 MiB of header: the server stops reading at the limit and closes, so
    # the client cannot get it all out (stock uvicorn buffers every byte)
    with workers2.connect() as sock:
        sent = 0
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(HEAD)
            while sent < 8 << 20:
                sock.sendall(b"X-Big: " + b"a" * 16384 + b"\r\n")
                sent += 16393
        assert sent < 8 << 20
        assert status(read_all(sock)) in (431, None)  # None: the 431 lost to the reset
    assert workers2.health() == 200


def test_answers_given_before_the_app_carry_the_security_headers(workers2):
    with workers2.connect() as sock:
        sock.sendall(HEAD + b"X-Big: " + b"a" * 9000)
        too_large = read_all(sock)
    with workers2.connect() as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")  # uvicorn's own 400
        garbage = read_all(sock)
    for reply, code in ((too_large, 431), (garbage, 400)):
        assert status(reply) == code, reply[:200]
        for header in (b"x-content-type-options: nosniff", b"x-frame-options: deny", b"content-security-policy:", b"referrer-policy:"):
            assert header in reply.lower(), (code, header)


def test_a_body_past_the_header_limit_is_not_taken_for_a_header(workers2):
    body = b'{"model": "meta-llama/Llama-3.1-8B", "method": "qlora", "gpu": "H100", "pad": "' + b"x" * 20000 + b'"}'
    head = (b"POST /api/v1/check HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
    with workers2.connect() as sock:
        sock.sendall(head + body)  # one write: headers and 20 KB of body arrive together
        reply = read_all(sock)
    assert status(reply) in (200, 422), reply[:300]


def test_pipelined_requests_past_the_header_limit_each_get_their_own_budget(workers2):
    requests = [HEAD + b"\r\n"] * 299 + [HEAD + b"Connection: close\r\n\r\n"]
    with workers2.connect() as sock:
        sock.sendall(b"".join(requests))  # 12 KB in one write, each header 40 bytes
        reply = read_all(sock)
    assert reply.count(b"HTTP/1.1 200 ") == 300 and b" 431 " not in reply


def test_unfinished_header_is_closed_after_the_header_timeout(workers2):
    with workers2.connect() as sock:
        sock.sendall(HEAD)
        # a slowloris: a header line every 0.25 s keeps any idle timer from firing, never the header timer
        assert closed_within(sock, 1 + SLACK, trickle=b"X-a: b\r\n") is not None
    with workers2.connect() as sock:  # a connection that never sends a byte
        assert closed_within(sock, 1 + SLACK) is not None
    assert workers2.health() == 200


def test_idle_keep_alive_connection_is_closed(workers2):
    with workers2.connect() as sock:
        sock.sendall(HEAD + b"\r\n")
        sock.settimeout(10)
        assert status(sock.recv(65536)) == 200
        assert closed_within(sock, 1 + SLACK) is not None


def test_unfinished_body_is_closed_after_the_body_timeout(worker1):
    with worker1.connect() as sock:
        sock.sendall(b"POST /api/v1/check HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\": ")
        assert closed_within(sock, 3 + SLACK, trickle=b" ") is not None


def test_requests_over_the_concurrency_limit_get_503_at_once(worker1):
    holders = []
    try:
        for _ in range(2):  # two requests in progress, each waiting for the rest of its body
            sock = worker1.connect()
            sock.sendall(b"POST /api/v1/check HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{")
            holders.append(sock)
        time.sleep(0.3)
        assert select.select(holders, [], [], 0)[0] == [], "a holder was answered: a slot was still taken"
        started = time.monotonic()
        with worker1.connect() as sock:
            sock.sendall(b"GET /api/v1/gpus HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            reply = read_all(sock)
        assert status(reply) == 503 and b"retry-after: 1" in reply.lower()
        assert time.monotonic() - started < 2  # answered, not queued behind the held requests
        # the 503 answered before the app carries the guard's headers
        assert b"x-content-type-options: nosniff" in reply.lower() and b"content-security-policy" in reply.lower()
        # a health check is outside the work limit: never shed with the work
        assert worker1.health() == 200
    finally:
        for sock in holders:
            sock.close()
    assert worker1.wait_healthy() == 200  # the slots come back when the holders leave


def test_connections_past_the_per_worker_cap_are_closed_at_once(worker1):
    held = [worker1.connect() for _ in range(6)]
    try:
        time.sleep(0.3)  # all six registered, well inside the 2 s header timeout
        with worker1.connect() as extra:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                extra.sendall(b"GET /api/v1/gpus HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # a probe may be answered at accept
            assert read_all(extra) == b""  # closed without reading the request
        # one of the six is served: the cap refused the newcomer, not the held connections
        held[0].sendall(HEAD + b"\r\n")
        held[0].settimeout(10)
        assert status(held[0].recv(65536)) == 200
    finally:
        for sock in held:
            sock.close()
    assert worker1.wait_healthy() == 200


# -- per client: connections and event streams; health outside the work (issue 25, items 1-3) --------

TOKEN = "test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    """A server with 2 work slots, 3 event streams and 6 connections per client, and a run whose
    feed stays open (starting, no process recorded yet: the follower leaves it for a minute)."""
    from launcher.store import RunStore

    data = tmp_path_factory.mktemp("data")
    store = RunStore(data / "runs.sqlite")
    spec = {"run_id": "ab" * 16, "model": {"kind": "catalog", "location": "tiny"}, "options": {}, "plan": {}}
    store.create({"id": "ab" * 16, "backend": "nosuch", "backend_options_json": "{}", "state": "starting", "model": "tiny", "stage": "sft",
                  "method": "lora", "spec_json": json.dumps(spec), "plan_hash": "x", "predicted_peak_bytes": 1, "predicted_high_bytes": 1,
                  "num_gpus": 0, "run_dir": str(data / "runs" / "abab"), "output_dir": str(data / "out")})
    store.close()
    env = {"VRAMPLAN_DATA_DIR": str(data), "VRAMPLAN_TOKEN": TOKEN, "VRAMPLAN_MAX_STREAMS_PER_CLIENT": "3",
           "VRAMPLAN_MAX_CONNECTIONS_PER_CLIENT": "6"}
    with Server("--workers", "1", "--limit-concurrency", "2", "--max-connections", "64", env=env) as server:
        yield server


def _open_stream(server) -> socket.socket:
    sock = server.connect()
    sock.sendall(b"GET /api/v1/runs/" + b"ab" * 16 + b"/events HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Authorization: Bearer " + TOKEN.encode() + b"\r\n\r\n")
    return sock


def test_event_streams_do_not_hold_work_slots_and_have_a_per_client_cap(streams):
    opened = []
    try:
        for _ in range(3):  # more streams than work slots
            sock = _open_stream(streams)
            sock.settimeout(10)
            head = sock.recv(65536)
            assert status(head) == 200 and b"text/event-stream" in head, head[:300]
            opened.append(sock)
        # the two work slots are free: a request is answered, not shed
        with streams.connect() as sock:
            sock.sendall(b"GET /api/v1/gpus HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert status(read_all(sock)) == 200
        with _open_stream(streams) as extra:  # a fourth stream from the same client
            assert status(read_all(extra)) == 503
        assert streams.health() == 200
    finally:
        for sock in opened:
            sock.close()
    time.sleep(0.5)
    with _open_stream(streams) as again:  # the streams' places come back when they close
        again.settimeout(10)
        assert status(again.recv(65536)) == 200


def test_one_client_cannot_take_every_connection(streams):
    held = []
    try:
        for _ in range(6):
            sock = socket.create_connection(("127.0.0.1", streams.port), timeout=10, source_address=("127.0.0.2", 0))
            held.append(sock)
        time.sleep(0.3)
        extra = socket.create_connection(("127.0.0.1", streams.port), timeout=10, source_address=("127.0.0.2", 0))
        with extra:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                extra.sendall(b"GET /api/v1/gpus HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_all(extra) == b""  # closed without reading: the client holds its share
        assert streams.health() == 200  # another client (127.0.0.1) is served
        held[0].sendall(HEAD + b"\r\n")
        held[0].settimeout(10)
        assert status(held[0].recv(65536)) == 200
    finally:
        for sock in held:
            sock.close()


def test_a_health_probe_is_answered_at_accept_with_the_guards_rules(workers2):
    """A whole GET /healthz already waiting when the connection is accepted is answered there (not
    behind the loop's turns of planning), closed, with the security headers; a foreign Host or a
    request that is not exactly that goes to the app as before."""
    with workers2.connect() as sock:
        # answered at accept when the bytes are there first, by the app otherwise: the same answer
        sock.sendall(HEAD + b"Connection: close\r\n\r\n")
        reply = read_all(sock)
    assert status(reply) == 200 and b"connection: close" in reply.lower() and b"x-frame-options: DENY" in reply
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["status"] == "ok"
    with workers2.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: evil.com@127.0.0.1\r\nConnection: close\r\n\r\n")
        assert status(read_all(sock)) == 400
    with workers2.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert status(read_all(sock)) == 400


def test_answer_at_accept_takes_only_one_whole_probe():
    from app import health

    health.register(lambda: (200, b'{"status":"ok"}'))
    assert health.answer_at_accept(b"GET /healthz HTTP/1.1\r\nHost: localhost:8000\r\n\r\n").startswith(b"HTTP/1.1 200 OK\r\n")
    assert health.answer_at_accept(b"HEAD /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").endswith(b"\r\n\r\n")
    for head in (b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n",  # not whole yet
                 b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\nGET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",  # pipelined
                 b"GET /healthz?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"GET /healthz HTTP/1.1\r\n\r\n",
                 b"GET /healthz HTTP/1.1\r\nHost: attacker.example\r\n\r\n",
                 b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n\r\n"):
        assert health.answer_at_accept(head) is None, head
