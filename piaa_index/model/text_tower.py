"""CLIP's text tower in numpy, so that a text query needs neither torch nor the image tower.

`piaa search --text` used to import torch and build the whole open_clip model to embed one
phrase (5-9 s, 1.2-1.5 GB). This module holds:

- `Tokenizer`: CLIP's byte-level BPE tokenizer (ftfy + HTML unescaping, whitespace cleanup,
  lower case, CLIP's split pattern, BPE merges from the vocabulary file open_clip ships), in
  plain Python; it gives the token ids of open_clip's `SimpleTokenizer`.
- `TextTower`: the forward pass of open_clip's standard text transformer (`CLIP.encode_text`:
  token + positional embedding, pre-norm residual attention blocks under the causal mask, MLP
  with GELU or QuickGELU, ln_final, the features at the end-of-text token, text projection),
  float32 on numpy's BLAS, all templates of a phrase in one batch.
- A cache of the tower's weights per model in the library home, `<home>/cache/text-tower/
  <key>.safetensors` beside `<key>.sum` (its crc32, checked on load: a damaged file is never
  used), and the tokenizer's parsed merges (`bpe-<key>.marshal`, 0.02 s to load, not 0.1 s). `save_text_tower(encoder, path)` extracts them from a loaded `Encoder`;
  `phrase_prototype(text, ...)` is what text search calls: the cached tower when there is
  one, else the Encoder (as before), writing the cache for the next query.

Only the default CLIP text configuration is supported; an HF text tower, another pool type,
layer scale, custom attention blocks, a projection with bias, a custom tokenizer (SigLIP,
HF tokenizers) or half-precision weights make `extract` raise `Unsupported`, and the caller
keeps using torch. Importing this module imports neither torch nor open_clip.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import html
import importlib.util
import json
import marshal
import re
import sys
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import regex

from piaa_index.config import DEFAULT_TEMPLATES
from piaa_index.durable import file_checksum, file_digest, write_bytes_atomic
from piaa_index.layout import Layout
from piaa_index.model import model_record
from piaa_index.model.weights import sha256_file

if TYPE_CHECKING:
    from piaa_index.config import ModelSpec
    from piaa_index.model.encoder import Encoder

__all__ = [
    "TEMPLATES",
    "TextTower",
    "Tokenizer",
    "Unsupported",
    "cache_path",
    "ensemble_prototypes",
    "extract",
    "load_text_tower",
    "phrase_prototype",
    "save_text_tower",
]

TEMPLATES = DEFAULT_TEMPLATES  # (config.py: the one list, importable without torch)
# encoder.SHIPPED_MODELS and the config they share, for the cache key (same test).
SHIPPED_WEIGHTS = {
    "shapesworld": "shapesworld.safetensors",
    "shapesworld-gap": "shapesworld-gap.safetensors",
}
SHIPPED_DIR = Path(__file__).resolve().parent / "assets" / "shapesworld"

FORMAT = 1  # bump when the file layout or the forward pass changes: new key, old files unused
BPE_FORMAT = 1  # bump when the cached tokenizer tables change
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
SOT, EOT = "<start_of_text>", "<end_of_text>"
# CLIP's split: the two special tokens, English contractions, runs of letters, single digits,
# runs of anything else that is not white space (case-insensitive).
_SPLIT = r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


class Unsupported(Exception):
    """The model's text tower or tokenizer is not the default CLIP one: use torch."""


# ---- tokenizer ------------------------------------------------------------------------------


def vocab_path() -> Path | None:
    """The BPE merges file inside the installed open_clip package, found without importing it
    (importing open_clip imports torch)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / VOCAB_FILE
        if path.is_file():
            return path
    return None


def _byte_symbols() -> tuple[list[str], dict[int, str]]:
    """One printable character per byte value, in vocabulary order: the bytes that print as
    themselves first (in byte order), then the others, mapped to chr(256), chr(257), ..."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    kept = set(keep)
    rest = [b for b in range(256) if b not in kept]
    symbols = {b: chr(b) for b in keep}
    symbols.update({b: chr(256 + n) for n, b in enumerate(rest)})
    return [symbols[b] for b in [*keep, *rest]], symbols


def _printable_ascii(text: str) -> bool:
    """Text ftfy leaves as it is: printable ASCII with no HTML entity (no '&')."""
    return text.isascii() and text.isprintable() and "&" not in text


