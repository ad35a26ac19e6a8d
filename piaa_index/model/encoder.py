"""open_clip model loading and the one-pass [CLS] + patch encoder (front-ends `clip`, `sclip`)."""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from PIL import Image

from piaa_index.config import DEFAULT_TEMPLATES, FRONT_ENDS, ModelSpec
from piaa_index.errors import PiaaError
from piaa_index.model import weights
from piaa_index.model.text_tower import ensemble_prototypes

__all__ = ["FRONT_ENDS", "DEFAULT_TEMPLATES", "Encoder", "ModelLoadError", "ModelSpec"]

SHAPESWORLD = "shapesworld"
SHAPESWORLD_DIR = Path(__file__).resolve().parent / "assets" / "shapesworld"
# The shipped stand-ins, one architecture (shapesworld.json), two trainings: `shapesworld`, whose
# patches were trained against the text directly, and `shapesworld-gap`, whose patches carry
# class evidence but sit far from the text, as web-trained CLIP's do (TRAINING.md).
SHIPPED_MODELS = {
    SHAPESWORLD: "shapesworld.safetensors",
    "shapesworld-gap": "shapesworld-gap.safetensors",
}
CHECKPOINT_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".bin", ".safetensors")
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16")
_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")
_TEXT_BATCH = 256


class ModelLoadError(PiaaError):
    """The model or its weights could not be resolved or loaded; the message says what to do."""


@dataclass(frozen=True)
class _Resolved:
    """A ModelSpec turned into open_clip arguments."""

    name: str  # name open_clip knows (built-in, registered config stem, or hf-hub:/local-dir:)
    pretrained: str | None  # tag or checkpoint path for open_clip, None for random init
    label: str  # what identity() records as "pretrained"
    model_label: str  # what identity() records as "model"
    preprocess: dict[str, Any]  # image_mean / image_std / ... from a config's preprocess_cfg
    quick_gelu: bool  # the weights tag was trained with QuickGELU


def _close_names(name: str, choices: Sequence[str], n: int = 5) -> str:
    """Up to n close matches, for error messages."""
    lowered = {c.lower(): c for c in choices}
    hits = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.5)
    return ", ".join(lowered[h] for h in hits)


@functools.cache
def _builtin_model_names() -> frozenset[str]:
    """open_clip's own model names, captured before we register any config."""
    return frozenset(open_clip.list_models())


def _register_config(path: Path) -> tuple[str, dict[str, Any]]:
    """Register an open_clip model-config JSON under its file stem; return (name, preprocess)."""
    if not path.is_file():
        raise ModelLoadError(f"model config file not found: {path}")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read model config {path}: {exc}") from exc
    if not isinstance(cfg, dict) or not all(k in cfg for k in _CONFIG_KEYS):
        raise ModelLoadError(
            f"{path} is not an open_clip model config (needs keys {', '.join(_CONFIG_KEYS)})"
        )
    name = path.stem
    pp_cfg = cfg.pop("preprocess_cfg", None) or {}
    if name in _builtin_model_names() and open_clip.get_model_config(name) != cfg:
        # add_model_config is process-wide: a same-named file would silently replace a built-in.
        raise ModelLoadError(
            f"config file {path.name} has the name of a built-in open_clip model with a "
            "different architecture; rename the file"
        )
    if pp_cfg:
        # open_clip's CLIP() rejects unknown keys, so register a copy without preprocess_cfg.
        clean = Path(tempfile.mkdtemp(prefix="piaa-model-config-")) / path.name
        clean.write_text(json.dumps(cfg), encoding="utf-8")
        open_clip.add_model_config(clean)
    else:
        open_clip.add_model_config(path)
    keys = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation"}
    keys["resize_mode"] = "image_resize_mode"
    return name, {keys[k]: v for k, v in pp_cfg.items() if k in keys}


def _checkpoint_label(path: Path) -> str:
    """File name, size and short content hash (sha256, computed once per file version)."""
    return f"{path.name} (size {path.stat().st_size}, sha256 {weights.sha256_file(path)[:12]})"


def _tag_preprocess(pcfg: dict[str, Any]) -> dict[str, Any]:
    """A pretrained tag's preprocessing, as create_model_and_transforms arguments: open_clip
    applies it itself for a tag, not for a file path, which is how a cached tag is loaded."""
    keys = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation"}
    keys["resize_mode"] = "image_resize_mode"
    return {keys[k]: v for k, v in pcfg.items() if k in keys}


