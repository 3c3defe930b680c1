"""What a running trainer reports: one JSON line per event in the run directory's events.jsonl.

Imported only inside the run's process (it imports torch and transformers). Every rank writes its
own lines with its own GPU's numbers: gathering across ranks is a collective that could hang a dying
run. Lines are appended with one write each on an O_APPEND descriptor, so ranks never interleave.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

EVENTS_FILE = "events.jsonl"
STOP_FILE = "STOP"
MAX_LINE = 16_384
LOG_PREFIX = "VRAMPLAN_EVENT "


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class EventWriter:
    def __init__(self, run_dir: Path, run_id: str):
        self.run_id = run_id
        self.rank = _rank()
        self.to_log = os.environ.get("VRAMPLAN_EVENTS_TO_LOG") == "1"
        self._fd = os.open(run_dir / EVENTS_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def emit(self, event: str, **fields) -> None:
        record = {"t": time.time(), "run_id": self.run_id, "rank": self.rank, "event": event}
        for key, value in fields.items():
            if isinstance(value, float) and not math.isfinite(value):
                value = None  # NaN loss is a fact worth keeping, but JSON cannot carry it
            elif isinstance(value, torch.Tensor):
                value = value.item()
            record[key] = value
        line = json.dumps(record, default=str)
        if len(line) > MAX_LINE:
            line = json.dumps({k: record[k] for k in ("t", "run_id", "rank", "event")} | {"truncated": True})
        os.write(self._fd, (line + "\n").encode())
        if self.to_log:  # no shared filesystem (Ray Jobs): the events travel in the log stream too
            print(f"{LOG_PREFIX}{line}", flush=True)


class MemoryProbe:
    """This rank's GPU: torch's peaks, the allocator's retries, and what NVML says the process holds."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self.nvml_error: str | None = None
        self._nvml_handle = None
        self.gpu_name: str | None = None
        self.gpu_uuid: str | None = None
        self.driver: str | None = None
        if not self.cuda:
            self.nvml_error = "no CUDA device"
            return
        device = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(device)
        self.gpu_name = props.name
        self.gpu_uuid = "GPU-" + str(props.uuid)
        try:
            import pynvml

            pynvml.nvmlInit()
            # NVML ignores CUDA_VISIBLE_DEVICES, so the device is matched by UUID, never by index
            self._nvml_handle = pynvml.nvmlDeviceGetHandleByUUID(self.gpu_uuid)
            driver = pynvml.nvmlSystemGetDriverVersion()
            self.driver = driver.decode() if isinstance(driver, bytes) else driver
        except Exception as exc:  # no driver library, a container's PID namespace, an old driver
            self.nvml_error = f"{type(exc).__name__}: {exc}"

    def process_used(self) -> int | None:
        """NVML's figure for this process on this GPU (context included); None where NVML cannot tell
        (inside a PID namespace NVML reports host pids, so ours is not found)."""
        if self._nvml_handle is None:
            return None
        import pynvml

        try:
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(self._nvml_handle):
                if proc.pid == os.getpid() and proc.usedGpuMemory:
                    return int(proc.usedGpuMemory)
        except Exception:
            return None
        return None

    def describe(self) -> dict:
        return {"cuda": self.cuda, "gpu_name": self.gpu_name, "gpu_uuid": self.gpu_uuid, "driver": self.driver, "nvml_error": self.nvml_error}

    def sample(self) -> dict:
        if not self.cuda:
            return {}
        stats = torch.cuda.memory_stats()
        return {
            "max_memory_allocated": torch.cuda.max_memory_allocated(),
            "max_memory_reserved": torch.cuda.max_memory_reserved(),
            "memory_reserved": torch.cuda.memory_reserved(),
            "alloc_retries": int(stats.get("num_alloc_retries", 0)),
            "ooms": int(stats.get("num_ooms", 0)),
            "nvml_process_used": self.process_used(),
        }


class StopFlag:
    """A cancel asked by the stop file or SIGTERM. Under several processes every rank must stop at the
    same step, or the ones that go on wait forever in the next collective: the flag is all-reduced."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / STOP_FILE
        self.signalled = False
        if _rank_is_main_thread():
            signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def local(self) -> bool:
        return self.signalled or self.path.exists()

    def agreed(self) -> bool:
        wanted = self.local()
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
            flag = torch.tensor([1 if wanted else 0], dtype=torch.int32, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            wanted = bool(flag.item())
        return wanted


def _rank_is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: the run ends here, since every step after it trains on garbage."""

    def __init__(self, step: int, value: float, learning_rate: float | None, what: str = "loss"):
        super().__init__(f"the {what} became {value} at step {step}")
        self.step, self.value, self.learning_rate, self.what = step, value, learning_rate, what


class LaunchCallback(TrainerCallback):
    def __init__(self, writer: EventWriter, probe: MemoryProbe, stop: StopFlag, step_sleep_s: float = 0.0):
        self.writer = writer
        self.probe = probe
        self.stop = stop
        self.step_sleep_s = step_sleep_s
        self.stopping = False

    def on_train_begin(self, args, state, control, **kwargs):
        fields = {"max_steps": state.max_steps, "resumed_from_step": state.global_step, **self.probe.describe()}
        if self.probe.cuda:
            # loading can peak above training (a fp32 load cast down): keep it apart, then measure training alone
            fields["load_peak_reserved"] = torch.cuda.max_memory_reserved()
            used = self.probe.process_used()
            fields["cuda_context"] = used - torch.cuda.memory_reserved() if used is not None else None
            torch.cuda.reset_peak_memory_stats()
        self.writer.emit("train_begin", **fields)

    def on_step_end(self, args, state, control, **kwargs):
        if self.step_sleep_s:
            time.sleep(self.step_sleep_s)
        if not self.stopping and self.stop.agreed():
            self.stopping = True
            control.should_training_stop = True
            control.should_save = True
            self.writer.emit("stopping", step=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        fields = {"step": state.global_step, "epoch": state.epoch}
        for key in ("loss", "learning_rate", "grad_norm", "num_tokens", "train_loss"):
            if key in logs:
                fields[key] = logs.pop(key)
        fields["extra"] = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
        self.writer.emit("log", **fields, **self.probe.sample())
        # the Trainer logs a NaN loss as the mean of the ones before (logging_nan_inf_filter), so the
        # gradient norm tells too; under fp16 an inf one is the loss scaler's skipped step, not a failure
        for what, key in (("loss", "loss"), ("gradient norm", "grad_norm")):
            value = fields.get(key)
            value = value.item() if isinstance(value, torch.Tensor) else value
            if isinstance(value, (int, float)) and not math.isfinite(value) and not (key == "grad_norm" and getattr(args, "fp16", False)):
                raise NonFiniteLoss(state.global_step, float(value), fields.get("learning_rate"), what)

    def on_save(self, args, state, control, **kwargs):
        self.writer.emit("checkpoint", step=state.global_step, path=f"checkpoint-{state.global_step}")

    def on_train_end(self, args, state, control, **kwargs):
        self.writer.emit("train_end", step=state.global_step, stopped=self.stopping, **self.probe.sample())
