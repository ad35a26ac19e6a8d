"""The numpy CLIP text tower (piaa_index/model/text_tower.py) against open_clip: the same token ids,
the same phrase prototypes within 1e-5 (float32), its cache in the library home, and text search
from the CLI without torch once the cache is there."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from open_clip.tokenizer import SimpleTokenizer

from piaa_index.cli import cli
from piaa_index.config import ModelSpec
from piaa_index.library.core import Library
from piaa_index.model import text_tower as tt
from piaa_index.model.encoder import DEFAULT_TEMPLATES, SHAPESWORLD_DIR, SHIPPED_MODELS, Encoder
from piaa_index.shapes.dataset import generate_dataset
from tests.conftest_models import TINY_MODEL_CONFIG, write_model_config

ATOL = 1e-5
PHRASES = [
    "a red car next to a house",
    "dog",
    "Caf\u00e9 &amp; cr\u00e8me br\u00fbl\u00e9e \U0001f600",
    "circle AND {square}",
    "x " * 90,  # beyond the context: cut, end-of-text kept last
    "\u65e5\u672c\u8a9e",
]


def _strings() -> list[str]:
    """Over 200 varied texts: words, case, punctuation, contractions, digits, accents, CJK,
    emoji (with joiners and flags), HTML entities, control characters, mojibake, long texts."""
    fixed = [
        "",
        " ",
        "\t\n",
        ".",
        "a",
        "A photo of a DOG.",
        "don't won't it's we've they'll I'd I'm",
        "DON'T IT'S",
        "&amp;",
        "&amp;amp;",
        "&lt;b&gt;bold&lt;/b&gt;",
        "Tom &amp; Jerry &quot;quoted&quot; &#39;single&#39; &#x263A;",
        "<start_of_text>",
        "<END_OF_TEXT> text",
        "na\u00efve fa\u00e7ade r\u00e9sum\u00e9 \u00fcber Stra\u00dfe",
        "\u00c0\u00c9\u00ce\u00d5\u00dc",
        "e\u0301 combining accent",
        "\ufb01 ligature \ufb02",
        "\uff46\uff55\uff4c\uff4c\uff57\uff49\uff44\uff54\uff48",
        "\u201ccurly quotes\u201d \u2018single\u2019",
        "\u00e2\u0080\u0099 mojibake \u00c3\u00a9t\u00c3\u00a9",
        "caf\u00c3\u00a9",
        "\x1b[31mred\x1b[0m",
        "line\r\nbreak\u2028sep",
        "tab\tsep\x00nul\x07bell",
        "\U0001f600\U0001f44d\U0001f3fd \U0001f468\u200d\U0001f469\u200d\U0001f467 \U0001f1eb\U0001f1f7",
        "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \ud55c\uad6d\uc5b4 \u4e2d\u6587",
        "\u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u05e2\u05d1\u05e8\u05d9\u05ea \u0440\u0443\u0441\u0441\u043a\u0438\u0439",
        "\u0939\u093f\u0928\u094d\u0926\u0940 \u0e44\u0e17\u0e22",
        "12345 3.14159 1,000,000 \u0663\u0664 \u00bd \u2460",
        "$100 @user #tag http://example.com/a?b=c&d=e",
        "!!!??? ... --- *** ((())) [[]] {{}}",
        "a{}b",
        "x " * 100,
        "supercalifragilisticexpialidocious " * 12,
        "\u00a0non\u00a0breaking\u00a0spaces\u2003em",
        "\u200bzero\u200bwidth",
        "MiXeD CaSe WoRdS",
        "   leading and trailing   ",
        "\U0001d400\U0001d401 math bold",
    ]
    words = (
        "a photo of the small large red green blue car house dog cat tree sky beach "
        "bicycle person Person's it's \u00e9t\u00e9 na\u00efve \u00fcber \u65e5\u672c "
        "\U0001f600 \U0001f697 &amp; &lt; &gt; &quot; ... ! ? , ; : - _ ' \" 42 7 2026 "
        "x-ray e-mail C++ O'Neil rock'n'roll \u00ad \u2014 \u2013 \u00b7 \u00b0C \u20ac5"
    ).split()
    rng = np.random.default_rng(23)
    out = list(fixed)
    while len(out) < 230:
        n = int(rng.integers(1, 40 if len(out) % 10 else 120))
        picked = [words[int(i)] for i in rng.integers(0, len(words), n)]
        seps = [" ", "", "  ", "\n"]
        out.append("".join(w + seps[int(rng.integers(0, 4))] for w in picked))
    return out


def test_constants_follow_the_encoder() -> None:
    """The constants text_tower keeps (encoder.py imports torch) equal the originals, and the
    templates are config's one list."""
    assert tuple(tt.TEMPLATES) == tuple(DEFAULT_TEMPLATES)
    assert tt.SHIPPED_WEIGHTS == SHIPPED_MODELS
    assert tt.SHIPPED_DIR == SHAPESWORLD_DIR


