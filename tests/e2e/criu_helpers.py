"""Small helpers for driving the CRIU that scripts/setup.sh installs into the venv.

The venv's ``bin/criu`` is a symlink into the cached CRIU build, and pycriu is importable
through a ``.pth`` file; both are part of the install, so a missing one is a failure, not a
reason to skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

VENV_BIN = Path(sys.prefix) / "bin"
CRIU = VENV_BIN / "criu"


def criu_binary() -> Path:
    """The venv's criu; fails the test when setup did not install it."""
    if not os.access(CRIU, os.X_OK):
        pytest.fail(f"{CRIU} missing or not executable: run scripts/setup.sh")
    return CRIU


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: CRIU dumps and restores processes")


def criu_check() -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(criu_binary()), "check"], capture_output=True, text=True, timeout=60)


@contextmanager
def images_dir_fd(path: Path) -> Iterator[int]:
    """An O_DIRECTORY fd on ``path`` that a criu child process can inherit.

    pycriu forks and execs ``criu swrk``; Python opens fds close-on-exec (PEP 446), so
    without ``set_inheritable`` criu would get a number that is closed in its process.
    """
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.set_inheritable(fd, True)
        yield fd
    finally:
        os.close(fd)


def new_criu(images_fd: int, log_file: str) -> Any:
    """A pycriu client in swrk mode (criu runs as our child), logging into the image dir."""
    import pycriu

    client = pycriu.criu()
    client.use_binary(str(criu_binary()))
    client.opts.images_dir_fd = images_fd
    client.opts.log_file = log_file
    client.opts.log_level = 4
    return client


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])
