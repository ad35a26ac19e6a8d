"""The plugin manager: registers the first-party plugins in code (`DEFAULT_PLUGINS`), then
loads third-party ones from the `piaa_index` entry-point group.

Queries and exporters are described by small dataclasses so that one registration gives a
Python call (`Library.query`), a CLI command and, later, an HTTP route, with no extra code.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import pluggy

from piaa_index.errors import PiaaError
from piaa_index.plugins import hookspecs

if TYPE_CHECKING:
    from piaa_index.library.core import Library

ENTRY_POINT_GROUP = "piaa_index"

# The first-party plugins (`plugins/`, import name `piaa_index_plugins`), registered by import
# whether or not the package's metadata is installed: (the name `piaa plugins` shows, module).
# By name, not imported here: `piaa_index` sits below `piaa_index_plugins` in the layers
# (pyproject.toml, [tool.importlinter]), and they load when a `Plugins` is made, as the entry
# points did.
DEFAULT_PLUGINS: tuple[tuple[str, str], ...] = (
    ("builtin_queries", "piaa_index_plugins.queries"),
    ("builtin_exporters", "piaa_index_plugins.exporters"),
    ("http_api", "piaa_index_plugins.http_api"),
)


# The plugin API (docs/plugins.md, "What a plugin may rely on"): the `Library` calls a plugin
# may use, and all a server's queries get (`ServedLibrary` in plugins/http_api/state.py).
# tests/test_plugin_api.py checks it against the docs' table and `Library`.
PLUGIN_API: tuple[str, ...] = (
    # indexing and fitting
    "index", "set_vocabulary", "add_labels", "remove_labels", "labels", "vocabulary", "fit",
    "ensure_tags", "is_stale", "is_fitted", "auto_fit", "update_indexes",
    # queries
    "query", "tags", "search", "text_search", "similar", "evidence", "thumbnail", "image_id",
    "present_tags", "tag_matrix",
    # the catalog
    "indexed_count", "indexed_paths", "image_info", "image_refs", "indexed_ids",
    "indexed_ids_by_path", "image_page", "newest_images", "feed_version", "present_tags_of",
    "tag_counts",
    # the user's own labels
    "user_labels_of", "user_label_page", "set_user_labels", "forget_user_labels",
    "labels_changed", "teach",
    # sharing and upkeep
    "sidecars", "status", "check", "vacuum", "add_api_key", "api_keys", "revoke_api_key",
    "api_key_scope", "live_api_keys",
)  # fmt: skip


# A flag's words in text (a query string): `?present_only` alone means true.
TRUE_WORDS = frozenset({"", "1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})
JSON_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string"}


@dataclass(frozen=True)
class Param:
    """One parameter of a query or exporter: a click argument or option in the CLI
    (piaa_index/cli/queries.py), a query-string parameter over HTTP (its OpenAPI schema and
    `GET /api/queries`: plugins/http_api/routes_queries.py). What they share is here, once:
    the option's name, the type's names, the default, the value when absent, the text's
    conversion."""

    name: str
    help: str = ""
    type: type = str
    default: Any = None
    required: bool = False
    positional: bool = False
    multiple: bool = False
    is_flag: bool = False

    @property
    def option(self) -> str:
        """The CLI option (`--present-only` for `present_only`)."""
        return "--" + self.name.replace("_", "-")

    @property
    def type_name(self) -> str:
        """`bool` for a flag, else the type's name (`str`, `int`, `float`)."""
        return "bool" if self.is_flag else getattr(self.type, "__name__", str(self.type))

    @property
    def json_type(self) -> str:
        """The JSON Schema type of one value (`string` for a type JSON has no name for)."""
        return "boolean" if self.is_flag else JSON_TYPES.get(self.type, "string")

    @property
    def default_value(self) -> Any:
        """The default as declared to a user (help, schema): a flag's is a bool."""
        return bool(self.default) if self.is_flag else self.default

    @property
    def has_default(self) -> bool:
        """Whether there is a default worth showing (a flag's is always False or True)."""
        return self.is_flag or self.default is not None

    def absent_value(self) -> Any:
        """What `run` gets when the parameter is not given: the default, a list when it may
        be given many times (the CLI passes click's tuple as a list)."""
        if self.multiple and not self.is_flag:
            return list(self.default or [])
        return self.default_value

    def parse(self, text: str) -> Any:
        """One value from text: a flag's word (1/true/yes/on, 0/false/no/off, empty: true),
        else the type called on it. ValueError, with a message naming the parameter, when the
        text is not one."""
        if self.is_flag:
            word = text.strip().lower()
            if word in TRUE_WORDS:
                return True
            if word in FALSE_WORDS:
                return False
            raise ValueError(f"parameter {self.name!r}: expected 1/true or 0/false")
        try:
            return self.type(text)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(
                f"parameter {self.name!r}: expected {self.type_name}, got {text[:100]!r}"
            ) from None

    def describe(self) -> dict[str, Any]:
        """The parameter as data (`GET /api/queries`)."""
        return {
            "name": self.name,
            "type": self.type_name,
            "required": bool(self.required),
            "default": self.default_value,
            "multiple": bool(self.multiple),
            "help": self.help,
        }


