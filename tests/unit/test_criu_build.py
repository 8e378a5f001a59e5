"""Our CRIU patches (scripts/criu-patches/, applied by scripts/build_criu.sh): they apply
to the pinned upstream source, and the criu this venv uses was built with them (else the
suite would test the lazy-pages daemon without them: `make setup` rebuilds it once)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from dunix.migrate import swrk

REPO = Path(__file__).resolve().parents[2]
PATCHES = sorted((REPO / "scripts" / "criu-patches").glob("*.patch"))
CACHE = Path(os.environ.get("DUNIX_CACHE", "/var/cache/dunix"))
VERSION = "4.2.1"  # build_criu.sh CRIU_MIN_VERSION: the source the patches are made for


def patch_hash() -> str:
    """What build_criu.sh puts in the build key: sha256 of the patches in name order."""
    digest = hashlib.sha256()
    for p in PATCHES:
        digest.update(p.read_bytes())
    return digest.hexdigest()[:12]


def patched_files(patch: Path) -> list[str]:
    return [ln[6:].strip() for ln in patch.read_text().splitlines() if ln.startswith("+++ b/")]


def test_there_are_patches_and_each_says_why() -> None:
    assert PATCHES
    for p in PATCHES:
        assert p.read_text().startswith("dunix:"), f"{p.name}: start with why (see 0001)"
        assert patched_files(p)


def test_patches_apply_to_the_pinned_source(tmp_path: Path) -> None:
    orig = CACHE / f"criu-{VERSION}" / "dl" / f"criu_{VERSION}.orig.tar.xz"
    if not orig.exists() or shutil.which("patch") is None:
        pytest.skip(f"no {orig} or no patch(1): `make setup` fetches both")
    wanted = {f for p in PATCHES for f in patched_files(p)}
    with tarfile.open(orig) as tar:
        for member in tar.getmembers():
            rel = member.name.split("/", 1)[-1]
            if rel in wanted:
                member.name = rel
                tar.extract(member, tmp_path, filter="data")
    for p in PATCHES:
        done = subprocess.run(
            ["patch", "-d", str(tmp_path), "-p1", "--batch", "--forward", "-i", str(p)],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_the_criu_in_use_was_built_with_these_patches() -> None:
    binary = Path(swrk.default_binary()).resolve()
    built = binary.parents[2] / ".built"  # <cache>/criu-<version>/src/criu/criu
    if not built.exists():
        pytest.skip(f"{binary} is not a build_criu.sh build")
    assert f"patches={patch_hash()}" in built.read_text().split(), (
        f"{binary} was built without the current scripts/criu-patches: run `make setup`"
    )
