"""`piaa index` says what it is doing before the slow parts (issue 23: something visible within
half a second, a line while the model loads): the notes come through the same progress channel
as the bars, before any image is read."""

from __future__ import annotations

from pathlib import Path

from piaa_index.library.core import Library
from piaa_index.shapes.dataset import generate_dataset


def test_index_reports_the_model_load_and_the_scan_before_any_image(tmp_path: Path) -> None:
    generate_dataset(tmp_path / "scenes", 6, seed=9, size=96, progress=False)
    seen: list[tuple[str, int, int]] = []

    def report(stage: str, done: int, total: int) -> None:
        seen.append((stage, done, total))

    with Library.open(home=tmp_path / "home", model="shapesworld") as lib:
        lib.index([tmp_path / "scenes" / "images"], progress=report)
        stages = [s for s, _, _ in seen]
        assert stages[0].startswith("loading the model shapesworld")
        assert stages[1].startswith("model loaded in")
        assert stages[2] == "scanning 1 path…"
        first_image = next(i for i, (_, done, _) in enumerate(seen) if done > 0)
        assert first_image > 2

        # A library that already has its model record loads no model to find nothing new.
        seen.clear()
        lib2 = Library.open(home=tmp_path / "home")
        report_ = lib2.index([tmp_path / "scenes" / "images"], progress=report)
        assert report_.unchanged == 6
        assert not any(s.startswith("loading the model") for s, _, _ in seen)
        assert lib2._encoder is None
        lib2.close()
