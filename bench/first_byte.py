"""Time to the first byte of the plan page, cold: a fresh `vramplan serve` per case, the trace
cache off (VRAMPLAN_TRACE_CACHE=off), the simulation on by default as a user gets it.

Cases (each the first request its server gets):
- first_visit: `GET /`, the default plan;
- shared_link: `GET /?…`, a result link someone shared (another model, GPU and sequence);
- fit_search_link: `GET /?…`, the page's "largest micro-batch" answer followed;
- upload: `POST /` with a config.json file (the upload form), a fresh server;
- upload_after_page: the same upload on a fresh server that has served `GET /` first (a user
  reaches the upload form from the page).

For each: the first byte, the whole response, which figure it shows (`formula`, `simulated`, or
none while an uploaded config is still being read; from the verdict's data-reserve-source, or its
words on pages that have none), and then what htmx asks for next (the fragment the page names, as
long as it names one: the plan of a config being read, then the traced plan in place of the
formula's), each with its first byte and the time since the first request. Target: every first byte under 1 s.
Results go to bench/results/first-byte-<date>.json (or --out).

    python bench/first_byte.py [--label after] [--out PATH] [--only first_visit,upload]
"""

from __future__ import annotations

import argparse
import datetime
import html
import json
import os
import platform
import re
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from load import Server  # noqa: E402  (vramplan serve in its own process group, port read from its log)

TARGET_S = 1.0
UPLOAD_CONFIG = ROOT / "planner" / "catalog" / "configs" / "mistralai__Mistral-7B-v0.3.json"
CASES = {
    "first_visit": ("GET", "/", None),
    "shared_link": ("GET", "/?" + urlencode({"model": "meta-llama/Llama-3.2-3B", "gpu": "NVIDIA GeForce RTX 4090", "method": "lora", "seq_len": "4096"}), None),
    "fit_search_link": ("GET", "/?" + urlencode({"model": "meta-llama/Llama-3.1-8B", "gpu": "NVIDIA RTX 4000 Ada Generation", "method": "qlora", "batch_size": "3"}), None),
    "upload": ("POST", "/", {"method": "lora", "gpu": "NVIDIA L4"}),
    "upload_after_page": ("POST", "/", {"method": "lora", "gpu": "NVIDIA L4"}),
}


def _multipart(fields: dict, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="config_file"; filename="{filename}"\r\n'
                 f"Content-Type: application/json\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def request(port: int, method: str, path: str, body: bytes = b"", content_type: str | None = None,
            headers: dict | None = None, timeout: float = 300) -> dict:
    """One request on a new connection: seconds to the first byte and to the end, status, body."""
    # what a browser's navigation sends: the page may answer that a config is still being read
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close",
             "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        started = time.perf_counter()
        sock.sendall(raw)
        first = sock.recv(1)
        first_byte = time.perf_counter() - started
        chunks = [first]
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        total = time.perf_counter() - started
    response = b"".join(chunks)
    head, _, content = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        content = _unchunk(content)
    return {"first_byte_s": round(first_byte, 3), "total_s": round(total, 3), "status": status, "body": content.decode("utf-8", "replace")}


def _unchunk(data: bytes) -> bytes:
    out, rest = [], data
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out.append(rest[:size])
        rest = rest[size + 2:]
    return b"".join(out)


def figure(body: str) -> str | None:
    """Which plan the page shows: the verdict's data-reserve-source, or its words."""
    found = re.search(r'data-reserve-source="(\w+)"', body)
    if found:
        return found.group(1)
    verdict = re.search(r'<div id="verdict".*?</div>\s*</div>', body, re.S)
    if verdict is None:
        return None
    return "simulated" if "allocator simulated" in verdict.group(0) else "formula"


def next_path(body: str) -> str | None:
    """The fragment the page asks for next (htmx): the plan of a config still being read, or the
    traced plan in place of the formula's."""
    found = re.search(r'<p id="refining"[^>]*hx-get="(/result\?[^"]*)"', body)
    return html.unescape(found.group(1)) if found else None


def run_case(name: str) -> dict:
    method, path, fields = CASES[name]
    server = Server(workers=1)
    try:
        warm_up = None
        if name == "upload_after_page":
            warm_up = request(server.port, "GET", "/")
            warm_up = {k: warm_up[k] for k in ("first_byte_s", "total_s", "status")}
            time.sleep(2)  # the user picks the file
        if method == "POST":
            body, content_type = _multipart(fields, UPLOAD_CONFIG.name, UPLOAD_CONFIG.read_bytes())
            started = time.perf_counter()
            first = request(server.port, method, path, body, content_type)
        else:
            started = time.perf_counter()
            first = request(server.port, method, path)
        result = {k: first[k] for k in ("first_byte_s", "total_s", "status")} | {"shows": figure(first["body"])}
        if warm_up is not None:
            result["after_get_index"] = warm_up
        result["pending_note"] = bool(re.search(r'id="refining"', first["body"]))
        result["no_js_refresh"] = bool(re.search(r'<meta http-equiv="refresh"', first["body"]))
        # what htmx does next: ask for the fragment the page names until the traced plan is shown
        body, result["then"] = first["body"], []
        while (follow := next_path(body)) is not None and len(result["then"]) < 4:
            step = request(server.port, "GET", follow, headers={"HX-Request": "true"})
            body = step["body"]
            result["then"].append({"refine": "refine=1" in follow, "first_byte_s": step["first_byte_s"], "status": step["status"],
                                   "shows": figure(body), "after_s": round(time.perf_counter() - started, 3)})
        if result["shows"] != "simulated" and result["then"] and result["then"][-1]["shows"] == "simulated":
            result["traced_plan_after_s"] = result["then"][-1]["after_s"]
        return result
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", default="")
    parser.add_argument("--out", default=None)
    parser.add_argument("--only", default=",".join(CASES))
    args = parser.parse_args()
    os.environ["VRAMPLAN_TRACE_CACHE"] = "off"
    os.environ.pop("VRAMPLAN_SIMULATE_ALLOCATOR", None)
    os.environ["VRAMPLAN_DATA_DIR"] = tempfile.mkdtemp(prefix="vramplan-first-byte-")
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    cases = {}
    for name in args.only.split(","):
        cases[name] = run_case(name)
        print(name, json.dumps(cases[name]), flush=True)
    result = {
        "date": datetime.date.today().isoformat(),
        "label": args.label,
        "commit": commit,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, CPython {platform.python_version()}",
        "trace_cache": "off",
        "target_first_byte_s": TARGET_S,
        "cases": cases,
        "all_under_target": all(c["first_byte_s"] < TARGET_S for c in cases.values()),
    }
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"first-byte-{result['date']}{'-' + args.label if args.label else ''}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "cases"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