def test_erf_matches_math_erf() -> None:
    xs = np.linspace(-9, 9, 20001)
    ref = np.array([math.erf(v) for v in xs])
    assert np.abs(tt.erf(xs.astype(np.float32)) - ref).max() < 5e-7
    assert np.abs(tt.erf(xs) - ref).max() < 1e-7


@pytest.mark.parametrize("context_length", [77, 32])
def test_tokenizer_gives_open_clips_ids(context_length: int) -> None:
    texts = _strings()
    assert len(texts) >= 200
    mine = tt.tokenizer(context_length)(texts)
    ref = SimpleTokenizer(context_length=context_length)(texts).numpy()
    bad = [t for t, a, b in zip(texts, mine, ref, strict=True) if not np.array_equal(a, b)]
    assert not bad, bad[:5]
    assert mine.dtype == np.int64 and mine.shape == (len(texts), context_length)


def test_tokenizer_is_found_without_importing_open_clip() -> None:
    code = (
        "import sys; from piaa_index.model import text_tower as tt; "
        "ids = tt.tokenizer()(['a photo of a dog.']); "
        "print(ids[0, :7].tolist(), 'torch' in sys.modules, 'open_clip' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("]")[1].split() == ["False", "False"]
    assert out.stdout.startswith("[49406, 320, 1125, 539, 320, 1929, 269]")


def _encoder(model: str, pretrained: str = "none") -> Encoder:
    return Encoder(ModelSpec(model, pretrained), device="cpu", precision="fp32")


def _check(encoder: Encoder) -> float:
    tower = tt.extract(encoder)
    ref = encoder.text_prototypes(PHRASES, list(DEFAULT_TEMPLATES))
    got = tower.text_prototypes(PHRASES, tt.TEMPLATES)
    assert got.dtype == np.float32 and got.shape == ref.shape
    diff = float(np.abs(got - ref).max())
    assert diff < ATOL, diff
    emb = encoder.encode_texts(PHRASES)
    assert float(np.abs(tower.encode_texts(PHRASES) - emb).max()) < ATOL
    return diff


@pytest.mark.parametrize("model", sorted(SHIPPED_MODELS))
def test_shipped_models_match_torch(model: str) -> None:
    if not (SHAPESWORLD_DIR / SHIPPED_MODELS[model]).is_file():
        pytest.skip("the shipped checkpoint is not in this checkout")
    _check(_encoder(model, "default"))


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_random_tiny_towers_match_torch(tmp_path: Path, quick_gelu: bool) -> None:
    """A wider tiny text tower (3 layers, 4 heads) with GELU and with QuickGELU."""
    cfg = json.loads(json.dumps(TINY_MODEL_CONFIG))
    cfg["text_cfg"].update(width=64, heads=4, layers=3)
    if quick_gelu:
        cfg["quick_gelu"] = True
    name = f"piaa-tt-tiny-{'quick' if quick_gelu else 'gelu'}"
    path = write_model_config(tmp_path, name, cfg)
    encoder = _encoder(str(path))
    assert tt.extract(encoder).quick_gelu is quick_gelu
    _check(encoder)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["ViT-B-16", "ViT-B-16-quickgelu"])
def test_vit_b16_random_tower_matches_torch(model: str) -> None:
    """ViT-B/16's text tower (12 layers, width 512, 77 tokens), random weights."""
    encoder = _encoder(model)
    assert tt.extract(encoder).quick_gelu is model.endswith("quickgelu")
    _check(encoder)


