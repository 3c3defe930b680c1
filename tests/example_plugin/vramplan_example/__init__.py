"""An example third-party backend: runs the trainer entry on this machine with `nohup`, no
admission, no multi-GPU. It shows what a plugin must provide: the class attributes, bounded Options,
and the seven methods; everything else (store, supervisor, CLI, pages) comes from vramplan.

It builds on vramplan's public pieces only: the LocalBackend class and launcher.run_files (what every
backend shares: the run's files, environment, argv and log), never a private helper."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from launcher.backend import API_VERSION, Handle, Health, LogChunk, Observation, Rendered
from launcher.backends.local import LocalBackend
from launcher.run_files import read_log_file
from launcher.spec import LaunchSpec


class NohupOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    grace_period_s: float = Field(default=30.0, ge=1, le=600)


class NohupBackend:
    name: ClassVar[str] = "example"
    api_version: ClassVar[int] = API_VERSION
    capabilities: ClassVar[frozenset[str]] = frozenset({"graceful_cancel", "events_file"})
    Options: ClassVar[type[BaseModel]] = NohupOptions

    def __init__(self):
        self._local = LocalBackend()  # a plugin may build on vramplan's own pieces

    def check(self) -> Health:
        return Health(True, "example plugin: nohup on this machine")

    def render(self, spec: LaunchSpec, run_dir: Path, options: BaseModel) -> Rendered:
        rendered = self._local.render(spec, run_dir, options)
        return Rendered(rendered.files, ("nohup", *rendered.argv), rendered.env, "example plugin: " + rendered.summary)

    def submit(self, rendered: Rendered, run_dir: Path) -> Handle:
        handle = self._local.submit(rendered, run_dir)
        return Handle(self.name, handle.data)

    def poll(self, handle: Handle, run_dir: Path) -> Observation:
        return self._local.poll(handle, run_dir)

    def cancel(self, handle: Handle, run_dir: Path) -> None:
        self._local.cancel(handle, run_dir)

    def kill(self, handle: Handle, run_dir: Path) -> None:
        self._local.kill(handle, run_dir)

    def read_logs(self, handle: Handle | None, run_dir: Path, offset: int, limit: int) -> LogChunk:
        return read_log_file(run_dir, offset, limit)  # the shim's log is RUN_DIR/train.log


class FutureBackend(NohupBackend):
    """Speaks a backend API this vramplan does not: must show as unavailable, never crash."""

    name: ClassVar[str] = "future"
    api_version: ClassVar[int] = API_VERSION + 1
