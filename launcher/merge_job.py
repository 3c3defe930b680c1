"""A merge, run and measured: PEFT's merge_and_unload of a LoRA/DoRA adapter into its base, or one
of mergekit's methods over several models (`mergekit_merge_and_measure`, below).

Two ways in, one measurement (`merge_and_measure`):
- `vramplan merge BASE --run` (app/merge_run.py) starts `python -m launcher.merge_job ARGS_JSON`
  and reads the result file ARGS_JSON names;
- a launched merge (`vramplan merge BASE --launch`: a LaunchSpec with task "merge") runs under the
  shim like every run, on whichever backend starts it; launcher/entry.py hands it to `run_launched`,
  which reports through events.jsonl, so the run store keeps the measured peak beside the plan's.

The measurement: import torch, transformers and PEFT and build the model's class on the meta device
(so the modeling code is imported too), reset the kernel's peak RSS (clear_refs) and read the
resident memory: the baseline. Then load the base in the plan's dtype (never trust_remote_code),
load the adapter (PeftModel.from_pretrained), merge (merge_and_unload) and save safetensors shards
of the plan's shard size; read the peak resident memory (VmHWM; getrusage's ru_maxrss where /proc
is missing, which on Linux also carries the parent's peak across fork and exec) and, where CUDA
exists, torch's max_memory_allocated. The host peak is that peak less the baseline: what the merge
itself took, which is the plan's host peak less its host.runtime term (MergePlan.host_merge_bytes).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from launcher.run_report import EXIT_OOM, emit_plain, is_oom, library_versions

# glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after which the
# merge's per-layer temporaries come from the heap and stay there: the same merge then peaks
# anywhere from 0 to 20% higher from run to run. A fixed threshold hands every freed temporary back,
# and the peak repeats to the MiB (docs/serving.md). Set in the merge process's environment.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


class AdapterRefused(Exception):
    """PEFT would not load the adapter onto this base (an adapter for another model), or mergekit
    would not take the models or the config: bad input."""


def _status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak RSS of this process to its RSS now (Linux 4.0+: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes() -> tuple[int, str]:
    """The process's peak RSS. VmHWM where /proc has it: getrusage's ru_maxrss also holds the
    parent's peak at fork (Linux keeps the larger across fork and exec), so a child started by a
    process that once held more reports the parent's figure."""
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm, "VmHWM"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "ru_maxrss"


def _rss_bytes() -> int:
    rss = _status_bytes("VmRSS")
    if rss is not None:
        return rss
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _measured_common(torch, cuda: bool, output: str, seconds: float, baseline: int) -> dict:
    """What both engines' measurements report alike: the process, the GPU and the saved files."""
    import resource

    files = sorted(p.name for p in Path(output).iterdir())
    return {
        "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_imports_bytes": baseline,
        "gpu_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "gpu_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
        "device": "cuda" if cuda else "cpu",
        "seconds": round(seconds, 3),
        "files": files,
        "output_bytes": sum((Path(output) / f).stat().st_size for f in files if (Path(output) / f).is_file()),
    }