def _looks_like_path(value: str) -> bool:
    return (
        value.lower().endswith(CHECKPOINT_SUFFIXES)
        or "/" in value
        or os.sep in value
        or Path(value).expanduser().exists()
    )


def resolve_spec(spec: ModelSpec) -> _Resolved:
    """Check a ModelSpec against open_clip's registry and the file system, without loading."""
    model, pretrained = spec.model.strip(), spec.pretrained.strip()
    preprocess: dict[str, Any] = {}
    tags: list[str] = []
    if model in SHIPPED_MODELS:
        shipped = SHAPESWORLD_DIR / "shapesworld.json"
        if not shipped.is_file():
            raise ModelLoadError(
                f"the shipped ShapesWorld model config is missing: {shipped} "
                "(reinstall piaa-index, or pass a model-config JSON path)"
            )
        name, preprocess = _register_config(shipped)
        kind = "shipped"
    elif model.startswith(("hf-hub:", "local-dir:")):
        name, kind = model, "schema"
    elif model.lower().endswith(".json"):
        name, preprocess = _register_config(Path(model).expanduser().resolve())
        kind = "config"
    else:
        name = model.replace("/", "-")  # open_clip accepts ViT-B/16 as ViT-B-16
        if name not in open_clip.list_models():
            hint = _close_names(name, open_clip.list_models() + list(SHIPPED_MODELS))
            raise ModelLoadError(
                f"unknown model {model!r}"
                + (f"; did you mean: {hint}?" if hint else "")
                + " (a model is an open_clip name, 'shapesworld', 'shapesworld-gap', or a "
                "model-config JSON path)"
            )
        kind = "builtin"
        tags = open_clip.list_pretrained_tags_by_model(name)
    model_label = model if kind == "shipped" else name  # the two shipped models share a config

    if kind == "schema" and pretrained != "default":
        raise ModelLoadError(f"{name} brings its own weights; use --pretrained default")
    if pretrained.lower() == "none":
        return _Resolved(name, None, "none", model_label, preprocess, False)

    if pretrained == "default":
        if kind == "shipped":
            ckpt = SHAPESWORLD_DIR / SHIPPED_MODELS[model]
            if not ckpt.is_file():
                raise ModelLoadError(
                    f"the shipped ShapesWorld checkpoint is missing: {ckpt} "
                    "(reinstall piaa-index, or pass --pretrained PATH)"
                )
            return _Resolved(
                name, str(ckpt), _checkpoint_label(ckpt), model_label, preprocess, False
            )
        if kind == "schema":
            return _Resolved(name, None, "hub", model_label, preprocess, False)
        if kind == "config":
            raise ModelLoadError(
                f"a model-config file has no default weights; pass --pretrained PATH to a "
                f"checkpoint for {name}, or --pretrained none for random weights"
            )
        if not tags:
            raise ModelLoadError(
                f"open_clip has no pretrained weights for {name}; pass --pretrained PATH"
            )
        pretrained = "openai" if "openai" in tags else tags[0]

    if pretrained in tags:
        pcfg = open_clip.get_pretrained_cfg(name, pretrained)
        quick = bool(pcfg.get("quick_gelu", False))
        return _Resolved(name, pretrained, pretrained, model_label, preprocess, quick)

    if _looks_like_path(pretrained):
        ckpt = Path(pretrained).expanduser()
        if not ckpt.is_file():
            raise ModelLoadError(f"checkpoint file not found: {ckpt}")
        ckpt = ckpt.resolve()
        return _Resolved(name, str(ckpt), _checkpoint_label(ckpt), model_label, preprocess, False)

    if kind == "builtin":
        hint = _close_names(pretrained, tags) or ", ".join(tags[:8])
        raise ModelLoadError(
            f"unknown weights {pretrained!r} for {name}"
            + (f"; known tags: {hint}" if hint else "")
            + " (or pass a checkpoint path, or none)"
        )
    raise ModelLoadError(
        f"{name} has no named weights; use default, none or a checkpoint path "
        f"({', '.join(CHECKPOINT_SUFFIXES)})"
    )


