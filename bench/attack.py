"""Attack benchmark for issue 25: is /healthz answered, quickly, while one client misbehaves?

Runs `vramplan serve` (one worker, its default limits) and, from a separate process, the attack;
this process probes `GET /healthz` from 127.0.0.1 every 50 ms on a fresh connection and records
each probe's status and latency.

- plan32: 32 keep-alive clients posting a catalog plan (as bench/load.py) for --seconds. Goal:
  /healthz p50 no slower than the plans' p50.
- flood: one source, 127.0.0.2, holds 1,050 connections that each send `GET / HTTP/1.1\\r\\n` and
  never finish (reopened whenever the server closes one), and 70 event streams of a run (reopened
  when refused or closed). Goal: 99% of the probes answered 200 within 100 ms.

With --tree DIR the server runs from another checkout (the code before a fix), the attack and the
probes from this one, so before and after are measured by the same clients. Results:
bench/results/attack-<date>[-<label>].json.

    python bench/attack.py [--seconds 10] [--only plan32,flood] [--tree DIR --label before]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import load  # noqa: E402 (bench/load.py: the server in a process group of its own)
BODY = {"model": "meta-llama/Llama-3.1-8B", "method": "qlora", "gpu": "RTX 4000 Ada", "seq_len": 2048}
TOKEN = "bench-token-0123456789abcdef"
RUN_ID = "ab" * 16
FLOOD_CONNECTIONS = 1050
FLOOD_STREAMS = 70
PROBE_INTERVAL_S = 0.05
PROBE_BUDGET_MS = 100


def _store_with_a_live_run(data: Path) -> None:
    """A run whose feed stays open: starting, no process recorded (the follower leaves it a minute)."""
    sys.path.insert(0, str(ROOT))
    from launcher.store import RunStore

    store = RunStore(data / "runs.sqlite")
    spec = {"run_id": RUN_ID, "model": {"kind": "catalog", "location": "tiny"}, "options": {}, "plan": {}}
    store.create({"id": RUN_ID, "backend": "nosuch", "backend_options_json": "{}", "state": "starting", "model": "tiny", "stage": "sft",
                  "method": "lora", "spec_json": json.dumps(spec), "plan_hash": "x", "predicted_peak_bytes": 1, "predicted_high_bytes": 1,
                  "num_gpus": 0, "run_dir": str(data / "runs" / "abab"), "output_dir": str(data / "out")})
    store.close()


def Server(tree: Path, data: Path):  # noqa: N802 - stands where the class was
    """bench/load.py's server, run from `tree` with its own data directory and token."""
    return load.Server(1, tree=tree, env={"VRAMPLAN_DATA_DIR": str(data), "VRAMPLAN_TOKEN": TOKEN, "PYTHONPATH": str(tree)},
                       start_seconds=90)


def probe(port: int, timeout: float = 5.0) -> tuple[int | None, float]:
    """(status or None, seconds) of one GET /healthz on a fresh connection from 127.0.0.1."""
    started = time.perf_counter()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=("127.0.0.1", 0)) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            head = sock.recv(65536)
        match = re.match(rb"HTTP/1\.[01] (\d{3}) ", head)
        return (int(match.group(1)) if match else None), time.perf_counter() - started
    except OSError:
        return None, time.perf_counter() - started


def prober(port: int, stop: threading.Event, out: list) -> None:
    while not stop.is_set():
        out.append(probe(port))
        time.sleep(PROBE_INTERVAL_S)


def summary(probes: list) -> dict:
    ms = sorted(1000 * s for _, s in probes)
    ok = [1000 * s for status, s in probes if status == 200]
    fast = sum(1 for status, s in probes if status == 200 and 1000 * s <= PROBE_BUDGET_MS)
    return {"probes": len(probes), "answered_200": len(ok), f"within_{PROBE_BUDGET_MS}ms_200": fast,
            "share_within_budget": round(fast / len(probes), 4) if probes else None,
            "statuses": {str(k): sum(1 for s, _ in probes if s == k) for k in {s for s, _ in probes}},
            "p50_ms": round(statistics.median(ms), 1) if ms else None, "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1) if ms else None,
            "max_ms": round(ms[-1], 1) if ms else None}


# -- the attack, in its own process -------------------------------------------------------------

async def _planner(port: int, until: float, latencies: list, statuses: dict) -> None:
    body = json.dumps(BODY).encode()
    request = (b"POST /api/v1/plan HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    reader = writer = None
    while time.monotonic() < until:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            code = head[9:12].decode()
            statuses[code] = statuses.get(code, 0) + 1
            if b"connection: close" in head.lower():
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError, AttributeError):
            statuses["error"] = statuses.get("error", 0) + 1
            writer = None
            await asyncio.sleep(0.01)
    if writer is not None:
        writer.close()


