"""The `piaa` command line: exit codes, output formats and the main flows, on real files.

Exit codes go through `main()` (which maps errors to 1/2 without a traceback), so they are
checked either in a real subprocess or by calling `main()`; output formats use CliRunner.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from piaa_index.cli import cli
from tests.cli_main import run_main
from tests.image_files import PhotoFolder, make_photo_folder

LABELS = ["red circle", "blue circle", "green circle"]
HEAVY = ("torch", "open_clip", "faiss")


@dataclass
class Home:
    """A CLI data folder (its own SQLite file) and the photo folder indexed into it."""

    home: Path
    photos: PhotoFolder

    def prefix(self) -> list[str]:
        return ["--home", str(self.home), "--db", f"sqlite:///{self.home / 'piaa.sqlite3'}"]


def invoke(home: Home, *args: str) -> Result:
    """Run `piaa [--home H --db URL] ARGS` in process; fail loudly on an unexpected error."""
    result = CliRunner().invoke(cli, [*home.prefix(), "-q", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def subprocess_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIAA_")}
    env["PIAA_HOME"] = str(home)
    env["PIAA_DEVICE"] = "cpu"
    return env


def run_piaa(args: list[str], home: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python -m piaa_index ARGS` in a fresh process."""
    return subprocess.run(
        [sys.executable, "-m", "piaa_index", *args],
        capture_output=True,
        text=True,
        env=subprocess_env(home),
        cwd=cwd,
        timeout=300,
    )


@pytest.fixture(scope="module")
def fitted_home(
    tiny_model_config: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Home]:
    """A library indexed, given a vocabulary and fitted through the CLI (shared, read-mostly)."""
    base = tmp_path_factory.mktemp("cli")
    home = Home(base / "home", make_photo_folder(base / "photos", n=60))
    invoke(
        home, "--model", str(tiny_model_config), "--pretrained", "none", "index",
        str(home.photos.root),
    )  # fmt: skip
    invoke(home, "vocab", "set", *LABELS)
    invoke(home, "fit")
    yield home


# -- start-up and exit codes (real processes) --------------------------------------------------


