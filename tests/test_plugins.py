"""Plugins: third-party queries/exporters/commands (in-process and installed through entry
points), error handling, and every hook documented and exercised (datasette's trick)."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from piaa_index.cli.common import AppContext
from piaa_index.cli.queries import add_query_commands
from piaa_index.library.core import Library, UserInputError
from piaa_index.plugins import Param, Plugins, Query, hookspecs
from tests.image_files import PhotoFolder, make_photo_folder

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs" / "plugins.md"


def hook_names() -> list[str]:
    """Every hook declared in piaa_index/plugins/hookspecs.py."""
    return sorted(
        name
        for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(fn, "piaa_index_spec")
    )


def docs_example_module() -> types.ModuleType:
    """The example plugin of docs/plugins.md, executed as a module (so the docs stay true)."""
    text = DOCS.read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    source = next(b for b in blocks if b.startswith("# piaa_largest.py"))
    module = types.ModuleType("piaa_largest")
    exec(compile(source, str(DOCS), "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module")
def indexed(
    tiny_model_config: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, PhotoFolder]]:
    """A small indexed library (home folder) shared by the plugin tests."""
    base = tmp_path_factory.mktemp("plugins")
    photos = make_photo_folder(base / "photos", n=10)
    home = base / "home"
    with Library.open(
        home=home, db=f"sqlite:///{home / 'piaa.sqlite3'}", model=str(tiny_model_config),
        pretrained="none", device="cpu",
    ) as lib:  # fmt: skip
        lib.index([photos.root])
    return home, photos


def open_with(home: Path, plugins: Plugins) -> Library:
    return Library.open(home=home, db=f"sqlite:///{home / 'piaa.sqlite3'}", plugins=plugins)


# -- in-process registration -------------------------------------------------------------------


def test_registered_plugin_query_and_exporter(indexed: tuple[Path, PhotoFolder]) -> None:
    """A plugin registered in-process adds a query (`Library.query`) and an exporter."""
    home, photos = indexed
    plugins = Plugins()
    plugins.register(docs_example_module())
    assert "largest" in plugins.queries and "count" in plugins.exporters
    assert {"tags", "search", "similar"} <= set(plugins.queries)  # built-ins still there

    with open_with(home, plugins) as lib:
        rows = lib.query("largest", limit=3)
        assert len(rows) == 3
        areas = []
        for row in rows:
            image = lib.store.image_by_path(row["path"])
            assert image is not None
            areas.append(image.width * image.height)
            assert row["score"] == float(areas[-1])
        assert areas == sorted(areas, reverse=True)
        assert plugins.exporters["count"].run(lib) == {"images": photos.n_good}


def test_builtin_queries_through_library_query(indexed: tuple[Path, PhotoFolder]) -> None:
    """The built-in queries are plain plugins too: `Library.query` runs them by name."""
    home, photos = indexed
    with open_with(home, Plugins()) as lib:
        similar = lib.query("similar", image=str(photos.heic), limit=2)
        assert len(similar) == 2 and str(photos.heic) not in {r["path"] for r in similar}
        text = lib.query("search", text="a red circle", limit=4)
        assert len(text) == 4
        with pytest.raises(UserInputError, match="not both"):
            lib.query("search", expression="red", text="red")


def test_third_party_query_gets_a_cli_command(indexed: tuple[Path, PhotoFolder]) -> None:
    """One registration also gives a CLI command with --json/--csv/--paths-only."""
    home, _ = indexed
    plugins = Plugins()
    plugins.register(docs_example_module())

    @click.group()
    @click.pass_context
    def group(ctx: click.Context) -> None:
        ctx.obj = AppContext(home=str(home), db=f"sqlite:///{home / 'piaa.sqlite3'}")

    add_query_commands(group, plugins)
    assert {"largest", "tags", "search", "similar"} <= set(group.commands)
    runner = CliRunner()
    result = runner.invoke(group, ["largest", "--limit", "2", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 2 and all(Path(r["path"]).is_file() for r in rows)
    paths = runner.invoke(group, ["largest", "--limit", "2", "--paths-only"]).stdout
    assert paths.splitlines() == [r["path"] for r in rows]
    assert "Largest images first." in runner.invoke(group, ["largest", "--help"]).stdout


def test_unknown_query_is_a_user_error(indexed: tuple[Path, PhotoFolder]) -> None:
    """Asking for a query nobody registered names the known ones."""
    home, _ = indexed
    with open_with(home, Plugins()) as lib:
        with pytest.raises(UserInputError, match="no query named 'nope'.*search"):
            lib.query("nope")


def test_two_plugins_with_one_query_name_are_refused(indexed: tuple[Path, PhotoFolder]) -> None:
    """A plugin cannot silently replace another's query."""
    home, _ = indexed
    from piaa_index import hookimpl

    class Impostor:
        @hookimpl
        def register_queries(self, register):  # type: ignore[no-untyped-def]
            register(Query("similar", "not the real one", lambda library, **kw: []))

    plugins = Plugins()
    plugins.register(Impostor(), name="impostor")
    with open_with(home, plugins) as lib:
        with pytest.raises(UserInputError, match="two plugins register a Query named 'similar'"):
            lib.query("similar", image="x")


