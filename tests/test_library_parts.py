"""The library's parts without back-references (issue 20): each part is given what it uses (one
`Resources` and the other parts by name), never the `Library`; only library/core.py knows the
façade. Checked on the source, and by driving parts built from a `Resources` alone."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from piaa_index.catalog.store import Store
from piaa_index.config import ModelSpec, Settings
from piaa_index.library.core import Library
from piaa_index.library.evidence import evidence
from piaa_index.library.maintenance import Maintenance
from piaa_index.library.resources import Resources
from piaa_index.library.searching import Searcher
from piaa_index.library.tagging import Tagger
from piaa_index.library.vocabulary import VocabularyEditor
from tools import scale

ROOT = Path(__file__).resolve().parent.parent / "piaa_index"
LIBRARY = ROOT / "library"
# Outside library/, the text tower is given the library's collaborators, not the library.
OTHERS = [ROOT / "model" / "text_tower.py"]


def _names_library(node: ast.expr | None) -> bool:
    """An annotation that names `Library` (`Library`, `"Library"`, `Library | None`, …)."""
    if node is None:
        return False
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        try:
            node = ast.parse(node.value, mode="eval").body
        except SyntaxError:
            return False
    return any(
        (isinstance(n, ast.Name) and n.id == "Library")
        or (isinstance(n, ast.Attribute) and n.attr == "Library")
        for n in ast.walk(node)
    )


def back_references(path: Path) -> list[str]:
    """What in one module reaches the `Library`: `self.library`, a parameter or attribute
    annotated `Library`, a function returning one, an import of `Library`, an `__init__`
    taking a `library`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if (
            isinstance(node, ast.Attribute)
            and node.attr == "library"
            and isinstance(node.value, ast.Name)
            and node.value.id == "self"
        ):
            found.append(f"{where}: self.library")
        elif isinstance(node, ast.arg) and _names_library(node.annotation):
            found.append(f"{where}: parameter {node.arg} annotated Library")
        elif isinstance(node, ast.AnnAssign) and _names_library(node.annotation):
            found.append(f"{where}: attribute annotated Library")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _names_library(
            node.returns
        ):
            found.append(f"{where}: {node.name} returns a Library")
        elif isinstance(node, ast.ImportFrom) and any(a.name == "Library" for a in node.names):
            found.append(f"{where}: imports Library from {node.module}")
        elif (
            isinstance(node, ast.FunctionDef)
            and node.name == "__init__"
            and any(a.arg == "library" for a in node.args.args)
        ):
            found.append(f"{where}: __init__ takes a library")
    return found


def test_no_part_holds_the_library() -> None:
    modules = sorted(p for p in LIBRARY.glob("*.py") if p.name != "core.py") + OTHERS
    assert {"part.py", "tagging.py", "searching.py", "resources.py"} <= {p.name for p in modules}
    found = [hit for path in modules for hit in back_references(path)]
    assert not found, "reaching the Library from a part:\n" + "\n".join(found)


def test_the_checker_sees_a_back_reference(tmp_path: Path) -> None:
    """The check above can fail: each kind of back-reference is found, and core.py has them."""
    path = tmp_path / "probe.py"
    path.write_text(
        "from piaa_index.library.core import Library\n"
        "class P:\n"
        "    def __init__(self, library: Library):\n"
        "        self.library = library\n"
        "def f(lib: 'Library | None') -> Library: ...\n"
    )
    hits = back_references(path)
    assert len(hits) == 6, hits
    assert any("returns a Library" in h for h in back_references(LIBRARY / "core.py"))


N_LABELS = 8
N_IMAGES = 400


@pytest.fixture(scope="module")
def world() -> scale.World:
    return scale.World.make(N_LABELS, seed=5)


def resources_at(home: Path, world: scale.World) -> Resources:
    """A library's collaborators made by hand: settings, a store, the model spec, the
    synthetic encoder; no `Library` anywhere."""
    settings = Settings.resolve(
        home, f"sqlite:///{home / 'piaa.sqlite3'}", scale.MODEL, scale.PRETRAINED, "clip", None
    )
    store = Store.open(settings.db_url)
    spec = ModelSpec(scale.MODEL, scale.PRETRAINED, "clip")
    return Resources(settings, store, spec, scale.encoder_factory(world))


def test_parts_work_from_resources_alone(tmp_path: Path, world: scale.World) -> None:
    """A synthetic library indexed, fitted and searched through parts built from a `Resources`
    (no Library): they answer as a Library opened on the same home does afterwards."""
    home = tmp_path / "home"
    resources = resources_at(home, world)
    try:
        assert resources.loaded_vectors is None and resources.loaded_encoder is None
        scale.add_images(resources, world, N_IMAGES, group=100)
        vocab = VocabularyEditor(resources)
        tagger = Tagger(resources, vocab)
        searcher = Searcher(resources, vocab, tagger)
        maintenance = Maintenance(resources, tagger)
        vocab.set_vocabulary(scale.label_names(N_LABELS))
        assert tagger.is_stale()
        hits = searcher.search("l001", limit=10)
        assert hits and not tagger.is_stale()
        texts = searcher.text_search("l002", limit=10)
        assert len(texts) == 10
        status = maintenance.status()
        assert status["images"]["indexed"] == N_IMAGES and status["home"] == str(home)
        first = int(hits[0]["id"]) if "id" in hits[0] else searcher.image_id(hits[0]["path"])
        ev = evidence(resources, tagger, searcher, first, "l001")
        assert ev.image_id == first and ev.grid.size > 0
    finally:
        resources.store.close()

    with scale.open_library(home, world) as lib:
        assert lib.search("l001", limit=10) == hits
        assert lib.text_search("l002", limit=10) == texts
        assert float(lib.evidence(first, "l001").grid.max()) == pytest.approx(float(ev.grid.max()))


def test_the_library_shares_one_resources_with_its_parts(
    tmp_path: Path, world: scale.World
) -> None:
    """The façade's attributes read the parts' one `Resources`: one store, one vector store,
    one encoder, loaded once whichever asks first."""
    with scale.open_library(tmp_path / "home", world) as lib:
        assert isinstance(lib, Library)
        resources = lib.resources
        for part in (lib.vocab, lib.tagger, lib.searcher, lib.maintenance):
            assert part.resources is resources
            assert not hasattr(part, "library")
        assert lib.tagger.vocab is lib.vocab
        assert lib.searcher.tagger is lib.tagger and lib.maintenance.tagger is lib.tagger
        assert lib.store is resources.store and lib.spec is resources.spec
        assert lib.settings is resources.settings and lib.vectors_dir == resources.vectors_dir
        assert lib._encoder is None and lib._vectors is None
        scale.add_images(lib, world, 50, group=50)
        assert lib._vectors is resources.vectors is lib.searcher.vectors
        assert lib._encoder is resources.encoder is lib.vocab.encoder
        assert lib._encoder_factory is resources.encoder_factory
        assert lib.tagger.scores_dir == resources.scores_dir
