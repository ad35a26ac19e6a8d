"""Imports inside functions only where they keep start-up fast (docs/architecture.md, "Imports").

An import inside a function of the shipped packages is allowed for one of two reasons:

- start-up: a quick command (`--help`, `--version`, `status`, `search`, `tags`, `vocab list`,
  `labels export`, `similar`, `search --text`, an `index` run with nothing new, `serve` up to
  its first answer, `from piaa_index import Library`) loads the importing module but not the
  imported one, so importing it at the top would make that command load more;
- heavy: the imported module brings in a slow third-party package (torch, open_clip, FAISS,
  SQLAlchemy, Pillow, FastAPI, Ray, …) that the importing module's own top-level imports do not,
  so whoever imports the module for its light parts stays light.

Optional dependencies (an import tried, with `except ImportError`) are not counted.

Everything else belongs at the top of its module. The quick commands run for real, each in a
fresh process on a small fitted library, and report the modules they loaded at exit.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from piaa_index.shapes.dataset import generate_dataset
from tests.piaa_processes import piaa_env, start_server

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {"piaa_index": REPO / "piaa_index", "piaa_index_plugins": REPO / "plugins"}
# Third-party packages whose import costs a noticeable part of a quick command's budget.
HEAVY = {
    "PIL", "alembic", "fastapi", "faiss", "huggingface_hub", "imagecodecs", "numpy",
    "open_clip", "pathspec", "pillow_heif", "psycopg", "pydantic", "pyexiv2", "ray",
    "rawpy", "safetensors", "sqlalchemy", "starlette", "timm", "torch", "uvicorn",
}  # fmt: skip

# Loaded by every fresh process through PYTHONPATH: writes the loaded modules' names at exit.
SITECUSTOMIZE = """
import atexit, json, os, sys
def _dump():
    with open(os.environ["PIAA_TEST_MODULES_OUT"], "w") as fh:
        json.dump(sorted(sys.modules), fh)
if os.environ.get("PIAA_TEST_MODULES_OUT"):
    atexit.register(_dump)
"""


@dataclass(frozen=True)
class LocalImport:
    module: str  # the importing module
    line: int
    targets: tuple[str, ...]  # the modules it imports (`from X import y`: X.y when a module)
    text: str


def _module_name(package: str, root: Path, path: Path) -> str:
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str, known: set[str]) -> bool:
    return name in known or name.split(".")[0] not in PACKAGES and _third_party_module(name)


def _third_party_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The module names an import statement names (relative ones resolved)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[: len(parts) - node.level + 1]
        base = ".".join([*parts, *([node.module] if node.module else [])])
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def _catches_import_error(node: ast.Try) -> bool:
    caught = " ".join(ast.unparse(h.type) for h in node.handlers if h.type is not None)
    return "ImportError" in caught or "ModuleNotFoundError" in caught


def _sources() -> Iterator[tuple[str, bool, ast.Module]]:
    for package, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            module = _module_name(package, root, path)
            yield module, path.name == "__init__.py", ast.parse(path.read_text(), str(path))


def _visit(
    node: ast.AST,
    in_function: bool,
    where: tuple[str, bool, set[str]],
    local: list[LocalImport],
    names: set[str],
) -> None:
    """Collect `node`'s imports: inside functions into `local`, the others into `names`."""
    module, is_package, known = where
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            continue  # annotations only
        if isinstance(child, ast.Try) and _catches_import_error(child):
            continue  # an optional dependency: tried where it is used
        if isinstance(child, ast.Import | ast.ImportFrom):
            found = _imported(child, module, is_package)
            if isinstance(child, ast.ImportFrom):  # `from X import y`: y a module (X.y) or a name
                found = [found[0]] + [n for n in found[1:] if _is_module(n, known)]
            if in_function:
                local.append(LocalImport(module, child.lineno, tuple(found), ast.unparse(child)))
            else:
                names.update(found)
        inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
        _visit(child, inner, where, local, names)


def _scan() -> tuple[list[LocalImport], dict[str, set[str]]]:
    """(every function-level import, each module's top-level imports)."""
    sources = list(_sources())
    known = {module for module, _, _ in sources}
    local: list[LocalImport] = []
    top: dict[str, set[str]] = {}
    for module, is_package, tree in sources:
        top[module] = set()
        _visit(tree, False, (module, is_package, known), local, top[module])
    return local, top


def _heavy_closure(module: str, top: dict[str, set[str]], seen: set[str] | None = None) -> set[str]:
    """The heavy third-party packages importing `module` loads (through top-level imports)."""
    seen = set() if seen is None else seen
    heavy: set[str] = set()
    parts = module.split(".")
    # importing a.b.c runs a/__init__ and a/b/__init__ first
    for name in [".".join(parts[: i + 1]) for i in range(len(parts))]:
        if name in seen:
            continue
        seen.add(name)
        if name.split(".")[0] not in PACKAGES:
            heavy |= {name.split(".")[0]} & HEAVY
            continue
        for imported in top.get(name, ()):
            heavy |= _heavy_closure(imported, top, seen)
    return heavy


