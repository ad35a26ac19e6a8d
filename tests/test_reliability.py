"""Hostile input in one folder: Pillow's own test images (odd, corrupt and fuzzed files) as they
ship in Pillow's source distribution, plus a non-UTF-8 name, a FIFO, a link to /dev/zero and two
13,000 x 13,000 16-bit PNGs. `piaa index` must finish in bounded time with exit 0, name every
file it could not read with a reason, index every file Pillow itself can read, and stay under
2 GB of peak RSS.

The corpus is fetched once from PyPI (`pip download` of the installed Pillow's sdist) into
~/.cache/piaa-index-tests; offline the test is skipped, unless PIAA_REQUIRE_CORPUS=1.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zlib
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.reliability]

CACHE = Path(os.environ.get("PIAA_TEST_CACHE", Path.home() / ".cache" / "piaa-index-tests"))
PEAK_RSS_LIMIT = 2 << 30
WALL_LIMIT_S = 600


def pillow_test_images() -> Path:
    """Pillow's Tests/images for the installed version, downloaded and extracted once."""
    import PIL

    version = PIL.__version__
    target = CACHE / f"pillow-{version}-images"
    if (target / ".complete").exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
                + ["--quiet", f"pillow=={version}", "-d", tmp],
                check=True,
                capture_output=True,
                timeout=300,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            reason = f"cannot download Pillow {version}'s sdist from PyPI: {detail[-300:]!r}"
            if os.environ.get("PIAA_REQUIRE_CORPUS") == "1":
                pytest.fail(reason)
            pytest.skip(reason)
        (sdist,) = Path(tmp).glob("*.tar.gz")
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with tarfile.open(sdist) as tar:
            for member in tar.getmembers():
                parts = member.name.split("/")
                if parts[1:3] != ["Tests", "images"] or not (member.isfile() or member.isdir()):
                    continue
                member.name = "/".join(parts[3:]) or "."
                tar.extract(member, partial, **_data_filter())
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        (target / ".complete").touch()
    return target


def _data_filter() -> dict[str, str]:
    return {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


def write_png16(path: Path, size: int, seed: int) -> None:
    """A size x size 16-bit greyscale PNG written row by row (no full-size array): a ramp in
    the first row, then rows that repeat it (PNG's Up filter, all zeros), ~0.4 MB on disk."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    first = b"".join(struct.pack(">H", (x * 5 + seed) & 0xFFFF) for x in range(size))
    same_again = b"\x02" + bytes(2 * size)
    comp = zlib.compressobj(6)
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n")
        fh.write(chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 16, 0, 0, 0, 0)))
        out = comp.compress(b"\x00" + first)
        for _ in range(size - 1):
            out += comp.compress(same_again)
            if len(out) > 1 << 16:
                fh.write(chunk(b"IDAT", out))
                out = b""
        fh.write(chunk(b"IDAT", out + comp.flush()))
        fh.write(chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    corpus = pillow_test_images()
    folder = tmp_path_factory.mktemp("hostile") / "photos"
    shutil.copytree(corpus, folder, ignore=shutil.ignore_patterns(".complete"))
    # A Latin-1 name (bytes that are not UTF-8), with its own content (a duplicate would be
    # reused, not decoded).
    latin1 = os.path.join(os.fsencode(folder), b"caf\xe9 \xe0 Z\xfcrich.jpg")
    with open(latin1, "wb") as fh:
        fh.write((corpus / "hopper.jpg").read_bytes() + b"trailing bytes")
    os.mkfifo(folder / "fifo.jpg")
    os.symlink("/dev/zero", folder / "zero.jpg")
    write_png16(folder / "huge-1.png", 13_000, seed=0)
    write_png16(folder / "huge-2.png", 13_000, seed=7)
    return folder


def readable_by_pillow(paths: list[str]) -> set[str]:
    """The files Pillow itself opens and fully decodes within our pixel limit."""
    from PIL import Image

    from piaa_index.ingest.images import DEFAULT_MAX_PIXELS, _register_heif

    _register_heif()
    good = set()
    for path in paths:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with Image.open(path) as im:
                    if im.size[0] * im.size[1] > DEFAULT_MAX_PIXELS:
                        continue
                    im.load()
        except Exception:  # what Pillow cannot read is the expected failure list
            continue
        good.add(path)
    return good


def peak_rss(time_output: str) -> int:
    """Bytes, from `/usr/bin/time -v`, else the largest child this process has waited for."""
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_output)
    if found:
        return int(found.group(1)) * 1024
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def test_hostile_folder_indexes_cleanly(hostile_folder: Path, tmp_path: Path) -> None:
    from piaa_index.ingest.scan import scan

    env = {k: v for k, v in os.environ.items() if not k.startswith("PIAA_")}
    env.update(PIAA_HOME=str(tmp_path / "home"), PIAA_DEVICE="cpu", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "piaa_index", "--model", "shapesworld"]
    command += ["index", str(hostile_folder), "--json"]
    timer = ["/usr/bin/time", "-v"] if os.access("/usr/bin/time", os.X_OK) else []
    result = subprocess.run(
        timer + command, env=env, capture_output=True, text=True, timeout=WALL_LIMIT_S
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    rss = peak_rss(result.stderr)
    print(f"peak RSS of `piaa index` on the hostile folder: {rss / 2**30:.2f} GiB")
    assert rss < PEAK_RSS_LIMIT

    report = json.loads(result.stdout)
    special = {os.path.basename(p) for p in report["skipped"]["special_files"]}
    assert special == {"fifo.jpg", "zero.jpg"}

    candidates = [f.path for f in scan([hostile_folder]).files]
    assert len(candidates) > 700
    failed = {f["path"]: f["error"] for f in report["failed"]}
    assert all(error.strip() for error in failed.values())
    readable = readable_by_pillow(candidates)
    # Every file Pillow can read is indexed; every other one is listed with its reason.
    assert set(failed) == set(candidates) - readable
    assert report["indexed"] + report["reused"] == len(readable)
    names = {os.path.basename(p) for p in readable}
    assert {"huge-1.png", "huge-2.png", os.fsdecode(b"caf\xe9 \xe0 Z\xfcrich.jpg")} <= names
    assert all(stat.S_ISREG(os.stat(p).st_mode) for p in readable)
