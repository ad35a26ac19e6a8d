"""`piaa serve` and CLI writers on one SQLite library (issue 18): after the server has run jobs,
CLI processes that open and close the library must not split it. The server's view and the
CLI's agree, an acknowledged write survives a restart, key revocations apply at once, and the
file passes SQLite's integrity check. Real processes, a real server, a real SQLite file."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from piaa_index.shapes.dataset import generate_dataset
from tests.piaa_processes import PiaaProcesses, piaa_env, start_server, stop_server


class Server:
    def __init__(self, proc: subprocess.Popen[str], base: str, key: str):
        self.proc, self.base, self.key = proc, base, key

    def call(self, method: str, path: str, body: Any = None, key: str | None = None) -> Any:
        """The JSON answer; an HTTP error is returned as its status code."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {key or self.key}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code

    def job(self, kind: str, body: Any = None) -> dict[str, Any]:
        job = self.call("POST", f"/api/jobs/{kind}", body or {})
        assert isinstance(job, dict), job
        return job

    def wait(self, job: dict[str, Any]) -> dict[str, Any]:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            state = self.call("GET", f"/api/jobs/{job['id']}")
            if state["state"] not in ("queued", "running"):
                assert state["state"] == "done", state
                return state
            time.sleep(0.3)
        raise AssertionError(f"job {job} did not finish")

    def deleted_files(self) -> list[str]:
        """Files the server process holds open that no longer have a name (a deleted WAL)."""
        fds = Path(f"/proc/{self.proc.pid}/fd")
        held = []
        for fd in fds.iterdir():
            try:
                held.append(os.readlink(fd))
            except OSError:
                continue
        return [t for t in held if "piaa.sqlite3" in t and t.endswith("(deleted)")]


@contextmanager
def serve(home: Path) -> Iterator[Server]:
    cmd = [sys.executable, "-m", "piaa_index", "serve", "--port", "0"]
    served = start_server(cmd, piaa_env(home, None), timeout=120)
    try:
        yield Server(served.proc, served.base, served.key)
    finally:
        stop_server(served.proc)
    assert "Traceback" not in served.stderr(), served.stderr()[-3000:]


def labels(cli: PiaaProcesses) -> list[str]:
    return list(json.loads(cli.run("vocab", "list", "--json"))["labels"])


def test_server_jobs_and_cli_writers_keep_one_database(tmp_path: Path) -> None:
    generate_dataset(tmp_path / "first", 80, seed=31, size=96, progress=False)
    generate_dataset(tmp_path / "second", 60, seed=32, size=96, progress=False)
    home = tmp_path / "home"
    cli = PiaaProcesses(home, None)
    cli.run("index", str(tmp_path / "first" / "images"))
    cli.run("vocab", "set", "car", "sun", "house", "mug")

    with serve(home) as server:
        # A job makes the server open the library again in its job thread.
        server.wait(server.job("fit"))
        cli.run("status", "--json")  # a CLI process opens and closes the library
        assert server.deleted_files() == []

        # Writes on either side are seen by the other at once.
        put = server.call("PUT", "/api/vocabulary", {"labels": ["only", "in", "server"]})
        assert put["labels"] == ["only", "in", "server"]
        assert labels(cli) == ["only", "in", "server"]
        cli.run("vocab", "set", "car", "sun", "star")
        assert server.call("GET", "/api/vocabulary")["labels"] == ["car", "sun", "star"]

        # Keys made by the CLI work on the server, and a revocation applies at once.
        token = cli.run("keys", "create", "--scope", "read").strip()
        assert isinstance(server.call("GET", "/api/status", key=token), dict)
        key_id = max(k["id"] for k in json.loads(cli.run("keys", "list", "--json")))
        cli.run("keys", "revoke", str(key_id))
        assert server.call("GET", "/api/status", key=token) == 401

        # A server fit job while the CLI changes the vocabulary and indexes more photos.
        job = server.job("fit")
        cli.together(
            ["vocab", "set", "car", "sun", "house", "wheel"],
            ["index", str(tmp_path / "second" / "images")],
        )
        server.wait(job)
        cli.run("status", "--json")
        assert server.deleted_files() == []
        assert labels(cli) == ["car", "sun", "house", "wheel"]
        assert server.call("GET", "/api/vocabulary")["labels"] == labels(cli)
        assert server.call("GET", "/api/status")["images"]["indexed"] == 140

        # The last acknowledged write, made by the server, outlives it.
        put = server.call("PUT", "/api/vocabulary", {"labels": ["acknowledged", "by", "server"]})
        assert put["labels"] == ["acknowledged", "by", "server"]
        cli.run("status", "--json")

    with sqlite3.connect(home / "piaa.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert labels(cli) == ["acknowledged", "by", "server"]
    with serve(home) as server:
        assert server.call("GET", "/api/vocabulary")["labels"] == ["acknowledged", "by", "server"]
    assert cli.check()["ok"] is True