def merge_and_measure(base: str, adapter: str, output: str, dtype_name: str, device: str, max_shard_size: str) -> dict:
    """Merge and save; the measured peaks. A config or adapter the libraries cannot read raises
    AdapterRefused (bad input); anything else propagates."""
    import gc
    import resource

    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, dtype_name)
    cuda = device == "cuda" and torch.cuda.is_available()
    try:
        config = AutoConfig.from_pretrained(base, trust_remote_code=False)
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(config, trust_remote_code=False)  # imports the modeling code
        PeftConfig.from_pretrained(adapter)
    except (ValueError, OSError, KeyError) as exc:
        raise AdapterRefused(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    if cuda:
        torch.zeros(1, device="cuda")  # the CUDA context before the baseline
        torch.cuda.reset_peak_memory_stats()
    gc.collect()
    reset = _reset_peak()
    baseline = _rss_bytes()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, trust_remote_code=False, device_map="cuda" if cuda else None)
    try:
        model = PeftModel.from_pretrained(model, adapter)
    except (ValueError, RuntimeError, KeyError) as exc:  # PEFT's size mismatch: an adapter for another model
        raise AdapterRefused(f"PEFT refused the adapter: {str(exc).strip().splitlines()[0][:300]}") from None
    merged = model.merge_and_unload()
    merged.save_pretrained(output, max_shard_size=max_shard_size)
    seconds = time.monotonic() - start
    peak, peak_source = _peak_bytes()
    return {
        "host_peak_bytes": max(0, peak - baseline),
        "host_maxrss_bytes": peak,
        "peak_source": peak_source + (" (reset after the imports)" if reset and peak_source == "VmHWM" else ""),
        "maxrss_after_imports_bytes": maxrss_before,
        **_measured_common(torch, cuda, output, seconds, baseline),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "peft": __import__("peft").__version__, "safetensors": __import__("safetensors").__version__},
    }


