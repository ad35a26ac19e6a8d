"""The one import of FAISS in `vectors/`: lazy, so that opening a library, a status or a
read-only search that needs no index does not load it (it is large, and starts OpenMP).

`method/open_pvcl.py` imports faiss itself (k-means of the background): `method/` sits below
`vectors/` in the layers (pyproject.toml), so it may not import this module.
"""

from __future__ import annotations

from typing import Any


def faiss() -> Any:
    """The `faiss` module, imported on first use."""
    import faiss as lib

    return lib
