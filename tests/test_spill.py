"""The spilled array (piaa_index/spill.py): what learning reads the labelled images' patches
from. Every read must give exactly the rows appended, in the order asked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from piaa_index.method.learning import Examples, LearnParams, learn
from piaa_index.spill import SpilledArray


def test_rows_read_back_are_the_rows_appended(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    whole = rng.standard_normal((5000, 7, 3)).astype(np.float16)
    spilled = SpilledArray((7, 3), np.float16, tmp_path / "spill")
    for start in range(0, len(whole), 613):  # blocks of uneven size, as shards give them
        spilled.append(whole[start : start + 613])
    assert spilled.shape == whole.shape and len(spilled) == 5000
    assert list((tmp_path / "spill").iterdir()) == []  # unnamed: nothing left to clean up
    np.testing.assert_array_equal(spilled[:], whole)
    np.testing.assert_array_equal(spilled[1200:3100], whole[1200:3100])
    np.testing.assert_array_equal(spilled[4990:9000], whole[4990:])
    np.testing.assert_array_equal(spilled[10:400:7], whole[10:400:7])
    picks = rng.choice(5000, 2500, replace=False)
    np.testing.assert_array_equal(spilled[picks], whole[picks])  # any order, runs or not
    np.testing.assert_array_equal(spilled[np.sort(picks)], whole[np.sort(picks)])
    mask = rng.random(5000) < 0.3
    np.testing.assert_array_equal(spilled[mask], whole[mask])
    assert spilled[np.array([], np.int64)].shape == (0, 7, 3)
    with pytest.raises(IndexError):
        spilled[np.array([5000])]
    with pytest.raises(ValueError):
        spilled.append(np.zeros((2, 3, 7), np.float16))
    spilled.close()


def test_learning_from_spilled_patches_learns_exactly_what_it_learns_in_memory(
    tmp_path: Path,
) -> None:
    """3,000 labelled images: the held-out batches and the training rows read from the file
    give the same rows, confidences and choices as the patches held in memory."""
    rng = np.random.default_rng(1)
    n, M, d, C = 3000, 8, 16, 3
    Y = (rng.random((n, C)) < 0.3).astype(np.int8)
    X = rng.standard_normal((n, M, d)).astype(np.float32)
    for c in range(C):
        X[Y[:, c] == 1, c, c] += 3.0
    X = (X / np.linalg.norm(X, axis=2, keepdims=True)).astype(np.float16)
    spilled = SpilledArray((M, d), np.float16, tmp_path)
    spilled.append(X)
    # Training-free rows half-way off their label's direction: the labels must turn them.
    W0 = (np.eye(C, d) + rng.standard_normal((C, d))).astype(np.float32)
    T = np.eye(C, d, dtype=np.float32)
    args = (W0, np.zeros(C, np.float32), T, 1.0)
    params = LearnParams(steps=60, lr=0.01, batch_images=700)  # several held-out batches per fold
    cls, bg = X.astype(np.float32).mean(axis=1), np.zeros((n, M), np.float32)
    held = learn(Examples(X, bg, cls, Y), *args, params=params)
    read = learn(Examples(spilled, bg, cls, Y), *args, params=params)
    assert held.chosen.any()
    for name in ("W", "b", "cls_protos", "slope", "intercept", "chosen"):
        np.testing.assert_array_equal(getattr(read, name), getattr(held, name), err_msg=name)
    assert read.report == held.report
