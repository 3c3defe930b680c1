"""Load benchmark: `POST /api/v1/plan` for a catalog model, driven by wrk against `vramplan serve`
on 127.0.0.1 (its default limits, one worker per core), in three scenarios:

- 32 connections. Target: p99 under 50 ms, zero errors, no 503.
- 500 connections, far past the limit of requests in progress per worker: the excess must be
  answered 503 at once, not queued. Target: no starvation (p99 under 1 s), no socket errors;
  the 503s are counted.
- 32 connections beside hostile traffic: threads posting a pasted config that asks for a million
  layers to /api/v1/check, and slowloris connections trickling an unfinished header. Target: as
  for 32 connections.

The server runs in its own process group; wrk (Debian's package: apt-get install wrk) stops by
itself. Results go to bench/results/load-<date>.json.

    python bench/load.py [--seconds 15] [--workers N] [--only c32,c500,c32_hostile]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import http.client
import importlib.metadata
import json
import os
import platform
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from app.server import ServerLimits  # noqa: E402

BODY = {"model": "meta-llama/Llama-3.1-8B", "method": "qlora", "gpu": "RTX 4000 Ada", "seq_len": 2048}
HOSTILE_BODY = {"model": "x", "config_json": json.dumps({"model_type": "gpt2", "n_layer": 1000000, "n_embd": 64, "n_head": 4, "vocab_size": 1000})}
HOSTILE_THREADS = 4
SLOWLORIS = 40
TARGET_P99_MS = 50
STARVATION_P99_MS = 1000
# wrk's Lua hooks: post the body; count 503s apart from other non-2xx (per thread, summed in done);
# report latency percentiles as JSON
SCRIPT = """
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) shed = 0 end
function response(status, headers, body) if status == 503 then shed = shed + 1 end end
done = function(summary, latency, requests)
  local total_shed = 0
  for _, thread in ipairs(threads) do total_shed = total_shed + thread:get("shed") end
  io.write(string.format('RESULT {"requests": %%d, "seconds": %%f, "p50_ms": %%f, "p90_ms": %%f, "p99_ms": %%f, "max_ms": %%f, "non2xx": %%d, "status_503": %%d, "socket_errors": {"connect": %%d, "read": %%d, "write": %%d, "timeout": %%d}}\\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3, latency:percentile(90) / 1e3,
    latency:percentile(99) / 1e3, latency.max / 1e3, summary.errors.status, total_shed,
    summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.timeout))
