"""Every user mistake and environment failure: one line on stderr, exit 2 (usage) or 1 (tool),
never a traceback. Extend the table whenever a new one is found.

Each case runs `piaa` as a user does (a real process), against a small indexed library.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.image_files import make_photo_folder


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, tiny_model_config: Path) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("bad-args")
    photos = make_photo_folder(base / "photos", n=8)
    (base / "random.db").write_bytes(os.urandom(5000))
    (base / "empty.db").write_bytes(b"")
    (base / "text.db").write_text("not a database\n")
    (base / "photo.jpg").write_bytes(photos.good[0].read_bytes())
    home = base / "home"
    env = _env(home, tiny_model_config)
    for args in (["index", str(photos.root)], ["vocab", "set", "red circle", "blue circle"]):
        subprocess.run([sys.executable, "-m", "piaa_index", *args], env=env, check=True)
    return {"base": base, "home": home, "photos": photos.root, "model": tiny_model_config}


def _env(home: Path, model: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIAA_")}
    env.update(PIAA_HOME=str(home), PIAA_MODEL=str(model), PIAA_PRETRAINED="none")
    env["PIAA_DEVICE"] = "cpu"
    return env


# (arguments, expected exit code, a piece of the message). {base} and {photos} are filled in.
CASES: list[tuple[list[str], int, str]] = [
    (["search", "zebra"], 2, "unknown label"),
    (["search", "red circle AND"], 2, ""),
    (["search", "red circle", "--limit", "-5"], 2, "--limit must be 0"),
    (["tags", "{base}/nope.jpg"], 2, "no such file: "),
    (["similar", "{base}/nope.jpg"], 2, "no such file: "),
    (["tags", "{base}/photo.jpg"], 2, "not in the index"),
    (["index", "{base}/does-not-exist"], 2, "no such file or folder"),
    (["index", "{photos}", "--batch-size", "0"], 2, "batch size must be at least 1"),
    (["index", "{photos}", "--batch-size", "-3"], 2, "batch size must be at least 1"),
    (["index", "{photos}", "--read-timeout", "0"], 2, "--read-timeout"),
    (["index", "{photos}", "--read-timeout", "soon"], 2, "--read-timeout"),
    (["index"], 2, "give files or folders"),
    (["vocab", "set", "x", "--template", "a {x} photo {}"], 2, "exactly one '{}'"),
    (["vocab", "set", "x", "--template", "no slot"], 2, "exactly one '{}'"),
    (["vocab", "set", "and"], 2, "query operator"),
    (["vocab", "set", 'a "quoted" label'], 2, "reserved by the query language"),
    (["vocab", "preset", "nope"], 2, ""),
    (["export", "csv", "--output", "{base}/no/such/dir/x.csv"], 1, "No such file or directory"),
    (["export", "json", "--output", "{base}"], 1, ""),
    (["export", "xmp", "--naming", "lightroom"], 2, "--naming must be one of append, replace"),
    (["export", "xmp", "--prefix", "a|b"], 2, "--prefix must not contain"),
    (["export", "xmp", "--overwrite"], 2, "--overwrite"),
    (["--db", "sqlite:///{base}/random.db", "status"], 1, "is not a SQLite database"),
    (["--db", "sqlite:///{base}/text.db", "status"], 1, "is not a SQLite database"),
    (["--db", "sqlite:///{base}/photo.jpg", "status"], 1, "is not a SQLite database"),
    (["--db", "sqlite:///{base}/empty.db", "status"], 1, "is empty (0 bytes)"),
    (["--db", "nosuchdialect://x", "status"], 2, "database URL"),
    (["--home", "/proc/piaa-cannot-be-here", "status"], 1, ""),
    (["--model", "no-such-model-anywhere", "--home", "{base}/other", "index", "{photos}"], 1, ""),
    (["eval", "{base}/does-not-exist"], 2, ""),
    (["nosuchcommand"], 2, "No such command"),
    (["fit", "--bank-size", "0"], 2, "bank size must be at least 1"),
    (["fit", "--bank-size", "-1"], 2, "bank size must be at least 1"),
    (["--db", "sqlite:///{base}/caf\udce9.db", "status"], 2, "is not valid UTF-8"),
    (["--home", "{base}/caf\udce9", "status"], 2, "is not valid UTF-8"),
    (["--home", "{base}/random.db", "status"], 2, "is a file"),
    (["--db", "sqlite:////proc/piaa-cannot-be-here/x.db", "status"], 1, ""),
    (["similar", ""], 2, "is a folder, not an image file"),
    (["tags", ""], 2, "no such file: ''"),
    (["tags", "{photos}"], 2, "is a folder, not an image file"),
    (["vocab", "set", ""], 2, "empty label"),
    (["search", ""], 2, "give a label EXPRESSION"),
]


@pytest.mark.parametrize(("args", "code", "message"), CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_arguments_exit_cleanly(
    world: dict[str, Path], args: list[str], code: int, message: str
) -> None:
    filled = [
        a.replace("{base}", str(world["base"])).replace("{photos}", str(world["photos"]))
        for a in args
    ]
    result = subprocess.run(
        [sys.executable, "-m", "piaa_index", *filled],
        env=_env(world["home"], world["model"]),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    # One line of explanation (click's usage errors add a "Usage:" / "Try" header).
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines and len(lines) <= 4, result.stderr
