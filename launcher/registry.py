"""Backends are found through the entry-point group `vramplan.backends`, ours included.

Listing reads names only; a backend is imported when named, so a slow or broken plugin costs
nothing until used, and a broken one shows as unavailable with its error instead of a crash.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from importlib import metadata

from pydantic import BaseModel

from launcher.backend import API_VERSION, Backend, Health

GROUP = "vramplan.backends"


class UnknownBackend(LookupError):
    pass


@dataclass(frozen=True)
class BackendInfo:
    name: str
    target: str  # "module:attr" as the entry point declares it
    available: bool
    detail: str
    capabilities: tuple[str, ...] = ()
    options: tuple[dict, ...] = ()  # the backend's own options: name, type, default, description

    def to_dict(self) -> dict:
        return {"name": self.name, "target": self.target, "available": self.available, "detail": self.detail,
                "capabilities": list(self.capabilities), "options": list(self.options)}


def _entry_points() -> dict[str, metadata.EntryPoint]:
    # a supervisor loads a run's backend on every refresh (twice a second while runs live): scan the
    # installed metadata once per sys.path, not each time
    return dict(_scan(tuple(sys.path)))


@functools.lru_cache(maxsize=8)
def _scan(path: tuple[str, ...]) -> tuple[tuple[str, metadata.EntryPoint], ...]:
    found: dict[str, metadata.EntryPoint] = {}
    for ep in metadata.entry_points(group=GROUP):
        found.setdefault(ep.name, ep)  # the first registration of a name wins, as importlib orders them
    return tuple(found.items())


def backend_names() -> list[str]:
    return sorted(_entry_points())


def load_backend(name: str) -> Backend:
    """An instance of the named backend; UnknownBackend or ValueError (with the reason) otherwise."""
    eps = _entry_points()
    if name not in eps:
        raise UnknownBackend(f"no backend named {name!r}; installed: {', '.join(sorted(eps)) or 'none'}")
    try:
        cls = eps[name].load()
    except Exception as exc:  # a plugin's import error is its own, never ours to crash on
        raise ValueError(f"backend {name} failed to import: {type(exc).__name__}: {exc}") from exc
    problem = _contract_problem(cls)
    if problem:
        raise ValueError(f"backend {name}: {problem}")
    try:
        instance = cls()
    except Exception as exc:
        raise ValueError(f"backend {name} failed to start: {type(exc).__name__}: {exc}") from exc
    if not isinstance(instance, Backend):
        raise ValueError(f"backend {name} does not implement the Backend protocol")
    return instance


def _contract_problem(cls) -> str:
    version = getattr(cls, "api_version", None)
    if version != API_VERSION:
        return f"speaks backend API {version}, this vramplan speaks {API_VERSION}"
    options = getattr(cls, "Options", None)
    if not (isinstance(options, type) and issubclass(options, BaseModel)):
        return "Options must be a pydantic model"
    return ""


def describe_backends() -> list[BackendInfo]:
    out = []
    for name, ep in sorted(_entry_points().items()):
        try:
            backend = load_backend(name)
            health = backend.check()
        except Exception as exc:
            health = Health(False, str(exc))
            caps: tuple[str, ...] = ()
            options: tuple[dict, ...] = ()
        else:
            caps = tuple(sorted(backend.capabilities))
            options = _options(backend.Options)
        out.append(BackendInfo(name=name, target=ep.value, available=health.ok, detail=health.detail, capabilities=caps, options=options))
    return out


def _options(model: type[BaseModel]) -> tuple[dict, ...]:
    out = []
    for name, info in model.model_fields.items():
        default = info.default if isinstance(info.default, (str, int, float, bool, type(None))) else None
        out.append({"name": name, "type": getattr(info.annotation, "__name__", None) or str(info.annotation).replace("typing.", ""), "default": default, "description": info.description or ""})
    return tuple(out)
