"""The CLI's rough edges a new user met (issue 22, item 5): `--output -`, the width of `piaa
tags`, `piaa --help` as one page, `vocab set --from FILE`, "no such file", the offline
default-model message, shell completion. Each runs the real CLI on a real library."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from piaa_index.cli import cli
from tests.cli_main import run_main


@pytest.fixture(autouse=True)
def _in_tmp_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own folder: a regression writes no file named `-` in the repo."""
    monkeypatch.chdir(tmp_path)


def library_args(home: Path) -> list[str]:
    return ["--home", str(home), "--db", f"sqlite:///{home / 'piaa.sqlite3'}", "-q"]


def invoke(home: Path, *args: str, input: str | None = None) -> Result:
    """`piaa --home HOME ARGS` in process (stdout and stderr apart); exit 0 expected."""
    result = CliRunner().invoke(
        cli, [*library_args(home), *args], catch_exceptions=False, input=input
    )
    assert result.exit_code == 0, result.stdout + result.stderr
    return result


# ---- 1. --output - is standard output ---------------------------------------------------------


def test_export_json_output_dash_writes_to_stdout(
    shapes_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a file named `-` in the current folder and only the summary on stdout."""
    monkeypatch.chdir(tmp_path)
    result = invoke(shapes_home, "export", "json", "--output", "-")
    data = json.loads(result.stdout)  # the data alone: the summary went to stderr
    assert data and all(set(item) == {"path", "labels"} for item in data)
    assert "json:" in result.stderr and f"{len(data)} images" in result.stderr
    assert not (tmp_path / "-").exists()
    # The file form is unchanged and holds the same data.
    invoke(shapes_home, "export", "json", "--output", str(tmp_path / "tags.json"))
    assert json.loads((tmp_path / "tags.json").read_text(encoding="utf-8")) == data


def test_export_csv_output_dash_writes_to_stdout(
    shapes_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke(shapes_home, "export", "csv", "--output", "-")
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["path", "label", "score"] and len(rows) > 1
    assert all(len(row) == 3 for row in rows)
    assert "csv:" in result.stderr
    assert not (tmp_path / "-").exists()
    invoke(shapes_home, "export", "csv", "--output", str(tmp_path / "tags.csv"))
    with open(tmp_path / "tags.csv", newline="", encoding="utf-8") as fh:
        assert list(csv.reader(fh)) == rows


def test_export_output_dash_with_json_summary_is_a_usage_error(
    shapes_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main(
        [*library_args(shapes_home), "export", "json", "--output", "-", "--json"],
        monkeypatch,
        capsys,
    )
    assert code == 2 and out == ""
    assert "--output -" in err and "Traceback" not in err
    assert not (tmp_path / "-").exists()


def first_tagged(home: Path) -> tuple[str, str]:
    """An indexed image of the library and a label present on it."""
    rows = json.loads(invoke(home, "export", "json", "--output", "-").stdout)
    item = next(i for i in rows if i["labels"])
    return item["path"], item["labels"][0]["label"]


def test_evidence_map_output_dash_writes_the_png_to_stdout(
    shapes_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    image, label = first_tagged(shapes_home)
    result = CliRunner().invoke(
        cli,
        [*library_args(shapes_home), "tags", image, "--evidence", label, "--output", "-"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout_bytes.startswith(b"\x89PNG\r\n\x1a\n")
    assert not (tmp_path / "-").exists()


# ---- 5. "no such file" is not "not in the index" ----------------------------------------------


def test_tags_of_a_missing_file_says_no_such_file(
    shapes_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Before: "not in the index: missing.jpg (run `piaa index` on its folder)" for a typo."""
    monkeypatch.chdir(tmp_path)
    args = library_args(shapes_home)
    code, out, err = run_main([*args, "tags", "missing.jpg"], monkeypatch, capsys)
    assert (code, out) == (2, "")
    assert err.strip() == "Error: no such file: missing.jpg"
    # An existing photo that is not indexed keeps the hint to index its folder.
    image, _ = first_tagged(shapes_home)
    stranger = tmp_path / "stranger.jpg"
    stranger.write_bytes(Path(image).read_bytes())
    code, _, err = run_main([*args, "tags", str(stranger)], monkeypatch, capsys)
    assert code == 2
    assert err.strip() == f"Error: not in the index: {stranger} (run `piaa index` on its folder)"
    # An indexed photo is still found by its path as typed (relative), absolute, or resolved.
    monkeypatch.chdir(Path(image).parent)
    for typed in (Path(image).name, image):
        code, out, err = run_main([*args, "tags", "--json", typed], monkeypatch, capsys)
        assert code == 0, err
        assert {row["path"] for row in json.loads(out)} == {image}


# ---- 2. `piaa tags` fits a terminal -----------------------------------------------------------


def test_tags_table_fits_a_terminal_with_no_empty_column(shapes_home: Path) -> None:
    """Before: 180+ columns (the path on every row, scores of every kind, an always-empty
    support_gate). Now the path once, then label, score, present, label status, short why."""
    image, label = first_tagged(shapes_home)
    out = invoke(shapes_home, "tags", image).stdout
    lines = out.rstrip("\n").splitlines()
    assert max(len(line) for line in lines) <= 100, out
    assert lines[0].startswith(image) and out.count(image) == 1
    header, rule, *body = lines[1:]
    assert header.split() == ["label", "score", "present", "label", "status", "why"]
    # Every column has something in it on some row (the rule gives the column spans).
    spans, start = [], 0
    for dashes in rule.split("  "):
        spans.append((start, start + len(dashes)))
        start += len(dashes) + 2
    for lo, hi in spans:
        assert any(row[lo:hi].strip() for row in body), (header[lo:hi], out)
    rows = json.loads(invoke(shapes_home, "tags", "--json", image).stdout)
    assert len(body) == len(rows)
    by_label = {row.split("  ")[0].strip(): row for row in body}
    assert by_label[label][len(label) :].split()[1:] == [
        "yes",
        "present",
        "confidence",
        ">=",
        "0.5",
    ]
    # --json keeps every field.
    assert set(rows[0]) == {
        "path", "label", "score", "patch_score", "cls_score", "present", "threshold",
        "text_support", "support_gate", "label_status", "learnt", "why",
    }  # fmt: skip
    assert {r["path"] for r in rows} == {image}


def test_tags_table_with_present_only_and_limit(shapes_home: Path) -> None:
    image, label = first_tagged(shapes_home)
    out = invoke(shapes_home, "tags", image, "--present-only", "--limit", "1").stdout
    lines = out.rstrip("\n").splitlines()
    assert len(lines) == 4 and lines[3].startswith(label)
    assert "(1 of 1 labels present)" in lines[0]


# ---- 6. the offline default model ---------------------------------------------------------------


def piaa_process(
    args: list[str], home: Path, cwd: Path, **env: str
) -> subprocess.CompletedProcess[str]:
    """`python -m piaa_index ARGS` in a fresh process, as a user runs `piaa`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PIAA_", "HF_"))}
    return subprocess.run(
        [sys.executable, "-m", "piaa_index", *args],
        capture_output=True,
        text=True,
        env={**base, "PIAA_HOME": str(home), "PIAA_DEVICE": "cpu", **env},
        cwd=cwd,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("endpoint", "reason"),
    [
        # RFC 2606: .invalid never resolves; port 9 (discard) refuses connections.
        ("http://piaa-no-network.invalid", "cannot reach piaa-no-network.invalid: the name"),
        ("http://127.0.0.1:9", "cannot reach 127.0.0.1:9: Connection refused"),
    ],
    ids=["name does not resolve", "connection refused"],
)
def test_offline_first_index_says_what_happened_and_the_ways_out(
    endpoint: str, reason: str, tmp_path: Path
) -> None:
    """Before: "no answer from https://huggingface.co in 3 s" after 0.7 s (the name did not
    resolve), and no word of the offline ways out. The failed run leaves no library that claims
    a model, so the way out it names works in the same home."""
    from piaa_index.shapes.dataset import generate_dataset

    scenes = generate_dataset(tmp_path / "scenes", 6, seed=9, size=96, progress=False)
    home, cache = tmp_path / "home", tmp_path / "hf-cache"
    cache.mkdir()
    offline = {"HF_ENDPOINT": endpoint, "HF_HUB_CACHE": str(cache)}
    proc = piaa_process(["index", str(scenes)], home, tmp_path, **offline)
    assert proc.returncode == 1, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("Error: the ViT-B-16 weights 'openai' are not on this machine")
    assert reason in line and "no answer" not in line
    for way_out in ("`piaa demo`", "--model shapesworld", "--pretrained PATH"):
        assert way_out in line
    # What is left: a schema with no model record and no vectors (as `piaa status` leaves it).
    assert not (home / "vectors").exists()
    status = piaa_process(["status", "--json"], home, tmp_path, **offline)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["model"] is None
    assert json.loads(status.stdout)["images"]["indexed"] == 0
    # The way out, in the same home: not refused as "indexed with another model".
    proc = piaa_process(["index", str(scenes), "--model", "shapesworld"], home, tmp_path, **offline)
    assert proc.returncode == 0, proc.stderr
    status = piaa_process(["status", "--json"], home, tmp_path, **offline)
    assert json.loads(status.stdout)["model"]["model"] == "shapesworld"
    assert json.loads(status.stdout)["images"]["indexed"] == 6


def test_a_silent_server_is_the_one_that_gets_no_answer() -> None:
    """Only a server that accepts and never answers is "no answer in N s"."""
    import socket
    import time

    from piaa_index.model import weights

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)  # the kernel accepts the connection; nobody ever answers
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        problems: list[str] = []
        start = time.monotonic()
        assert not weights.endpoint_answers(url, timeout=0.5, problems=problems)
        assert time.monotonic() - start >= 0.45
    assert problems == [f"no answer from 127.0.0.1:{url.rsplit(':', 1)[1]} in 0.5 s"]


# ---- 4. vocab set/add --from FILE ---------------------------------------------------------------

LABEL_FILE = (
    "# the shapes we care about\n"
    "red circle\n"
    "\n"
    "  blue square  \n"
    "#green circle (commented out)\n"
    "C# sharp\n"
)


def test_vocab_set_and_add_from_a_file_and_stdin(tmp_path: Path) -> None:
    home = tmp_path / "home"
    labels = tmp_path / "labels.txt"
    labels.write_text(LABEL_FILE, encoding="utf-8")
    out = invoke(home, "vocab", "set", "--from", str(labels), "--json").stdout
    assert json.loads(out)["labels"] == ["red circle", "blue square", "C# sharp"]
    # `-` is standard input; LABELS given as arguments come first.
    out = invoke(home, "vocab", "add", "star", "--from", "-", "--json", input="sun\n\nmoon\n")
    assert json.loads(out.stdout)["labels"][-3:] == ["star", "sun", "moon"]
    out = invoke(home, "vocab", "set", "--from", "-", "--json", input="\ufeffdog\r\ncat\r\n")
    assert json.loads(out.stdout)["labels"] == ["dog", "cat"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"dog\n\xff\xfecat\n", "is not UTF-8 text (byte 4)"),
        (b"# nothing but comments\n\n", "holds no labels"),
        (b"dog\x00cat\n", "holds NUL bytes"),
        (None, "cannot read the label file"),  # no such file
        ("folder", "cannot read the label file"),  # a folder
    ],
    ids=["not utf-8", "empty", "binary", "missing", "folder"],
)
def test_vocab_set_from_a_malformed_file_exits_2(
    content: bytes | str | None,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    home = tmp_path / "home"
    source = tmp_path / "labels.txt"
    if isinstance(content, bytes):
        source.write_bytes(content)
    elif content == "folder":
        source.mkdir()
    args = [*library_args(home), "vocab", "set", "--from", str(source)]
    code, out, err = run_main(args, monkeypatch, capsys)
    assert (code, out) == (2, ""), err
    assert message in err and str(source) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    # Nothing was changed: the vocabulary is still empty.
    code, out, _ = run_main([*library_args(home), "vocab", "list", "--json"], monkeypatch, capsys)
    assert code == 0 and json.loads(out)["labels"] == []


def test_vocab_set_needs_labels_or_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_main([*library_args(tmp_path / "home"), "vocab", "set"], monkeypatch, capsys)
    assert code == 2 and "give LABELS or --from FILE" in err


# ---- 3. `piaa --help` reads as one page -------------------------------------------------------


def listed_commands(help_text: str) -> dict[str, str]:
    """name → one-line help of the commands a help page lists (any section before options)."""
    import re

    listed = {}
    if "\nCommands:" in help_text:  # a sub-group's page: options, then commands
        section = help_text.split("\nCommands:")[1]
    else:  # `piaa --help`: the commands by section, then the global options
        section = help_text.split("\nGlobal options")[0]
    for line in section.splitlines():
        if m := re.match(r"^  ([a-z][\w-]*) {2,}(\S.*)$", line):
            listed[m.group(1)] = m.group(2)
    return listed


def help_page(*args: str, width: int = 80) -> str:
    result = CliRunner().invoke(cli, [*args, "--help"], terminal_width=width)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_every_command_summary_is_a_whole_sentence_that_fits() -> None:
    """Before: "search   Images matching a label EXPRESSION, e.g." and six summaries cut with
    "..." in `piaa --help`, more in `piaa db/models/shapes/export/vocab --help`."""
    top = help_page()
    assert max(len(line) for line in top.splitlines()) <= 80, top
    pages = {"piaa": listed_commands(top)}
    assert {"demo", "index", "vocab", "search", "tags", "export", "serve", "db"} <= set(
        pages["piaa"]
    )
    for name, command in sorted(cli.commands.items()):
        if isinstance(command, click.Group) or name == "export":
            pages[f"piaa {name}"] = listed_commands(help_page(name))
    assert pages["piaa export"].keys() >= {"csv", "json", "xmp"}
    for page, listed in pages.items():
        assert listed, page
        for name, summary in listed.items():
            where = f"{page}: {name}  {summary}"
            assert summary.endswith(".") and not summary.endswith("..."), where
            assert not summary.endswith(("e.g.", "i.e.")), where
    assert pages["piaa"]["search"] == "Find images by a label expression or by any text phrase."


def test_top_help_is_one_page_in_sections_with_the_first_steps() -> None:
    text = help_page()
    # What piaa is, then the commands by section, the global options, the first steps.
    order = ["Tag and search photo", "Start:", "Find:", "Share:", "Global options", "First steps"]
    positions = [text.index(part) for part in order]
    assert positions == sorted(positions), text
    start = text[text.index("Start:") : text.index("Find:")]
    assert [line.split()[0] for line in start.splitlines()[1:] if line.strip()][:2] == [
        "demo",
        "index",
    ]
    steps = text[text.index("First steps") :]
    for step in ("piaa demo", "piaa index ", "piaa vocab set ", "piaa search "):
        assert step in steps
    assert "_PIAA_COMPLETE=bash_source piaa" in steps
    # Each command appears once.
    listed = [line.split()[0] for line in text.splitlines() if line.startswith("  ") and not
              line.startswith(("  -", "   ")) and line.split()[0].isalpha()]  # fmt: skip
    commands = [name for name in listed if name in cli.list_commands(click.Context(cli))]
    assert len(commands) == len(set(commands))


# ---- 7. shell completion --------------------------------------------------------------------


def test_shell_completion_script_and_completions(tmp_path: Path) -> None:
    """The documented line prints a script; bash, sourcing it, completes commands."""
    import shutil

    for shell, marker in (
        ("bash", "complete -o nosort -F _piaa_completion piaa"),
        ("zsh", "#compdef piaa"),
        ("fish", "complete --no-files --command piaa"),
    ):
        proc = piaa_process([], tmp_path / "home", tmp_path, _PIAA_COMPLETE=f"{shell}_source")
        assert proc.returncode == 0, proc.stderr
        assert marker in proc.stdout, proc.stdout
    # The documented places mention it.
    root = Path(__file__).resolve().parent.parent
    for doc in ("README.md", "docs/cli.md"):
        assert "_PIAA_COMPLETE=bash_source piaa" in (root / doc).read_text(encoding="utf-8")
    script = Path(sys.executable).with_name("piaa")
    bash = shutil.which("bash")
    if bash is None or not script.is_file():
        pytest.skip("no bash or no installed `piaa` script to complete with")
    line = (
        'eval "$(_PIAA_COMPLETE=bash_source piaa)"; '
        "COMP_WORDS=(piaa voc); COMP_CWORD=1; _piaa_completion piaa; echo ${COMPREPLY[@]}; "
        "COMPREPLY=(); COMP_WORDS=(piaa vocab se); COMP_CWORD=2; _piaa_completion piaa; echo ${COMPREPLY[@]}"
    )
    env = {**os.environ, "PATH": f"{script.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(
        [bash, "-c", line], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["vocab", "set"], proc.stdout
