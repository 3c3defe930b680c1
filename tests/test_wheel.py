"""The wheel works on its own: built from a copy of the checkout (sdist, then the wheel from the
sdist, as `python -m build` does), installed in a fresh virtualenv outside the source tree, its
`vramplan serve` serves every page with the templates and static files the wheel carries, and the
npm assets are found where app/templating.py says (or their absence is said in the log and on the
page).

No network: the build runs without isolation (the dev extra has `build` and setuptools) and the
fresh virtualenv borrows this environment's installed dependencies through a .pth file, minus
this project itself (its editable install would otherwise import the checkout, not the wheel).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL = ("app", "planner", "gpu_catalog", "launcher")
# not part of a build; copying them would only cost time
SKIP_COPY = shutil.ignore_patterns(".git", ".venv", "venv", "node_modules", "build", "dist", "*.egg-info", "__pycache__",
                                   ".pytest_cache", ".hypothesis", "shared", "tests", "bench")


def _build_problem() -> str | None:
    if importlib.util.find_spec("build") is None:
        return "the `build` package is not installed (it is in the dev extra: pip install -c constraints.txt -e '.[dev]')"
    try:
        from importlib.metadata import version

        major = int(version("setuptools").split(".")[0])
    except Exception:  # noqa: BLE001  (not installed, or an odd version string)
        return "setuptools is not installed (the dev extra has it)"
    return None if major >= 68 else f"setuptools>=68 is needed to build without isolation (this environment has {major})"


pytestmark = pytest.mark.skipif(_build_problem() is not None, reason=f"cannot build the wheel here: {_build_problem()}")


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, check=False, **kwargs)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A fresh virtualenv, outside the checkout, with the wheel installed and this environment's
    dependencies (not this project) importable."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=SKIP_COPY)
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", tmp / "dist", source], cwd=tmp)
    wheel = next((tmp / "dist").glob("vramplan-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    # what was built from (the copy: the checkout may change meanwhile)
    shipped = [f"app/{p.relative_to(source).as_posix()}" for folder in ("templates", "static") for p in (source / folder).rglob("*")
               if p.is_file() and "__pycache__" not in p.parts]
    modules = [p.relative_to(source).as_posix() for top in TOP_LEVEL for p in (source / top).rglob("*.py") if "__pycache__" not in p.parts]
    # the shipped trace templates: without them a catalog check traces for seconds (planner/trace_templates.py)
    data = [p.relative_to(source).as_posix() for p in (source / "planner" / "catalog" / "templates").glob("*.json.xz")]
    assert data
    missing = [name for name in shipped + modules + data if name not in names]
    assert not missing, f"the wheel lacks {missing} (pyproject.toml's [tool.setuptools] packages and package-data)"

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-index", wheel])
    fresh_site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())

    # this environment's packages, as links, without this project: its editable install's finder
    # and .pth would put the checkout's app/ ahead of the wheel's, and its dist-info would make
    # two vramplans. site.addsitedir (not a bare path line) so the linked .pth files still run.
    deps = tmp / "deps"
    deps.mkdir()
    for site_dir in dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib")):
        for entry in Path(site_dir).iterdir():
            name = entry.name
            if (name.startswith(("__editable__", "vramplan-", "vramplan.")) or name in TOP_LEVEL or name == "__pycache__"
                    or (deps / name).exists()):
                continue
            (deps / name).symlink_to(entry)
    (fresh_site / "zz_vramplan_test_deps.pth").write_text(f"import site; site.addsitedir({str(deps)!r})\n")

    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    probe = _run([python, "-c", "import app.templating as t, planner, launcher; print(t.__file__); print(planner.__file__); print(t.TEMPLATES); print(t.STATIC)"],
                 cwd=elsewhere, env=_env(tmp, node_modules=None))
    for line in probe.stdout.split():
        assert line.startswith(str(venv)), f"imported from outside the fresh virtualenv: {line}"
    return {"tmp": tmp, "venv": venv, "source": source}


def _env(tmp: Path, node_modules: Path | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("VRAMPLAN_NODE_MODULES", "PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", VRAMPLAN_DATA_DIR=str(tmp / "data"), PYTHONDONTWRITEBYTECODE="1")
    if node_modules is not None:
        env["VRAMPLAN_NODE_MODULES"] = str(node_modules)
    return env


def _fake_node_modules(where: Path, tag: str) -> Path:
    """A node_modules holding the three files the app serves from npm packages, each marked `tag`."""
    for relative in ("htmx.org/dist/htmx.min.js", "htmx-ext-sse/dist/sse.min.js", "swagger-ui-dist/swagger-ui-bundle.js"):
        path = where / "node_modules" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"/* {tag} */\n")
    return where / "node_modules"


class Server:
    """`vramplan serve --port 0` from the fresh virtualenv, in directory `cwd`."""

    def __init__(self, installed: dict, cwd: Path, node_modules: Path | None) -> None:
        self.log_path = cwd.parent / f"{cwd.name}.log"
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen([installed["venv"] / "bin" / "vramplan", "serve", "--port", "0"], cwd=cwd,
                                        env=_env(installed["tmp"], node_modules), stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self.url = None

    def wait(self, timeout: float = 45) -> str:
        """The server's URL, once it answers: it prints the address before it has loaded the app."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"the server exited ({self.process.returncode}):\n{self.log_path.read_text()}"
            found = re.search(r"serving on (http://\S+?:\d+)", self.log_path.read_text())
            if found:
                self.url = found.group(1)
                try:
                    if httpx.get(self.url + "/healthz", timeout=5).status_code == 200:
                        return self.url
                except httpx.TransportError:
                    pass
            time.sleep(0.1)
        raise AssertionError(f"the server did not answer in {timeout} s:\n{self.log_path.read_text()}")

    def get(self, path: str):
        import httpx

        return httpx.get(self.url + path, timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def servers(installed):
    """Three servers at once: no npm packages anywhere; ./node_modules in the directory it starts
    in; $VRAMPLAN_NODE_MODULES, which wins over ./node_modules."""
    tmp = installed["tmp"]
    for name in ("bare", "cwd", "env"):
        (tmp / name).mkdir()
    _fake_node_modules(tmp / "cwd", "from the working directory")
    _fake_node_modules(tmp / "env", "from the working directory")  # loses to the variable's
    chosen = _fake_node_modules(tmp / "chosen", "from VRAMPLAN_NODE_MODULES")
    started = {}
    try:
        started["bare"] = Server(installed, tmp / "bare", None)
        started["cwd"] = Server(installed, tmp / "cwd", None)
        started["env"] = Server(installed, tmp / "env", chosen)
        for server in started.values():
            server.wait()
        yield started
    finally:
        for server in started.values():
            server.stop()


# each page, and what shows it is the real rendered page, not an error
PAGES = {
    "/": 'id="plan-form"',
    "/?model=Qwen/Qwen2.5-0.5B&method=lora&gpu=L4": 'id="plan-form"',
    "/compare": 'action="/compare"',
    "/compare?model=Qwen/Qwen2.5-0.5B&gpu=L4": 'action="/compare"',
    "/matrix": 'action="/matrix"',
    "/matrix?method=qlora": 'action="/matrix"',
    "/login": 'id="login-form"',
    "/docs": "/openapi.json",
    "/openapi.json": '"openapi"',
    "/healthz": None,
    "/plan.md?model=Qwen/Qwen2.5-0.5B&gpu=L4": "Qwen2.5-0.5B",
}


def test_the_installed_wheel_serves_every_page(installed, servers):
    server, source = servers["bare"], installed["source"]
    for path, marker in PAGES.items():
        response = server.get(path)
        assert response.status_code == 200, (path, response.status_code, response.text[:500])
        if marker:
            assert marker in response.text, (path, response.text[:500])
    for path in ("/", "/compare", "/matrix", "/login"):
        html = server.get(path).text
        assert '<link rel="stylesheet" href="/static/app.css' in html and "</html>" in html, path
    css = server.get("/static/app.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css") and css.text == (source / "static" / "app.css").read_text()
    for name in ("copy.js", "swagger-init.js"):
        script = server.get(f"/static/{name}")
        assert script.status_code == 200 and script.text == (source / "static" / name).read_text()
    runs = server.get("/runs")
    assert runs.status_code in (200, 303, 401), runs.status_code  # the runs list may need signing in


def test_without_npm_packages_the_log_and_the_page_say_so(servers):
    server = servers["bare"]
    page = server.get("/").text
    assert 'id="htmx-missing"' in page and "npm ci" in page and "VRAMPLAN_NODE_MODULES" in page
    assert "/static/htmx.min.js" not in page  # the page does without, rather than loading a 404
    assert server.get("/static/htmx.min.js").status_code == 404
    log = server.log_path.read_text()
    assert log.count("npm packages not found: htmx.org, htmx-ext-sse, swagger-ui-dist") == 1, log
    assert "npm ci" in log and "VRAMPLAN_NODE_MODULES" in log, log
    assert "API explorer needs swagger-ui-dist" in server.get("/docs").text


@pytest.mark.parametrize(("name", "tag"), [("cwd", "from the working directory"), ("env", "from VRAMPLAN_NODE_MODULES")])
def test_npm_packages_are_found_where_they_are_looked_for(servers, name, tag):
    server = servers[name]
    page = server.get("/").text
    assert '<script src="/static/htmx.min.js"' in page and 'id="htmx-missing"' not in page
    for path in ("/static/htmx.min.js", "/static/htmx-ext-sse.js", "/static/swagger-ui/swagger-ui-bundle.js"):
        response = server.get(path)
        assert response.status_code == 200 and tag in response.text, (path, response.status_code, response.text[:200])
    assert "npm packages not found" not in server.log_path.read_text()


@pytest.mark.skipif(not (ROOT / "node_modules" / "htmx.org" / "dist" / "htmx.min.js").is_file(),
                    reason="the checkout has no node_modules (npm ci): the real htmx is not served from it")
def test_the_checkouts_npm_packages_through_the_variable(installed):
    tmp = installed["tmp"]
    (tmp / "real").mkdir()
    server = Server(installed, tmp / "real", ROOT / "node_modules")
    try:
        server.wait()
        htmx = server.get("/static/htmx.min.js")
        assert htmx.status_code == 200 and htmx.content == (ROOT / "node_modules" / "htmx.org" / "dist" / "htmx.min.js").read_bytes()
    finally:
        server.stop()
