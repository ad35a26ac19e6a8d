"""`piaa index` and `piaa status`."""

from __future__ import annotations

import os
from typing import BinaryIO

import click

from piaa_index.cli.common import AppContext, echo_json, pass_app
from piaa_index.errors import UserInputError
from piaa_index.ingest.bounded import READ_TIMEOUT


@click.command("index")
@click.argument("paths", nargs=-1, type=click.Path())
@click.option(
    "--from",
    "from_file",
    type=click.File("rb"),
    help="Also index the paths listed in this file, one per line (or NUL-separated, as "
    "`find -print0` writes); `-` reads standard input.",
)
@click.option(
    "--prune",
    is_flag=True,
    help="Forget images under PATHS whose files are provably gone (their folder was read and "
    "is not empty); the summary says what was kept and why.",
)
@click.option(
    "--exclude",
    multiple=True,
    metavar="PATTERN",
    help="Skip files and folders matching this gitignore-style pattern (repeatable); "
    "a .piaaignore file in any folder works the same.",
)
@click.option(
    "--no-default-excludes",
    is_flag=True,
    help="Also walk NAS thumbnail folders (@eaDir), trash, .git, hidden files and folders.",
)
@click.option(
    "--follow-symlinks", is_flag=True, help="Walk into symlinked folders (each folder once)."
)
@click.option("--batch-size", default=32, show_default=True, help="Images per forward pass.")
@click.option(
    "--commit-every",
    default=256,
    show_default=True,
    help="Images per vector shard and SQL commit (a crash loses at most the groups in flight).",
)
@click.option(
    "--read-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=READ_TIMEOUT,
    show_default=True,
    envvar="PIAA_READ_TIMEOUT",
    metavar="SECONDS",
    help="Give up on a file whose read or decode takes longer (a hung network share); "
    "it is listed as failed in this run's summary, not recorded, and tried again next run. "
    "Env: PIAA_READ_TIMEOUT.",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="ray: decode, encode and write shards on a Ray cluster (pip install "
    "'piaa-index[ray]'; docs/ray.md).",
)
@click.option(
    "--address",
    metavar="ADDRESS",
    help="With --engine ray: the cluster (auto, ray://HOST:10001); default RAY_ADDRESS, "
    "else a new local Ray.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@pass_app
def index_command(
    app: AppContext,
    paths: tuple[str, ...],
    from_file: BinaryIO | None,
    prune: bool,
    exclude: tuple[str, ...],
    no_default_excludes: bool,
    follow_symlinks: bool,
    batch_size: int,
    commit_every: int,
    read_timeout: float,
    engine: str,
    address: str | None,
    as_json: bool,
) -> None:
    """Index image files and folders (recursive, incremental, resumable).

    Unchanged files (same size and mtime) are skipped; a file with the same content as an
    indexed one reuses its vectors. Files that cannot be decoded are recorded and skipped;
    the exit code is 0 when the run completes.
    """
    todo = list(paths) + (read_path_stream(from_file) if from_file is not None else [])
    if not todo:
        raise click.UsageError("give files or folders to index, or --from FILE")
    if app.progress:  # within half a second: the library and the model take seconds to open
        click.echo("opening the library…", err=True)
    library = app.library()
    report = library.index(
        todo,
        prune=prune,
        progress=app.progress,
        batch_size=batch_size,
        exclude=exclude,
        default_excludes=not no_default_excludes,
        follow_symlinks=follow_symlinks,
        engine=engine,
        address=address,
        commit_every=commit_every,
        read_timeout=read_timeout,
    )
    if as_json:
        echo_json(report.as_dict())
        return
    d = report.as_dict()
    click.echo(
        f"indexed {d['indexed']}, reused {d['reused']}, unchanged {d['unchanged']}, "
        f"removed {d['removed']}, failed {len(d['failed'])}"
        + (f" (+{d['still_failing']} still failing)" if d["still_failing"] else "")
        + f" in {d['seconds']:.1f}s"
        + (f" ({d['images_per_second']:.1f} images/s)" if d["indexed"] else "")
    )
    for failure in d["failed"]:
        click.echo(f"  failed: {failure['path']}: {failure['error']}", err=True)
    if d["warnings"]:
        n = len(d["warnings"])
        click.echo(
            f"  {n} file{'s' if n != 1 else ''} decoded with decoder warnings "
            "(e.g. corrupt EXIF; each file's messages are in --json's warnings)",
            err=True,
        )
    for line in skipped_lines(d["skipped"], d["kept"]):
        click.echo(f"  {line}", err=True)


def skipped_lines(skipped: dict, kept: dict[str, int]) -> list[str]:
    """One line per kind of file the run did not read, and per reason --prune kept images."""
    lines = []
    if skipped.get("unsupported"):
        by_ext = ", ".join(f"{n} {ext}" for ext, n in skipped["unsupported"].items())
        lines.append(f"not images (skipped): {by_ext}")
    if skipped.get("excluded"):
        lines.append(f"excluded by patterns: {skipped['excluded']} files or folders")
    for key, what in (
        ("special_files", "not regular files (FIFO, device, socket)"),
        ("dangling_links", "broken links"),
        ("unreadable", "could not read"),
        ("linked_folders_not_followed", "symlinked folders not followed (--follow-symlinks)"),
    ):
        paths = skipped.get(key) or []
        if paths:
            more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
            lines.append(f"{what}: {', '.join(paths[:3])}{more}")
    for reason, n in kept.items():
        lines.append(f"kept {n} missing images: {reason}")
    return lines


def read_path_list(data: bytes) -> list[str]:
    """Paths from a list file: NUL-separated when it holds a NUL, else one per line.

    Names are decoded as the file system does (os.fsdecode), so bytes that are not UTF-8
    survive; blank lines are skipped.
    """

    entries = data.split(b"\0") if b"\0" in data else data.splitlines()
    return [os.fsdecode(entry) for entry in entries if entry.strip()]


# The most bytes one entry of a --from list may take (PATH_MAX is 4096 on Linux, 1024 on
# macOS): a longer "path", or that many bytes without any path, is not a path list
# (`--from /dev/zero`, a binary file) and is refused before it can exhaust memory.
MAX_PATH_ENTRY_BYTES = 64 * 1024
_CHUNK = 64 * 1024


def read_path_stream(stream: BinaryIO, limit: int = MAX_PATH_ENTRY_BYTES) -> list[str]:
    """`read_path_list` of a stream, read in chunks so that memory stays bounded by the paths
    themselves: NUL-separated when a NUL comes within the first entry, else one per line; a
    stretch of more than `limit` bytes holding no path (one over-long entry, or endless blank
    entries) is a usage error."""

    def too_long() -> UserInputError:
        return UserInputError(
            f"--from: over {limit} bytes without a path (an over-long entry, or only "
            "separators): not a list of paths, one per line or NUL-separated"
        )

    out: list[str] = []
    buffer = b""
    separator: bytes | None = None  # decided by the first NUL, or by the first full entry
    blank = 0  # bytes of separators and blank entries since the last path
    while True:
        chunk = stream.read(_CHUNK)
        buffer += chunk
        if separator is None:
            if b"\0" in buffer:
                separator = b"\0"
            elif len(buffer) > limit or (not chunk and buffer):
                separator = b"\n"
        if separator is not None:
            if separator == b"\n" and b"\0" in buffer:
                raise UserInputError("--from: a NUL byte in a newline-separated list of paths")
            entries = buffer.split(separator)
            buffer = b"" if not chunk else entries.pop()  # the last one may be unfinished
            if separator == b"\n":
                # bytes.splitlines' line ends (\r\n, a lone \r) as `read_path_list` has them
                entries = [line for entry in entries for line in entry.splitlines() or [b""]]
            for entry in entries:
                if len(entry) > limit:
                    raise too_long()
                if entry.strip():
                    out.append(os.fsdecode(entry))
                    blank = 0
                else:
                    blank += len(entry) + 1
                    if blank > limit:
                        raise too_long()
        if len(buffer) > limit:
            raise too_long()
        if not chunk:
            return out


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@pass_app
def status_command(app: AppContext, as_json: bool) -> None:
    """Counts, model, vocabulary, classifier version and whether tags are stale."""
    status = None
    if not app.library_is_open:  # a fresh `piaa status`: read-only, without SQLAlchemy
        from piaa_index.catalog import readonly as store_readonly

        status = store_readonly.status(app.settings())
    if status is None:
        status = app.library().status()
    if as_json:
        echo_json(status)
        return
    images = status["images"]
    model = status["model"] or {}
    click.echo(f"database:    {status['database']} (schema {status['schema_revision']})")
    click.echo(
        f"model:       {model.get('model', '-')} ({model.get('pretrained', '-')}), "
        f"front-end {model.get('front_end', '-')}"
    )
    click.echo(
        f"images:      {images['indexed']} indexed, {images['failed']} failed, "
        f"{images['pending']} pending; vectors {status['vectors_bytes'] / 1e6:.1f} MB"
    )
    vocab = status["vocabulary"]
    click.echo(f"vocabulary:  v{vocab['version']}: {', '.join(vocab['labels']) or '(empty)'}")
    clf = status["classifier"]
    if clf is None:
        click.echo("classifier:  none (run `piaa fit`)")
    else:
        click.echo(
            f"classifier:  v{clf['version']} fitted {clf['fitted_at']} on {clf['n_images']} images"
            f" (vocabulary v{clf['vocabulary_version']})"
        )
        if clf["images_added_since"]:
            click.echo(f"             {clf['images_added_since']} images added since the fit")
        if clf["absent_labels"]:
            click.echo(
                f"             look absent from the collection: {', '.join(clf['absent_labels'])}"
            )
        if clf["weak_labels"]:
            click.echo(f"             too little evidence for: {', '.join(clf['weak_labels'])}")
        for warning in clf["warnings"]:
            click.echo(f"             note: {warning}")
    click.echo(f"stale:       {'yes (the next query refits)' if status['stale'] else 'no'}")
    if status.get("labels_changed"):
        click.echo("your labels: changed since the last fit (`piaa fit` learns from them)")


COMMANDS = [index_command, status_command]