class Tokenizer:
    """CLIP's BPE tokenizer: texts -> [n, context_length] int64 ids (start, BPE tokens, end,
    zeros; a text too long is cut, its last id kept as the end-of-text token)."""

    def __init__(self, path: Path, context_length: int = 77, cache_dir: Path | None = None):
        tables = _load_tables(path, cache_dir) if cache_dir is not None else None
        if tables is None:
            tables = _parse_tables(path)
            if cache_dir is not None:
                _save_tables(tables, path, cache_dir)
        self.ids, self.ranks = tables
        _, by_byte = _byte_symbols()
        self.byte_symbol = [by_byte[b] for b in range(256)]
        self.sot, self.eot = self.ids[SOT], self.ids[EOT]
        self.context_length = context_length
        self._split = regex.compile(_SPLIT, regex.IGNORECASE)
        self._words: dict[str, list[int]] = {SOT: [self.sot], EOT: [self.eot]}

    @staticmethod
    def clean(text: str) -> str:
        if not _printable_ascii(text):
            import ftfy

            text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text)).strip()
        return " ".join(text.split()).lower()

    def _merge(self, word: str) -> list[int]:
        """BPE on one pre-token (already mapped to byte symbols): merge the best-ranked pair
        everywhere, left to right, until no adjacent pair is a known merge."""
        parts = [*word[:-1], word[-1] + "</w>"]
        ranks = self.ranks
        while len(parts) > 1:
            best, pair = None, ("", "")
            for a, b in zip(parts, parts[1:], strict=False):
                r = ranks.get((a, b))
                if r is not None and (best is None or r < best):
                    best, pair = r, (a, b)
            if best is None:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and parts[i] == pair[0] and parts[i + 1] == pair[1]:
                    merged.append(pair[0] + pair[1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return [self.ids[p] for p in parts]

    def encode(self, text: str) -> list[int]:
        """The BPE ids of a text, without start and end tokens."""
        out: list[int] = []
        for piece in self._split.findall(self.clean(text)):
            ids = self._words.get(piece)
            if ids is None:
                ids = self._merge("".join(self.byte_symbol[b] for b in piece.encode("utf-8")))
                self._words[piece] = ids
            out.extend(ids)
        return out

    def __call__(self, texts: Sequence[str], context_length: int | None = None) -> np.ndarray:
        n_ctx = context_length or self.context_length
        result = np.zeros((len(texts), n_ctx), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot, *self.encode(text), self.eot]
            if len(ids) > n_ctx:
                ids = ids[:n_ctx]
                ids[-1] = self.eot
            result[row, : len(ids)] = ids
        return result


Tables = tuple[dict[str, int], dict[tuple[str, str], int]]  # token ids, merge ranks


def _parse_tables(path: Path) -> Tables:
    """(token -> id, merge pair -> rank) from open_clip's gzipped merges file (0.1 s)."""
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    # After the header line, the merges that fill the vocabulary: 512 byte symbols (alone
    # and word-final), the merges, the two special tokens.
    n_merges = VOCAB_SIZE - 2 * 256 - 2
    merges = [(a, b) for a, b in (line.split() for line in lines[1 : 1 + n_merges])]
    ordered, _ = _byte_symbols()
    words = [*ordered, *(s + "</w>" for s in ordered), *("".join(m) for m in merges)]
    words += [SOT, EOT]
    if len(words) != VOCAB_SIZE:
        raise Unsupported(f"{path} holds {len(words)} tokens, not {VOCAB_SIZE}")
    return {w: i for i, w in enumerate(words)}, {m: r for r, m in enumerate(merges)}


def _tables_path(vocab: Path, cache_dir: Path) -> Path:
    """The parsed tables of this merges file for this Python (marshal's format is Python's)."""

    st = vocab.stat()
    identity = [BPE_FORMAT, str(vocab), st.st_size, st.st_mtime_ns]
    identity += [list(sys.version_info[:2]), marshal.version]
    key = hashlib.blake2b(json.dumps(identity).encode(), digest_size=8).hexdigest()
    return cache_dir / f"bpe-{key}.marshal"


def _load_tables(vocab: Path, cache_dir: Path) -> Tables | None:
    """The cached tables (0.02 s to load against 0.1 s to parse), or None when there are none
    or the file's checksum (its first line) does not match what follows."""

    try:
        data = _tables_path(vocab, cache_dir).read_bytes()
        head, _, payload = data.partition(b"\n")
        if head != f"crc32:{zlib.crc32(payload):08x}".encode():
            return None
        ids, ranks = marshal.loads(payload)
    except (OSError, ValueError, EOFError, TypeError):
        return None
    if not isinstance(ids, dict) or not isinstance(ranks, dict) or len(ids) != VOCAB_SIZE:
        return None
    return ids, ranks


def _save_tables(tables: Tables, vocab: Path, cache_dir: Path) -> None:
    """Cache the parsed tables beside the tower (best effort: a read-only home parses again)."""

    payload = marshal.dumps(tables)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        data = f"crc32:{zlib.crc32(payload):08x}\n".encode() + payload
        write_bytes_atomic(data, _tables_path(vocab, cache_dir), unique=True)
    except OSError:
        pass


@functools.cache
def _bpe(path: Path, cache_dir: Path | None = None) -> Tokenizer:
    return Tokenizer(path, cache_dir=cache_dir)


def tokenizer(context_length: int = 77, cache_dir: Path | None = None) -> Tokenizer:
    """The CLIP tokenizer (vocabulary read once per process) at this context length; with
    `cache_dir`, its parsed tables are kept there for the next process."""
    path = vocab_path()
    if path is None:
        raise Unsupported("open_clip's BPE vocabulary file was not found")
    base = _bpe(path, cache_dir)
    if base.context_length == context_length:
        return base
    tok = Tokenizer.__new__(Tokenizer)
    tok.__dict__.update(base.__dict__)
    tok.context_length = context_length
    return tok


# ---- the forward pass -----------------------------------------------------------------------

# erf(x) = x P(x^2) / Q(x^2) on [-4, 4], clamped beyond (Eigen's float erf; in float32 within
# 3e-7 of math.erf everywhere, checked in the tests): numpy has no erf and scipy is not a
# dependency.
_ERF_P = (
    -2.72614225801306e-10,
    2.77068142495902e-08,
    -2.10102402082508e-06,
    -5.69250639462346e-05,
    -7.34990630326855e-04,
    -2.95459980854025e-03,
    -1.60960333262415e-02,
)
_ERF_Q = (
    -1.45660718464996e-05,
    -2.13374055278905e-04,
    -1.68282697438203e-03,
    -7.37332916720468e-03,
    -1.42647390514189e-02,
)


def _horner(coefficients: Sequence[float], x: np.ndarray) -> np.ndarray:
    out = np.full_like(x, coefficients[0])
    for c in coefficients[1:]:
        out *= x
        out += x.dtype.type(c)
    return out


def erf(x: np.ndarray) -> np.ndarray:
    """The error function, elementwise, in x's float dtype."""
    c = np.clip(x, -4.0, 4.0)
    c2 = c * c
    out = _horner(_ERF_P, c2)
    out *= c
    out /= _horner(_ERF_Q, c2)
    return out


def _gelu(x: np.ndarray, quick: bool) -> np.ndarray:
    """GELU (exact, erf) or QuickGELU (x * sigmoid(1.702 x)), float32 in and out."""
    if quick:
        return x / (np.float32(1.0) + np.exp(np.float32(-1.702) * x))
    e = erf(x * np.float32(0.5**0.5))
    e += np.float32(1.0)
    e *= x
    e *= np.float32(0.5)
    return e


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    var = (centred * centred).mean(axis=-1, keepdims=True)
    return centred / np.sqrt(var + np.float32(eps)) * w + b


@dataclass
class TextTower:
    """open_clip's default text transformer as numpy arrays (linear weights stored [in, out])."""

    weights: dict[str, np.ndarray]
    heads: int
    layers: int
    eps: float
    quick_gelu: bool
    cache_dir: Path | None = None  # where the tokenizer's parsed tables are cached

    @property
    def context_length(self) -> int:
        return int(self.weights["positional_embedding"].shape[0])

    @property
    def dim(self) -> int:
        return int(self.weights["text_projection"].shape[1])

    def config(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "heads": self.heads,
            "layers": self.layers,
            "eps": self.eps,
            "quick_gelu": self.quick_gelu,
        }

    def features(self, tokens: np.ndarray) -> np.ndarray:
        """[n, context] token ids -> [n, d] unnormalised text features (`encode_text`)."""
        w = self.weights
        n = tokens.shape[0]
        eot = tokens.argmax(axis=-1)  # the end-of-text id is the largest in each row
        # Causal attention: no position sees a later one, so the positions after the last
        # end-of-text token change nothing that is read; they are not computed.
        seq = int(eot.max()) + 1
        # Rows are (text, position) pairs: 2-D products, contiguous operands for BLAS.
        x = (w["token_embedding"][tokens[:, :seq]] + w["positional_embedding"][:seq]).reshape(
            n * seq, -1
        )
        x = x.astype(np.float32)
        width = x.shape[-1]
        heads = self.heads
        hd = width // heads
        mask = np.triu(np.full((seq, seq), -np.inf, np.float32), 1)
        scale = np.float32(hd**-0.5)
        for i in range(self.layers):
            p = f"blocks.{i}."
            h = _layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], self.eps)
            qkv = h @ w[p + "attn.in_proj"] + w[p + "attn.in_proj_bias"]
            qkv = qkv.reshape(n, seq, 3, heads, hd).transpose(2, 0, 3, 1, 4)
            q = np.ascontiguousarray(qkv[0]) * scale  # [n, heads, seq, hd]
            k = np.ascontiguousarray(qkv[1].transpose(0, 1, 3, 2))
            v = np.ascontiguousarray(qkv[2])
            att = q @ k + mask
            att = np.exp(att - att.max(axis=-1, keepdims=True))
            att /= att.sum(axis=-1, keepdims=True)
            o = np.ascontiguousarray((att @ v).transpose(0, 2, 1, 3)).reshape(n * seq, width)
            x = x + (o @ w[p + "attn.out_proj"] + w[p + "attn.out_proj_bias"])
            h = _layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], self.eps)
            h = _gelu(h @ w[p + "mlp.c_fc"] + w[p + "mlp.c_fc_bias"], self.quick_gelu)
            x = x + (h @ w[p + "mlp.c_proj"] + w[p + "mlp.c_proj_bias"])
        x = x.reshape(n, seq, width)
        pooled = x[np.arange(n), eot]
        pooled = _layer_norm(pooled, w["ln_final.weight"], w["ln_final.bias"], self.eps)
        return (pooled @ w["text_projection"]).astype(np.float32)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> [N, d] float32, L2-normalised (as `Encoder.encode_texts`)."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        feats = self.features(tokenizer(self.context_length, self.cache_dir)(texts))
        norms = np.linalg.norm(feats, axis=1, keepdims=True)
        return (feats / np.maximum(norms, np.float32(1e-12))).astype(np.float32)

    def text_prototypes(
        self, labels: Sequence[str], templates: Sequence[str] = TEMPLATES
    ) -> np.ndarray:
        """Per label, the normalised mean of the normalised template embeddings: [C, d]."""
        return ensemble_prototypes(self.encode_texts, self.dim, labels, templates)