def test_help_does_not_import_torch_open_clip_or_faiss(tmp_path: Path) -> None:
    """`piaa --help` (and command help, and `piaa plugins`) stay instant: no heavy imports."""
    script = f"""
import json, sys
from piaa_index.cli import cli
for args in (["--help"], ["search", "--help"], ["index", "--help"], ["export", "--help"],
             ["vocab", "--help"], ["plugins", "--json"]):
    try:
        cli.main(args=args, prog_name="piaa", standalone_mode=False)
    except SystemExit:
        pass
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=subprocess_env(tmp_path / "home"),
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    *_, last = proc.stdout.strip().splitlines()
    assert json.loads(last) == []
    assert "Usage: piaa" in proc.stdout and "search" in proc.stdout


@pytest.mark.slow
def test_index_json_in_a_real_process(tiny_model_config: Path, tmp_path: Path) -> None:
    """`piaa index DIR --json` exits 0 although two files are broken, and lists them."""
    photos = make_photo_folder(tmp_path / "photos", n=20)
    proc = run_piaa(
        ["--model", str(tiny_model_config), "--pretrained", "none", "index",
         str(photos.root), "--json"],
        tmp_path / "home",
        tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["indexed"] == 20
    failed = {f["path"]: f["error"] for f in report["failed"]}
    assert set(failed) == {str(p) for p in photos.broken}
    assert all(failed.values())
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "home" / "piaa.sqlite3").is_file()


def test_index_json_exits_0_with_failures(
    tiny_model_config: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """`piaa index DIR --json` (through main) exits 0 and lists the broken files."""
    photos = make_photo_folder(tmp_path / "photos", n=6)
    args = ["--home", str(tmp_path / "home"), "--model", str(tiny_model_config)]
    code, out, err = run_main(
        [*args, "--pretrained", "none", "index", str(photos.root), "--json"], monkeypatch, capsys
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["indexed"] == 6
    assert {f["path"] for f in report["failed"]} == {str(p) for p in photos.broken}


def test_unknown_label_exits_2_in_a_real_process(fitted_home: Home, tmp_path: Path) -> None:
    """A label outside the vocabulary: exit 2, one message naming it, no traceback."""
    proc = run_piaa([*fitted_home.prefix(), "search", "red circle AND zebra"], tmp_path, tmp_path)
    assert proc.returncode == 2
    assert "zebra" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


# -- exit codes through main() -----------------------------------------------------------------


def test_malformed_expression_exits_2(fitted_home: Home, monkeypatch, capsys) -> None:
    """A syntax error in a search is a usage error (2) with a readable message."""
    code, out, err = run_main(
        [*fitted_home.prefix(), "search", "red circle AND ("], monkeypatch, capsys
    )
    assert code == 2
    assert err.startswith("Error:") and "Traceback" not in err
    assert out == ""


def test_search_without_vocabulary_exits_2(
    tiny_model_config: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """Searching before `piaa vocab set` tells the user what to do."""
    db = ["--home", str(tmp_path / "h"), "--db", f"sqlite:///{tmp_path / 'h' / 'db.sqlite3'}"]
    code, _, err = run_main([*db, "search", "dog"], monkeypatch, capsys)
    assert code == 2
    assert "piaa vocab set" in err


def test_index_missing_path_exits_2(
    tiny_model_config: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """A path that does not exist is the user's mistake (2), named in the message."""
    args = ["--model", str(tiny_model_config), "--pretrained", "none"]
    code, _, err = run_main([*args, "index", str(tmp_path / "nope")], monkeypatch, capsys)
    assert code == 2
    assert "nope" in err


def test_reserved_character_in_label_exits_2(fitted_home: Home, monkeypatch, capsys) -> None:
    """Labels that the query language could not express are refused when set."""
    code, _, err = run_main([*fitted_home.prefix(), "vocab", "add", "a(b"], monkeypatch, capsys)
    assert code == 2
    assert "reserved" in err


def test_other_model_exits_1_naming_both(
    fitted_home: Home, tiny_model_config: Path, monkeypatch, capsys
) -> None:
    """Opening an index with another model fails cleanly (1) and names both models."""
    code, _, err = run_main(
        [*fitted_home.prefix(), "--model", "ViT-B-32", "status"], monkeypatch, capsys
    )
    assert code == 1
    assert "ViT-B-32" in err and str(tiny_model_config) in err


def test_unknown_command_exits_2(monkeypatch, capsys) -> None:
    code, _, err = run_main(["frobnicate"], monkeypatch, capsys)
    assert code == 2
    assert "frobnicate" in err


# -- vocabulary, fit, queries (CliRunner) ------------------------------------------------------


def test_vocab_list_json(fitted_home: Home) -> None:
    """`piaa vocab list --json` shows the labels, in order, and the version."""
    data = json.loads(invoke(fitted_home, "vocab", "list", "--json").stdout)
    assert data["labels"] == LABELS
    assert isinstance(data["version"], int)
    plain = invoke(fitted_home, "vocab", "list").stdout.splitlines()
    assert plain == LABELS


def test_fit_json(fitted_home: Home) -> None:
    """`piaa fit --json` reports the classifier, images, and a threshold per label."""
    report = json.loads(invoke(fitted_home, "fit", "--json").stdout)
    assert report["n_images"] == 60
    assert report["n_patches"] > 0
    assert set(report["thresholds"]) == set(LABELS)
    assert set(report["tagged_present"]) <= set(LABELS)


