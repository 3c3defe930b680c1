"""Local GPUs through NVIDIA's NVML bindings (the `nvidia-ml-py` package, module `pynvml`).

No driver, no library, no GPU: all normal states. `detect()` never raises; it returns what it
found and, when it found nothing, why. The NVML calls sit behind `NvmlBackend`, so tests can
stand in a fake for a GPU this machine lacks while the real path runs everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from gpu_catalog.catalog import gpu_by_name


class NvmlBackend(Protocol):
    def init(self) -> None: ...
    def shutdown(self) -> None: ...
    def driver_version(self) -> str: ...
    def device_count(self) -> int: ...
    def name(self, index: int) -> str: ...
    def memory(self, index: int) -> tuple[int, int, int]: ...  # total, free, used bytes
    def compute_capability(self, index: int) -> tuple[int, int]: ...


class PynvmlBackend:
    """The real NVML, through pynvml."""

    def __init__(self):
        import pynvml

        self._nvml = pynvml

    def init(self) -> None:
        self._nvml.nvmlInit()

    def shutdown(self) -> None:
        self._nvml.nvmlShutdown()

    def driver_version(self) -> str:
        version = self._nvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)

    def device_count(self) -> int:
        return int(self._nvml.nvmlDeviceGetCount())

    def _handle(self, index: int):
        return self._nvml.nvmlDeviceGetHandleByIndex(index)

    def name(self, index: int) -> str:
        name = self._nvml.nvmlDeviceGetName(self._handle(index))
        return name.decode() if isinstance(name, bytes) else str(name)

    def memory(self, index: int) -> tuple[int, int, int]:
        info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle(index))
        return int(info.total), int(info.free), int(info.used)

    def compute_capability(self, index: int) -> tuple[int, int]:
        major, minor = self._nvml.nvmlDeviceGetCudaComputeCapability(self._handle(index))
        return int(major), int(minor)

    def uuid(self, index: int) -> str:
        value = self._nvml.nvmlDeviceGetUUID(self._handle(index))
        return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class DetectedGPU:
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    compute_capability: str
    catalog_name: str | None  # the catalog entry it matched, if any
    uuid: str | None = None  # "GPU-...": stable across CUDA_VISIBLE_DEVICES orderings, unlike the index

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Detection:
    gpus: tuple[DetectedGPU, ...] = ()
    driver_version: str | None = None
    reason: str | None = None  # why nothing was found

    def to_dict(self) -> dict:
        return {"gpus": [g.to_dict() for g in self.gpus], "driver_version": self.driver_version, "reason": self.reason}


def detect(backend: NvmlBackend | None = None) -> Detection:
    try:
        backend = backend or PynvmlBackend()
    except ImportError:
        return Detection(reason="no NVIDIA GPU detected: the nvidia-ml-py package is not installed")
    try:
        backend.init()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...: a machine without a GPU
        return Detection(reason=f"no NVIDIA GPU detected: {exc or type(exc).__name__}")
    try:
        driver = backend.driver_version()
        gpus = []
        for index in range(backend.device_count()):
            name = backend.name(index)
            total, free, used = backend.memory(index)
            major, minor = backend.compute_capability(index)
            match = gpu_by_name(name)  # NVML names are the catalog's canonical names
            uuid = backend.uuid(index) if hasattr(backend, "uuid") else None  # a fake may not know one
            gpus.append(DetectedGPU(index, name, total, free, used, f"{major}.{minor}", match.name if match else None, uuid))
        reason = None if gpus else "no NVIDIA GPU detected: the driver reports 0 devices"
        return Detection(tuple(gpus), driver, reason)
    except Exception as exc:
        return Detection(reason=f"NVML failed while reading the GPUs: {exc or type(exc).__name__}")
    finally:
        try:
            backend.shutdown()
        except Exception:
            pass
