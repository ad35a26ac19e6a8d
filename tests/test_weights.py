"""Weights on a machine without network: `piaa models` lists the cache and the shipped model,
offline runs fail at once with one message naming the file and where it goes, cached weights
load with no request, and a library accepts its checkpoint moved (same bytes), not another."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from piaa_index.cli import cli
from piaa_index.library.core import Library, LibraryError
from piaa_index.model import weights
from piaa_index.model.weights import SHIPPED_DIR
from tests.image_files import shapes_image

REPO = "timm/vit_base_patch16_clip_224.openai"
REVISION = "0123456789abcdef0123456789abcdef01234567"
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache for this test; the network settings cleared."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    for var in ("HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    return cache


def put_in_cache(cache: Path, repo: str, filename: str, data: bytes) -> Path:
    """A file laid out as huggingface_hub stores a download (snapshot + refs/main)."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snap = folder / "snapshots" / REVISION / filename
    snap.parent.mkdir(parents=True)
    snap.write_bytes(data)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(REVISION)
    return snap


def piaa(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the CLI as the `piaa` script does (errors mapped to one line and an exit code)."""
    from piaa_index.cli.common import run_guarded

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_guarded(cli, args)
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def photos(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        shapes_image(np.random.default_rng(i), (96, 80)).save(folder / f"p{i}.jpg")
    return folder


# ---- offline: one message, at once --------------------------------------------------------------


@pytest.mark.parametrize("network", ["HF_HUB_OFFLINE=1", f"HF_ENDPOINT={UNREACHABLE}"])
def test_default_model_offline_fails_at_once_naming_the_file(
    network: str, hf_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: 55 s of 46 retry lines and a message cut at 300 characters. Now the check runs
    before open_clip asks the hub: no retries, one message with the file, folder and command."""
    from piaa_index.config import ModelSpec
    from piaa_index.model.encoder import Encoder, ModelLoadError

    var, value = network.split("=", 1)
    monkeypatch.setenv(var, value)
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as err:
        Encoder(ModelSpec(), device="cpu")  # ViT-B-16, openai: the default
    elapsed = time.monotonic() - start
    message = str(err.value)
    print(f"{network}: failed in {elapsed:.2f} s")
    assert "\n" not in message
    assert "open_clip_pytorch_model.bin" in message and REPO in message
    assert "piaa models fetch ViT-B-16 openai" in message
    assert str(hf_cache) in message and "--pretrained PATH" in message
    assert ("HF_HUB_OFFLINE" in message) == (var == "HF_HUB_OFFLINE")


@pytest.mark.parametrize("network", ["HF_HUB_OFFLINE=1", f"HF_ENDPOINT={UNREACHABLE}"])
def test_cli_offline_is_one_line_exit_1(
    network: str,
    hf_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    var, value = network.split("=", 1)
    monkeypatch.setenv(var, value)
    code, _out, err = piaa(["index", str(photos(tmp_path / "p"))], capsys)
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: the ViT-B-16 weights 'openai'")


def test_known_sources_match_open_clip() -> None:
    """The default model's source is known without importing open_clip; it must be the one
    open_clip would download."""
    from piaa_index.model import weights

    for (model, tag), src in weights.KNOWN_SOURCES.items():
        assert weights.source_for(model, tag) == src


@pytest.mark.parametrize("network", ["HF_HUB_OFFLINE=1", f"HF_ENDPOINT={UNREACHABLE}"])
def test_offline_default_model_fails_before_importing_torch(
    network: str, hf_cache: Path, tmp_path: Path
) -> None:
    """A fresh `piaa index` with no network says what to fetch before paying for torch's
    import (seconds): the message is the same one, from a process that never loaded torch."""
    var, value = network.split("=", 1)
    code = (
        "import sys\n"
        "from piaa_index.cli import cli\n"
        "from piaa_index.cli.common import run_guarded\n"
        "try:\n"
        "    run_guarded(cli, ['index', sys.argv[1]])\n"
        "finally:\n"
        "    print('torch' in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(photos(tmp_path / "p"))],
        env={**os.environ, var: value},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.strip() == "False"
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "piaa models fetch ViT-B-16 openai" in proc.stderr and REPO in proc.stderr


@pytest.mark.slow
def test_offline_run_as_a_real_process(hf_cache: Path, tmp_path: Path) -> None:
    """The must-show as a user meets it: `piaa index` with no network, a fresh process."""
    folder = photos(tmp_path / "p")
    for network in ({"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": UNREACHABLE}):
        env = {**os.environ, **network}
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "piaa_index", "index", str(folder)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        print(f"{network}: exit {proc.returncode} in {time.monotonic() - start:.1f} s")
        assert proc.returncode == 1
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "piaa models fetch ViT-B-16 openai" in proc.stderr


# ---- the cache ------------------------------------------------------------------------------------


def test_cached_weights_load_from_their_path_with_the_tags_preprocessing(
    hf_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tag whose file is cached is loaded from the file: no request, even offline."""
    from piaa_index.config import ModelSpec
    from piaa_index.model.encoder import Encoder, resolve_spec

    cached = put_in_cache(hf_cache, REPO, "open_clip_pytorch_model.bin", b"weights")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = Encoder._local(resolve_spec(ModelSpec()))
    assert r.pretrained == str(cached) and r.label == "openai"
    assert r.preprocess["image_mean"] == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert r.quick_gelu


def test_models_lists_the_shipped_model_and_the_cache(hf_cache: Path) -> None:
    cached = put_in_cache(hf_cache, REPO, "open_clip_model.safetensors", b"x" * 1234)
    result = CliRunner().invoke(cli, ["models", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    assert listing["cache"] == str(hf_cache)
    by_key = {(m["model"], m["tag"]): m for m in listing["models"]}
    # ViT-B-16-quickgelu's openai tag is the same file in the same repository.
    assert set(by_key) == {
        ("shapesworld", "default"),
        ("shapesworld-gap", "default"),
        ("ViT-B-16", "openai"),
        ("ViT-B-16-quickgelu", "openai"),
    }
    shipped = by_key["shapesworld", "default"]
    assert shipped["path"] == str(SHIPPED_DIR / "shapesworld.safetensors") and shipped["size"]
    gap = by_key["shapesworld-gap", "default"]
    assert gap["path"] == str(SHIPPED_DIR / "shapesworld-gap.safetensors") and gap["size"]
    assert by_key["ViT-B-16", "openai"] == {
        "model": "ViT-B-16",
        "tag": "openai",
        "cached": True,
        "size": 1234,
        "path": str(cached),
        "source": f"open_clip_model.safetensors or open_clip_pytorch_model.bin from the "
        f"Hugging Face repository {REPO}",
    }
    everything = json.loads(CliRunner().invoke(cli, ["models", "--all", "--json"]).stdout)
    assert len(everything["models"]) > 100  # every (model, tag) open_clip knows
    assert not next(m for m in everything["models"] if m["tag"] == "laion2b_s34b_b88k")["cached"]
    table = CliRunner().invoke(cli, ["models"])
    assert "shapesworld" in table.stdout and str(cached) in table.stdout
    assert f"Hugging Face cache: {hf_cache}" in table.stderr


def test_models_fetch(
    hf_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Offline: one line, exit 1. Already cached: the path, no download. Typos: exit 2."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _out, err = piaa(["models", "fetch", "ViT-B-16", "openai"], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "HF_HUB_OFFLINE is set" in err
    cached = put_in_cache(hf_cache, REPO, "open_clip_pytorch_model.bin", b"w")
    code, out, _err = piaa(["models", "fetch", "ViT-B/16"], capsys)  # tag: the default, openai
    assert code == 0 and out.strip() == str(cached)
    code, _out, err = piaa(["models", "fetch", "ViT-B-61"], capsys)
    assert code == 2 and "did you mean" in err
    code, _out, err = piaa(["models", "fetch", "ViT-B-16", "opneai"], capsys)
    assert code == 2 and "known: openai" in err


def test_sha256_is_computed_once_per_file_version(tmp_path: Path, piaa_home: Path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"a" * 5000)
    first = weights.sha256_file(path)
    cache = json.loads((piaa_home / weights.HASH_CACHE).read_text())
    assert cache[str(path)][2] == first
    cache[str(path)][2] = "remembered"  # what a second call returns shows it did not re-read
    (piaa_home / weights.HASH_CACHE).write_text(json.dumps(cache))
    assert weights.sha256_file(path) == "remembered"
    path.write_bytes(b"b" * 5001)  # another size: hashed again
    assert weights.sha256_file(path) not in (first, "remembered")


# ---- a checkpoint that moves ---------------------------------------------------------------------


def open_lib(home: Path, **kw: str) -> Library:
    return Library.open(home=home, device="cpu", **kw)


def test_moved_weights_are_accepted_and_other_bytes_refused(
    tmp_path: Path, piaa_home: Path
) -> None:
    folder = photos(tmp_path / "photos")
    original = tmp_path / "a" / "mine.safetensors"
    original.parent.mkdir()
    shutil.copy(SHIPPED_DIR / "shapesworld.safetensors", original)
    with open_lib(piaa_home, model="shapesworld", pretrained=str(original)) as lib:
        assert lib.index([folder]).indexed == 3
        record = lib.store.get_setting("model")
    assert record is not None and record["pretrained"] == str(original)
    assert record["weights_sha256"] == weights.sha256_file(original)

    moved = tmp_path / "b" / "renamed.safetensors"
    moved.parent.mkdir()
    original.rename(moved)
    with open_lib(piaa_home) as lib:
        assert lib.status()["images"]["indexed"] == 3  # what needs no model still works
        assert lib.index([folder]).unchanged == 3  # nothing to encode: no model needed
        photos(folder, n=4)  # a new photo needs the model
        with pytest.raises(LibraryError, match="no longer at .*--pretrained NEWPATH"):
            lib.index([folder])

    with open_lib(piaa_home, pretrained=str(moved)) as lib:  # same bytes, new path: accepted
        assert lib.index([folder]).indexed == 1
    with open_lib(piaa_home) as lib:  # and remembered
        assert lib.spec.pretrained == str(moved)
        assert len(lib.similar(folder / "p0.jpg", limit=None)) == 3

    other = tmp_path / "c" / "other.safetensors"
    other.parent.mkdir()
    data = bytearray(moved.read_bytes())
    data[-100] ^= 0xFF  # one weight changed: still a valid checkpoint, other weights
    other.write_bytes(bytes(data))
    with pytest.raises(LibraryError, match="holds other weights .*sha256"):
        open_lib(piaa_home, pretrained=str(other))

    moved.write_bytes(bytes(data))  # the recorded file itself overwritten
    photos(folder, n=5)
    with open_lib(piaa_home) as lib, pytest.raises(LibraryError, match="has changed since"):
        lib.index([folder])


def test_cli_moved_weights(
    tmp_path: Path, piaa_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = photos(tmp_path / "photos", n=2)
    first = tmp_path / "w1.safetensors"
    shutil.copy(SHIPPED_DIR / "shapesworld.safetensors", first)
    args = ["index", str(folder), "-q", "--device", "cpu"]
    assert piaa([*args, "--model", "shapesworld", "--pretrained", str(first)], capsys)[0] == 0
    second = tmp_path / "moved" / "w2.safetensors"
    second.parent.mkdir()
    first.rename(second)
    photos(folder, n=3)  # something to encode
    code, _out, err = piaa(args, capsys)
    assert code == 1 and "no longer at" in err and len(err.strip().splitlines()) == 1
    assert piaa([*args, "--pretrained", str(second)], capsys)[0] == 0
    code, _out, err = piaa([*args, "--pretrained", str(tmp_path / "nope.pt")], capsys)
    assert code == 1 and "checkpoint file not found" in err


def test_an_older_library_is_migrated_and_its_moved_file_accepted(
    tmp_path: Path, piaa_home: Path
) -> None:
    """A library recorded before the hash (identity label with a blake2b prefix only)."""
    from piaa_index.ingest.images import file_hash

    folder = photos(tmp_path / "photos", n=2)
    original = tmp_path / "w.safetensors"
    shutil.copy(SHIPPED_DIR / "shapesworld.safetensors", original)
    with open_lib(piaa_home, model="shapesworld", pretrained=str(original)) as lib:
        lib.index([folder])
        record = lib.store.get_setting("model")
        assert record is not None
        old = {k: v for k, v in record.items() if k != "weights_sha256"}
        size, short = original.stat().st_size, file_hash(original)[:12]
        old["identity"]["pretrained"] = f"w.safetensors (size {size}, blake2b {short})"
        lib.store.set_setting("model", old)

    moved = tmp_path / "elsewhere.safetensors"
    original.rename(moved)
    with open_lib(piaa_home, pretrained=str(moved)) as lib:
        record = lib.store.get_setting("model")
        assert record is not None
        assert record["pretrained"] == str(moved)
        assert record["weights_sha256"] == weights.sha256_file(moved)
        assert lib.index([folder]).unchanged == 2