def test_search_json(fitted_home: Home) -> None:
    """`piaa search EXPR --json` prints a JSON list of rows with path and score."""
    out = invoke(fitted_home, "search", "red circle AND blue circle", "--json").stdout
    rows = json.loads(out)
    assert isinstance(rows, list)
    good = {str(p) for p in fitted_home.photos.good}
    for row in rows:
        assert row["path"] in good and isinstance(row["score"], float)
        assert row["match"] is True
    every = json.loads(
        invoke(
            fitted_home, "search", "red circle AND blue circle", "--all-images", "--limit", "100",
            "--json",
        ).stdout
    )  # fmt: skip
    assert len(every) == 60
    assert [r["path"] for r in every[: len(rows)]] == [r["path"] for r in rows]
    for row in every:
        assert set(row) >= {"path", "score", "match", "labels"}
        assert set(row["labels"]) == {"red circle", "blue circle"}
        assert set(row["labels"]["red circle"]) == {"score", "present"}


def test_search_text_json(fitted_home: Home) -> None:
    """`piaa search --text PHRASE` works for any phrase, outside the vocabulary too."""
    rows = json.loads(
        invoke(fitted_home, "search", "--text", "yellow umbrella", "--limit", "4", "--json").stdout
    )
    assert len(rows) == 4
    assert all({"path", "score"} <= set(r) for r in rows)


def test_paths_only(fitted_home: Home) -> None:
    """`--paths-only` prints nothing but paths, one per line (for xargs and friends)."""
    out = invoke(
        fitted_home, "search", "red circle", "--all-images", "--limit", "7", "--paths-only"
    ).stdout
    lines = out.splitlines()
    assert len(lines) == 7
    assert all(Path(line).is_file() for line in lines)
    out = invoke(
        fitted_home, "similar", str(fitted_home.photos.unicode), "--limit", "3", "--paths-only"
    ).stdout
    assert len(out.splitlines()) == 3 and all(Path(x).is_file() for x in out.splitlines())


def test_csv_has_a_header(fitted_home: Home) -> None:
    """`--csv` writes a header row, then one row per result, nested scores flattened."""
    out = invoke(
        fitted_home, "search", "red circle AND blue circle", "--all-images", "--limit", "5",
        "--csv",
    ).stdout  # fmt: skip
    rows = list(csv.DictReader(io.StringIO(out)))
    assert len(rows) == 5
    assert {"path", "score", "match", "labels.red circle.score"} <= set(rows[0])
    assert all(Path(r["path"]).is_file() for r in rows)
    assert all(0.0 <= float(r["score"]) <= 1.0 for r in rows)


def test_table_output(fitted_home: Home) -> None:
    """The default output is a readable table with a header and a ruler."""
    out = invoke(fitted_home, "similar", str(fitted_home.photos.heic), "--limit", "2").stdout
    lines = out.splitlines()
    assert lines[0].split() == ["path", "score"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert len(lines) == 4


def test_tags_json(fitted_home: Home) -> None:
    """`piaa tags IMG --json` lists every label with its score and decision."""
    img = fitted_home.photos.unicode
    rows = json.loads(invoke(fitted_home, "tags", str(img), "--json").stdout)
    assert sorted(r["label"] for r in rows) == sorted(LABELS)
    for row in rows:
        assert row["path"] == str(img)
        assert {"score", "present", "threshold", "patch_score", "cls_score"} <= set(row)
    present = json.loads(invoke(fitted_home, "tags", str(img), "--present-only", "--json").stdout)
    assert [r["label"] for r in present] == [r["label"] for r in rows if r["present"]]


def test_tags_relative_path(fitted_home: Home, monkeypatch) -> None:
    """An image can be named relative to the current folder."""
    img = fitted_home.photos.good[10]
    monkeypatch.chdir(img.parent)
    rows = json.loads(invoke(fitted_home, "tags", img.name, "--json").stdout)
    assert {r["path"] for r in rows} == {str(img)}


def test_similar_json_limit(fitted_home: Home) -> None:
    """`piaa similar IMG --json --limit 3` gives three other images, best first."""
    img = fitted_home.photos.good[3]
    rows = json.loads(invoke(fitted_home, "similar", str(img), "--json", "--limit", "3").stdout)
    assert len(rows) == 3
    assert str(img) not in {r["path"] for r in rows}
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)


