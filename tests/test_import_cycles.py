"""No import cycles: a module never imports (directly or through others) a module that imports
it. Checked on the real import graph of the shipped packages (grimp, import-linter's engine),
function-level imports included. Imports under `if TYPE_CHECKING:` are left out: they are
annotations only (the parts of `library/` name the `Library` they serve), listed by
`lint-imports` with the layer contracts in pyproject.toml."""

from __future__ import annotations

import grimp


def test_no_import_cycles_at_runtime() -> None:
    graph = grimp.build_graph(
        "piaa_index", "piaa_index_plugins", exclude_type_checking_imports=True, cache_dir=None
    )
    assert len(graph.modules) > 80  # the whole tree was read
    cycles = sorted(
        f"{module} -> {imported} -> ... -> {module}"
        for module in graph.modules
        for imported in graph.find_modules_directly_imported_by(module)
        if graph.chain_exists(importer=imported, imported=module)
    )
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
