"""Audit findings on hostile or malformed input (issue 18): each answer is a 4xx with the API's
JSON error body, or a one-line CLI error with exit code 2, never a 500 or a traceback.

HTTP cases run on a real (small, synthetic) library through FastAPI's TestClient; CLI cases
run `main()` as the `piaa` script does, or a real process where the input could exhaust memory.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from piaa_index_plugins.http_api.app import create_app
from piaa_index_plugins.http_api.jobs import MAX_PENDING
from piaa_index_plugins.http_api.state import ServerConfig

from piaa_index.cli import cli, main
from piaa_index.library.core import Library
from tests.image_files import shapes_image
from tools import scale

SESSION = "piaa_issue18-key"
BASE = "http://127.0.0.1:8765"
AUTH = {"Authorization": f"Bearer {SESSION}"}


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Library]:
    world = scale.World.make(4, seed=3)
    lib = scale.open_library(tmp_path_factory.mktemp("issue18") / "home", world)
    scale.add_images(lib, world, 20)
    lib.set_vocabulary(scale.label_names(4))
    lib.fit()
    yield lib
    lib.close()


@pytest.fixture(scope="module")
def client(library: Library) -> Iterator[TestClient]:
    app = create_app(library, ServerConfig(session_key=SESSION))
    with TestClient(app, base_url=BASE, headers=AUTH, raise_server_exceptions=False) as c:
        yield c


def api_error(response: Any, *statuses: int) -> str:
    """The message of a JSON error answer with one of `statuses`."""
    assert response.status_code in statuses, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.text
    return str(response.json()["error"]["message"])


# -- HTTP ------------------------------------------------------------------------------------


def test_unicode_digit_image_is_not_an_image_id(client: TestClient) -> None:
    """'²' passes str.isdigit() but not int(): it names no indexed image (was a 500)."""
    for query in ("tags", "similar"):
        message = api_error(client.get(f"/api/queries/{query}?image=%C2%B2"), 400, 404)
        assert "not an indexed image" in message


def test_image_id_past_the_integer_range(client: TestClient, library: Library) -> None:
    """A 23-digit id overflowed SQLite's integer (a 500); now it names no image."""
    for query in ("tags", "similar"):
        for image in ("12345678901234567890123", "9223372036854775808", "9" * 4000):
            message = api_error(client.get(f"/api/queries/{query}", params={"image": image}), 400)
            assert "not an indexed image" in message
    # A real id, even with leading zeros, is still an image.
    first = library.store.image_page(0, 1)[0][0]["id"]
    response = client.get("/api/queries/tags", params={"image": f"{0:020d}{first}"})
    assert response.status_code == 200, response.text


def test_forged_cursors_are_400(client: TestClient) -> None:
    """Cursors that decode but miss fields raised KeyError (a 500)."""
    for url in (
        "/api/tags?cursor=eyJrIjogInRhZ3MiLCAiYSI6IDF9",  # {"k": "tags", "a": 1}: no "u"
        "/api/images?cursor=eyJrIjogImltYWdlcyJ9",  # {"k": "images"}: no "a"
    ):
        assert "invalid cursor" in api_error(client.get(url), 400)
    # A real next_cursor still pages.
    page = client.get("/api/tags", params={"limit": 5}).json()
    assert client.get("/api/tags", params={"cursor": page["next_cursor"]}).status_code == 200


def test_lone_surrogate_label_is_400(client: TestClient, library: Library) -> None:
    before = library.labels()
    for body in (b'{"labels": ["ok", "bad \\udcff"]}', b'{"labels": ["x"], "templates": ["\\ud800 {}"]}'):  # fmt: skip
        response = client.put(
            "/api/vocabulary", content=body, headers={"Content-Type": "application/json"}
        )
        assert "surrogate" in api_error(response, 400)
    assert library.labels() == before


def test_origin_scheme_is_compared(client: TestClient) -> None:
    """https://127.0.0.1:PORT is another origin than the http://127.0.0.1:PORT served."""
    response = client.get("/api/status", headers={"Origin": "https://127.0.0.1:8765"})
    assert response.status_code == 403 and response.json()["error"]["code"] == "origin_not_allowed"
    response = client.get("/api/status", headers={"Origin": "http://[::1"})  # unparsable
    assert response.status_code == 403
    assert client.get("/api/status", headers={"Origin": BASE}).status_code == 200