@pytest.mark.parametrize(
    "change",
    [
        {"ls_init_value": 0.1},  # layer scale
        {"pool_type": "last"},
        {"proj_bias": True},
        {"no_causal_mask": True},
        {"embed_cls": True},
        {"tokenizer_kwargs": {"clean": "canonicalize"}},
    ],
)
def test_other_text_configurations_are_unsupported(tmp_path: Path, change: dict) -> None:
    cfg = json.loads(json.dumps(TINY_MODEL_CONFIG))
    cfg["text_cfg"].update(change)
    key = next(iter(change))
    path = write_model_config(tmp_path, f"piaa-tt-{key.replace('_', '-')}", cfg)
    encoder = _encoder(str(path))
    with pytest.raises(tt.Unsupported):
        tt.extract(encoder)
    assert tt.save_text_tower(encoder, tmp_path / "t.safetensors") is None
    assert not (tmp_path / "t.safetensors").exists()


def test_half_precision_and_foreign_encoders_are_unsupported(tmp_path: Path) -> None:
    path = write_model_config(tmp_path, "piaa-tt-half", TINY_MODEL_CONFIG)
    encoder = _encoder(str(path))
    encoder.model.to(torch.float16)
    with pytest.raises(tt.Unsupported):
        tt.extract(encoder)
    with pytest.raises(tt.Unsupported):
        tt.extract(object())  # type: ignore[arg-type]


def test_cache_round_trip_and_damage(tmp_path: Path) -> None:
    path = write_model_config(tmp_path, "piaa-tt-cache", TINY_MODEL_CONFIG)
    encoder = _encoder(str(path))
    file = tmp_path / "home" / "cache" / "text-tower" / "k.safetensors"
    tower = tt.save_text_tower(encoder, file)
    assert tower is not None and file.is_file()
    loaded = tt.load_text_tower(file)
    assert loaded is not None
    np.testing.assert_array_equal(loaded.text_prototypes(PHRASES), tower.text_prototypes(PHRASES))
    # One flipped byte: the digest says so and the file is not used.
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))
    os.utime(file, ns=(1, 1))  # another file version, whatever the clock's resolution
    assert tt.load_text_tower(file) is None
    (file.with_name(file.name + ".sum")).unlink()
    assert tt.load_text_tower(file) is None
    assert tt.load_text_tower(tmp_path / "missing.safetensors") is None


def test_a_cache_written_with_a_blake2b_digest_still_loads(tmp_path: Path) -> None:
    """Caches from before the crc32 keep working (and are still checked)."""
    from piaa_index.durable import file_digest

    path = write_model_config(tmp_path, "piaa-tt-old", TINY_MODEL_CONFIG)
    file = tmp_path / "k.safetensors"
    assert tt.save_text_tower(_encoder(str(path)), file) is not None
    summed = file.with_name(file.name + ".sum")
    assert summed.read_text().startswith("crc32:")
    summed.write_text(file_digest(file))
    os.utime(file, ns=(3, 3))
    assert tt.load_text_tower(file) is not None
    summed.write_text("0" * 32)
    os.utime(file, ns=(4, 4))
    assert tt.load_text_tower(file) is None