@pytest.fixture(scope="module")
def loaded_by_quick_commands(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """{command: modules a fresh process of it loaded}, on a small fitted library."""
    base = tmp_path_factory.mktemp("quick")
    generate_dataset(base / "scenes", 40, seed=5, size=96, progress=False)
    hooks = base / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = piaa_env(base / "home", None)
    env["PYTHONPATH"] = os.pathsep.join([str(hooks), str(REPO)])
    piaa = [sys.executable, "-m", "piaa_index"]
    image = str(sorted((base / "scenes" / "images").iterdir())[0])

    def run(args: list[str]) -> None:
        proc = subprocess.run([*piaa, *args], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr

    run(["index", str(base / "scenes" / "images")])
    run(["vocab", "set", "wheel", "star", "car"])
    run(["fit"])
    run(["search", "--text", "a red car"])  # the first text query caches the text tower
    commands = {
        "help": ["--help"],
        "version": ["--version"],
        "index help": ["index", "--help"],
        "plugins": ["plugins", "--json"],
        "status": ["status", "--json"],
        "search": ["search", "wheel AND star", "--json"],
        "tags": ["tags", image, "--json"],
        "vocab list": ["vocab", "list", "--json"],
        "labels export": ["labels", "export"],
        "similar": ["similar", image, "--json"],
        "text search": ["search", "--text", "a red car", "--json"],
        "index, nothing new": ["index", str(base / "scenes" / "images")],
    }
    loaded: dict[str, set[str]] = {}
    for name, args in commands.items():
        out = base / f"{len(loaded)}.json"
        env["PIAA_TEST_MODULES_OUT"] = str(out)
        run(args)
        loaded[name] = set(json.loads(out.read_text()))
    out = base / "serve.json"
    env["PIAA_TEST_MODULES_OUT"] = str(out)
    served = start_server([*piaa, "serve", "--port", "0"], env)
    try:
        # up to its first answer (a 401 without a key is one): what serving loads
        for _ in range(600):
            try:
                urllib.request.urlopen(served.base + "/api/status", timeout=5)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                time.sleep(0.1)
        served.proc.send_signal(signal.SIGINT)  # Ctrl-C: the process exits through atexit
        served.proc.wait(120)
    finally:
        if served.proc.poll() is None:
            served.proc.kill()
            served.proc.wait(10)
    assert served.proc.returncode == 0, served.stderr()[-2000:]
    loaded["serve"] = set(json.loads(out.read_text()))
    out = base / "library.json"
    env["PIAA_TEST_MODULES_OUT"] = str(out)
    proc = subprocess.run(
        [sys.executable, "-c", "from piaa_index import Library"], env=env, timeout=120
    )
    assert proc.returncode == 0
    loaded["from piaa_index import Library"] = set(json.loads(out.read_text()))
    return loaded


def test_function_level_imports_keep_start_up_fast(
    loaded_by_quick_commands: dict[str, set[str]],
) -> None:
    local, top = _scan()
    assert len(local) > 100 and len(top) > 100  # the whole tree was read
    loaded = loaded_by_quick_commands
    assert "piaa_index.catalog.readonly" in loaded["search"]  # the read-only paths ran
    assert "torch" not in loaded["text search"] and "torch" not in loaded["similar"]
    hoist = []
    for imp in local:
        startup = [c for c, mods in loaded.items() if imp.module in mods]
        if any(t not in loaded[c] for c in startup for t in imp.targets):
            continue  # a quick command loads the module without what it imports here
        own = _heavy_closure(imp.module, top)
        if set().union(*(_heavy_closure(t, top) for t in imp.targets)) - own:
            continue  # it would bring a slow package to whoever imports the module
        hoist.append(f"{imp.module}:{imp.line}: {imp.text}")
    assert not hoist, "imports to move to the top of their module:\n" + "\n".join(hoist)


def test_quick_reads_skip_package_metadata_and_the_orm(
    loaded_by_quick_commands: dict[str, set[str]],
) -> None:
    """A fresh read loads neither the scan of every installed package's metadata (the entry
    points: read only for a command the first-party plugins lack, or `--help`) nor SQLAlchemy
    (the read-only twin answers)."""
    for command in ("status", "search", "tags", "vocab list", "similar", "text search"):
        loaded = loaded_by_quick_commands[command]
        assert "importlib.metadata" not in loaded, command
        assert "sqlalchemy" not in loaded, command
    # the saved [CLS] index is read and searched without FAISS (vectors/similar_files.py)
    assert "faiss" not in loaded_by_quick_commands["similar"]
