"""Progress of a long pass: a tqdm bar on stderr (the CLI) or a callback (the HTTP API's jobs).

`progress` arguments across the library take either a bool (bar or nothing) or a callable
`report(stage, done, total)`, called as the pass advances.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Union

Report = Callable[[str, int, int], None]
Progress = Union[bool, Report]  # noqa: UP007 - an alias evaluated at runtime on 3.10


@contextmanager
def progress_bar(total: int, desc: str, progress: Progress) -> Iterator[Callable[[int], None]]:
    """Yields `advance(n)`; a bar when `progress` is True, the callback when it is callable."""
    if callable(progress):
        report = progress
        done = 0
        report(desc, 0, total)

        def advance(n: int) -> None:
            nonlocal done
            done += n
            report(desc, done, total)

        yield advance
        return
    from tqdm import tqdm

    with tqdm(
        total=total,
        unit="img",
        desc=desc,
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        yield bar.update


def note(message: str, progress: Progress) -> None:
    """One line saying what a long command is doing now (opening, scanning, loading the model):
    on stderr when bars are shown, or the callback with a total of 0."""
    if callable(progress):
        progress(message, 0, 0)
    elif progress:
        print(message, file=sys.stderr, flush=True)
