"""The saved [CLS] index (`similar.ClsIndex`) read and searched without FAISS.

Importing FAISS is most of a fresh `piaa similar` (the faiss-gpu wheel loads the CUDA
libraries: 0.1-0.2 s and ~300 MB even where there is no GPU). The two kinds `ClsIndex.save`
writes are simple, so a read-only process parses them here and reads with `os.pread` (each of
an index's parts, vectors/parts.py, is one such file):

    flat  "IxM2" header  "IxFI" header  u64 n·d  float32[n, d]  u64 n  int64[n] (ids)
    ivf   "IwFl" header  u64 nlist  u64 nprobe
          "IxFI" header (the coarse quantizer)  u64 nlist·d  float32[nlist, d] (centroids)
          u8 direct map type (0: none)  u64 0
          "ilar"  u64 nlist  u64 code size (4·d)
          "full" u64 nlist u64[nlist] (list sizes)  or  "sprs" u64 2m (list, size)[m]
          then each non-empty list in order: float32[size, d]  int64[size] (ids)

    header = i32 d, i64 ntotal, i64, i64, u8 is_trained, i32 metric (0: inner product)

An IVF search reads the centroids (at load) and the probed lists only: at 1M images the file
is ~0.5 GB, a probe of 32 lists ~1 MB.

The scores are FAISS's to the last bit: FAISS's `fvec_inner_product` (the flat scan, the
coarse quantizer and the IVF list scanner all use it) is a loop the compiler vectorises in
`LANES` float32 lanes, products and sums rounded separately, the lanes then added in halves;
`inner_products` does the same with numpy. A scan first takes numpy's BLAS product (fast, a
different summation order), keeps the rows whose score may reach the k-th by the textbook
error bound, and computes those exactly. Which of the rows tied at the k-th score are kept
follows FAISS's heap (`_faiss_top`). FAISS itself scans more than 10,000 vectors on several
threads with BLAS (sgemm): its scores there may differ from these (and from its own on one
thread) by a few ulps.

Strict: anything else (another layout or FAISS version's, an on-disk inverted list, a direct
map, another metric, a width the lanes do not divide, a CPU whose FAISS kernel is not known,
any count or size that disagrees) gives None, and the caller reads the index through FAISS.
tests/test_similar_files.py compares both kinds' answers with FAISS's, bit for bit.
"""

from __future__ import annotations

import os
import platform
import struct
import weakref
from dataclasses import dataclass

import numpy as np

from piaa_index.vectors.shard_files import AVAILABLE, ShortRead, read_at

_HEADER = struct.Struct("<iqqqBi")  # d, ntotal, dummy, dummy, is_trained, metric_type
_U64 = struct.Struct("<Q")
_U8 = struct.Struct("<B")
METRIC_INNER_PRODUCT = 0
# Read at once: the headers, and the list sizes of up to ~500 lists (more are read again).
HEAD_BYTES = 1 << 16
_LOWEST = np.float32(np.finfo(np.float32).min)  # FAISS's empty heap slot: never returned
# Below this many multiply-adds a scan computes every score exactly (no BLAS pre-pass).
EXACT_CELLS = 1 << 18
# FAISS's lanes per SIMD level (FAISS_SIMD_LEVEL, as FAISS reads it): measured against
# faiss.fvec_inner_product by tests/test_similar_files.py (1.15, dynamic dispatch).
_LEVEL_LANES = {"AVX512_SPR": 16, "AVX512": 16, "AVX2": 8, "NONE": 4}


def _lanes() -> int | None:
    """float32 lanes of the `fvec_inner_product` FAISS runs on this CPU, or None (unknown)."""
    level = os.environ.get("FAISS_SIMD_LEVEL")
    if level is not None:
        return _LEVEL_LANES.get(level)
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None  # ARM and others: other kernels, not measured
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy < 2
        return None
    if all(features.get(f) for f in ("AVX512F", "AVX512CD", "AVX512VL", "AVX512DQ", "AVX512BW")):
        return 16
    if features.get("AVX2") and features.get("FMA3"):
        return 8
    return 4


