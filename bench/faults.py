"""Fault benchmark for issue 25: what a user sees when the server's store, disk or processes fail.

Each scenario starts `vramplan serve` (one worker) from a checkout, in a process group of its own,
with a data directory, a token and roots of its own, produces one fault for real and records what a
client of the API is answered, or what is left running:

- corrupt_store: runs.sqlite overwritten with junk while serving -> GET /api/v1/runs, GET /healthz
- readonly_data_dir: the data directory (with its store) bind-mounted read-only in a mount
  namespace (`unshare -rm`; root ignores file modes) -> GET /api/v1/runs, GET /healthz, a launch
- kill9_server: three pasted configs planned (the build worker starts), kill -9 of the server ->
  its descendants still alive 6 s later
- kill9_trainer: a tiny local CPU run (random 2-layer Llama, in-process BPE tokenizer, 48 rows;
  0.5 s per step), kill -9 of its trainer process after the first step -> the run's state, reason
- toctou_dataset: a run launched on a dataset inside the roots, the dataset swapped for a symlink to
  a file outside right after the 201 -> the run's state, reason, and whether the outside file was
  read (its atime set older than its mtime first, so relatime advances it on a read)
- disk_full: the server in a mount namespace with its data directory's runs/ on a 192 KiB tmpfs, a
  run saving a checkpoint every step -> the run's state, reason (skipped when `unshare -rm` cannot
  mount)

The admission's load cap (VRAMPLAN_MAX_LOAD_PER_CPU) is off for every server: the machine is shared
and its load is not the fault measured. With --tree DIR the server runs from another checkout (the
code before the fixes), the faults and the client from this one. Results:
bench/results/faults-<date>[-<label>].json; --table BEFORE.json AFTER.json prints them side by side.

    python bench/faults.py [--tree DIR --label before] [--only corrupt_store,kill9_trainer]
    python bench/faults.py --table bench/results/faults-2026-12-05-before.json bench/results/faults-2026-12-05-after.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "faults-token-0123456789abcdef"
MARKER = "VRAMPLAN_RUN_ID"  # launcher/run_files.py: every process of a run carries it in its environment
CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 256}
SCENARIOS = ("corrupt_store", "readonly_data_dir", "kill9_server", "kill9_trainer", "toctou_dataset", "disk_full")
TIMEOUT_S = {"corrupt_store": 120, "readonly_data_dir": 180, "kill9_server": 180, "kill9_trainer": 300, "toctou_dataset": 300, "disk_full": 300}


class ScenarioTimeout(Exception):
    pass


# -- the tiny model and dataset (the tests' fixture, tests/tinyrun.py, in a few lines) ----------

def make_tiny_model(out: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    texts = [f"Is {i} even? The number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(300)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    fast.save_pretrained(out)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def write_dataset(path: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Is {i} even?"}, {"role": "assistant", "content": "yes" if i % 2 == 0 else "no"}]}
            for i in range(48)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


# -- the server and its client ------------------------------------------------------------------

class Server:
    """`vramplan serve --port 0 --workers 1` from `tree`, in a session of its own; `wrap` is a shell
    line run first in a mount namespace of its own (`unshare -rm`), the server exec'd after it."""

    def __init__(self, tree: Path, data: Path, roots: list[Path] | None = None, wrap: str | None = None, start_seconds: float = 90):
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed with the object
        serve = [sys.executable, "-m", "app.cli", "serve", "--port", "0", "--workers", "1"]
        command = ["unshare", "-rm", "sh", "-c", wrap + ' && exec "$@"', "sh", *serve] if wrap else serve
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tree), "VRAMPLAN_DATA_DIR": str(data), "VRAMPLAN_TOKEN": TOKEN,
               "VRAMPLAN_MAX_LOAD_PER_CPU": "0"}
        env.pop("VRAMPLAN_AUTH", None)
        if roots:
            env["VRAMPLAN_ROOTS"] = os.pathsep.join(str(r) for r in roots)
        self.proc = subprocess.Popen(command, cwd=tree, stdout=subprocess.DEVNULL, stderr=self.log, start_new_session=True, env=env)
        try:
            deadline = time.time() + start_seconds
            while time.time() < deadline:
                match = re.search(r"serving on http://127\.0\.0\.1:(\d+) ", self.stderr())
                if match:
                    self.port = int(match.group(1))
                    break
                if self.proc.poll() is not None:
                    raise RuntimeError("server exited: " + self.stderr()[-2000:])
                time.sleep(0.1)
            else:
                raise RuntimeError("server did not start: " + self.stderr()[-2000:])
            while time.time() < deadline:  # up, whatever /healthz then says
                with contextlib.suppress(OSError):
                    if request(self.port, "GET", "/healthz", timeout=2)[0]:
                        return
                time.sleep(0.2)
            raise RuntimeError("server did not answer: " + self.stderr()[-2000:])
        except BaseException:
            self.stop()
            raise

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):  # the group's stragglers (runs are in sessions of their own)
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)


