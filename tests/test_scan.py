"""The scan on folders like real ones: NAS junk, trash, hidden folders, ignore files, special
files, broken and looping links, unsupported formats, and `--prune` on folders it cannot read."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from piaa_index.ingest.scan import Scan, scan
from piaa_index.library.core import Library
from tests.image_files import shapes_image


def photo(path: Path, seed: int = 0) -> Path:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    shapes_image(np.random.default_rng(seed), (64, 48)).save(path, quality=85)
    return path


def nas_share(root: Path) -> Path:
    """One photo, and the copies and thumbnails a Synology share, a desktop and git add."""
    real = photo(root / "2024" / "IMG_0001.jpg")
    for junk in (
        "2024/@eaDir/IMG_0001.jpg/SYNOPHOTO_THUMB_M.jpg",
        "2024/@eaDir/IMG_0001.jpg/SYNOPHOTO_THUMB_XL.jpg",
        "2024/.thumbnails/IMG_0001.jpg",
        ".Trash-1000/files/IMG_0001.jpg",
        ".git/objects/IMG_0001.jpg",
        "#recycle/old.jpg",
        "2024/._IMG_0001.jpg",  # macOS resource fork
    ):
        photo(root / junk)
    (root / "2024" / "clip.mp4").write_bytes(b"\0" * 64)
    (root / "2024" / "IMG_0001.MOV").write_bytes(b"\0" * 64)
    (root / "2024" / "IMG_0001.jpg.xmp").write_text("<x/>")
    return real


def paths(found: Scan) -> list[str]:
    return [f.path for f in found.files]


def test_a_nas_share_holds_one_photo(tmp_path: Path) -> None:
    real = nas_share(tmp_path / "share")
    found = scan([tmp_path / "share"])
    assert paths(found) == [str(real)]
    assert found.excluded == 6  # @eaDir, .thumbnails, .Trash-1000, .git, #recycle, ._IMG
    assert found.unsupported == {".mov": 1, ".mp4": 1, ".xmp": 1}
    everything = scan([tmp_path / "share"], default_excludes=False)
    assert len(everything.files) == 8


def test_exclude_patterns_and_ignore_files(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    for rel in ("a/1.jpg", "a/tmp/2.jpg", "b/3.jpg", "b/4.png", "b/keep/5.png", "c/6.jpg"):
        photo(root / rel)
    (root / "b" / ".piaaignore").write_text("*.png\n!keep/*.png\n")
    found = scan([root], exclude=["tmp/", "c"])
    assert [Path(p).relative_to(root).as_posix() for p in paths(found)] == [
        "a/1.jpg",
        "b/3.jpg",
        "b/keep/5.png",
    ]


def test_an_explicit_file_is_taken_even_when_a_pattern_would_skip_it(tmp_path: Path) -> None:
    hidden = photo(tmp_path / ".hidden.jpg")
    assert paths(scan([hidden])) == [str(hidden)]


@pytest.fixture
def special_files(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "odd"
    photo(root / "ok.jpg")
    os.mkfifo(root / "pipe.jpg")
    os.symlink("/dev/zero", root / "zero.jpg")
    os.symlink(root / "nowhere.jpg", root / "dangling.jpg")
    os.symlink(root, root / "loop")  # a folder link back to its parent
    yield root


def test_special_files_are_counted_never_read(special_files: Path) -> None:
    started = time.monotonic()
    found = scan([special_files])
    assert time.monotonic() - started < 30  # reading the FIFO or /dev/zero would never end
    assert paths(found) == [str(special_files / "ok.jpg")]
    assert sorted(found.special) == [str(special_files / n) for n in ("pipe.jpg", "zero.jpg")]
    assert found.dangling_links == [str(special_files / "dangling.jpg")]
    assert found.linked_folders == [str(special_files / "loop")]
    # Following links visits each real folder once: the loop adds nothing.
    assert paths(scan([special_files], follow_symlinks=True)) == paths(found)


def test_index_run_over_special_files_completes(
    special_files: Path, piaa_home: Path, tiny_model_config: Path
) -> None:
    lib = Library.open(home=piaa_home, model=str(tiny_model_config), pretrained="none")
    with lib:
        report = lib.index([special_files]).as_dict()
    assert report["indexed"] == 1 and report["failed"] == []
    assert len(report["skipped"]["special_files"]) == 2
    assert report["skipped"]["dangling_links"] == [str(special_files / "dangling.jpg")]


def make_unreadable(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """chmod 000; as root (which reads anyway) the listing is made to fail as it would."""
    folder.chmod(0)
    if os.geteuid() != 0:
        return
    real_scandir = os.scandir

    def scandir(path):  # type: ignore[no-untyped-def]
        if os.fspath(path) == str(folder):
            raise PermissionError(13, "Permission denied", str(folder))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_prune_keeps_what_it_cannot_prove_gone(
    tmp_path: Path, piaa_home: Path, tiny_model_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unreadable folder and an emptied (unmounted) share keep their images; a deleted file
    in a readable folder and a deleted folder are forgotten."""
    root = tmp_path / "lib"
    for k in range(5):
        for folder in ("readable", "locked", "share", "deleted"):
            photo(root / folder / f"{k}.jpg", seed=k * 10 + len(folder))
    lib = Library.open(home=piaa_home, model=str(tiny_model_config), pretrained="none")
    with lib:
        assert lib.index([root]).indexed == 20
        (root / "readable" / "0.jpg").unlink()
        for f in (root / "share").iterdir():
            f.unlink()  # what an unmounted share looks like: an empty mount point
        for f in (root / "deleted").iterdir():
            f.unlink()
        (root / "deleted").rmdir()
        make_unreadable(root / "locked", monkeypatch)
        try:
            report = lib.index([root], prune=True).as_dict()
        finally:
            (root / "locked").chmod(0o755)
        assert report["removed"] == 6  # readable/0.jpg and the 5 of the deleted folder
        assert report["skipped"]["unreadable"] == [str(root / "locked")]
        assert report["kept"] == {
            f"folder not read: {root / 'locked'}": 5,
            f"folder is empty (an offline share?): {root / 'share'}": 5,
        }
        assert lib.status()["images"]["indexed"] == 14


def test_cli_summary_names_what_was_skipped(
    tmp_path: Path, piaa_home: Path, tiny_model_config: Path
) -> None:
    import json

    from click.testing import CliRunner

    from piaa_index.cli import cli

    nas_share(tmp_path / "share")
    photo(tmp_path / "share" / "drafts" / "x.jpg", seed=3)
    args = ["index", str(tmp_path / "share"), "--model", str(tiny_model_config)]
    args += ["--pretrained", "none", "--exclude", "drafts/"]
    result = CliRunner().invoke(cli, [*args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["indexed"] == 1
    assert report["skipped"]["unsupported"] == {".mov": 1, ".mp4": 1, ".xmp": 1}
    assert report["skipped"]["excluded"] == 7
    text = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert "not images (skipped): 1 .mov, 1 .mp4, 1 .xmp" in text.stderr
    assert "excluded by patterns: 7" in text.stderr