async def _holder(port: int, until: float, counts: dict) -> None:
    """One of the flood's connections: an unfinished request, reopened whenever it is closed."""
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
            counts["opened"] += 1
            writer.write(b"GET / HTTP/1.1\r\n")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(reader.read(1), max(0.01, until - time.monotonic()))
            writer.close()
        except OSError:
            counts["failed"] += 1
            await asyncio.sleep(0.05)


async def _streamer(port: int, until: float, counts: dict) -> None:
    request = (f"GET /api/v1/runs/{RUN_ID}/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n").encode()
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
            writer.write(request)
            head = await asyncio.wait_for(reader.read(512), 10)
            key = head[9:12].decode() or "closed"
            counts[key] = counts.get(key, 0) + 1
            if key == "200":
                with contextlib.suppress(asyncio.TimeoutError):
                    while await asyncio.wait_for(reader.read(65536), max(0.01, until - time.monotonic())):
                        pass
            else:
                await asyncio.sleep(0.5)
            writer.close()
        except (OSError, asyncio.TimeoutError):
            counts["error"] = counts.get("error", 0) + 1
            await asyncio.sleep(0.5)


async def _attack(kind: str, port: int, seconds: float) -> dict:
    until = time.monotonic() + seconds
    if kind == "plan32":
        latencies: list = []
        statuses: dict = {}
        await asyncio.gather(*(_planner(port, until, latencies, statuses) for _ in range(32)))
        ms = sorted(1000 * s for s in latencies)
        return {"plans": len(ms), "statuses": statuses, "p50_ms": round(statistics.median(ms), 1) if ms else None,
                "p99_ms": round(ms[int(0.99 * len(ms))], 1) if ms else None}
    counts = {"opened": 0, "failed": 0}
    streams: dict = {}
    await asyncio.gather(*(_holder(port, until, counts) for _ in range(FLOOD_CONNECTIONS)),
                         *(_streamer(port, until, streams) for _ in range(FLOOD_STREAMS)))
    return {"connections": FLOOD_CONNECTIONS, "connections_opened": counts["opened"], "connect_failures": counts["failed"],
            "streams": FLOOD_STREAMS, "stream_answers": streams}


def run_scenario(kind: str, port: int, seconds: float) -> dict:
    attack = subprocess.Popen([sys.executable, __file__, "--_attack", kind, "--port", str(port), "--seconds", str(seconds)],
                              stdout=subprocess.PIPE, text=True)
    time.sleep(2 if kind == "flood" else 1)  # the flood's connections are open before the probes start
    probes: list = []
    stop = threading.Event()
    thread = threading.Thread(target=prober, args=(port, stop, probes))
    thread.start()
    out, _ = attack.communicate(timeout=seconds + 120)
    stop.set()
    thread.join()
    return {"attack": json.loads(out.strip().splitlines()[-1]), "healthz": summary(probes)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--only", default="plan32,flood")
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout the server runs from")
    parser.add_argument("--label", default="")
    parser.add_argument("--_attack")
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    if args._attack:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        print(json.dumps(asyncio.run(_attack(args._attack, args.port, args.seconds))))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        _store_with_a_live_run(data)
        server = Server(args.tree.resolve(), data)
        scenarios = {}
        try:
            for _ in range(8):  # warm: the first plans fill the caches
                subprocess.run([sys.executable, "-c", "import json,sys,urllib.request as u;u.urlopen(u.Request(sys.argv[1],data=sys.argv[2].encode(),"
                                "headers={'Content-Type':'application/json'}),timeout=120).read()", f"http://127.0.0.1:{server.port}/api/v1/plan",
                                json.dumps(BODY)], check=False, timeout=180)
            for kind in args.only.split(","):
                scenarios[kind] = run_scenario(kind, server.port, args.seconds)
                time.sleep(3)
        finally:
            server.stop()
    commit = subprocess.run(["git", "-C", str(args.tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    result = {
        "date": datetime.date.today().isoformat(), "server_commit": commit, "label": args.label, "seconds_per_scenario": args.seconds,
        "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "load_average_before": round(os.getloadavg()[0], 2),
                    "note": "server, attack and probes share these cores (and other work on the machine)"},
        "server": "vramplan serve --workers 1, default limits", "scenarios": scenarios,
        "goals": {"plan32": "healthz p50 <= the plans' p50", "flood": f"99% of probes 200 within {PROBE_BUDGET_MS} ms"},
        "met": {"plan32": scenarios["plan32"]["healthz"]["p50_ms"] <= scenarios["plan32"]["attack"]["p50_ms"] if "plan32" in scenarios else None,
                "flood": (scenarios["flood"]["healthz"]["share_within_budget"] or 0) >= 0.99 if "flood" in scenarios else None},
    }
    name = f"attack-{result['date']}{'-' + args.label if args.label else ''}.json"
    (ROOT / "bench" / "results" / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