def _pick_device(device: str) -> torch.device:
    """`auto`: CUDA, else Apple's Metal (MPS), else the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r} (use auto, cpu, cuda, cuda:N, mps)") from exc


def _pick_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        # fp16 on CUDA. MPS stays fp32: its fp16 kernels cover the ViT, but no run on a Mac has
        # checked the vectors against the CPU's yet; Encoder(..., precision="fp16") asks for it.
        return "fp16" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose auto or {', '.join(PRECISIONS)}")
    return precision


def _check_vit(visual: torch.nn.Module, name: str) -> VisionTransformer:
    """Accept only open_clip's plain ViT tower, the one whose last block we can rerun."""
    if not isinstance(visual, VisionTransformer):
        raise ModelLoadError(
            f"{name} has a {type(visual).__name__} image tower; piaa needs a plain open_clip "
            "ViT (timm and ResNet towers are not supported)"
        )
    if visual.attn_pool is not None:
        raise ModelLoadError(f"{name} pools with attention (CoCa-style); piaa needs a plain ViT")
    if visual.pool_type not in ("tok", "avg"):
        raise ModelLoadError(f"{name} has pool_type {visual.pool_type!r}; need 'tok' or 'avg'")
    blocks = visual.transformer.resblocks
    if not all(type(b) is ResidualAttentionBlock for b in blocks):
        raise ModelLoadError(
            f"{name} uses custom attention blocks; piaa needs standard ResidualAttentionBlock"
        )
    if getattr(blocks[-1].attn, "in_proj_weight", None) is None:
        raise ModelLoadError(f"{name}: last block has no packed q/k/v projection")
    return visual


def _to_nld(x: torch.Tensor, batch_first: bool) -> torch.Tensor:
    return x if batch_first else x.transpose(0, 1)


