"""The command line turns a failed system call on a path argument into one line and a
status, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from dunix.cli import main


def test_a_missing_path_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    assert main(["fs", "where", str(missing)]) == 1
    assert capsys.readouterr().err == f"dunix: {missing}: No such file or directory\n"


def test_a_factor_on_a_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = tmp_path / "a.txt"
    plain.write_text("x")
    monkeypatch.setattr("dunix.client.storagefs_owner", lambda path: (1, 1))  # "on storagefs"
    assert main(["fs", "replicas", "2", str(plain)]) == 2
    assert capsys.readouterr().err == (
        f"dunix: {plain} is not a folder: a factor is set on a folder\n"
    )