def request(port: int, method: str, path: str, body: dict | None = None, timeout: float = 60) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    if body is not None:
        headers["Content-Type"] = "application/json"
    connection.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    response = connection.getresponse()
    text = response.read().decode(errors="replace")
    connection.close()
    return response.status, text


def says(text: str, words: int = 14) -> str:
    """The body's first words: an error's message, a health's error, else the body itself."""
    with contextlib.suppress(ValueError, AttributeError, IndexError, KeyError, TypeError):
        data = json.loads(text)
        if isinstance(data.get("detail"), list):
            text = data["detail"][0]["msg"]
        elif isinstance(data.get("detail"), str):
            text = data["detail"]
        elif "status" in data:
            store = data.get("store") or {}
            text = f"status {data['status']}" + (f"; store: {store.get('error')}" if isinstance(store, dict) and store.get("error") else "")
        elif "runs" in data:
            text = f"runs: {len(data['runs'])}"
    return " ".join(text.split()[:words])


def answered(port: int, method: str, path: str, body: dict | None = None) -> dict:
    try:
        status, text = request(port, method, path, body)
        return {"status": status, "says": says(text)}
    except OSError as exc:
        return {"status": None, "says": f"{type(exc).__name__}: {exc}"}


def health(port: int) -> dict:
    time.sleep(1.2)  # past the health cache's second (app/health.py)
    return answered(port, "GET", "/healthz")


def run_body(tiny: dict, dataset: Path, **settings) -> dict:
    return {"model": str(tiny["model"]), "dataset": str(dataset), "backend": "local", "device": "cpu", "precision": "fp32",
            "seq_len": 64, "batch_size": 2, "lora_r": 4, **settings}


def launch(port: int, body: dict) -> str:
    status, text = request(port, "POST", "/api/v1/runs", body, timeout=120)
    if status in (404, 405):
        raise LookupError(f"POST /api/v1/runs: {status} (no such API in this tree)")
    if status != 201:
        raise RuntimeError(f"launch answered {status}: {says(text, 40)}")
    return json.loads(text)["id"]


