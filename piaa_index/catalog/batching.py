"""The one batching loop of the store: long lists of ids, paths or rows go to SQL a slice at a
time, so each statement binds a bounded number of parameters (SQLite builds before 3.32 allow
999)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, TypeVar, cast

BATCH = 500

_S = TypeVar("_S", bound=Sequence[Any])


def chunks(seq: _S, size: int = BATCH) -> Iterator[_S]:
    """`seq[0:size]`, `seq[size:2 * size]`, ...: its slices, of its own type (a list's are
    lists, a numpy array's are arrays); none for an empty `seq`."""
    for start in range(0, len(seq), size):
        yield cast(_S, seq[start : start + size])
