"""Built-in exporters: XMP sidecars (Lightroom, digiKam, darktable read dc:subject), CSV, JSON."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

from piaa_index.hookspecs import hookimpl
from piaa_index.plugins import Exporter, Param
from piaa_index.textio import json_text

XMP_TEMPLATE = """<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="piaa-index">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:lr="http://ns.adobe.com/lightroom/1.0/">
   <dc:subject>
    <rdf:Bag>
{items}
    </rdf:Bag>
   </dc:subject>
   <lr:hierarchicalSubject>
    <rdf:Bag>
{hier}
    </rdf:Bag>
   </lr:hierarchicalSubject>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="w"?>
"""


def _present_tags(library: Any) -> dict[str, list[tuple[str, float]]]:
    """path → [(label, score)] of labels decided present, best first."""
    return dict(library.present_tags())


def _xmp(library: Any, prefix: str = "piaa", overwrite: bool = False) -> dict[str, Any]:
    written, skipped = 0, []
    for path, labels in sorted(_present_tags(library).items()):
        sidecar = Path(path).with_suffix(Path(path).suffix + ".xmp")
        if sidecar.exists() and not overwrite:
            skipped.append(str(sidecar))
            continue
        items = "\n".join(f"     <rdf:li>{escape(name)}</rdf:li>" for name, _ in labels)
        hier = "\n".join(
            f"     <rdf:li>{escape(prefix)}|{escape(name)}</rdf:li>" for name, _ in labels
        )
        tmp = sidecar.with_name(sidecar.name + ".tmp")
        tmp.write_text(XMP_TEMPLATE.format(items=items, hier=hier), encoding="utf-8")
        os.replace(tmp, sidecar)
        written += 1
    return {"written": written, "skipped_existing": skipped}


def _csv(library: Any, output: str = "tags.csv") -> dict[str, Any]:
    tags = _present_tags(library)
    # A non-UTF-8 file name is written as its own bytes, as the file system holds it.
    with open(output, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
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
    Path(output).write_text(json_text(data), encoding="utf-8")
    return {"output": output, "images": len(tags)}


@hookimpl
def register_exporters(register: Callable[[Exporter], None]) -> None:
    register(
        Exporter(
            "xmp",
            "Write IMAGE.xmp sidecars with the present labels as keywords (dc:subject).",
            _xmp,
            (
                Param("prefix", "Parent keyword for lr:hierarchicalSubject.", default="piaa"),
                Param("overwrite", "Replace existing sidecars.", is_flag=True),
            ),
        )
    )
    register(
        Exporter(
            "csv",
            "Write path,label,score rows of present labels.",
            _csv,
            (Param("output", "Output file.", default="tags.csv"),),
        )
    )
    register(
        Exporter(
            "json",
            "Write present labels per image as JSON.",
            _json,
            (Param("output", "Output file.", default="tags.json"),),
        )
    )
