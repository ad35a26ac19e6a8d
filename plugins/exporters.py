"""Built-in exporters: XMP sidecars (piaa_index/xmp/sidecars.py: merged into what is there, undoable),
CSV, JSON."""

from __future__ import annotations

import contextlib
import csv
import sys
from collections.abc import Callable, Iterator
from typing import IO, Any

from piaa_index.plugins import Exporter, Param
from piaa_index.plugins.hookspecs import hookimpl
from piaa_index.textio import json_text


def _present_tags(library: Any) -> dict[str, list[tuple[str, float]]]:
    """path → [(label, score)] of labels decided present, best first."""
    return dict(library.present_tags())


def _xmp(
    library: Any,
    prefix: str = "piaa",
    naming: str = "append",
    undo: bool = False,
    verbose: bool = False,
) -> dict[str, Any]:
    from piaa_index.xmp.sidecars import check_options

    check_options(prefix, naming)  # before tagging, which may take a while
    sidecars = library.sidecars()
    images = library.indexed_paths()
    if undo:
        report = sidecars.undo(images)
    else:
        tags = {
            path: [name for name, _ in labels] for path, labels in _present_tags(library).items()
        }
        report = sidecars.export(tags, images, prefix=prefix, naming=naming)
    return report.as_dict(list_paths=verbose)


STDOUT = "-"  # --output -: standard output, as most Unix tools read it


@contextlib.contextmanager
def _text_output(output: str, newline: str | None = None) -> Iterator[IO[str]]:
    """The file `output`, or standard output for `-` (left open). A non-UTF-8 file name is
    written as its own bytes, as the file system holds it."""
    if output == STDOUT:
        yield sys.stdout
        sys.stdout.flush()
        return
    with open(output, "w", newline=newline, encoding="utf-8", errors="surrogateescape") as fh:
        yield fh


def _csv(library: Any, output: str = "tags.csv") -> dict[str, Any]:
    tags = _present_tags(library)
    with _text_output(output, newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "score"])
        for path in sorted(tags):
            for name, score in tags[path]:
                writer.writerow([path, name, f"{score:.6f}"])
    return {"output": output, "images": len(tags)}


def _json(library: Any, output: str = "tags.json") -> dict[str, Any]:
    tags = _present_tags(library)
    data = [
        {"path": p, "labels": [{"label": n, "score": s} for n, s in tags[p]]} for p in sorted(tags)
    ]
    with _text_output(output) as fh:
        fh.write(json_text(data) + "\n")
    return {"output": output, "images": len(tags)}


@hookimpl
def register_exporters(register: Callable[[Exporter], None]) -> None:
    register(
        Exporter(
            "xmp",
            "Merge the present labels into each image's XMP sidecar as keywords (dc:subject, "
            "lr:hierarchicalSubject PREFIX|label, digiKam:TagsList PREFIX/label), keeping "
            "everything else in it; a re-export replaces only the keywords piaa wrote; --undo "
            "takes them out again (a sidecar piaa created is deleted, one untouched since is "
            "restored byte for byte).",
            _xmp,
            (
                Param("prefix", "Parent keyword of the hierarchical keywords.", default="piaa"),
                Param(
                    "naming",
                    "Sidecar name: 'append' gives IMG.jpg.xmp (darktable, digiKam, Immich), "
                    "'replace' gives IMG.xmp (Lightroom, RAW files). An image whose other-named "
                    "sidecar already exists gets its keywords merged into that one.",
                    default="append",
                ),
                Param("undo", "Take out every keyword piaa wrote.", is_flag=True),
                Param("verbose", "Also list the sidecars by outcome.", is_flag=True),
            ),
        )
    )
    register(
        Exporter(
            "csv",
            "Write path,label,score rows of present labels.",
            _csv,
            (Param("output", "Output file; - for standard output.", default="tags.csv"),),
        )
    )
    register(
        Exporter(
            "json",
            "Write present labels per image as JSON.",
            _json,
            (Param("output", "Output file; - for standard output.", default="tags.json"),),
        )
    )
