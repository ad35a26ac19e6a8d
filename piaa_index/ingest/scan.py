"""Finding a library's image files: what to read, what to skip, and why.

Real photo folders hold NAS thumbnails (`@eaDir`), trash folders, `.git`, sidecars, videos,
FIFOs, dangling links and folders we may not read. The scan yields only regular files with an
image extension (RAW included), skips junk folders by default (gitignore-style patterns, also
from `.piaaignore` files), and counts everything it skipped, so that nothing vanishes silently
and `--prune` forgets only what is provably gone.
"""

from __future__ import annotations

import functools
import os
import stat
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from piaa_index.errors import UsageError
from piaa_index.ingest.images import IMAGE_EXTENSIONS, RAW_EXTENSIONS, raw_supported

# Folders no photographer means to index: NAS thumbnail and recycle folders (Synology, QNAP),
# desktop trash, Windows system folders, caches, repositories; and hidden files and folders.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    "@eaDir/",
    r"\#recycle/",  # "#" would start a comment
    r"\#snapshot/",
    "@Recycle/",
    ".@__thumb/",
    ".Trash-*/",
    ".Trashes/",
    "$RECYCLE.BIN/",
    "System Volume Information/",
    ".thumbnails/",
    ".git/",
    "node_modules/",
    "__pycache__/",
    ".*",
)
IGNORE_FILE = ".piaaignore"  # gitignore syntax, relative to the folder that holds it


class PathError(UsageError):
    """Paths given to `index` that do not exist."""


@dataclass(frozen=True)
class FileInfo:
    path: str
    size: int
    mtime: float


@dataclass
class Scan:
    """What a scan found, and everything it did not read, by reason."""

    files: list[FileInfo] = field(default_factory=list)
    roots: list[str] = field(default_factory=list)
    listed: dict[str, int] = field(default_factory=dict)  # folder read in full -> its entries
    unsupported: Counter[str] = field(default_factory=Counter)  # extension -> files
    excluded: int = 0
    special: list[str] = field(default_factory=list)  # FIFOs, sockets, devices, links to them
    dangling_links: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # folders or files we could not stat/list
    linked_folders: list[str] = field(default_factory=list)  # not followed (no --follow-symlinks)

    def skipped(self) -> dict[str, Any]:
        """The summary an index report carries (lists of paths, counts where lists get long)."""
        return {
            "unsupported": dict(sorted(self.unsupported.items())),
            "excluded": self.excluded,
            "special_files": self.special,
            "dangling_links": self.dangling_links,
            "unreadable": self.unreadable,
            "linked_folders_not_followed": self.linked_folders,
        }

    def why_kept(self, path: str) -> str | None:
        """None when a known image that the scan did not find is provably gone, else why not.

        Gone means: the file does not exist and its nearest existing folder was read in full
        and is not empty (an unmounted share leaves an empty mount point behind).
        """
        folder = os.path.dirname(path)
        while not os.path.lexists(folder):
            parent = os.path.dirname(folder)
            if parent == folder:
                return "no existing folder above it"
            folder = parent
        if folder not in self.listed:
            return f"folder not read: {folder}"
        if os.path.lexists(path):
            return "still on disk (excluded, unreadable or no longer a regular image file)"
        if self.listed[folder] == 0:
            return f"folder is empty (an offline share?): {folder}"
        return None


@functools.cache
def _raw_ok() -> bool:
    return raw_supported()


def _spec(lines: Iterable[str]) -> Any:
    import pathspec

    return pathspec.GitIgnoreSpec.from_lines(lines)


def _excluded(rel_by_spec: list[tuple[Any, str]]) -> bool:
    """Each pattern set judges the path relative to its own folder; the deepest verdict wins,
    so a `.piaaignore` can re-include (`!pattern`) what an outer rule excluded."""
    decision = False
    for spec, rel in rel_by_spec:
        verdict = spec.check_file(rel).include
        if verdict is not None:
            decision = verdict
    return decision


