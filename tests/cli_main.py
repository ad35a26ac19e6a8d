"""`piaa` run in this process as its script runs it, for tests that check exit codes and the
two output streams (the CLI tests share it)."""

from __future__ import annotations

import sys

import pytest

from piaa_index.cli import main


def run_main(
    args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    """Run `main()` as the `piaa` script does: (exit code, stdout, stderr) of this run only."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["piaa", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    code = exit_info.value.code
    return (0 if code is None else int(code)), out, err