class _AnonymousPeak:
    """The largest anonymous resident memory (RssAnon) seen, sampled every half millisecond in a
    thread. The kernel keeps a high-water mark only of the whole RSS, and a mergekit merge's RSS
    also holds the inputs' memory-mapped checkpoint pages, which the kernel takes back under
    pressure; what the merge needs is its anonymous memory. torch's kernels release the GIL, so the
    thread samples during them."""

    def __init__(self):
        import threading

        self.anon = self.file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.anon = max(self.anon, _status_bytes("RssAnon") or 0)
            self.file = max(self.file, _status_bytes("RssFile") or 0)
            self._stop.wait(0.0005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class _IntervalPeaks:
    """The anonymous peak between one output tensor and the next: the kernel's high-water mark less
    the file pages mapped at its end (the inputs of a tensor are read before it is computed), then
    the mark is reset (clear_refs) for the next. A sampler thread alone can miss a peak of a few
    milliseconds on a busy machine, and one high-water mark for the whole merge, less the pages
    mapped by its end, counts pages mapped only after the peak."""

    def __init__(self):
        self.anon = self.resident = 0
        # without clear_refs the mark is one for the whole merge: only the last reading is sound
        self.resettable = _reset_peak()

    def mark(self, last: bool = False) -> None:
        if not (self.resettable or last):
            return
        hwm = _peak_bytes()[0]
        self.resident = max(self.resident, hwm)
        self.anon = max(self.anon, hwm - (_status_bytes("RssFile") or 0) - (_status_bytes("RssShmem") or 0))
        _reset_peak()

    def each_output_tensor(self):
        """Mark as mergekit's TensorWriter takes each output tensor (instrumentation of the measured
        child only; the merge itself is mergekit's)."""
        import contextlib

        from mergekit.io import tensor_writer

        original = tensor_writer.TensorWriter.save_tensor
        marks = self

        def save_tensor(writer, *args, **kwargs):
            marks.mark()
            return original(writer, *args, **kwargs)

        @contextlib.contextmanager
        def patched():
            tensor_writer.TensorWriter.save_tensor = save_tensor
            try:
                yield
            finally:
                tensor_writer.TensorWriter.save_tensor = original

        return patched()


def mergekit_merge_and_measure(config: dict, output: str, device: str, low_cpu_memory: bool, out_shard_bytes: int) -> dict:
    """Run mergekit's merge of `config` (its YAML's keys) into `output` and measure it like the PEFT
    merge, and more: its anonymous memory's peak above the imported runtime (host_peak_bytes: what
    the plan's host peak counts), the resident peak with the mapped checkpoints' pages
    (host_resident_peak_bytes) and those pages (host_page_cache_bytes). Never trust_remote_code.
    A config or models mergekit refuses raise AdapterRefused."""
    import gc

    import torch
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from pydantic import ValidationError

    try:
        merge_config = MergeConfiguration.model_validate(config)
    except ValidationError as exc:
        raise AdapterRefused(f"mergekit refused the config: {str(exc).splitlines()[0]}") from None
    cuda = device == "cuda" and torch.cuda.is_available()
    options = MergeOptions(cuda=cuda, device="cuda" if cuda else "cpu", low_cpu_memory=low_cpu_memory, out_shard_size=out_shard_bytes,
                           trust_remote_code=False, lazy_unpickle=False, quiet=True, copy_tokenizer=True)
    if cuda:
        torch.zeros(1, device="cuda")
        torch.cuda.reset_peak_memory_stats()
    gc.collect()
    reset = _reset_peak()
    baseline = _rss_bytes()
    anon_before, file_before = _status_bytes("RssAnon") or 0, _status_bytes("RssFile") or 0
    start = time.monotonic()
    intervals = _IntervalPeaks()
    with _AnonymousPeak() as sampled, intervals.each_output_tensor():
        try:
            run_merge(merge_config, output, options)
        except (ValueError, KeyError) as exc:  # mergekit's own checks: a model without a tensor, mismatched shapes
            raise AdapterRefused(f"mergekit refused the merge: {str(exc).strip().splitlines()[0][:300]}") from None
    intervals.mark(last=True)
    seconds = time.monotonic() - start
    _, peak_source = _peak_bytes()
    peak = intervals.resident
    anon_peak = max(sampled.anon, intervals.anon)
    return {
        "host_peak_bytes": max(0, anon_peak - anon_before),
        "host_resident_peak_bytes": max(0, peak - baseline),
        "host_page_cache_bytes": max(0, max(sampled.file, _status_bytes("RssFile") or 0) - file_before),
        "host_maxrss_bytes": peak,
        "peak_source": "RssAnon sampled every 0.5 ms, and " + peak_source + (" (reset after the imports and at each output tensor)" if reset and peak_source == "VmHWM" else "")
                       + " less the mapped files",
        **_measured_common(torch, cuda, output, seconds, baseline),
        "versions": {"torch": torch.__version__, "mergekit": _version("mergekit"), "safetensors": __import__("safetensors").__version__},
    }


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _measured(job: dict, model: str, output: str, device: str) -> dict:
    """Either engine's merge of a launched spec's job (or --run's arguments)."""
    if job.get("engine") == "mergekit":
        return mergekit_merge_and_measure(job["mergekit_config"], output, device, bool(job.get("low_cpu_memory")), int(job["out_shard_bytes"]))
    return merge_and_measure(model, job["adapter"], output, job["dtype"], device, job["max_shard_size"])


def _confined(spec: dict) -> tuple[dict, str | None]:
    """A served merge's spec with every path resolved now, when the merge is about to open them,
    and each inside the server's roots (spec["confine_to"]), symlinks followed: (spec, None), or
    (spec, why not) when one now leads elsewhere or is gone. The merge then opens the resolved
    paths, not the names. The CLI's merges (no roots) are not confined."""
    roots = [Path(root) for root in spec.get("confine_to") or ()]
    if not roots:
        return spec, None
    from planner.merge import mergekit_models

    job = dict(spec["merge"])
    resolved: dict[str, str] = {}

    def check(field: str, text: str, must_exist: bool) -> str | None:
        try:
            path = Path(text).resolve(strict=must_exist)
        except FileNotFoundError:
            return f"{field} {text} no longer exists"
        except (OSError, RuntimeError) as exc:
            return f"{field} {text} cannot be resolved: {exc}"
        if not any(path == root or root in path.parents for root in roots):
            return f"{field} {text} now leads to {path}, outside the server's roots; nothing was read or written there"
        resolved[text] = str(path)
        return None

    checks = [("model", spec["model"]["location"], True), ("output_dir", spec["output_dir"], False)]
    if job.get("adapter"):
        checks.append(("adapter_dir", job["adapter"], True))
    checks += [("merge_with", name, True) for name in mergekit_models(job.get("mergekit_config") or {})]
    for field, text, must_exist in checks:
        problem = check(field, text, must_exist)
        if problem:
            return spec, problem
    if job.get("adapter"):
        job["adapter"] = resolved[job["adapter"]]
    if job.get("mergekit_config"):
        job["mergekit_config"] = json.loads(json.dumps(job["mergekit_config"]), object_hook=lambda d: {
            k: resolved.get(v, v) if k in ("model", "base_model") and isinstance(v, str) else v for k, v in d.items()})
    return {**spec, "merge": job, "model": {**spec["model"], "location": resolved[spec["model"]["location"]]},
            "output_dir": resolved[spec["output_dir"]]}, None


def run_launched(spec: dict, run_dir: Path) -> int:
    """A launched merge (spec task "merge"), under the shim: its events are the training runs'
    (start, train_begin, end, error) plus merge_end with the measured peaks, which the supervisor
    stores beside the plan's. Exit 0 merged, 2 the adapter refused, 3 CUDA out of memory, 1 otherwise."""
    run_id = spec["run_id"]
    emit_plain(run_dir, run_id, "start", pid=os.getpid(), stage="merge", method=spec["method"], attempt=spec.get("attempt", 1), versions=library_versions())
    spec, outside = _confined(spec)
    if outside:
        print(f"vramplan: the merge did not start: {outside}", file=sys.stderr, flush=True)
        emit_plain(run_dir, run_id, "error", kind="exception", type="PathOutsideRoots", message=outside, phase="paths",
                    summary=outside, hint="name paths inside the server's roots, and leave them in place until the run has started")
        return 2
    job = spec["merge"]
    emit_plain(run_dir, run_id, "train_begin", max_steps=1)
    try:
        Path(spec["output_dir"]).mkdir(parents=True, exist_ok=True)
        result = _measured(job, spec["model"]["location"], spec["output_dir"], spec["resources"]["device"])
    except AdapterRefused as exc:
        print(f"vramplan: the merge failed: {exc}", file=sys.stderr, flush=True)
        emit_plain(run_dir, run_id, "error", kind="exception", type="AdapterRefused", message=str(exc), phase="merge",
                    summary=str(exc), hint="merge models of one architecture and size (mergekit merges them tensor by tensor)" if job.get("engine") == "mergekit"
                    else "merge an adapter trained on this base (its adapter_config.json names the base it was made for)")
        return 2
    except BaseException as exc:  # noqa: BLE001 - what ends the merge is the run's error event
        import traceback

        traceback.print_exc()
        oom = is_oom(exc)
        emit_plain(run_dir, run_id, "error", kind="oom" if oom else "exception", type=type(exc).__name__, message=str(exc)[:2000], phase="merge")
        return EXIT_OOM if oom else 1
    print(f"vramplan: merged into {spec['output_dir']}: host peak above the runtime {result['host_peak_bytes'] / 2**20:.1f} MiB "
          f"(planned {job['host_planned_bytes'] / 2**20:.1f} MiB)", flush=True)
    emit_plain(run_dir, run_id, "merge_end", **{k: v for k, v in result.items() if k != "files"}, files=result["files"][:100])
    emit_plain(run_dir, run_id, "end", status="completed", step=1)
    return 0


def _main(argv: list[str]) -> int:
    """`python -m launcher.merge_job ARGS_JSON` (app/merge_run.py's child): the result as JSON in the
    file ARGS_JSON's "result" names; exit 2 with {"error"} when the adapter or config is refused."""
    args = json.loads(argv[0])

    def done(data: dict, code: int) -> int:
        Path(args["result"]).write_text(json.dumps(data))
        return code

    try:
        result = _measured(args, args["base"], args["output"], args["device"])
    except AdapterRefused as exc:
        return done({"error": str(exc)}, 2)
    return done(result, 0)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
