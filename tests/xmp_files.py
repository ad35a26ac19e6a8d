"""Sidecars as photographers' tools leave them: made by exiftool, and a darktable one by hand.

exiftool comes from Debian's `libimage-exiftool-perl`. Tests that need it skip when it is not
on PATH, unless PIAA_REQUIRE_EXIFTOOL=1 (CI), where they fail instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

# A darktable 4.x sidecar as darktable writes one on import and edit: its own namespace with
# attributes, an edit history (a Seq of structures), an empty mask history and darktable's
# automatic tag in dc:subject, after an XML declaration (not an xpacket).
DARKTABLE_SIDECAR = """<?xml version="1.0" encoding="UTF-8"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="XMP Core 4.4.0-Exiv2">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:exif="http://ns.adobe.com/exif/1.0/"
    xmlns:xmp="http://ns.adobe.com/xap/1.0/"
    xmlns:xmpMM="http://ns.adobe.com/xap/1.0/mm/"
    xmlns:dc="http://purl.org/dc/elements/1.1/"
    xmlns:lr="http://ns.adobe.com/lightroom/1.0/"
    xmlns:darktable="http://darktable.sf.net/"
   exif:DateTimeOriginal="2024:06:01 18:22:05.000"
   xmp:Rating="3"
   xmpMM:DerivedFrom="IMG_0042.jpg"
   darktable:import_timestamp="63852345600000000"
   darktable:change_timestamp="63852349200000000"
   darktable:export_timestamp="-1"
   darktable:print_timestamp="-1"
   darktable:xmp_version="5"
   darktable:raw_params="0"
   darktable:auto_presets_applied="1"
   darktable:history_end="2"
   darktable:iop_order_version="4">
   <dc:subject>
    <rdf:Bag>
     <rdf:li>darktable|format|jpg</rdf:li>
     <rdf:li>dog</rdf:li>
    </rdf:Bag>
   </dc:subject>
   <lr:hierarchicalSubject>
    <rdf:Bag>
     <rdf:li>darktable|format|jpg</rdf:li>
    </rdf:Bag>
   </lr:hierarchicalSubject>
   <darktable:masks_history>
    <rdf:Seq/>
   </darktable:masks_history>
   <darktable:history>
    <rdf:Seq>
     <rdf:li
      darktable:num="0"
      darktable:operation="exposure"
      darktable:enabled="1"
      darktable:modversion="6"
      darktable:params="0000000000000000000000000000803f0000000000000000"
      darktable:multi_name=""
      darktable:multi_name_hand_edited="0"
      darktable:multi_priority="0"
      darktable:blendop_version="13"
      darktable:blendop_params="gz11eJxjYIAACQYYOOHEgAZY0QWAgBEL3YADfAQAFNUEbA=="/>
     <rdf:li
      darktable:num="1"
      darktable:operation="colorbalancergb"
      darktable:enabled="1"
      darktable:modversion="5"
      darktable:params="gz09eJxjYGiwZ2A44MAABhRiQxVpgI=="
      darktable:multi_name="_builtin_basic colorfulness"
      darktable:multi_name_hand_edited="0"
      darktable:multi_priority="0"
      darktable:blendop_version="13"
      darktable:blendop_params="gz11eJxjYIAACQYYOOHEgAZY0QWAgBEL3YADfAQAFNUEbA=="/>
    </rdf:Seq>
   </darktable:history>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
"""


def exiftool_path() -> str:
    """exiftool's path; skips the test when it is missing (fails with PIAA_REQUIRE_EXIFTOOL=1)."""
    exe = shutil.which("exiftool")
    if exe is None:
        hint = "exiftool is not on PATH (apt-get install libimage-exiftool-perl)"
        if os.environ.get("PIAA_REQUIRE_EXIFTOOL") == "1":
            pytest.fail(f"{hint}, and PIAA_REQUIRE_EXIFTOOL=1 requires it")
        pytest.skip(f"{hint}; set PIAA_REQUIRE_EXIFTOOL=1 to fail instead")
    return exe


def exiftool(*args: str | Path) -> str:
    result = subprocess.run(
        [exiftool_path(), *map(str, args)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


# The keyword lists exiftool reads from a sidecar, by exiftool's names: dc:subject,
# lr:hierarchicalSubject, digiKam:TagsList, MicrosoftPhoto:LastKeywordXMP, mediapro:CatalogSets.
KEYWORD_TAGS = ("Subject", "HierarchicalSubject", "TagsList", "LastKeywordXMP", "CatalogSets")


def exiftool_read(sidecar: Path) -> dict[str, Any]:
    """What exiftool reads from a sidecar (`-j -struct -XMP:all`), lists always lists."""
    data = json.loads(exiftool("-j", "-struct", "-XMP:all", sidecar))[0]
    for key in KEYWORD_TAGS:
        if key in data and not isinstance(data[key], list):
            data[key] = [data[key]]
    return data


def write_exiftool_sidecar(sidecar: Path) -> None:
    """A sidecar a photographer made with exiftool: rating 4, a red label, a title, a creator,
    keywords (one of them, "dog", also one of our labels) and a hierarchical keyword."""
    exiftool(
        "-q", "-o", sidecar,
        "-XMP-xmp:Rating=4", "-XMP-xmp:Label=Red", "-XMP-dc:Title=Harbour at dusk",
        "-XMP-dc:Creator=Jane Doe", "-XMP-dc:Subject=dog", "-XMP-dc:Subject=holiday",
        "-XMP-lr:HierarchicalSubject=places|harbour",
    )  # fmt: skip
    assert sidecar.exists()
