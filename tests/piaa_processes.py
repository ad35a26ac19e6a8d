"""A library driven by real `piaa` processes on the shipped shapesworld model, offline, with
none of the calling shell's PIAA_* settings: shared by the kill-at-random and concurrency tests."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import NamedTuple


def piaa_env(home: Path, db_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIAA_")}
    env.update(PIAA_HOME=str(home), PIAA_MODEL="shapesworld", PIAA_DEVICE="cpu")
    env["HF_HUB_OFFLINE"] = "1"
    if db_url:
        env["PIAA_DB"] = db_url
    return env


class PiaaProcesses:
    """One library (its home, and its database when not SQLite) driven by `piaa` commands."""

    timeout = 600  # seconds a command may take

    def __init__(self, home: Path, db_url: str | None):
        self.env = piaa_env(home, db_url)
        self.home = home

    def run(self, *args: str) -> str:
        """Run one command to completion; it must exit 0. Its stdout."""
        result = subprocess.run(
            [sys.executable, "-m", "piaa_index", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=self.timeout,
        )
        assert result.returncode == 0, (args, result.stderr[-2000:])
        return result.stdout

    def together(self, *commands: list[str]) -> None:
        """Start every command at once; each must exit 0 without a traceback."""
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "piaa_index", *cmd],
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for cmd in commands
        ]
        for cmd, proc in zip(commands, procs, strict=True):
            _, err = proc.communicate(timeout=self.timeout)
            assert proc.returncode == 0, (cmd, err[-2000:])
            assert "Traceback" not in err, (cmd, err[-2000:])

    def tags(self) -> dict[str, list[str]]:
        """path -> its present labels, from `piaa export json`."""
        out = self.home / "tags.json"
        self.run("export", "json", "--output", str(out))
        return {
            item["path"]: sorted(x["label"] for x in item["labels"])
            for item in json.loads(out.read_text())
        }

    def check(self) -> dict:
        return json.loads(self.run("db", "check", "--json"))


class Served(NamedTuple):
    """A running `piaa serve`: its process, base URL (`http://127.0.0.1:PORT`), port, the key
    of the printed gallery URL, and its stderr lines so far (drained by a thread)."""

    proc: subprocess.Popen[str]
    base: str
    port: int
    key: str
    lines: list[str]
    reader: threading.Thread

    def stderr(self) -> str:
        """Everything the server printed; after it exits, to the end."""
        if self.proc.poll() is not None:
            self.reader.join(10)
        return "".join(self.lines)


def start_server(cmd: list[str], env: dict[str, str], timeout: float = 60) -> Served:
    """Start `cmd` (a `piaa … serve` command line) and wait for the URL it prints."""
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    lines: list[str] = []
    found = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "#key=" in line:
                found.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if not found.wait(timeout):
        proc.kill()
        raise AssertionError("piaa serve printed no URL:\n" + "".join(lines[-20:]))
    url = re.search(r"(http://127\.0\.0\.1:(\d+))/#key=(\S+)", "".join(lines))
    assert url is not None, "".join(lines[-20:])
    return Served(proc, url.group(1), int(url.group(2)), url.group(3), lines, reader)


def stop_server(proc: subprocess.Popen[str]) -> None:
    """SIGTERM, as Ctrl-C would; kill it if it does not stop."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


async def http_status(port: int, path: str, key: str = "", timeout: float = 60) -> int:
    """The status code of one raw HTTP/1.1 GET to the server on 127.0.0.1:`port`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}Connection: close\r\n\r\n".encode()
    )
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), timeout)
    writer.close()
    return int(data.split(b" ", 2)[1])
