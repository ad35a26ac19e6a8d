"""A library driven by real `piaa` processes on the shipped shapesworld model, offline, with
none of the calling shell's PIAA_* settings: shared by the kill-at-random and concurrency tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


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