def ensemble_prototypes(
    encode_texts: Callable[[list[str]], np.ndarray],
    dim: int,
    labels: Sequence[str],
    templates: Sequence[str],
) -> np.ndarray:
    """Per label, the normalised mean of its normalised template embeddings ([C, d] float32):
    the prompt ensemble of both text towers (`Encoder.text_prototypes` and this module's)."""
    labels, templates = list(labels), list(templates)
    if not templates or any("{}" not in t for t in templates):
        raise ValueError("every prompt template must contain '{}' for the label")
    if not labels:
        return np.zeros((0, dim), dtype=np.float32)
    # Replacement, not str.format: a label or template with other braces must not crash.
    emb = encode_texts([t.replace("{}", label) for label in labels for t in templates])
    mean = emb.reshape(len(labels), len(templates), -1).mean(axis=1)
    mean /= np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)
    return mean.astype(np.float32)


# ---- from a torch Encoder -------------------------------------------------------------------


def _np(t: Any) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy())


def _check_norm(norm: Any, width: int, where: str) -> float:
    import torch

    if not isinstance(norm, torch.nn.LayerNorm) or tuple(norm.normalized_shape) != (width,):
        raise Unsupported(f"{where} is not a LayerNorm over the width")
    if norm.weight is None or norm.bias is None:
        raise Unsupported(f"{where} has no affine weight or bias")
    return float(norm.eps)