def test_register_rejects_wrong_types() -> None:
    """Registering something that is not a Query is a plugin error, not a later crash."""
    from piaa_index import hookimpl
    from piaa_index.plugins import PluginError

    class Sloppy:
        @hookimpl
        def register_queries(self, register):  # type: ignore[no-untyped-def]
            register({"name": "dict-query"})

    plugins = Plugins(load_entry_points=False)
    plugins.register(Sloppy())
    with pytest.raises(PluginError, match="expected a Query"):
        _ = plugins.queries


# -- installed plugins (real entry points, real processes) -------------------------------------

HELLO_PLUGIN = '''
import click
from piaa_index import hookimpl
from piaa_index.plugins import Param, Query


def _hello(library=None, name="world", progress=False):
    return [{"path": f"/hello/{name}", "score": 1.0}]


@hookimpl
def register_queries(register):
    register(Query("hello", "Say hello.", _hello, (Param("name", default="world"),)))


@hookimpl
def register_commands(cli):
    @cli.command("hello-cmd")
    def hello_cmd():
        """Print a greeting from a plugin command."""
        click.echo("hello from a plugin command")
'''


def _dist(site: Path, dist: str, version: str, module: str, entry: str) -> None:
    info = site / f"{dist}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[piaa_index]\n{entry} = {module}\n")
    (info / "top_level.txt").write_text(f"{module}\n")


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A site folder with an installed working plugin and an installed broken one."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "piaa_hello_plugin.py").write_text(HELLO_PLUGIN)
    _dist(site, "piaa_hello_plugin", "1.2.3", "piaa_hello_plugin", "hello")
    _dist(site, "piaa_broken_plugin", "0.1", "piaa_missing_module_xyz", "broken")
    return site