def test_the_tokenizer_tables_are_cached_and_checked(tmp_path: Path) -> None:
    """The parsed BPE merges are kept beside the tower: the same ids from the cache, and a
    damaged cache is parsed again and rewritten, never used."""
    vocab = tt.vocab_path()
    assert vocab is not None
    cache = tmp_path / "cache"
    parsed = tt.Tokenizer(vocab)
    first = tt.Tokenizer(vocab, cache_dir=cache)  # parses and writes
    (table,) = cache.glob("bpe-*.marshal")
    cached = tt.Tokenizer(vocab, cache_dir=cache)  # loads
    strings = _strings()
    np.testing.assert_array_equal(cached(strings), parsed(strings))
    np.testing.assert_array_equal(first(strings), parsed(strings))
    data = bytearray(table.read_bytes())
    data[len(data) // 2] ^= 0x01
    table.write_bytes(bytes(data))
    assert tt._load_tables(vocab, cache) is None
    again = tt.Tokenizer(vocab, cache_dir=cache)
    np.testing.assert_array_equal(again(strings), parsed(strings))
    assert tt._load_tables(vocab, cache) is not None  # rewritten


def test_cache_key_names_the_model_and_its_weights(tmp_path: Path) -> None:
    home = tmp_path / "home"
    a = tt.cache_path(home, ModelSpec("shapesworld", "default"), None)
    b = tt.cache_path(home, ModelSpec("shapesworld-gap", "default"), None)
    c = tt.cache_path(home, ModelSpec("ViT-B-16", "none"), None)
    d = tt.cache_path(home, ModelSpec("ViT-B-16", "openai"), None)
    assert None not in (a, b, c, d) and len({a, b, c, d}) == 4
    assert a == tt.cache_path(home, ModelSpec("shapesworld", "default"), None)
    assert a is not None and a.parent == home / "cache" / "text-tower"
    assert tt.cache_path(home, ModelSpec("hf-hub:org/model", "default"), None) is None
    assert tt.cache_path(home, ModelSpec("ViT-B-16", str(tmp_path / "gone.pt")), None) is None
    ckpt = tmp_path / "w.safetensors"
    ckpt.write_bytes(b"one")
    first = tt.cache_path(home, ModelSpec("ViT-B-16", str(ckpt)), None)
    ckpt.write_bytes(b"other bytes")
    assert tt.cache_path(home, ModelSpec("ViT-B-16", str(ckpt)), None) not in (None, first)
    # A library whose record names other bytes: no key, loading the model reports it.
    record = {"weights_sha256": "0" * 64}
    assert tt.cache_path(home, ModelSpec("ViT-B-16", str(ckpt)), record) is None


@pytest.fixture(scope="module")
def small_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (SHAPESWORLD_DIR / "shapesworld.safetensors").is_file():
        pytest.skip("the shipped shapesworld checkpoint is not in this checkout")
    root = tmp_path_factory.mktemp("tt-lib")
    generate_dataset(root / "scenes", 8, seed=3, size=96, progress=False)
    home = root / "home"
    args = ["index", str(root / "scenes" / "images"), "--model", "shapesworld", "-q"]
    result = CliRunner().invoke(cli, [*args, "--home", str(home)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return home


def _cache_files(home: Path) -> list[Path]:
    return sorted((home / "cache" / "text-tower").glob("*.safetensors"))


def test_text_search_caches_the_tower_and_answers_without_torch(small_library: Path) -> None:
    home = small_library
    for f in (home / "cache" / "text-tower").glob("*"):
        f.unlink()
    with Library.open(home=home) as lib:
        first = lib.text_search("a red car next to a house", limit=5)
        assert lib._encoder is not None  # no cache yet: the model was loaded ...
        phrase = lib.encoder.text_prototypes(["a red car next to a house"], DEFAULT_TEMPLATES)
    (cached,) = _cache_files(home)  # ... and its text tower written for the next query
    tower = tt.load_text_tower(cached)
    assert tower is not None
    assert np.abs(tower.text_prototypes(["a red car next to a house"]) - phrase).max() < ATOL
    assert len(first) == 5

    # A fresh CLI process: the same results, and torch never imported.
    code = (
        "import sys\nfrom piaa_index.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('TORCH', 'torch' in sys.modules, file=sys.stderr)\n"
    )
    argv = ["--home", str(home), "search", "--text", "a red car next to a house"]
    out = subprocess.run(
        [sys.executable, "-c", code, *argv, "--limit", "5", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout) == first
    assert "TORCH False" in out.stderr, out.stderr


def test_a_damaged_cache_is_rebuilt_not_used(small_library: Path) -> None:
    with Library.open(home=small_library) as lib:
        expected = lib.text_search("blue circle", limit=4)
    (cached,) = _cache_files(small_library)
    data = bytearray(cached.read_bytes())
    data[-100] ^= 0x55  # inside the last array (the end of an MLP or projection weight)
    cached.write_bytes(bytes(data))
    os.utime(cached, ns=(2, 2))
    with Library.open(home=small_library) as lib:
        assert lib.text_search("blue circle", limit=4) == expected
        assert lib._encoder is not None  # the damaged file was not used: the model loaded
    assert tt.load_text_tower(cached) is not None  # and rewrote it