def _text_parts(model: Any) -> dict[str, Any]:
    """The text tower's modules, from a CLIP (tower inlined) or a CustomTextCLIP whose text
    tower is a plain TextTransformer."""
    from open_clip.model import CLIP, CustomTextCLIP
    from open_clip.transformer import TextTransformer

    if type(model) is CLIP:
        src, pool = model, model.text_pool_type
    elif type(model) is CustomTextCLIP and type(model.text) is TextTransformer:
        src, pool = model.text, model.text.pool_type
        if src.cls_emb is not None or src.use_pad_mask:
            raise Unsupported("text tower with a class token or a padding mask")
    else:
        raise Unsupported(f"{type(model).__name__} model (HF or custom text tower)")
    if pool != "argmax":
        raise Unsupported(f"text pool type {pool!r} (only 'argmax')")
    return {
        "transformer": src.transformer,
        "token_embedding": src.token_embedding,
        "positional_embedding": src.positional_embedding,
        "ln_final": src.ln_final,
        "text_projection": src.text_projection,
        "attn_mask": src.attn_mask,
    }


def _check_tokenizer(tok: Any, context_length: int) -> None:
    from open_clip import tokenizer as oct

    if type(tok) is not oct.SimpleTokenizer:
        raise Unsupported(f"tokenizer {type(tok).__name__} (only CLIP's SimpleTokenizer)")
    if getattr(tok, "clean_fn", None) is not oct._clean_lower or tok.reduction_fn is not None:
        raise Unsupported("tokenizer with another cleaning or a reduction mask")
    if tok.vocab_size != VOCAB_SIZE or tok.context_length != context_length:
        raise Unsupported("tokenizer with another vocabulary or context length")
    probe = ["a photo of a dog.", "Caf\u00e9 &amp; 42 \U0001f600 don't", "x " * 100]
    mine = tokenizer(context_length)(probe)
    if not np.array_equal(mine, tok(probe).numpy()):
        raise Unsupported("tokenizer ids differ from open_clip's on a probe")