@dataclass(frozen=True)
class Query:
    """A query: `run(library, **params)` returns rows, each a dict with at least path and score.

    `quick(settings, **params)`, when given, may answer a fresh process without opening a
    Library (e.g. straight from the files, read-only); it returns None when it cannot, and the
    query runs as usual. Its rows must equal `run`'s.
    """

    name: str
    help: str
    run: Callable[..., list[dict[str, Any]]]
    params: tuple[Param, ...] = field(default_factory=tuple)
    quick: Callable[..., list[dict[str, Any]] | None] | None = None


@dataclass(frozen=True)
class Exporter:
    """An exporter: `run(library, **params)` writes tags somewhere and returns a summary dict."""

    name: str
    help: str
    run: Callable[..., dict[str, Any]]
    params: tuple[Param, ...] = field(default_factory=tuple)


_Item = TypeVar("_Item", Query, Exporter)


class PluginError(PiaaError):
    """A plugin that failed to load or registered something invalid."""


class Plugins:
    """Loaded plugins and what they registered."""

    def __init__(self, load_entry_points: bool = True, defaults: bool = True):
        self.pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
        self.pm.add_hookspecs(hookspecs)
        self.load_errors: dict[str, str] = {}
        if defaults:
            self._load_defaults()
        self._queries: dict[str, Query] | None = None
        self._exporters: dict[str, Exporter] | None = None
        if load_entry_points:
            self.load_entry_points()

    def _load_defaults(self) -> None:
        for name, module in DEFAULT_PLUGINS:
            self._load(name, functools.partial(importlib.import_module, module))

    def load_entry_points(self) -> None:
        """Register the installed packages' plugins (their `piaa_index` entry points)."""
        import importlib.metadata  # a scan of every installed package: only when asked

        # An entry point naming a module already registered (an older install of ours, whose
        # metadata still lists the first-party plugins) is skipped, never registered twice.
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.attr is None and self._has_module(ep.module):
                continue
            taken = self.pm.get_plugin(ep.name)
            if taken is not None:
                owner = getattr(taken, "__name__", repr(taken))
                self.load_errors[ep.name] = f"the name {ep.name!r} is taken (by {owner})"
                continue
            self._load(ep.name, ep.load)
        self._queries = self._exporters = None

    def _has_module(self, name: str) -> bool:
        return any(getattr(p, "__name__", None) == name for p in self.pm.get_plugins())

    def _load(self, name: str, load: Callable[[], object]) -> None:
        # One by one, so a broken plugin is reported, not fatal.
        try:
            plugin = load()
            if not self.pm.is_registered(plugin):
                self.pm.register(plugin, name=name)
        except Exception as exc:  # noqa: BLE001 - any plugin failure is reported
            self.load_errors[name] = f"{type(exc).__name__}: {exc}"

    def register(self, module: object, name: str | None = None) -> None:
        """Register a plugin object directly (tests, embedding applications)."""
        self.pm.register(module, name=name)
        self._queries = self._exporters = None

    @property
    def queries(self) -> dict[str, Query]:
        if self._queries is None:
            self._queries = self._collect(self.pm.hook.register_queries, Query)
        return self._queries

    @property
    def exporters(self) -> dict[str, Exporter]:
        if self._exporters is None:
            self._exporters = self._collect(self.pm.hook.register_exporters, Exporter)
        return self._exporters

    def _collect(self, hook: Any, kind: type[_Item]) -> dict[str, _Item]:
        found: dict[str, _Item] = {}

        def register(item: Any) -> None:
            if not isinstance(item, kind):
                raise PluginError(f"expected a {kind.__name__}, got {item!r}")
            if item.name in found:
                raise PluginError(f"two plugins register a {kind.__name__} named {item.name!r}")
            found[item.name] = item

        hook(register=register)
        return found

    def describe(self) -> list[dict[str, Any]]:
        """Each loaded plugin, its hooks and what it registered (for `piaa plugins`)."""
        out = []
        for name, plugin in sorted(self.pm.list_name_plugin(), key=lambda kv: str(kv[0])):
            hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or [])
            out.append(
                {
                    "name": name,
                    "module": getattr(plugin, "__name__", repr(plugin)),
                    "hooks": hooks,
                    "version": _dist_version(getattr(plugin, "__name__", "")),
                }
            )
        for name, error in sorted(self.load_errors.items()):
            out.append({"name": name, "module": None, "hooks": [], "error": error})
        return out


def _dist_version(module_name: str) -> str | None:
    import importlib.metadata  # `piaa plugins` only

    top = module_name.split(".", 1)[0]
    for dist_name in importlib.metadata.packages_distributions().get(top, []):
        try:
            return importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def run_query(library: Library, plugins: Plugins, name: str, **params: Any) -> list[dict]:
    try:
        query = plugins.queries[name]
    except KeyError:
        known = ", ".join(sorted(plugins.queries))
        raise PluginError(f"no query named {name!r} (known: {known})") from None
    return query.run(library, **params)