def scan(
    paths: Sequence[str | os.PathLike[str]],
    exclude: Sequence[str] = (),
    default_excludes: bool = True,
    follow_symlinks: bool = False,
) -> Scan:
    """Image files under `paths` (recursive, sorted by path) and what was skipped.

    An explicitly given file is taken whatever the patterns say (the user named it); folders are
    walked with the exclude rules. Symlinked folders are followed only with `follow_symlinks`,
    each real folder once (no loops).
    """
    result = Scan()
    rules = _spec([*(DEFAULT_EXCLUDES if default_excludes else ()), *exclude])
    missing: list[str] = []
    found: dict[str, FileInfo] = {}
    seen_dirs: set[tuple[int, int]] = set()
    for given in paths:
        root = Path(given).expanduser()
        if not os.path.lexists(root):
            missing.append(os.fspath(given))
            continue
        try:
            root = root.resolve()
            st = root.stat()
        except (OSError, RuntimeError):  # a dangling link, a loop, no permission
            result.dangling_links.append(str(root))
            continue
        result.roots.append(str(root))
        if stat.S_ISDIR(st.st_mode):
            _walk(str(root), rules, follow_symlinks, seen_dirs, found, result)
        else:
            _take_file(str(root), st, found, result)
    if missing:
        # All of them at once: a list of 10,000 paths should not fail one name per run.
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise PathError(f"no such file or folder: {', '.join(missing[:5])}{more}")
    result.files = [found[p] for p in sorted(found)]
    return result


def _take_file(path: str, st: os.stat_result, found: dict[str, FileInfo], result: Scan) -> None:
    """Keep a regular file with an image extension; count anything else."""
    if not stat.S_ISREG(st.st_mode):
        result.special.append(path)  # reading a FIFO or /dev/zero would never end
        return
    ext = os.path.splitext(path)[1].lower()
    if ext not in IMAGE_EXTENSIONS:
        result.unsupported[ext or "(no extension)"] += 1
        return
    if ext in RAW_EXTENSIONS and not _raw_ok():
        result.unsupported[f"{ext} (needs rawpy)"] += 1
        return
    found[path] = FileInfo(path, st.st_size, st.st_mtime)


def _walk(
    root: str,
    rules: Any,
    follow_symlinks: bool,
    seen_dirs: set[tuple[int, int]],
    found: dict[str, FileInfo],
    result: Scan,
) -> None:
    # Depth-first with an explicit stack: (folder, [(spec, folder's path relative to spec)]).
    stack: list[tuple[str, list[tuple[Any, str]]]] = [(root, [(rules, "")])]
    while stack:
        folder, specs = stack.pop()
        try:
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen_dirs:
                continue  # reached again through a link: a loop or a second way in
            seen_dirs.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:
            result.unreadable.append(folder)
            continue
        result.listed[folder] = len(entries)
        names = {e.name for e in entries}
        if IGNORE_FILE in names:
            try:
                with open(os.path.join(folder, IGNORE_FILE), encoding="utf-8") as fh:
                    specs = [*specs, (_spec(fh.read().splitlines()), "")]
            except (OSError, UnicodeDecodeError):
                result.unreadable.append(os.path.join(folder, IGNORE_FILE))
        for entry in sorted(entries, key=lambda e: e.name):
            _visit(entry, specs, follow_symlinks, stack, found, result)


def _visit(
    entry: os.DirEntry[str],
    specs: list[tuple[Any, str]],
    follow_symlinks: bool,
    stack: list[tuple[str, list[tuple[Any, str]]]],
    found: dict[str, FileInfo],
    result: Scan,
) -> None:
    try:
        is_link = entry.is_symlink()
        st = os.stat(entry.path) if is_link else entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        result.dangling_links.append(entry.path)
        return
    except OSError:  # a link loop, no permission
        (result.dangling_links if entry.is_symlink() else result.unreadable).append(entry.path)
        return
    is_dir = stat.S_ISDIR(st.st_mode)
    rel = [(spec, f"{base}{entry.name}{'/' if is_dir else ''}") for spec, base in specs]
    if _excluded(rel):
        result.excluded += 1
        return
    if not is_dir:
        _take_file(entry.path, st, found, result)
    elif is_link and not follow_symlinks:
        result.linked_folders.append(entry.path)
    else:
        stack.append((entry.path, rel))


_FOLDER_EXCLUDES: Any = None


def in_excluded_folder(path: str) -> bool:
    """Whether `path` lies in a folder the scan skips by default whatever its parent: a NAS
    thumbnail or recycle folder, a trash, `.git`… (hidden folders in general aside: a user may
    keep a whole library under one). Exports check it so that an image indexed before these
    excludes, or named explicitly, never gets a sidecar written into such a folder."""
    global _FOLDER_EXCLUDES
    if _FOLDER_EXCLUDES is None:
        _FOLDER_EXCLUDES = _spec(p for p in DEFAULT_EXCLUDES if p.endswith("/"))
    folder = os.path.dirname(os.path.abspath(path)).replace(os.sep, "/").strip("/")
    return bool(folder) and bool(_FOLDER_EXCLUDES.match_file(folder + "/"))