def test_status_json(fitted_home: Home) -> None:
    """`piaa status --json` has counts, model, vocabulary and classifier."""
    status = json.loads(invoke(fitted_home, "status", "--json").stdout)
    assert status["images"] == {"indexed": 60, "failed": 2, "pending": 0}
    assert status["vocabulary"]["labels"] == LABELS
    assert status["classifier"]["n_images"] == 60
    assert status["stale"] is False
    assert status["model"]["pretrained"] == "none"
    assert status["vectors_bytes"] > 0
    text = invoke(fitted_home, "status").stdout
    assert "60 indexed, 2 failed" in text


def test_db_info_lists_failed_files(fitted_home: Home) -> None:
    """`piaa db info --json` tells where data lives and which files failed, and why."""
    info = json.loads(invoke(fitted_home, "db", "info", "--json").stdout)
    assert {f["path"] for f in info["failed"]} == {str(p) for p in fitted_home.photos.broken}
    assert Path(info["vectors_dir"]).is_dir()


def test_plugins_json() -> None:
    """`piaa plugins --json` shows the built-in plugins, their hooks, queries and exporters."""
    result = CliRunner().invoke(cli, ["plugins", "--json"], catch_exceptions=False)
    assert result.exit_code == 0
    listing = json.loads(result.stdout)
    plugins = {p["name"]: p for p in listing["plugins"]}
    assert plugins["builtin_queries"]["hooks"] == ["register_queries"]
    assert plugins["builtin_exporters"]["hooks"] == ["register_exporters"]
    assert plugins["builtin_queries"]["module"] == "piaa_index_plugins.queries"
    assert {"tags", "search", "similar"} <= set(listing["queries"])
    assert {"xmp", "csv", "json"} <= set(listing["exporters"])
    assert not any(p.get("error") for p in listing["plugins"])


def test_export_xmp_sidecars(fitted_home: Home, tmp_path: Path) -> None:
    """`piaa export xmp` writes IMG.jpg.xmp sidecars whose keywords are the present labels (none
    for an image without any), prints one summary (not a path per line), and `--undo` deletes
    the sidecars it created."""
    invoke(fitted_home, "export", "json", "--output", str(tmp_path / "tags.json"))
    tagged = [r["path"] for r in json.loads((tmp_path / "tags.json").read_text()) if r["labels"]]
    # A tiny random model: some images get tags, not all (per-label calibration, fewer-surer).
    assert 0 < len(tagged) < 60
    summary = json.loads(invoke(fitted_home, "export", "xmp", "--json").stdout)
    assert summary["written"] == len(tagged) and summary["failed"] == 0
    assert "paths" not in summary
    assert sorted(str(p) for p in fitted_home.photos.root.rglob("*.xmp")) == sorted(
        p + ".xmp" for p in tagged
    )
    special = (fitted_home.photos.unicode, fitted_home.photos.heic, fitted_home.photos.good[0])
    checked = [p for p in special if str(p) in tagged] + [Path(p) for p in tagged[:3]]
    for img in checked:
        sidecar = img.with_name(img.name + ".xmp")
        text = sidecar.read_text(encoding="utf-8")
        assert "<dc:subject>" in text
        tags = json.loads(invoke(fitted_home, "tags", str(img), "--json").stdout)
        for tag in tags:
            line = f"<rdf:li>{tag['label']}</rdf:li>"
            assert (line in text) == tag["present"], (img, tag)
            assert (f"<rdf:li>piaa|{tag['label']}</rdf:li>" in text) == tag["present"]
            assert (f"<rdf:li>piaa/{tag['label']}</rdf:li>" in text) == tag["present"]
    # A rerun changes nothing and says so in one line.
    again = invoke(fitted_home, "export", "xmp")
    assert again.stdout.strip() == f"xmp: 0 written, {len(tagged)} unchanged"
    listed = invoke(fitted_home, "export", "xmp", "--verbose").stdout.splitlines()
    assert len(listed) == len(tagged) + 1 and listed[0].startswith("unchanged\t")
    undone = json.loads(invoke(fitted_home, "export", "xmp", "--undo", "--json").stdout)
    assert undone["removed"] == len(tagged)
    assert not list(fitted_home.photos.root.rglob("*.xmp"))