def extract(encoder: Encoder) -> TextTower:
    """The text tower of a loaded Encoder as numpy float32 arrays; `Unsupported` for anything
    but open_clip's default CLIP text configuration in fp32."""
    import torch
    from open_clip.transformer import QuickGELU, ResidualAttentionBlock

    parts = _text_parts(getattr(encoder, "model", None))
    tfm, emb, pos = parts["transformer"], parts["token_embedding"], parts["positional_embedding"]
    proj, mask = parts["text_projection"], parts["attn_mask"]
    if not isinstance(emb, torch.nn.Embedding) or not isinstance(proj, torch.nn.Parameter):
        raise Unsupported("text projection or token embedding of another kind (bias, none)")
    ctx, width = int(pos.shape[0]), int(pos.shape[1])
    causal = torch.full((ctx, ctx), float("-inf")).triu(1)
    if mask is None or tuple(mask.shape) != (ctx, ctx) or not torch.equal(mask.cpu(), causal):
        raise Unsupported("no causal mask")
    params = [emb.weight, pos, proj, *tfm.parameters(), *parts["ln_final"].parameters()]
    if any(p.dtype != torch.float32 for p in params):
        raise Unsupported("weights not in float32")
    eps = {_check_norm(parts["ln_final"], width, "ln_final")}
    w = {
        "token_embedding": _np(emb.weight),
        "positional_embedding": _np(pos),
        "text_projection": _np(proj),
        "ln_final.weight": _np(parts["ln_final"].weight),
        "ln_final.bias": _np(parts["ln_final"].bias),
    }
    heads, quick = None, set()
    for i, blk in enumerate(tfm.resblocks):
        if type(blk) is not ResidualAttentionBlock or hasattr(blk, "ln_1_kv"):
            raise Unsupported("custom attention blocks")
        if not (
            isinstance(blk.ls_1, torch.nn.Identity) and isinstance(blk.ls_2, torch.nn.Identity)
        ):
            raise Unsupported("layer scale")
        attn = blk.attn
        if (
            attn.in_proj_weight is None
            or attn.in_proj_bias is None
            or attn.bias_k is not None
            or attn.add_zero_attn
            or attn.out_proj.bias is None
        ):
            raise Unsupported("attention without packed biased q/k/v projections")
        fc, act, cp = blk.mlp.c_fc, blk.mlp.gelu, blk.mlp.c_proj
        if type(act) is QuickGELU:
            quick.add(True)
        elif type(act) is torch.nn.GELU and act.approximate == "none":
            quick.add(False)
        else:
            raise Unsupported(f"activation {type(act).__name__}")
        if fc.bias is None or cp.bias is None or len(blk.mlp) != 3:
            raise Unsupported("MLP of another shape")
        eps.add(_check_norm(blk.ln_1, width, "ln_1"))
        eps.add(_check_norm(blk.ln_2, width, "ln_2"))
        heads = attn.num_heads if heads is None else heads
        if attn.num_heads != heads:
            raise Unsupported("blocks with different head counts")
        p = f"blocks.{i}."
        w[p + "ln_1.weight"], w[p + "ln_1.bias"] = _np(blk.ln_1.weight), _np(blk.ln_1.bias)
        w[p + "ln_2.weight"], w[p + "ln_2.bias"] = _np(blk.ln_2.weight), _np(blk.ln_2.bias)
        w[p + "attn.in_proj"] = _np(attn.in_proj_weight.T)
        w[p + "attn.in_proj_bias"] = _np(attn.in_proj_bias)
        w[p + "attn.out_proj"] = _np(attn.out_proj.weight.T)
        w[p + "attn.out_proj_bias"] = _np(attn.out_proj.bias)
        w[p + "mlp.c_fc"], w[p + "mlp.c_fc_bias"] = _np(fc.weight.T), _np(fc.bias)
        w[p + "mlp.c_proj"], w[p + "mlp.c_proj_bias"] = _np(cp.weight.T), _np(cp.bias)
    if heads is None or len(eps) != 1 or len(quick) != 1:
        raise Unsupported("no blocks, or blocks that differ in norm eps or activation")
    _check_tokenizer(getattr(encoder, "_tokenizer", None), ctx)
    return TextTower(w, int(heads), len(tfm.resblocks), eps.pop(), quick.pop())