end
"""


class Server:
    """`vramplan serve --port 0` in a process group of its own; the port read from its first line."""

    def __init__(self, workers: int, tree: Path = ROOT, env: dict | None = None, start_seconds: float = 60):
        """`tree`: the checkout to serve (bench/attack.py serves an older one beside this); `env`:
        more environment for the server."""
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--port", "0", "--workers", str(workers)],
            cwd=tree, stdout=subprocess.DEVNULL, stderr=self.log, start_new_session=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        )
        try:
            self._wait_ready(time.time() + start_seconds)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, deadline: float) -> None:
        while time.time() < deadline:
            self.log.seek(0)
            match = re.search(r"serving on http://127\.0\.0\.1:(\d+) ", self.log.read())
            if match:
                self.port = int(match.group(1))
                break
            if self.proc.poll() is not None:
                raise RuntimeError("server exited: " + self.stderr())
            time.sleep(0.1)
        else:
            raise RuntimeError("server did not start: " + self.stderr())
        self.url = f"http://127.0.0.1:{self.port}"
        while time.time() < deadline:
            with contextlib.suppress(OSError):
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                connection.request("GET", "/healthz")
                if connection.getresponse().status == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError("server did not become healthy: " + self.stderr())

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):  # stragglers that outlived the server
            os.killpg(self.proc.pid, signal.SIGKILL)


class Hostile:
    """Posts HOSTILE_BODY from a few threads and keeps SLOWLORIS connections trickling an
    unfinished header, reconnecting whenever the server closes one, until stopped."""

    def __init__(self, port: int):
        self.port = port
        self.stopping = threading.Event()
        self.statuses: dict[str, int] = {}
        self.latencies: list[float] = []
        self.slow_opened = 0
        self.slow_closed_after: list[float] = []
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(HOSTILE_THREADS + 1)

    def start(self) -> None:
        for _ in range(HOSTILE_THREADS):
            self.pool.submit(self._post_loop)
        self.pool.submit(self._slowloris)

    def stop(self) -> dict:
        self.stopping.set()
        self.pool.shutdown(wait=True)
        closed = self.slow_closed_after
        return {
            "check_posts": {"threads": HOSTILE_THREADS, "answered": sum(self.statuses.values()), "statuses": self.statuses,
                            "median_ms": round(1000 * statistics.median(self.latencies), 1) if self.latencies else None,
                            "max_ms": round(1000 * max(self.latencies), 1) if self.latencies else None},
            "slowloris": {"connections_at_once": SLOWLORIS, "opened": self.slow_opened, "closed_by_server": len(closed),
                          "median_seconds_to_close": round(statistics.median(closed), 1) if closed else None},
        }

    def _post_loop(self) -> None:
        while not self.stopping.is_set():
            self.post_once()

    def post_once(self) -> None:
        started = time.monotonic()
        try:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            connection.request("POST", "/api/v1/check", body=json.dumps(HOSTILE_BODY), headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            key = str(response.status)
            connection.close()
        except OSError as exc:
            key = type(exc).__name__
        with self.lock:
            self.statuses[key] = self.statuses.get(key, 0) + 1
            self.latencies.append(time.monotonic() - started)

    def _slowloris(self) -> None:
        opened: dict[socket.socket, float] = {}

        def open_one() -> None:
            with contextlib.suppress(OSError):
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                sock.sendall(b"POST /api/v1/plan HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                opened[sock] = time.monotonic()
                self.slow_opened += 1

        while not self.stopping.is_set():
            while len(opened) < SLOWLORIS and not self.stopping.is_set():
                open_one()
            readable, _, _ = select.select(list(opened), [], [], 1.0)
            for sock in list(opened):
                try:
                    if sock in readable and sock.recv(4096) == b"":
                        raise ConnectionResetError
                    sock.sendall(b"X-a: b\r\n")
                except OSError:
                    self.slow_closed_after.append(time.monotonic() - opened.pop(sock))
                    sock.close()
        for sock in opened:
            sock.close()


def wrk(url: str, script: str, connections: int, seconds: int, threads: int) -> dict:
    run = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "--latency", "-s", script, f"{url}/api/v1/plan"],
        capture_output=True, text=True, check=True, timeout=seconds + 60,
    )
    figures = json.loads(re.search(r"RESULT (\{.*\})", run.stdout).group(1))
    figures["requests_per_second"] = figures["requests"] / figures["seconds"]
    figures["ok_per_second"] = (figures["requests"] - figures["non2xx"]) / figures["seconds"]
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in figures.items()}


def _versions() -> dict:
    found = {"python": platform.python_version()}
    for name in ("uvicorn", "httptools", "uvloop", "fastapi", "starlette"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    found["wrk"] = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    return found


def _cpu() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _timed_plan(port: int) -> float:
    """Seconds for one POST of BODY on a fresh connection (any worker may take it)."""
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.request("POST", "/api/v1/plan", body=json.dumps(BODY), headers={"Content-Type": "application/json"})
    connection.getresponse().read()
    connection.close()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--threads", type=int, default=2, help="wrk's threads")
    parser.add_argument("--only", default="c32,c500,c32_hostile")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    wanted = args.only.split(",")
    load_before = os.getloadavg()[0]
    server = Server(args.workers)
    scenarios = {}
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
            script.write(SCRIPT % json.dumps(BODY))
        # warm-up: the first plans fill each worker's caches, and the first pasted config costs
        # each worker a one-off import (seconds): done here so the runs measure the steady state
        warm = Hostile(server.port)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: warm.post_once(), range(16)))
            # a plan simulates the allocator by default: each worker traces BODY's step once
            # (seconds, with torch's import), then answers it from memory
            deadline = time.time() + 180
            while max(pool.map(lambda _: _timed_plan(server.port), range(8))) > 1.0 and time.time() < deadline:
                pass
        wrk(server.url, script.name, 8, 3, args.threads)
        if "c32" in wanted:
            scenarios["c32"] = {"connections": 32, **wrk(server.url, script.name, 32, args.seconds, args.threads)}
        if "c500" in wanted:
            scenarios["c500"] = {"connections": 500, **wrk(server.url, script.name, 500, args.seconds, args.threads)}
            time.sleep(2)  # the shed connections' TIME_WAIT and the workers settle
        if "c32_hostile" in wanted:
            hostile = Hostile(server.port)
            cpu = time.process_time()
            hostile.start()
            time.sleep(2)  # the slowloris connections are all open before the measured run
            figures = wrk(server.url, script.name, 32, args.seconds, args.threads)
            # the hostile clients share this machine's cores with wrk and the server: their CPU
            # time is part of the picture
            report = {**hostile.stop(), "client_cpu_seconds": round(time.process_time() - cpu, 1)}
            scenarios["c32_hostile"] = {"connections": 32, **figures, "hostile": report}
    finally:
        server.stop()
        log = server.stderr()
        with contextlib.suppress(NameError, OSError):
            os.unlink(script.name)
    limits = ServerLimits()
    met = {}
    for name, figures in scenarios.items():
        errors = sum(figures["socket_errors"].values())
        if name == "c500":
            met[name] = figures["p99_ms"] < STARVATION_P99_MS and errors == 0 and figures["non2xx"] == figures["status_503"]
        else:
            met[name] = figures["p99_ms"] < TARGET_P99_MS and errors == 0 and figures["non2xx"] == 0
    result = {
        "date": datetime.date.today().isoformat(),
        "endpoint": "POST /api/v1/plan",
        "body": BODY,
        "seconds_per_scenario": args.seconds,
        "workers": args.workers,
        "wrk_threads": args.threads,
        "machine": {"cores": os.cpu_count(), "cpu": _cpu(), "platform": platform.platform(), "load_average_before": round(load_before, 2)},
        "versions": _versions(),
        "server_limits_per_worker": dataclasses.asdict(limits),
        "scenarios": scenarios,
        "hostile_traffic": {"check_body": HOSTILE_BODY, "check_threads": HOSTILE_THREADS, "slowloris_connections": SLOWLORIS},
        "server_warnings": [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line][:20],
        "targets": {
            "c32": f"p99 < {TARGET_P99_MS} ms, zero socket errors, zero non-2xx",
            "c500": f"p99 < {STARVATION_P99_MS} ms (no starvation), zero socket errors, every non-2xx a 503",
            "c32_hostile": f"as c32, beside {HOSTILE_THREADS} threads posting the hostile config and {SLOWLORIS} slowloris connections",
        },
        "met": met,
    }
    out = ROOT / "bench" / "results" / f"load-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
