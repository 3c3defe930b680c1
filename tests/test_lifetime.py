"""No process outlives its server (issue 25, item 6): `vramplan serve` in a subprocess, a pasted
config built (which starts the build worker and multiprocessing's resource tracker), then kill -9 of
the server: within a few seconds none of its descendants is left. With --workers 2 the uvicorn
workers and their build workers go too.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

import psutil
import pytest

CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256}


def _serve(*flags):
    err = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", "0", *flags], stdout=subprocess.DEVNULL, stderr=err,
                            start_new_session=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        err.seek(0)
        found = re.search(r"serving on http://127\.0\.0\.1:(\d+) ", err.read())
        if found:
            return proc, int(found.group(1)), err
        assert proc.poll() is None
        time.sleep(0.1)
    raise AssertionError("the server did not start")


def _plan(port: int, config: dict) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/plan", method="POST",
                                     data=json.dumps({"config_json": json.dumps(config), "method": "lora", "gpu_memory_gib": 8}).encode(),
                                     headers={"Content-Type": "application/json"})
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_kill_9_of_the_server_leaves_no_process_behind(workers):
    proc, port, err = _serve("--workers", workers)
    try:
        for hidden in (64, 96, 128):  # with two workers, builds land on either
            assert _plan(port, {**CONFIG, "hidden_size": hidden}) == 200
        family = psutil.Process(proc.pid).children(recursive=True)
        names = [" ".join(p.cmdline())[:120] for p in family]
        assert len(family) >= (2 if workers == "1" else 4), names  # build worker + resource tracker (+ uvicorn workers)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        gone, alive = psutil.wait_procs(family, timeout=6)
        assert not alive, [" ".join(p.cmdline())[:120] for p in alive]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        err.close()
