"""Load benchmark: `POST /api/v1/plan` for a catalog model, 32 concurrent clients, with wrk
against `vramplan serve` on 127.0.0.1. Target: p99 under 50 ms, zero errors.

The server runs in its own process (uvicorn, one worker per core unless --workers); wrk
(Debian's package: apt-get install wrk) drives it for a bounded time and stops by itself.
Results go to bench/results/load-<date>.json.

    python bench/load.py [--seconds 20] [--connections 32] [--workers 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BODY = {"model": "meta-llama/Llama-3.1-8B", "method": "qlora", "gpu": "RTX 4000 Ada", "seq_len": 2048}
# wrk's Lua hooks: post the body, report latency percentiles and non-2xx counts as JSON
SCRIPT = """
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  io.write(string.format('RESULT {"requests": %%d, "seconds": %%f, "p50_ms": %%f, "p90_ms": %%f, "p99_ms": %%f, "max_ms": %%f, "non2xx": %%d, "socket_errors": %%d}\\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3, latency:percentile(90) / 1e3,
    latency:percentile(99) / 1e3, latency.max / 1e3, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_healthy(url: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("server did not become healthy")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--workers", str(args.workers)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_healthy(url)
        with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
            script.write(SCRIPT % json.dumps(BODY))
        # warm-up: first plans fill each worker's caches
        subprocess.run(["wrk", "-t2", "-c4", "-d2s", "-s", script.name, f"{url}/api/v1/plan"], capture_output=True, check=True)
        run = subprocess.run(
            ["wrk", "-t2", f"-c{args.connections}", f"-d{args.seconds}s", "--latency", "-s", script.name, f"{url}/api/v1/plan"],
            capture_output=True, text=True, check=True, timeout=args.seconds + 60,
        )
    finally:
        server.terminate()
        server.wait(timeout=20)
    match = re.search(r"RESULT (\{.*\})", run.stdout)
    figures = json.loads(match.group(1))
    figures["requests_per_second"] = round(figures["requests"] / figures["seconds"], 1)
    result = {
        "date": datetime.date.today().isoformat(),
        "endpoint": "POST /api/v1/plan",
        "body": BODY,
        "connections": args.connections,
        "workers": args.workers,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "tool": subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.splitlines()[0],
        **{k: round(v, 2) if isinstance(v, float) else v for k, v in figures.items()},
        "target": "p99 < 50 ms at 32 clients, zero errors",
    }
    result["met"] = result["p99_ms"] < 50 and result["non2xx"] == 0 and result["socket_errors"] == 0
    out = ROOT / "bench" / "results" / f"load-{result['date']}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
