"""The pages' Jinja2 environment and the files they serve: templates, the app's static files and
the npm packages' scripts (htmx, its SSE extension).

Where those live is decided here alone, so an installed wheel and a source checkout find them the
same way.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fastapi import Request
from fastapi.templating import Jinja2Templates
from markupsafe import Markup, escape

from app.forms import QUERY_ONLY_FIELDS
from gpu_catalog.catalog import find_gpu
from planner.plan import GIB

log = logging.getLogger("vramplan")

# templates/ and static/ sit at the repository's top level. The wheel carries them inside the
# package as app/templates and app/static (pyproject.toml maps them there with package-dir), so
# an installed app finds them beside this file; a source checkout or an editable install has
# them one level up. Plain paths, not importlib.resources: Jinja2's loader and FileResponse need
# real files, and pip always installs a wheel unpacked, so the files are on disk either way.
PACKAGE = Path(__file__).resolve().parent
INSTALLED = (PACKAGE / "templates" / "base.html").is_file()
SHIPPED = PACKAGE if INSTALLED else PACKAGE.parent  # the folder holding templates/ and static/
SOURCE_ROOT = None if INSTALLED else PACKAGE.parent  # the checkout, when running from one
TEMPLATES = SHIPPED / "templates"
STATIC = SHIPPED / "static"
templates = Jinja2Templates(directory=TEMPLATES)
templates.env.filters["gib"] = lambda n: f"{n / GIB:,.2f} GiB" if n is not None else "-"


def _break_after(text: str, separator: str) -> Markup:
    """Escaped text with a line-break opportunity after each separator, so a long dotted or
    slashed name wraps at its parts ("activations.<wbr>checkpoints"), never inside a word."""
    return Markup(f"{separator}<wbr>").join(escape(part) for part in str(text).split(separator))


# a Markdown table cell: one line, pipes escaped
templates.env.filters["md_cell"] = lambda text: " ".join(str(text).split()).replace("|", "\\|")
templates.env.filters["break_dots"] = lambda text: _break_after(text, ".")
templates.env.filters["break_slash"] = lambda text: _break_after(text, "/")


# The npm packages (htmx, its SSE extension, Swagger UI) are no Python package data: `npm ci`
# puts them in a node_modules folder, which an installed wheel has none of beside it. Looked for,
# in order: $VRAMPLAN_NODE_MODULES (the Docker image sets it), ./node_modules in the directory the
# server starts in, the source checkout's node_modules. The pages work without them.
NODE_MODULES_HINT = "run `npm ci` in the project's checkout (or in the directory `vramplan serve` starts in), or set VRAMPLAN_NODE_MODULES to a node_modules folder that has them"
HTMX_FILE = Path("htmx.org", "dist", "htmx.min.js")


def node_modules_candidates() -> list[Path]:
    """Where the npm packages are looked for, first to last."""
    candidates = []
    if os.environ.get("VRAMPLAN_NODE_MODULES"):
        candidates.append(Path(os.environ["VRAMPLAN_NODE_MODULES"]).expanduser().resolve())
    candidates.append(Path.cwd() / "node_modules")
    if SOURCE_ROOT is not None:
        candidates.append(SOURCE_ROOT / "node_modules")
    return list(dict.fromkeys(candidates))


def find_node_modules(candidates: list[Path]) -> Path:
    """The first candidate with htmx in it; else the first folder that exists (it may hold the
    others); else the first candidate, where nothing is found and the pages go without."""
    return next((c for c in candidates if (c / HTMX_FILE).is_file()), None) or next((c for c in candidates if c.is_dir()), candidates[0])


NODE_MODULES_CANDIDATES = node_modules_candidates()
NODE_MODULES = find_node_modules(NODE_MODULES_CANDIDATES)
HTMX = NODE_MODULES / HTMX_FILE
# htmx's server-sent-events extension (npm htmx-ext-sse): the run page's live updates
SSE_EXT = NODE_MODULES / "htmx-ext-sse" / "dist" / "sse.min.js"
# the API docs page (/docs) serves Swagger UI from its npm package
SWAGGER_UI = NODE_MODULES / "swagger-ui-dist"
NPM_FILES = {"htmx.org": HTMX, "htmx-ext-sse": SSE_EXT, "swagger-ui-dist": SWAGGER_UI / "swagger-ui-bundle.js"}
MISSING_NPM = [name for name, path in NPM_FILES.items() if not path.is_file()]
# what /static/NAME serves: the npm packages' files and the app's own; nothing else
ASSETS = {
    "htmx.min.js": (HTMX, "text/javascript", "htmx not installed: run npm ci, or set VRAMPLAN_NODE_MODULES"),
    "htmx-ext-sse.js": (SSE_EXT, "text/javascript", "htmx-ext-sse not installed: run npm ci, or set VRAMPLAN_NODE_MODULES"),
    "app.css": (STATIC / "app.css", "text/css", "missing"),
    "swagger-init.js": (STATIC / "swagger-init.js", "text/javascript", "missing"),
    "copy.js": (STATIC / "copy.js", "text/javascript", "missing"),
    "run-live.js": (STATIC / "run-live.js", "text/javascript", "missing"),
}
if MISSING_NPM:
    # said once, when the app is loaded (the server's start); the pages say it too (base.html)
    log.warning("vramplan: npm packages not found: %s. The pages work without them (no live updates; /docs links to the schema); "
                "to have them, %s. Looked in: %s", ", ".join(MISSING_NPM), NODE_MODULES_HINT,
                ", ".join(map(str, NODE_MODULES_CANDIDATES)))


def _asset_version() -> str:
    import hashlib

    path = STATIC / "app.css"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:10] if path.is_file() else "0"


def signed_in(request: Request) -> bool:
    """The request carries this server's sign-in cookie or token (app/main.py's guard read it)."""
    return bool((request.scope.get("state") or {}).get("vramplan_auth"))


templates.env.globals["asset_version"] = _asset_version()  # a new stylesheet is fetched anew, never a stale cached one
templates.env.globals["signed_in"] = signed_in
# the line base.html shows when htmx is missing (None when it is here)
templates.env.globals["htmx_missing"] = None if HTMX.is_file() else (
    "htmx is not installed here, so pages reload whole where they would update in place. "
    "To have it, run npm ci in the project, or set VRAMPLAN_NODE_MODULES to a node_modules folder that has it.")


def _units_example() -> str:
    """How a marketed GB size reads in GiB, for the one line that says which unit is which."""
    h100 = find_gpu("H100 SXM")
    return f"an “80GB” H100 has {h100.memory_mib:,} MiB = {h100.memory_mib / 1024:.1f} GiB"


templates.env.globals["units_example"] = _units_example()

# the plan options the form shows no input for: index.html keeps the given ones as hidden fields
templates.env.globals["query_only_fields"] = QUERY_ONLY_FIELDS
