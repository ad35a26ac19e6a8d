"""Write tests/fixtures/library-<version>/: a small library made by the `piaa` of this checkout,
and what it answered, so later releases are tested to open it and answer the same
(tests/test_compat_fixture.py).

Only the CLI is used, so the script works on any release. The library is built under a fixed
absolute path (FIXTURE_ROOT): the paths stored in its database are those, and the test asks for
images by them (a path the index holds answers even when the file is gone).

    .venv/bin/python tools/make_compat_fixture.py tests/fixtures/library-0.1.0
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

FIXTURE_ROOT = Path("/tmp/piaa-compat-fixture")
LABELS = ["pine tree", "honeycomb", "car", "clock face", "beach ball", "traffic light"]
QUERIES = [
    "car",
    '"pine tree" AND honeycomb',
    '"clock face" OR "beach ball"',
    '"traffic light" AND NOT car',
    '"my thing"',
]


def piaa(*args: str, home: Path | None = None) -> str:
    cmd = [sys.executable, "-m", "piaa_index"]
    if home is not None:
        cmd += ["--home", str(home), "--model", "shapesworld"]
    done = subprocess.run(
        [*cmd, *args], capture_output=True, text=True, check=True, env=dict(os.environ)
    )
    return done.stdout


def answers(home: Path, images: list[str]) -> dict:
    """What the library answers: the calls tests/test_compat_fixture.py repeats."""
    out: dict = {
        "status": json.loads(piaa("status", "--json", home=home)),
        "vocab": json.loads(piaa("vocab", "list", "--json", home=home)),
        "labels_export": piaa("labels", "export", home=home),
        "tags": {p: json.loads(piaa("tags", p, "--json", home=home)) for p in images},
        "search": {
            q: json.loads(piaa("search", q, "--json", "--limit", "100", home=home)) for q in QUERIES
        },
        "similar": json.loads(piaa("similar", images[0], "--json", "--limit", "10", home=home)),
        "evidence": json.loads(piaa("tags", images[1], "--evidence", "car", "--json", home=home)),
    }
    return out


def build(root: Path) -> list[str]:
    home, scenes = root / "home", root / "scenes"
    piaa("shapes", "generate", str(scenes), "--images", "60", "--seed", "7", "--size", "128")
    images = scenes / "images"
    piaa("index", str(images), home=home)
    piaa("vocab", "set", *LABELS, home=home)
    piaa("fit", home=home)
    # The user's own labels (learnt from by the fit) and a taught concept (its own fit).
    piaa("labels", "set", str(images / "00003.jpg"), "car", "yes", home=home)
    piaa("labels", "set", str(images / "00004.jpg"), "car", "no", home=home)
    piaa("labels", "set", str(images / "00005.jpg"), "clock face", "yes", home=home)
    examples = [str(images / f"000{n}.jpg") for n in (10, 11, 12, 13)]
    piaa("teach", "my thing", *examples, "--not", str(images / "00014.jpg"), home=home)
    return sorted(str(p) for p in images.glob("*.jpg"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="e.g. tests/fixtures/library-0.1.0")
    args = parser.parse_args()
    shutil.rmtree(FIXTURE_ROOT, ignore_errors=True)
    FIXTURE_ROOT.mkdir(parents=True)
    images = build(FIXTURE_ROOT)
    recorded = answers(FIXTURE_ROOT / "home", images)
    version = piaa("--version").strip()
    args.out.mkdir(parents=True, exist_ok=True)
    # One archive (the lock files left out): the library as its release left it.
    with tarfile.open(args.out / "library.tar.gz", "w:gz") as tar:
        for path in sorted((FIXTURE_ROOT / "home").rglob("*")):
            if path.is_file() and not path.name.endswith(".lock"):
                tar.add(path, arcname=str(path.relative_to(FIXTURE_ROOT)))
    (args.out / "answers.json").write_text(
        json.dumps({"made_by": version, "root": str(FIXTURE_ROOT), **recorded}, indent=1) + "\n"
    )
    print(f"wrote {args.out} ({version}, {len(images)} images)")


if __name__ == "__main__":
    main()