def test_job_queue_is_bounded(library: Library) -> None:
    """At most MAX_PENDING jobs queued or running; more are 429, not piled up."""
    release = threading.Event()

    def open_job_library() -> Library:
        release.wait(60)  # the worker holds its first job until the test has submitted
        return library.reopen()

    app = create_app(library, ServerConfig(session_key=SESSION), open_job_library)
    with TestClient(app, base_url=BASE, headers=AUTH, raise_server_exceptions=False) as c:
        try:
            for _ in range(MAX_PENDING):
                assert c.post("/api/jobs/fit").status_code == 202
            for _ in range(3):
                response = c.post("/api/jobs/fit")
                assert "queued or running" in api_error(response, 429)
                assert response.json()["error"]["code"] == "too_many_jobs"
                assert response.headers["retry-after"]
            assert len(c.get("/api/jobs").json()) == MAX_PENDING
        finally:
            release.set()
        jobs = app.state.piaa.jobs
        for job in jobs.list():
            assert jobs.wait(job["id"], 120)["state"] == "done"
        assert c.post("/api/jobs/fit").status_code == 202  # room again once they are done


# -- CLI -------------------------------------------------------------------------------------


def run_main(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: Any) -> tuple[int, str]:
    """Run `main()` as the `piaa` script does: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["piaa", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    _, err = capsys.readouterr()
    return int(exit_info.value.code or 0), err


def one_line_error(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    return lines[0]


def test_revoking_an_out_of_range_key_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """As for an unknown small id: exit 2, "no live key" (was an OverflowError traceback)."""
    home = ["--home", str(tmp_path / "h")]
    for key_id in ("7", "1000000000000000000000000000000", "-1000000000000000000000000000000"):
        code, err = run_main([*home, "keys", "revoke", "--", key_id], monkeypatch, capsys)
        assert code == 2 and "no live key" in one_line_error(err), (key_id, err)


@pytest.mark.parametrize(
    "url, words",
    [
        ("notaurl", "invalid database URL"),
        ("http://example.com/x", "invalid database URL"),
        ("file:///tmp/x.db", "invalid database URL"),
        # No database name: nothing listens on port 1, so without the check this would be
        # "cannot open database" (exit 1); on a real server, its maintenance database.
        ("postgresql+psycopg://nobody@127.0.0.1:1/", "names no database"),
        ("postgresql+psycopg://nobody:secret@127.0.0.1:1", "names no database"),
    ],
)
def test_malformed_database_urls_are_usage_errors(
    url: str, words: str, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    code, err = run_main(["--db", url, "status"], monkeypatch, capsys)
    line = one_line_error(err)
    assert code == 2 and words in line, err
    assert "secret" not in line


def test_postgres_url_with_a_database_still_opens(
    postgres_database: Any, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    url = postgres_database()
    code, err = run_main(["--db", url, "status", "--json"], monkeypatch, capsys)
    assert code == 0, err


def _limit_memory() -> None:  # in the child: a regression fails with MemoryError, not OOM
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


def test_index_from_dev_zero_is_refused(tmp_path: Path) -> None:
    """`--from /dev/zero` read without bound; now it stops after 64 KiB without a path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIAA_")}
    env["PIAA_HOME"] = str(tmp_path / "home")
    proc = subprocess.run(
        [sys.executable, "-m", "piaa_index", "index", "--from", "/dev/zero"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        preexec_fn=_limit_memory,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "without a path" in one_line_error(proc.stderr)


def test_index_from_an_over_long_line_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"/ok.jpg\n" + b"/x" * 40_000 + b"\n")
    code, err = run_main(["index", "--from", str(listing)], monkeypatch, capsys)
    assert code == 2 and "--from" in one_line_error(err)


def test_print0_keeps_names_with_newlines(tiny_model_config: Path, tmp_path: Path) -> None:
    """`--print0` / `-0`: each path followed by a NUL, a newline inside a name kept."""
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(5)
    names = ["plain.png", "two\nlines.png", "three.png"]
    for name in names:
        shapes_image(rng, (72, 64)).save(photos / name)
    home = ["--home", str(tmp_path / "home"), "-q"]
    model = ["--model", str(tiny_model_config), "--pretrained", "none"]
    runner = CliRunner()
    result = runner.invoke(cli, [*home, *model, "index", str(photos)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    query = photos / "plain.png"
    expected = {os.fsencode(photos / n) for n in names if n != "plain.png"}
    for flag in ("--print0", "-0"):
        result = runner.invoke(cli, [*home, "similar", str(query), flag], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        out = result.stdout_bytes
        assert out.endswith(b"\0") and b"\n" not in out.replace(b"two\nlines", b"")
        assert set(out[:-1].split(b"\0")) == expected
    # --paths-only is unchanged: one per line.
    result = runner.invoke(cli, [*home, "similar", str(query), "--paths-only"])
    assert b"\0" not in result.stdout_bytes and result.stdout_bytes.count(b"\n") == 3
