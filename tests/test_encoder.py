"""The open_clip encoder: loading paths, one-pass == two-pass, front-ends, text prototypes."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import piaa_index.model.encoder as encoder_mod
from piaa_index.model.encoder import (
    DEFAULT_TEMPLATES,
    Encoder,
    ModelLoadError,
    ModelSpec,
    _sclip_block,
    resolve_spec,
)
from tests.conftest_models import TINY_MODEL_CONFIG, write_model_config
from tools.reference_encoder import encode_two_pass

ATOL = 1e-5


def _build(cfg: Path | str, front_end: str = "sclip", seed: int = 0, **kw: str) -> Encoder:
    torch.manual_seed(seed)
    return Encoder(ModelSpec(model=str(cfg), pretrained="none", front_end=front_end), **kw)


def _images(n: int = 3, size: int = 80) -> list[Image.Image]:
    rng = np.random.default_rng(1)
    return [
        Image.fromarray(rng.integers(0, 255, (size, size + 10 * i, 3), np.uint8)) for i in range(n)
    ]


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    torch.manual_seed(7)
    return torch.randn(3, 3, 64, 64)


@pytest.fixture(scope="module")
def enc_sclip(tiny_model_config: Path) -> Encoder:
    return _build(tiny_model_config, "sclip")


@pytest.fixture(scope="module")
def enc_clip(tiny_model_config: Path) -> Encoder:
    return _build(tiny_model_config, "clip")


@pytest.fixture(params=["clip", "sclip"])
def enc(request: pytest.FixtureRequest, enc_clip: Encoder, enc_sclip: Encoder) -> Encoder:
    return enc_clip if request.param == "clip" else enc_sclip


# ---- shapes and identity ------------------------------------------------------------------------


def test_shapes_dtype_and_normalisation(enc: Encoder) -> None:
    assert (enc.dim, enc.grid, enc.n_patches, enc.image_size) == (32, (4, 4), 16, (64, 64))
    assert enc.device.type == "cpu" and enc.precision == "fp32"  # "auto" on a CPU machine

    x = torch.stack([enc.preprocess(img) for img in _images()])
    assert x.shape == (3, 3, 64, 64)
    cls, patches = enc.encode_images(x)

    assert cls.shape == (3, 32) and patches.shape == (3, 16, 32)
    assert cls.dtype == np.float32 and patches.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(cls, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(patches, axis=-1), 1.0, atol=1e-5)


def test_identity(enc_sclip: Encoder) -> None:
    ident = enc_sclip.identity()
    assert ident == {
        "model": "piaa-tiny-vit",
        "pretrained": "none",
        "front_end": "sclip",
        "dim": 32,
        "grid": [4, 4],
    }
    assert json.loads(json.dumps(ident)) == ident


def test_rejects_bad_batch(enc_clip: Encoder) -> None:
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        enc_clip.encode_images(torch.zeros(3, 64, 64))


# ---- one pass, two outputs ------------------------------------------------------------------------


def test_one_pass_equals_two_passes(enc: Encoder, batch: torch.Tensor) -> None:
    cls1, patches1 = enc.encode_images(batch)
    cls2, patches2 = encode_two_pass(enc, batch)
    np.testing.assert_allclose(cls1, cls2, atol=ATOL)
    np.testing.assert_allclose(patches1, patches2, atol=ATOL)


def test_cls_is_open_clip_encode_image(enc: Encoder, batch: torch.Tensor) -> None:
    with torch.no_grad():
        ref = F.normalize(enc.model.encode_image(batch), dim=-1).numpy()
    np.testing.assert_allclose(enc.encode_images(batch)[0], ref, atol=ATOL)


def test_clip_patches_are_open_clip_output_tokens(enc_clip: Encoder, batch: torch.Tensor) -> None:
    visual = enc_clip.visual
    visual.output_tokens = True  # open_clip's own token output: ln_post(x)[:, 1:], unprojected
    try:
        with torch.no_grad():
            _, tokens = visual(batch)
            ref = F.normalize(tokens @ visual.proj, dim=-1).numpy()
    finally:
        visual.output_tokens = False
    np.testing.assert_allclose(enc_clip.encode_images(batch)[1], ref, atol=ATOL)


def test_front_ends_share_cls_but_not_patches(
    enc_clip: Encoder, enc_sclip: Encoder, batch: torch.Tensor
) -> None:
    cls_c, patches_c = enc_clip.encode_images(batch)
    cls_s, patches_s = enc_sclip.encode_images(batch)
    np.testing.assert_allclose(cls_c, cls_s, atol=ATOL)  # same seed, same weights
    assert np.abs(patches_c - patches_s).max() > 1e-2


def test_sclip_block_matches_the_sclip_formula(enc_sclip: Encoder) -> None:
    block = enc_sclip.visual.transformer.resblocks[-1]
    torch.manual_seed(3)
    x = torch.randn(2, 17, 64)
    with torch.no_grad():
        got = _sclip_block(block, x)

        # SCLIP's custom_attn, written out per head with explicit softmaxes.
        attn, heads = block.attn, block.attn.num_heads
        hd = 64 // heads
        q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1)
        outs = []
        for h in range(heads):
            sl = slice(h * hd, (h + 1) * hd)
            qh, kh, vh = q[..., sl], k[..., sl], v[..., sl]
            w = torch.softmax(qh @ qh.transpose(1, 2) / hd**0.5, -1) + torch.softmax(
                kh @ kh.transpose(1, 2) / hd**0.5, -1
            )
            outs.append(w @ vh)
        y = x + attn.out_proj(torch.cat(outs, -1))
        want = y + block.mlp(block.ln_2(y))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_layout_not_batch_first(tiny_model_config: Path, batch: torch.Tensor) -> None:
    enc = _build(tiny_model_config, "sclip")
    # Older open_clip ran the tower sequence-first (LND); flip this one to that layout.
    enc.visual.transformer.batch_first = False
    for blk in enc.visual.transformer.resblocks:
        blk.attn.batch_first = False
    enc._batch_first = False
    with torch.no_grad():
        ref = F.normalize(enc.model.encode_image(batch), dim=-1).numpy()
    cls1, patches1 = enc.encode_images(batch)
    cls2, patches2 = encode_two_pass(enc, batch)
    np.testing.assert_allclose(cls1, ref, atol=ATOL)
    np.testing.assert_allclose(patches1, patches2, atol=ATOL)
    base_cls, base_patches = _build(tiny_model_config, "sclip").encode_images(batch)
    np.testing.assert_allclose(cls1, base_cls, atol=ATOL)
    np.testing.assert_allclose(patches1, base_patches, atol=ATOL)


@pytest.mark.parametrize(
    "name,extra",
    [("piaa-tiny-avg", {"pool_type": "avg"}), ("piaa-tiny-lnpool", {"final_ln_after_pool": True})],
)
def test_pooling_variants_match_encode_image(
    tmp_path: Path, batch: torch.Tensor, name: str, extra: dict[str, object]
) -> None:
    cfg = copy.deepcopy(TINY_MODEL_CONFIG)
    cfg["vision_cfg"].update(extra)
    enc = _build(write_model_config(tmp_path, name, cfg), "sclip")
    with torch.no_grad():
        ref = F.normalize(enc.model.encode_image(batch), dim=-1).numpy()
    cls, patches = enc.encode_images(batch)
    np.testing.assert_allclose(cls, ref, atol=ATOL)
    np.testing.assert_allclose(patches, encode_two_pass(enc, batch)[1], atol=ATOL)


def test_bf16_runs_and_stays_close(tiny_model_config: Path, batch: torch.Tensor) -> None:
    ref_cls, ref_patches = _build(tiny_model_config).encode_images(batch)
    low = _build(tiny_model_config, precision="bf16")
    cls, patches = low.encode_images(batch)
    assert cls.dtype == np.float32 and patches.dtype == np.float32
    assert np.abs(cls - ref_cls).max() < 0.1
    assert np.abs(patches - ref_patches).max() < 0.1


# ---- loading ------------------------------------------------------------------------------------


def test_checkpoint_round_trip(
    tiny_model_config: Path, tmp_path: Path, batch: torch.Tensor
) -> None:
    src = _build(tiny_model_config, seed=0)
    ckpt = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(ckpt))

    torch.manual_seed(99)  # a different random init, overwritten by the checkpoint
    loaded = Encoder(ModelSpec(model=str(tiny_model_config), pretrained=str(ckpt)))

    for a, b in zip(src.encode_images(batch), loaded.encode_images(batch), strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL)
    label = loaded.identity()["pretrained"]
    assert label.startswith("tiny.safetensors (size ") and "sha256" in label


def test_checkpoint_for_another_architecture(tiny_model_config: Path, tmp_path: Path) -> None:
    src = _build(tiny_model_config)
    ckpt = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(ckpt))
    cfg = copy.deepcopy(TINY_MODEL_CONFIG)
    cfg["vision_cfg"]["layers"] = 3
    other = write_model_config(tmp_path, "piaa-tiny-3layers", cfg)
    with pytest.raises(ModelLoadError, match="does not load into piaa-tiny-3layers"):
        Encoder(ModelSpec(model=str(other), pretrained=str(ckpt)))


def test_missing_checkpoint(tiny_model_config: Path, tmp_path: Path) -> None:
    spec = ModelSpec(model=str(tiny_model_config), pretrained=str(tmp_path / "nope.pt"))
    with pytest.raises(ModelLoadError, match="checkpoint file not found"):
        resolve_spec(spec)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="model config file not found"):
        resolve_spec(ModelSpec(model=str(tmp_path / "absent.json"), pretrained="none"))


def test_json_that_is_not_a_model_config(tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    path.write_text('{"theme": "dark"}')
    with pytest.raises(ModelLoadError, match="not an open_clip model config"):
        resolve_spec(ModelSpec(model=str(path), pretrained="none"))


def test_config_may_not_shadow_a_builtin(tmp_path: Path) -> None:
    path = write_model_config(tmp_path, "ViT-B-16", TINY_MODEL_CONFIG)
    with pytest.raises(ModelLoadError, match="built-in open_clip model"):
        resolve_spec(ModelSpec(model=str(path), pretrained="none"))


def test_unknown_model_name_suggests_close_names() -> None:
    with pytest.raises(ModelLoadError, match="unknown model 'ViT-B-61'.*ViT-B-16"):
        resolve_spec(ModelSpec(model="ViT-B-61"))


def test_bad_front_end() -> None:
    with pytest.raises(ValueError, match="unknown front-end 'maskclip'.*clip, sclip"):
        ModelSpec(front_end="maskclip")


def test_default_weights_resolution() -> None:
    r = resolve_spec(ModelSpec(model="ViT-B/16"))
    assert (r.name, r.pretrained, r.label) == ("ViT-B-16", "openai", "openai")
    assert r.quick_gelu  # OpenAI weights were trained with QuickGELU; open_clip only warns
    siglip = resolve_spec(ModelSpec(model="ViT-B-16-SigLIP"))
    assert siglip.pretrained == siglip.label and not siglip.quick_gelu
    assert resolve_spec(ModelSpec(pretrained="none")).pretrained is None


def test_unknown_tag_lists_known_tags() -> None:
    with pytest.raises(ModelLoadError, match="unknown weights 'opneai'.*openai"):
        resolve_spec(ModelSpec(model="ViT-B-16", pretrained="opneai"))


def test_config_file_has_no_default_weights(tiny_model_config: Path) -> None:
    with pytest.raises(ModelLoadError, match="no default weights.*--pretrained PATH"):
        resolve_spec(ModelSpec(model=str(tiny_model_config)))


def test_download_failure_message(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub answers but the download fails: one message naming the file and the fix."""

    def failing(*_a: object, **_k: object) -> None:
        raise RuntimeError("Failed to download weights for tag 'openai': disk full")

    monkeypatch.setenv("HF_HUB_CACHE", str(Path(os.environ["PIAA_HOME"]) / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(encoder_mod.weights, "endpoint_answers", lambda *_a, **_k: True)
    monkeypatch.setattr(encoder_mod.open_clip, "create_model_and_transforms", failing)
    with pytest.raises(
        ModelLoadError, match="download failed: Failed.*disk full.*--pretrained PATH"
    ):
        Encoder(ModelSpec(model="ViT-B-16", pretrained="openai"))


def test_shapesworld_loads_shipped_checkpoint(
    tiny_model_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch: torch.Tensor
) -> None:
    shipped = tmp_path / "shapesworld"
    write_model_config(shipped, "shapesworld", TINY_MODEL_CONFIG)
    src = _build(tiny_model_config)
    save_file(
        {k: v.contiguous() for k, v in src.model.state_dict().items()},
        str(shipped / "shapesworld.safetensors"),
    )
    monkeypatch.setattr(encoder_mod, "SHAPESWORLD_DIR", shipped)

    enc = Encoder(ModelSpec(model="shapesworld"))

    assert enc.identity()["model"] == "shapesworld"
    assert enc.identity()["pretrained"].startswith("shapesworld.safetensors")
    np.testing.assert_allclose(enc.encode_images(batch)[1], src.encode_images(batch)[1], atol=ATOL)


def test_both_shipped_models_load_through_open_clip(batch: torch.Tensor) -> None:
    """`shapesworld` and `shapesworld-gap` share one architecture and load the real shipped
    checkpoints through the same open_clip path; they are different trainings."""
    plain = Encoder(ModelSpec(model="shapesworld"))
    gap = Encoder(ModelSpec(model="shapesworld-gap"))
    assert gap.identity()["model"] == "shapesworld-gap"
    assert gap.identity()["pretrained"].startswith("shapesworld-gap.safetensors")
    assert plain.identity()["model"] == "shapesworld"
    assert {k: v for k, v in gap.identity().items() if k not in ("model", "pretrained")} == {
        k: v for k, v in plain.identity().items() if k not in ("model", "pretrained")
    }
    small = torch.nn.functional.interpolate(batch, size=(96, 96))
    cls_plain, patches_plain = plain.encode_images(small)
    cls_gap, patches_gap = gap.encode_images(small)
    assert patches_gap.shape == patches_plain.shape and cls_gap.shape == cls_plain.shape
    assert not np.allclose(patches_gap, patches_plain, atol=1e-2)


def test_shapesworld_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(encoder_mod, "SHAPESWORLD_DIR", tmp_path)
    with pytest.raises(ModelLoadError, match="ShapesWorld"):
        resolve_spec(ModelSpec(model="shapesworld"))


def test_config_preprocess_cfg_is_honoured(tmp_path: Path) -> None:
    cfg = copy.deepcopy(TINY_MODEL_CONFIG)
    cfg["preprocess_cfg"] = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    enc = _build(write_model_config(tmp_path, "piaa-tiny-pp", cfg))
    white = enc.preprocess(Image.new("RGB", (64, 64), (255, 255, 255)))
    torch.testing.assert_close(white, torch.ones(3, 64, 64))  # (1 - 0.5) / 0.5


# ---- text ---------------------------------------------------------------------------------------


def test_encode_texts(enc_sclip: Encoder) -> None:
    out = enc_sclip.encode_texts(["a dog", "a cat", "a dog"])
    assert out.shape == (3, 32) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out[0], out[2], atol=1e-6)
    assert not np.allclose(out[0], out[1])
    assert enc_sclip.encode_texts([]).shape == (0, 32)


def test_text_prototypes_are_normalised_template_means(enc_sclip: Encoder) -> None:
    labels = ["dog", "fire hydrant"]
    protos = enc_sclip.text_prototypes(labels)
    assert protos.shape == (2, 32)
    for label, proto in zip(labels, protos, strict=True):
        emb = enc_sclip.encode_texts([t.format(label) for t in DEFAULT_TEMPLATES])
        mean = emb.mean(axis=0)
        np.testing.assert_allclose(proto, mean / np.linalg.norm(mean), atol=1e-5)
    with pytest.raises(ValueError, match="must contain"):
        enc_sclip.text_prototypes(labels, ["a photo"])


def test_auto_device_picks_mps_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    device = encoder_mod._pick_device("auto")
    assert device == torch.device("mps")
    assert encoder_mod._pick_precision("auto", device) == "fp32"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert encoder_mod._pick_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert encoder_mod._pick_device("auto") == torch.device("cuda")
    assert encoder_mod._pick_precision("auto", torch.device("cuda")) == "fp16"