# ---- the cache file -------------------------------------------------------------------------


def _sum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sum")


def save_text_tower(encoder: Encoder, path: Path) -> TextTower | None:
    """Extract the text tower of a loaded Encoder into `path` (written atomically, its digest
    beside it); the tower, or None where the model is not supported (nothing written)."""
    from safetensors.numpy import save

    try:
        tower = extract(encoder)
    except Unsupported:
        return None
    data = save(tower.weights, metadata={"piaa_text_tower": json.dumps(tower.config())})
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(data, path, unique=True)
    write_bytes_atomic(file_checksum(path).encode("ascii"), _sum_path(path), unique=True)
    _loaded.pop(path, None)
    return tower


_loaded: dict[Path, tuple[tuple[int, int, str], TextTower]] = {}
_lock = threading.Lock()


def _names(layers: int) -> set[str]:
    block = ["ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.in_proj"]
    block += ["attn.in_proj_bias", "attn.out_proj", "attn.out_proj_bias", "mlp.c_fc"]
    block += ["mlp.c_fc_bias", "mlp.c_proj", "mlp.c_proj_bias"]
    names = {"token_embedding", "positional_embedding", "text_projection"}
    names |= {"ln_final.weight", "ln_final.bias"}
    return names | {f"blocks.{i}.{b}" for i in range(layers) for b in block}