LANES = _lanes()


def supported(dim: int) -> bool:
    """Whether a scan at this width gives FAISS's scores here."""
    return AVAILABLE and LANES is not None and dim > 0 and dim % LANES == 0


def inner_products(vectors: np.ndarray, q: np.ndarray) -> np.ndarray:
    """float32 [n]: each row's inner product with `q` as FAISS's `fvec_inner_product` computes
    it (`LANES` partial sums, each product and sum rounded to float32, then halved)."""
    assert LANES is not None
    n, d = vectors.shape
    x = np.ascontiguousarray(vectors, np.float32).reshape(n, d // LANES, LANES)
    qq = np.asarray(q, np.float32).reshape(d // LANES, LANES)
    acc = np.zeros((n, LANES), np.float32)
    for c in range(d // LANES):
        acc += x[:, c, :] * qq[c]
    while acc.shape[1] > 1:
        half = acc.shape[1] // 2
        acc = acc[:, :half] + acc[:, half:]
    return acc[:, 0]


def _faiss_top(sims: np.ndarray, heap_ids: np.ndarray, k: int) -> np.ndarray:
    """Positions (into `sims`, in scan order) of the k results FAISS's heap keeps, best first.
    Scores that never enter it (NaN, -inf, the lowest float) are left out. Of the rows tied
    at the k-th score, the heap took those scanned before the k-th row at or above it, and
    each better row that came later evicted the one with the smallest heap id."""
    pos = np.flatnonzero(sims > _LOWEST)
    if len(pos) > k:
        vals = sims[pos]
        kth = np.partition(vals, len(vals) - k)[len(vals) - k]
        above = pos[vals > kth]
        reached = pos[vals >= kth][k - 1]  # the scan position where k rows >= kth were seen
        tied = pos[(vals == kth) & (pos <= reached)]
        tied = tied[np.argsort(-heap_ids[tied], kind="stable")[: k - len(above)]]
        pos = np.concatenate([above, tied])
    return pos[np.lexsort((-heap_ids[pos], -sims[pos]))]


def top_k(
    vectors: np.ndarray, q: np.ndarray, k: int, heap_ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(positions, scores) of the k rows FAISS's exhaustive inner-product search keeps, best
    first; `heap_ids` are the ids its heap holds (the row numbers of an IndexFlat, default)."""
    n, d = vectors.shape
    q = np.asarray(q, np.float32)
    ids = np.arange(n, dtype=np.int64) if heap_ids is None else heap_ids
    if n == 0 or k <= 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    if n * d <= EXACT_CELLS or k >= n:
        rows = np.arange(n, dtype=np.int64)
        sims = inner_products(vectors, q)
    else:
        # Any summation order errs by at most gamma_d · sum|v_i q_i| <= gamma_d · max|v| ·
        # sum|q| (Higham, 3.1): BLAS's and FAISS's scores differ by at most twice that.
        approx = vectors @ q
        gamma = d * 2.0**-24 / (1 - d * 2.0**-24)
        big = max(float(vectors.max()), -float(vectors.min()))
        slack = 2.5 * gamma * big * float(np.abs(q).sum()) + 1e-30
        finite = np.isfinite(approx)
        if np.isfinite(slack):
            low = np.where(finite, approx - slack, -np.inf)
            kth = np.partition(low, n - k)[n - k]
            rows = np.flatnonzero(~finite | (approx + slack >= kth))
        else:  # a NaN or infinity among the vectors or the query: every score exactly
            rows = np.arange(n, dtype=np.int64)
        sims = inner_products(vectors[rows], q)
    keep = _faiss_top(sims, ids[rows], k)
    return rows[keep], sims[keep]


class _Saved:
    """A saved index file held open (read with pread; closed with the object)."""

    def __init__(self, fd: int, dim: int, ntotal: int):
        self._fd = fd
        self.d = dim
        self.ntotal = ntotal
        weakref.finalize(self, os.close, fd)

    def _result(self, k: int, sims: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, ...]:
        """FAISS's `search` shape: [1, k] scores and labels, -1 past the results."""
        out_sims = np.full((1, k), _LOWEST, np.float32)
        out_ids = np.full((1, k), -1, np.int64)
        out_sims[0, : len(sims)], out_ids[0, : len(labels)] = sims, labels
        return out_sims, out_ids


class SavedFlat(_Saved):
    """An IndexIDMap2(IndexFlatIP) file: searched as FAISS searches it."""

    def __init__(self, fd: int, dim: int, ntotal: int, rows_at: int, ids_at: int):
        super().__init__(fd, dim, ntotal)
        self._rows_at, self._ids_at = rows_at, ids_at

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
        n, d = self.ntotal, self.d
        rows = np.frombuffer(read_at(self._fd, self._rows_at, 4 * n * d), "<f4").reshape(n, d)
        labels = np.frombuffer(read_at(self._fd, self._ids_at, 8 * n), "<i8")
        found, sims = top_k(rows, x[0], k)
        return self._result(k, sims, labels[found])


class SavedIVF(_Saved):
    """An IndexIVFFlat (inner product) file: the centroids read once, the probed lists at
    each search."""

    def __init__(
        self,
        fd: int,
        dim: int,
        ntotal: int,
        centroids: np.ndarray,
        sizes: np.ndarray,
        starts: np.ndarray,
        nprobe: int,
    ):
        super().__init__(fd, dim, ntotal)
        self.nlist = len(centroids)
        self.nprobe = nprobe
        self._centroids, self._sizes, self._starts = centroids, sizes, starts

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
        q = np.asarray(x[0], np.float32)
        probe = min(self.nlist, max(1, int(self.nprobe)))
        lists, _ = top_k(self._centroids, q, probe)  # best first, as FAISS scans them
        lists = lists[self._sizes[lists] > 0]
        row_bytes = 4 * self.d + 8
        vecs, labels = [], []
        for li in lists.tolist():
            size = int(self._sizes[li])
            raw = read_at(self._fd, int(self._starts[li]), size * row_bytes)
            vecs.append(np.frombuffer(raw, "<f4", size * self.d).reshape(size, self.d))
            labels.append(np.frombuffer(raw, "<i8", size, 4 * size * self.d))
        if not vecs:
            return self._result(k, np.zeros(0, np.float32), np.zeros(0, np.int64))
        every = np.concatenate(labels)
        found, sims = top_k(np.concatenate(vecs), q, k, heap_ids=every)
        return self._result(k, sims, every[found])


@dataclass(frozen=True)
class _Head:
    dim: int
    ntotal: int
    end: int  # offset after the header


def _header(buf: bytes, at: int, fourcc: bytes) -> _Head | None:
    """A trained inner-product index header with this fourcc at `at`."""
    if buf[at : at + 4] != fourcc or len(buf) < at + 4 + _HEADER.size:
        return None
    dim, ntotal, _, _, is_trained, metric = _HEADER.unpack_from(buf, at + 4)
    if metric != METRIC_INNER_PRODUCT or is_trained != 1 or dim <= 0 or ntotal < 0:
        return None
    return _Head(dim, ntotal, at + 4 + _HEADER.size)


def _u64(buf: bytes, at: int) -> int | None:
    return _U64.unpack_from(buf, at)[0] if len(buf) >= at + 8 else None


def _parse_flat(fd: int, size: int, head: bytes) -> SavedFlat | None:
    outer = _header(head, 0, b"IxM2")
    if outer is None:
        return None
    inner = _header(head, outer.end, b"IxFI")
    if inner is None or (inner.dim, inner.ntotal) != (outer.dim, outer.ntotal):
        return None
    dim, n = outer.dim, outer.ntotal
    if _u64(head, inner.end) != n * dim:
        return None
    rows_at = inner.end + 8
    ids_at = rows_at + 4 * n * dim + 8
    if ids_at + 8 * n != size or _u64(read_at(fd, ids_at - 8, 8), 0) != n:
        return None
    return SavedFlat(fd, dim, n, rows_at, ids_at)


def _parse_ivf(fd: int, size: int, head: bytes) -> SavedIVF | None:
    ivf = _header(head, 0, b"IwFl")
    if ivf is None or len(head) < ivf.end + 16:
        return None
    dim, n = ivf.dim, ivf.ntotal
    nlist, nprobe = _u64(head, ivf.end), _u64(head, ivf.end + 8)
    quantizer = _header(head, ivf.end + 16, b"IxFI")
    if nlist is None or nprobe is None or quantizer is None or nlist < 1:
        return None
    if (quantizer.dim, quantizer.ntotal) != (dim, nlist):
        return None
    if _u64(head, quantizer.end) != nlist * dim:
        return None
    centroids_at = quantizer.end + 8
    at = centroids_at + 4 * nlist * dim  # the direct map, then the inverted lists
    if at + 1 + 8 + 4 + 16 + 4 + 8 > size:
        return None
    tail = read_at(fd, at, min(size - at, HEAD_BYTES))
    if _U8.unpack_from(tail, 0)[0] != 0 or _u64(tail, 1) != 0:
        return None  # a direct map (ClsIndex keeps none)
    if tail[9:13] != b"ilar" or _u64(tail, 13) != nlist or _u64(tail, 21) != 4 * dim:
        return None
    kind, count = tail[29:33], _u64(tail, 33)
    if count is None or count > 2 * nlist:
        return None
    sizes_at = at + 41
    data_at = sizes_at + 8 * count
    if data_at > size:
        return None
    table = np.frombuffer(read_at(fd, sizes_at, 8 * count), "<u8").astype(np.int64)
    sizes = np.zeros(nlist, np.int64)
    if kind == b"full" and count == nlist:
        sizes[:] = table
    elif kind == b"sprs" and count % 2 == 0:
        which, counts = table[0::2], table[1::2]
        if len(which) and (which.min() < 0 or which.max() >= nlist or np.any(np.diff(which) <= 0)):
            return None
        sizes[which] = counts
    else:
        return None
    if sizes.min() < 0 or int(sizes.sum()) != n:
        return None
    ends = data_at + np.cumsum(sizes * (4 * dim + 8))
    if int(ends[-1]) != size:
        return None
    starts = ends - sizes * (4 * dim + 8)
    centroids = np.frombuffer(read_at(fd, centroids_at, 4 * nlist * dim), "<f4")
    return SavedIVF(fd, dim, n, centroids.reshape(nlist, dim), sizes, starts, int(nprobe))


def open_saved(path: str, kind: str) -> SavedFlat | SavedIVF | None:
    """The saved [CLS] index of this kind ("flat" or "ivf") at `path`, ready to search without
    FAISS, or None (not one this module reads, damaged, or a width or CPU whose FAISS scores
    it cannot reproduce: the caller reads it through FAISS)."""
    if not AVAILABLE or LANES is None or kind not in ("flat", "ivf"):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    saved: SavedFlat | SavedIVF | None = None
    try:
        size = os.fstat(fd).st_size
        head = read_at(fd, 0, min(size, HEAD_BYTES), exact=False)
        saved = _parse_flat(fd, size, head) if kind == "flat" else _parse_ivf(fd, size, head)
    except (OSError, ShortRead, struct.error, ValueError):
        saved = None
    if saved is None or not supported(saved.d):
        if saved is None:
            os.close(fd)
        return None  # (a parsed index closes its descriptor when collected)
    return saved