def poll_run(port: int, run_id: str, until, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, text = request(port, "GET", f"/api/v1/runs/{run_id}")
        if status == 200:
            run = json.loads(text)
            if until(run):
                return run
        time.sleep(0.3)
    raise ScenarioTimeout(f"run {run_id}: not there in {timeout:.0f} s (last: {text[:300]})")


def outcome(run: dict) -> dict:
    return {"state": run.get("state"), "reason": run.get("reason"), "message": " ".join(str(run.get("message") or "").split()[:30]),
            "last_step": run.get("last_step")}


def run_processes(run_id: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            if proc.pid != os.getpid() and proc.environ().get(MARKER) == run_id:
                found.append(proc)
    return found


def end_run(run_id: str) -> None:
    for proc in run_processes(run_id):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


# -- the scenarios ------------------------------------------------------------------------------

def make_store(tree: Path, data: Path) -> None:
    """An empty run store made by the tree's own code (a GET of the runs does not make one)."""
    data.mkdir(parents=True, exist_ok=True)
    code = "import sys; from pathlib import Path; from launcher.store import RunStore; RunStore(Path(sys.argv[1])).close()"
    made = subprocess.run([sys.executable, "-c", code, str(data / "runs.sqlite")], cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                          capture_output=True, text=True, timeout=60, check=False)
    if made.returncode:
        raise RuntimeError("the tree's store could not be made: " + made.stderr[-500:])


def corrupt_store(tree: Path, tmp: Path, tiny: dict) -> dict:
    data = tmp / "data"
    make_store(tree, data)
    server = Server(tree, data)
    try:
        before = {"runs": answered(server.port, "GET", "/api/v1/runs"), "healthz": health(server.port)}
        store = data / "runs.sqlite"
        store.write_bytes(b"this is not SQLite " * 500)
        for suffix in ("-wal", "-shm"):
            store.with_name(store.name + suffix).unlink(missing_ok=True)
        return {"fault": "runs.sqlite overwritten with junk while serving", "healthy_before": before,
                "runs": answered(server.port, "GET", "/api/v1/runs"), "healthz": health(server.port)}
    finally:
        server.stop()


def readonly_data_dir(tree: Path, tmp: Path, tiny: dict) -> dict:
    data = tmp / "data"
    make_store(tree, data)
    (tmp / "root").mkdir()
    dataset = write_dataset(tmp / "root" / "train.jsonl")
    server = Server(tree, data, roots=[tiny["model"].parent, tmp / "root"], wrap=f"mount --bind {data} {data} && mount -o remount,bind,ro {data}")
    try:
        result = {"fault": "the data directory, its store made by this tree, bind-mounted read-only before the server starts",
                  "runs": answered(server.port, "GET", "/api/v1/runs"), "healthz": health(server.port),
                  "launch": answered(server.port, "POST", "/api/v1/runs", run_body(tiny, dataset, max_steps=1))}
        time.sleep(2)
        return result
    finally:
        server.stop()


def kill9_server(tree: Path, tmp: Path, tiny: dict) -> dict:
    server = Server(tree, tmp / "data")
    family: list[psutil.Process] = []
    try:
        statuses = []
        for hidden in (64, 96, 128):
            status, _ = request(server.port, "POST", "/api/v1/plan", {"config_json": json.dumps({**CONFIG, "hidden_size": hidden}),
                                                                    "method": "lora", "gpu_memory_gib": 8}, timeout=120)
            statuses.append(status)
        family = psutil.Process(server.proc.pid).children(recursive=True)
        names = [" ".join(p.cmdline())[:100] for p in family]
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        _, alive = psutil.wait_procs(family, timeout=6)
        left = []
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                left.append({"cmdline": " ".join(proc.cmdline())[:100], "ppid": proc.ppid()})
        return {"fault": "kill -9 of `vramplan serve --workers 1` after three pasted configs were planned", "plan_statuses": statuses,
                "descendants_before": len(family), "descendant_cmdlines": names, "alive_6s_later": len(left), "left": left}
    finally:
        for proc in family:  # what outlived its server: started here, ended here
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        server.stop()


def kill9_trainer(tree: Path, tmp: Path, tiny: dict) -> dict:
    root = tmp / "root"
    root.mkdir()
    dataset = write_dataset(root / "train.jsonl")
    server = Server(tree, tmp / "data", roots=[tiny["model"].parent, root])
    run_id = None
    try:
        run_id = launch(server.port, run_body(tiny, dataset, max_steps=200, step_sleep_s=0.5, save_steps=1000))
        poll_run(server.port, run_id, lambda r: r["terminal"] or (r["state"] == "running" and (r.get("last_step") or 0) >= 1), 180)
        trainers = [p for p in run_processes(run_id) if "launcher.entry" in p.cmdline() and "launcher.shim" not in p.cmdline()]
        if len(trainers) != 1:
            return {"error": f"{len(trainers)} trainer processes found for the run"}
        trainers[0].kill()
        run = poll_run(server.port, run_id, lambda r: r["terminal"], 90)
        return {"fault": "kill -9 of the trainer (launcher.entry) of a running local CPU run, no cancel asked", **outcome(run),
                "processes_left": len(run_processes(run_id))}
    finally:
        if run_id:
            end_run(run_id)
        server.stop()


def toctou_dataset(tree: Path, tmp: Path, tiny: dict) -> dict:
    root, outside = tmp / "root", tmp / "outside"
    root.mkdir()
    outside.mkdir()
    dataset = write_dataset(root / "data.jsonl")
    secret = write_dataset(outside / "secret.jsonl")
    now = time.time()
    os.utime(secret, (now - 86400, now))  # atime older than mtime: relatime advances it on the next read
    atime = os.stat(secret).st_atime
    server = Server(tree, tmp / "data", roots=[tiny["model"].parent, root])
    run_id = None
    try:
        run_id = launch(server.port, run_body(tiny, dataset, max_steps=2))
        link = dataset.with_name("data.jsonl.link")
        link.symlink_to(secret)
        os.replace(link, dataset)
        run = poll_run(server.port, run_id, lambda r: r["terminal"], 240)
        return {"fault": "the dataset replaced by a symlink to a file outside the roots right after the 201", **outcome(run),
                "outside_file_read": os.stat(secret).st_atime > atime}
    finally:
        if run_id:
            end_run(run_id)
        server.stop()


def _can_mount() -> str | None:
    if shutil.which("unshare") is None:
        return "no unshare"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True, text=True, check=False)
    return None if probe.returncode == 0 else f"unshare -rm cannot mount a tmpfs: {probe.stderr.strip()[:200]}"


def disk_full(tree: Path, tmp: Path, tiny: dict) -> dict:
    why = _can_mount()
    if why:
        return {"skipped": why}
    root, data = tmp / "root", tmp / "data"
    root.mkdir()
    (data / "runs").mkdir(parents=True)
    dataset = write_dataset(root / "train.jsonl")
    server = Server(tree, data, roots=[tiny["model"].parent, root], wrap=f"mount -t tmpfs -o size=192k tmpfs {data / 'runs'}")
    run_id = None
    try:
        run_id = launch(server.port, run_body(tiny, dataset, max_steps=20, save_steps=1))
        run = poll_run(server.port, run_id, lambda r: r["terminal"], 240)
        return {"fault": "the data directory's runs/ on a 192 KiB tmpfs (the store on the real disk), a checkpoint every step", **outcome(run)}
    finally:
        if run_id:
            end_run(run_id)
        server.stop()


# -- the table ----------------------------------------------------------------------------------

def cell(result: dict, scenario: str) -> str:
    got = result["scenarios"].get(scenario)
    if got is None:
        return "not run"
    if "skipped" in got:
        return f"skipped: {got['skipped']}"
    if "not_applicable" in got:
        return f"n/a: {got['not_applicable']}"
    if "error" in got:
        return f"error: {got['error'][:120]}"
    if scenario in ("corrupt_store", "readonly_data_dir"):
        parts = [f"runs {got['runs']['status']} \"{got['runs']['says']}\"", f"healthz {got['healthz']['status']} \"{got['healthz']['says']}\""]
        if "launch" in got:
            parts.append(f"launch {got['launch']['status']} \"{got['launch']['says']}\"")
        return "; ".join(parts)
    if scenario == "kill9_server":
        return f"{got['alive_6s_later']} of {got['descendants_before']} descendants alive 6 s later"
    text = f"{got['state']}, reason {got['reason']}"
    if scenario == "toctou_dataset":
        text += f", last step {got['last_step']}, outside file read: {'yes' if got['outside_file_read'] else 'no'}"
    return text + (f" (\"{' '.join(got['message'].split()[:10])}…\")" if got.get("message") else "")


def table(before: dict, after: dict) -> str:
    lines = [f"| fault | before ({before['server_commit']}) | after ({after['server_commit']}) |", "|---|---|---|"]
    for scenario in SCENARIOS:
        row = [re.sub(r"/tmp/vramplan-faults-[^/]+/[^/ ]+/", "…/", cell(result, scenario)) for result in (before, after)]
        lines.append(f"| {scenario} | " + " | ".join(c.replace("|", "/") for c in row) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout the server runs from")
    parser.add_argument("--label", default="")
    parser.add_argument("--only", default=",".join(SCENARIOS))
    parser.add_argument("--table", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.table[0].read_text()), json.loads(args.table[1].read_text())))
        return 0
    tree = args.tree.resolve()

    def alarm(signum, frame):
        raise ScenarioTimeout("the scenario ran past its timeout")

    signal.signal(signal.SIGALRM, alarm)
    scenarios: dict = {}
    with tempfile.TemporaryDirectory(prefix="vramplan-faults-") as tmpname:
        tmp = Path(tmpname)
        tiny = {"model": make_tiny_model(tmp / "tiny" / "model")}
        for name in args.only.split(","):
            started = time.monotonic()
            work = tmp / name
            work.mkdir()
            signal.alarm(TIMEOUT_S[name])
            try:
                scenarios[name] = globals()[name](tree, work, tiny)
            except LookupError as exc:
                scenarios[name] = {"not_applicable": str(exc)}
            except Exception as exc:  # noqa: BLE001 - a scenario that broke is recorded as such
                scenarios[name] = {"error": f"{type(exc).__name__}: {exc}"[:1500]}
            finally:
                signal.alarm(0)
            scenarios[name]["seconds"] = round(time.monotonic() - started, 1)
            print(f"{name}: {json.dumps(scenarios[name])}", file=sys.stderr, flush=True)
    commit = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    result = {"date": datetime.date.today().isoformat(), "server_commit": commit, "label": args.label,
              "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "user": "root" if os.geteuid() == 0 else "not root"},
              "server": "vramplan serve --workers 1, VRAMPLAN_MAX_LOAD_PER_CPU=0, its other limits default",
              "timeouts_s": TIMEOUT_S, "scenarios": scenarios}
    name = f"faults-{result['date']}{'-' + args.label if args.label else ''}.json"
    (ROOT / "bench" / "results" / name).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