def _piaa(site: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIAA_")}
    env["PYTHONPATH"] = str(site) + os.pathsep + env.get("PYTHONPATH", "")
    env["PIAA_HOME"] = str(tmp_path / "home")
    return subprocess.run(
        [sys.executable, "-m", "piaa_index", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )


def test_register_commands_and_entry_points_of_installed_plugins(
    site: Path, tmp_path: Path
) -> None:
    """An installed plugin's query and command appear in `piaa`; a broken one is reported."""
    listing = _piaa(site, tmp_path, "plugins", "--json")
    assert listing.returncode == 0, listing.stderr
    data = json.loads(listing.stdout)
    by_name = {p["name"]: p for p in data["plugins"]}
    assert by_name["hello"]["hooks"] == ["register_commands", "register_queries"]
    assert by_name["hello"]["version"] == "1.2.3"
    assert "ModuleNotFoundError" in by_name["broken"]["error"]
    assert "hello" in data["queries"]
    assert {"builtin_queries", "builtin_exporters"} <= set(by_name)

    help_text = _piaa(site, tmp_path, "--help")
    assert help_text.returncode == 0, help_text.stderr
    assert re.search(r"^\s+hello\s", help_text.stdout, flags=re.M)
    assert re.search(r"^\s+hello-cmd\s", help_text.stdout, flags=re.M)

    command = _piaa(site, tmp_path, "hello-cmd")
    assert command.returncode == 0, command.stderr
    assert command.stdout.strip() == "hello from a plugin command"


# -- first-party plugins in code, third-party ones from entry points ---------------------------


def _entry_points(monkeypatch: pytest.MonkeyPatch, *specs: tuple[str, str]) -> None:
    """The installed packages' `piaa_index` entry points are exactly `specs` (name, value)."""
    import importlib.metadata

    listed = [importlib.metadata.EntryPoint(n, v, "piaa_index") for n, v in specs]

    def entry_points(**select: object) -> list[importlib.metadata.EntryPoint]:
        assert select == {"group": "piaa_index"}
        return listed

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


def test_builtins_need_no_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    """The built-in queries, exporters and `piaa serve` are registered in code: with no entry
    point installed at all (metadata hidden), they are all there."""
    _entry_points(monkeypatch)
    plugins = Plugins()
    assert not plugins.load_errors
    assert {"search", "tags", "similar"} <= set(plugins.queries)
    assert {"xmp", "csv", "json"} <= set(plugins.exporters)
    group = click.Group("piaa")
    plugins.pm.hook.register_commands(cli=group)
    assert {"serve", "keys"} <= set(group.commands)
    names = {p["name"] for p in plugins.describe()}
    assert names == {"builtin_queries", "builtin_exporters", "http_api"}


def test_third_party_entry_point_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A third-party plugin still comes from its entry point, beside the built-ins."""
    monkeypatch.setitem(sys.modules, "piaa_largest", docs_example_module())
    _entry_points(monkeypatch, ("largest", "piaa_largest"))
    plugins = Plugins()
    assert not plugins.load_errors
    assert {"largest", "search", "tags", "similar"} <= set(plugins.queries)
    assert "count" in plugins.exporters
    assert plugins.pm.get_plugin("largest") is sys.modules["piaa_largest"]
    assert Plugins(load_entry_points=False).queries.keys() == {"search", "tags", "similar"}


def test_an_entry_point_of_a_builtin_is_not_registered_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An older install's metadata still lists the built-ins as entry points (under their own
    names or others): each module is registered once, so no query is registered twice."""
    _entry_points(
        monkeypatch,
        ("builtin_queries", "piaa_index_plugins.queries"),
        ("builtin_exporters", "piaa_index_plugins.exporters"),
        ("http_api", "piaa_index_plugins.http_api"),
        ("queries_again", "piaa_index_plugins.queries"),
    )
    plugins = Plugins()
    assert not plugins.load_errors
    assert len(plugins.pm.get_plugins()) == 3
    assert {"search", "tags", "similar"} <= set(plugins.queries)  # no "two plugins register"
    assert {"xmp", "csv", "json"} <= set(plugins.exporters)


def test_a_third_party_entry_point_with_a_builtin_name_is_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A third-party entry point named like a built-in is not loaded, and says why."""
    monkeypatch.setitem(sys.modules, "piaa_largest", docs_example_module())
    _entry_points(monkeypatch, ("builtin_queries", "piaa_largest"))
    plugins = Plugins()
    assert "largest" not in plugins.queries and "search" in plugins.queries
    assert "taken" in plugins.load_errors["builtin_queries"]


# -- one Param, the same call from every front end ---------------------------------------------

EVERY_KIND = (
    Param("things", "Many things.", positional=True, multiple=True),
    Param("ratio", "A ratio.", type=float, default=0.5),
    Param("tag", "Tags.", multiple=True, default=("a", "b")),
    Param("ids", "Ids.", type=int, multiple=True),
    Param("loud", "Loud.", is_flag=True, default=True),
    Param("quiet", is_flag=True),
    Param("limit", "Limit.", type=int),
)


def test_a_param_reads_alike_in_the_cli_and_over_http(tmp_path: Path) -> None:
    """`piaa NAME` and `GET /api/queries/NAME` with nothing given call `run` with the same
    values (`Param.absent_value`), and given the same words, the same converted values."""
    from piaa_index_plugins.http_api.routes_queries import query_params

    seen: list[dict[str, object]] = []

    def quick(settings: object, progress: bool = False, **params: object) -> list[dict]:
        seen.append(params)
        return [{"path": "/p", "score": 1.0}]

    query = Query("kinds", "Every kind of Param.", quick, EVERY_KIND, quick=quick)

    @click.group()
    @click.pass_context
    def group(ctx: click.Context) -> None:
        ctx.obj = AppContext(home=str(tmp_path))

    plugins = Plugins(load_entry_points=False, defaults=False)
    plugins.register(types.SimpleNamespace(register_queries=_registers(query)), name="kinds")
    add_query_commands(group, plugins)
    runner = CliRunner()
    for argv, raw in [
        ([], []),
        (
            ["p", "q", "--ratio", "2", "--tag", "x", "--ids", "3", "--ids", "4", "--quiet"],
            [("things", "p"), ("things", "q"), ("ratio", "2"), ("tag", "x"), ("ids", "3"),
             ("ids", "4"), ("quiet", "1")],
        ),
    ]:  # fmt: skip
        result = runner.invoke(group, ["kinds", *argv, "--json"], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        assert seen.pop() == query_params(query, raw)
    assert query_params(query, [])["tag"] == ["a", "b"] and query_params(query, [])["ids"] == []
    assert [p.option for p in EVERY_KIND if not p.positional][:1] == ["--ratio"]
    assert [p.type_name for p in EVERY_KIND] == [
        "str",
        "float",
        "str",
        "int",
        "bool",
        "bool",
        "int",
    ]


def _registers(query: Query) -> object:
    from piaa_index import hookimpl

    @hookimpl
    def register_queries(register):  # type: ignore[no-untyped-def]
        register(query)

    return register_queries


# -- hooks documented and exercised ------------------------------------------------------------


def test_hookspecs_are_found() -> None:
    assert hook_names() == sorted(["register_queries", "register_exporters", "register_commands"])


@pytest.mark.parametrize("hook", hook_names())
def test_every_hook_is_documented(hook: str) -> None:
    """Each hook has a section in docs/plugins.md (a new hook must be documented)."""
    headings = re.findall(r"^###\s+(\w+)\s*$", DOCS.read_text(encoding="utf-8"), flags=re.M)
    assert hook in headings


def test_documented_hooks_exist() -> None:
    """The docs describe no hook that does not exist (no stale documentation)."""
    text = DOCS.read_text(encoding="utf-8")
    section = text.split("## Hooks", 1)[1].split("\n## ", 1)[0]
    assert sorted(re.findall(r"^###\s+(\w+)\s*$", section, flags=re.M)) == hook_names()


@pytest.mark.parametrize("hook", hook_names())
def test_every_hook_is_implemented_or_tested(hook: str) -> None:
    """Each hook is used by a built-in plugin or exercised by a test in this module."""
    builtin = {
        h for p in Plugins().describe() if str(p["name"]).startswith("builtin_") for h in p["hooks"]
    }
    tests_here = [name for name in globals() if name.startswith("test_") and hook in name]
    assert hook in builtin or tests_here, f"hook {hook} is neither built-in nor tested"