def _sclip_block(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """SCLIP's last block on NLD tokens: correlative self-attention, residual and MLP kept."""
    attn = block.attn
    h = block.ln_1(x)
    n, seq, width = h.shape
    heads = attn.num_heads
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(n, seq, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    # As in SCLIP's code: softmax(q q^T / sqrt(d)) + softmax(k k^T / sqrt(d)), then times v.
    o = F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)
    o = attn.out_proj(o.transpose(1, 2).reshape(n, seq, width))
    x = x + block.ls_1(o)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def _front_end_block(
    front_end: str, block: ResidualAttentionBlock, x: torch.Tensor, batch_first: bool
) -> torch.Tensor:
    """Run the patch branch's last block on tokens in the transformer's own layout."""
    if front_end == "clip":
        return block(x)
    out = _sclip_block(block, _to_nld(x, batch_first))
    return _to_nld(out, batch_first)


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """Silence open_clip's root-logger lines: its warning about random init (we chose `none`
    on purpose) and its error on a failed download, which our one-line message replaces."""
    root = logging.getLogger()
    level = root.level
    if level < logging.CRITICAL:
        root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.setLevel(level)


class Encoder:
    """An open_clip ViT that gives [CLS] and patch embeddings from one pass of the trunk."""

    def __init__(self, spec: ModelSpec, device: str = "auto", precision: str = "auto") -> None:
        self.spec = spec
        self.device = _pick_device(device)
        self.precision = _pick_precision(precision, self.device)
        self._resolved = self._local(resolve_spec(spec))
        r = self._resolved
        try:
            # Random weights (`none`, tests) must be the same in every process that opens the
            # index, or text prototypes would not match the stored vectors: seed them.
            with torch.random.fork_rng(devices=[]), _quiet_open_clip():
                torch.manual_seed(0)
                model, _, preprocess = open_clip.create_model_and_transforms(
                    r.name,
                    pretrained=r.pretrained,
                    precision=self.precision,
                    device=self.device,
                    force_quick_gelu=r.quick_gelu,  # open_clip only warns on a mismatch
                    **r.preprocess,
                )
        except ModelLoadError:
            raise
        except Exception as exc:
            raise self._load_error(exc) from exc
        model.eval().requires_grad_(False)  # inference only
        self.model = model
        self.visual = _check_vit(model.visual, r.model_label)
        self._preprocess = preprocess
        self._tokenizer = open_clip.get_tokenizer(r.name)
        self._dtype = self.visual.conv1.weight.dtype
        self._batch_first = bool(getattr(self.visual.transformer, "batch_first", True))

    @staticmethod
    def _local(r: _Resolved) -> _Resolved:
        """A pretrained tag whose file is in the cache loads from that path (no request to the
        hub); one that is not fails at once where no network answers."""
        if r.pretrained is None or r.pretrained != r.label:
            return r  # random init, or a checkpoint path
        try:
            found = weights.local_weights(r.name, r.pretrained)
        except weights.WeightsUnavailable as exc:
            raise ModelLoadError(str(exc)) from None
        if found is None:
            return r  # not cached, the hub answers: open_clip downloads it
        pp = {**_tag_preprocess(open_clip.get_pretrained_cfg(r.name, r.pretrained)), **r.preprocess}
        return replace(r, pretrained=str(found), preprocess=pp)

    def _load_error(self, exc: Exception) -> ModelLoadError:
        r = self._resolved
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if r.pretrained is not None and not Path(r.pretrained).is_file():
            src = weights.source_for(r.name, r.pretrained)
            return ModelLoadError(weights.unavailable_message(src, f"the download failed: {msg}"))
        if r.pretrained is not None:
            return ModelLoadError(f"checkpoint {r.pretrained} does not load into {r.name}: {msg}")
        return ModelLoadError(f"could not build {r.name}: {msg}")

    # ---- shape facts -------------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """Joint embedding dimension d."""
        return int(self.visual.output_dim)

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (h, w); patches are row-major."""
        gh, gw = self.visual.grid_size
        return int(gh), int(gw)

    @property
    def n_patches(self) -> int:
        """M = grid_h x grid_w."""
        gh, gw = self.grid
        return gh * gw

    @property
    def image_size(self) -> tuple[int, int]:
        """Input size (h, w) that preprocess produces."""
        h, w = self.visual.image_size
        return int(h), int(w)

    def identity(self) -> dict[str, Any]:
        """What an index records about the model that made its vectors."""
        return {
            "model": self._resolved.model_label,
            "pretrained": self._resolved.label,
            "front_end": self.spec.front_end,
            "dim": self.dim,
            "grid": list(self.grid),
        }

    # ---- images -------------------------------------------------------------------------------

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        """open_clip's validation transform: PIL image -> [3, H, W] float tensor."""
        return self._preprocess(img)

    def _prepare(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected a [B, 3, H, W] batch, got {tuple(batch.shape)}")
        return batch.to(device=self.device, dtype=self._dtype)

    def _pool_cls(self, x: torch.Tensor) -> torch.Tensor:
        """open_clip's pooling of the standard tower output (NLD) into the [CLS] embedding."""
        v = self.visual
        if v.final_ln_after_pool:
            pooled = v.ln_post(x[:, 0] if v.pool_type == "tok" else x[:, 1:].mean(dim=1))
        else:
            x = v.ln_post(x)
            pooled = x[:, 0] if v.pool_type == "tok" else x[:, 1:].mean(dim=1)
        return pooled @ v.proj if v.proj is not None else pooled

    def _project_patches(self, x: torch.Tensor) -> torch.Tensor:
        """Patch tokens (NLD, class token first) -> ln_post -> proj, as SCLIP does."""
        tokens = self.visual.ln_post(x[:, 1:])
        return tokens @ self.visual.proj if self.visual.proj is not None else tokens

    @staticmethod
    def _normalise(t: torch.Tensor) -> np.ndarray:
        return F.normalize(t.float(), dim=-1).cpu().numpy()

    def encode_images(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """[B,3,H,W] -> ([CLS] [B,d], patches [B,M,d]); float32, L2-normalised, one trunk pass."""
        v = self.visual
        with torch.inference_mode():
            x = self._prepare(batch)
            # The stem, written out so that the trunk runs once for both outputs.
            x = v.conv1(x)
            x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
            cls_tok = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
            x = torch.cat([cls_tok, x], dim=1) + v.positional_embedding.to(x.dtype)
            x = v.ln_pre(x)  # patch dropout is the identity in eval mode
            if not self._batch_first:
                x = x.transpose(0, 1)
            blocks = v.transformer.resblocks
            for blk in blocks[:-1]:
                x = blk(x)
            last = blocks[-1]
            std = last(x)
            if self.spec.front_end == "clip":
                fe = std  # same block, same output: the patch branch costs nothing extra
            else:
                fe = _front_end_block(self.spec.front_end, last, x, self._batch_first)
            cls = self._pool_cls(_to_nld(std, self._batch_first))
            patches = self._project_patches(_to_nld(fe, self._batch_first))
            return self._normalise(cls), self._normalise(patches)

    # ---- text ---------------------------------------------------------------------------------

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> [N, d] float32, L2-normalised."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), _TEXT_BATCH):
                tokens = self._tokenizer(texts[start : start + _TEXT_BATCH]).to(self.device)
                out.append(self._normalise(self.model.encode_text(tokens)))
        return np.concatenate(out, axis=0)

    def text_prototypes(
        self, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES
    ) -> np.ndarray:
        """Per label, the normalised mean of the normalised template embeddings: [C, d]."""

        return ensemble_prototypes(self.encode_texts, self.dim, labels, templates)