def test_export_csv_and_json(fitted_home: Home, tmp_path: Path) -> None:
    """`piaa export csv/json --output FILE` write the present labels per image."""
    out_csv, out_json = tmp_path / "tags.csv", tmp_path / "tags.json"
    invoke(fitted_home, "export", "csv", "--output", str(out_csv))
    invoke(fitted_home, "export", "json", "--output", str(out_json))
    rows = list(csv.DictReader(out_csv.open(encoding="utf-8")))
    data = json.loads(out_json.read_text(encoding="utf-8"))
    assert len(data) == 60
    from_json = {(d["path"], lb["label"]) for d in data for lb in d["labels"]}
    assert {(r["path"], r["label"]) for r in rows} == from_json
    assert all(label in LABELS for _, label in from_json)


def test_index_plain_output_and_rerun(tiny_model_config: Path, tmp_path: Path) -> None:
    """The human summary counts indexed and failed files; a rerun finds everything unchanged."""
    home = Home(tmp_path / "home", make_photo_folder(tmp_path / "photos", n=8))
    args = ["--model", str(tiny_model_config), "--pretrained", "none", "index"]
    first = invoke(home, *args, str(home.photos.root))
    assert "indexed 8," in first.stdout and "failed 2" in first.stdout
    assert "notes.jpg" in first.stderr
    second = invoke(home, "index", str(home.photos.root), "--json")
    report = json.loads(second.stdout)
    assert (report["indexed"], report["unchanged"], report["still_failing"]) == (0, 8, 2)


def test_status_of_a_new_home(tmp_path: Path, monkeypatch, capsys) -> None:
    """`piaa status` works before anything is indexed and creates no vector folder."""
    home = tmp_path / "fresh"
    code, out, err = run_main(["--home", str(home), "status", "--json"], monkeypatch, capsys)
    assert code == 0, err
    status = json.loads(out)
    assert status["images"] == {"indexed": 0, "failed": 0, "pending": 0}
    assert status["model"] is None and status["classifier"] is None
    assert not (home / "vectors").exists()


def test_search_needs_an_expression_or_text(fitted_home: Home, monkeypatch, capsys) -> None:
    """`piaa search` with nothing to search for is a usage error with a hint."""
    code, _, err = run_main([*fitted_home.prefix(), "search"], monkeypatch, capsys)
    assert code == 2
    assert "--text" in err


def test_vocab_add_remove_round_trip(tmp_path: Path, monkeypatch, capsys) -> None:
    """`vocab set/add/remove` edit the label list in order; removing an unknown label is 2."""
    base = ["--home", str(tmp_path / "v")]
    assert run_main([*base, "vocab", "set", "dog", "Fire  Hydrant"], monkeypatch, capsys)[0] == 0
    code, out, _ = run_main([*base, "vocab", "add", "cat", "dog", "--json"], monkeypatch, capsys)
    assert code == 0 and json.loads(out)["labels"] == ["dog", "Fire Hydrant", "cat"]
    code, out, _ = run_main([*base, "vocab", "remove", "dog"], monkeypatch, capsys)
    assert code == 0 and out.splitlines() == ["Fire Hydrant", "cat"]
    code, _, err = run_main([*base, "vocab", "remove", "zebra"], monkeypatch, capsys)
    assert code == 2 and "zebra" in err