def load_text_tower(path: Path) -> TextTower | None:
    """The cached tower at `path`, or None when there is none or it is damaged (its digest or
    its contents are wrong): the caller rebuilds it. The digest is checked once per file
    version per process; the arrays are views of the memory-mapped file (a query touches
    the embedding rows of its own tokens only)."""
    try:
        st = path.stat()
        expected = _sum_path(path).read_text(encoding="ascii").strip()
    except (OSError, ValueError):
        return None
    stamp = (st.st_size, st.st_mtime_ns, expected)
    with _lock:
        hit = _loaded.get(path)
        if hit is not None and hit[0] == stamp:
            return hit[1]
    try:
        # A crc32 since this release (0.07 s at ViT-B/16); a blake2b digest from before.
        found = file_checksum(path) if expected.startswith("crc32:") else file_digest(path)
        if found != expected:
            return None
        # safetensors: 8-byte little-endian header length, a JSON header (dtype, shape and
        # byte range of each array after it), the arrays.
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        size = int.from_bytes(raw[:8].tobytes(), "little")
        header = json.loads(raw[8 : 8 + size].tobytes())
        config = json.loads(header.pop("__metadata__")["piaa_text_tower"])
        if config.get("format") != FORMAT or set(header) != _names(int(config["layers"])):
            return None
        weights = {}
        for name, info in header.items():
            start, stop = (8 + size + int(o) for o in info["data_offsets"])
            if info["dtype"] != "F32" or stop > len(raw):
                return None
            weights[name] = raw[start:stop].view(np.float32).reshape(info["shape"])
        tower = TextTower(
            weights,
            int(config["heads"]),
            int(config["layers"]),
            float(config["eps"]),
            bool(config["quick_gelu"]),
            cache_dir=path.parent,
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    with _lock:
        _loaded[path] = (stamp, tower)
    return tower


def _version(package: str) -> str:
    """The installed version of `package` as its `version.py` states it (torch and open_clip
    ship one): read without importing the package, and without importlib.metadata, which
    scans every installed package (~40 ms of a text query)."""
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        try:
            text = (Path(folder) / "version.py").read_text(encoding="utf-8")
        except OSError:
            continue
        found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
        if found:
            return found.group(1)
    return ""


def cache_path(home: Path, spec: ModelSpec, record: dict[str, Any] | None) -> Path | None:
    """Where the text tower of this library's model is cached: the key hashes the model name,
    the weights (tag, or the sha256 of the checkpoint file), the bytes of a model-config file
    and the open_clip and torch versions (random weights depend on torch). None when the
    model cannot be keyed without loading it (hf-hub:, local-dir:) or a file is gone."""

    model, pretrained = spec.model.strip(), spec.pretrained.strip()
    if model.startswith(("hf-hub:", "local-dir:")):
        return None
    identity: dict[str, Any] = {
        "format": FORMAT,
        "model": model,
        "pretrained": pretrained,
        "open_clip": _version("open_clip"),
        "torch": _version("torch"),
    }
    try:
        if model in SHIPPED_WEIGHTS:
            identity["config_sha256"] = sha256_file(SHIPPED_DIR / "shapesworld.json", home)
            if pretrained == "default":
                ckpt = SHIPPED_DIR / SHIPPED_WEIGHTS[model]
                identity["weights_sha256"] = sha256_file(ckpt, home)
        elif model.lower().endswith(".json"):
            identity["config_sha256"] = sha256_file(Path(model).expanduser(), home)
        if (ckpt_path := model_record.checkpoint_path(pretrained)) is not None:
            identity["weights_sha256"] = sha256_file(ckpt_path, home)
        elif model_record.looks_like_file(pretrained):
            return None  # a checkpoint that is not there: loading the model says so
    except OSError:
        return None
    if record and record.get("weights_sha256") not in (None, identity.get("weights_sha256")):
        return None  # the file changed since indexing: loading the model says so
    key = hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=16)
    return Layout(home).text_tower_cache / f"{key.hexdigest()}.safetensors"


def phrase_prototype(
    text: str,
    templates: Callable[[], list[str]],
    *,
    home: Path,
    spec: ModelSpec,
    record: dict[str, Any] | None,
    custom_encoder: bool,
    encoder: Callable[[], Encoder],
) -> np.ndarray:
    """A phrase's prototype for text search ([d] float32): from the cached numpy tower in
    `home` when the model (`spec`, its library's model `record`) has one; else from the Encoder
    (`encoder()` loads it, as before), whose text tower is then cached for the next query and
    used for this one, so that every query of a library is answered by the same code. A library
    given its own encoder factory (`custom_encoder`) uses that encoder, never a cached tower.

    `templates` gives the prompt templates (`vocabulary.default_templates`: config's list)."""
    path = None if custom_encoder else cache_path(home, spec, record)
    tower = load_text_tower(path) if path is not None else None
    if tower is None:
        model = encoder()
        if path is not None:
            tower = save_text_tower(model, path)
        if tower is None:
            return model.text_prototypes([text], templates())[0]
    return tower.text_prototypes([text], templates())[0]
