"""What a library records about its model (the `model` setting), and the one rule for weights
given by path: they are the same weights when they have the same bytes, wherever they are.

The setting is {"model", "pretrained", "front_end", "identity"} and, for a checkpoint file,
"weights_sha256". Libraries made before the hash was recorded carry only the identity label
"NAME (size N, blake2b PREFIX)"; `migrate` adds the hash while the file is where it was, and
`same_weights` still accepts a moved copy by that label. No torch import here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from piaa_index.errors import LibraryError

_LEGACY_LABEL = re.compile(r"\(size (\d+), blake2b ([0-9a-f]{12})\)")
_KEYWORDS = ("default", "none")


def sha256_file(path: Path, home: Path | None = None) -> str:
    """`weights.sha256_file`, imported when a hash is needed: `checkpoint_path` serves the
    read-only `piaa status` too, which should not import urllib for it (~25 ms)."""
    from piaa_index.model.weights import sha256_file as digest

    return digest(path, home)


def checkpoint_path(pretrained: str | None) -> Path | None:
    """The absolute path when `pretrained` names an existing file (not a tag or keyword: a
    file called `openai` in the current folder does not turn the tag into a path)."""
    if not pretrained or not looks_like_file(pretrained):
        return None
    path = Path(pretrained).expanduser()
    return path.resolve() if path.is_file() else None


def looks_like_file(pretrained: str) -> bool:
    """A path or a file name with an extension, as opposed to a tag (`openai`) or keyword."""
    return pretrained.lower() not in _KEYWORDS and (
        "/" in pretrained or os.sep in pretrained or "." in Path(pretrained).name
    )


def weights_fields(pretrained: str, home: Path) -> dict[str, Any]:
    """For a new library: an absolute path and its sha256 when `pretrained` is a file."""
    path = checkpoint_path(pretrained)
    if path is None:
        return {"pretrained": pretrained}
    return {"pretrained": str(path), "weights_sha256": sha256_file(path, home)}


def migrate(record: dict[str, Any], home: Path) -> dict[str, Any] | None:
    """The record with the hash added (older libraries), or None when nothing changes."""
    if "weights_sha256" in record:
        return None
    path = checkpoint_path(record.get("pretrained"))
    if path is None:
        return None
    label = str((record.get("identity") or {}).get("pretrained", ""))
    legacy = _LEGACY_LABEL.search(label)
    if legacy and not _matches_label(path, legacy):
        return None  # the file at that path changed; `check_file` reports it when loading
    return {**record, "weights_sha256": sha256_file(path, home)}


def _matches_label(path: Path, legacy: re.Match[str]) -> bool:
    from piaa_index.ingest.images import file_hash

    return path.stat().st_size == int(legacy[1]) and file_hash(path)[:12] == legacy[2]


def same_weights(record: dict[str, Any], path: Path, home: Path) -> bool:
    """Whether the file at `path` holds the bytes the library was indexed with."""
    if record.get("weights_sha256"):
        return sha256_file(path, home) == record["weights_sha256"]
    label = str((record.get("identity") or {}).get("pretrained", ""))
    legacy = _LEGACY_LABEL.search(label)
    return legacy is not None and _matches_label(path, legacy)


def _short(record: dict[str, Any]) -> str:
    sha = record.get("weights_sha256")
    return f"sha256 {sha[:12]}…" if sha else str((record.get("identity") or {}).get("pretrained"))


def accept_moved(record: dict[str, Any], asked: str, home: Path) -> dict[str, Any]:
    """`--pretrained ASKED` on a library indexed from another path: the updated record when
    ASKED holds the same bytes; LibraryError naming both hashes when it does not."""
    path = checkpoint_path(asked)
    if path is None:
        raise LibraryError(
            f"checkpoint file not found: {asked} (this library was indexed with "
            f"{record.get('pretrained')}, {_short(record)})"
        )
    if not same_weights(record, path, home):
        raise LibraryError(
            f"{path} holds other weights (sha256 {sha256_file(path, home)[:12]}…) than this "
            f"library was indexed with ({_short(record)}, from {record.get('pretrained')}); "
            "pass the same file, or use another --home/--db for other weights"
        )
    return {**record, "pretrained": str(path), "weights_sha256": sha256_file(path, home)}


def check_file(record: dict[str, Any], home: Path) -> None:
    """Before loading the model: the recorded checkpoint is where it was, with its bytes."""
    pretrained = str(record.get("pretrained") or "")
    if not record.get("weights_sha256") or not looks_like_file(pretrained):
        return
    path = Path(pretrained).expanduser()
    if not path.is_file():
        raise LibraryError(
            f"the weights this library was indexed with are no longer at {pretrained} "
            f"({_short(record)}); pass --pretrained NEWPATH where the file is now "
            "(the same bytes are accepted at any path)"
        )
    if not same_weights(record, path, home):
        raise LibraryError(
            f"{pretrained} has changed since this library was indexed (sha256 now "
            f"{sha256_file(path, home)[:12]}…, recorded {_short(record)}); put the original "
            "file back, or use another --home/--db for the new weights"
        )
