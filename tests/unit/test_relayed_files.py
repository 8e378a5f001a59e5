"""The target frees a relayed file's image entry of its offset, size and mode
(dunix.migrate.relayed_files), and leaves every other entry as it was."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from pycriu.images import pb

from dunix.errors import MigrationFailed
from dunix.migrate import images, relayed_files

KEY = "file[2a:1f]"


def image(*entries: object) -> bytes:
    bodies = [e.SerializeToString() for e in entries]  # type: ignore[attr-defined]
    head = struct.pack("<II", images.IMG_COMMON, 0x56213732)  # then the image's own magic
    return head + b"".join(struct.pack("<I", len(b)) + b for b in bodies)


def reg(file_id: int, name: str, ext: bool) -> object:
    entry = pb.file_entry(type=relayed_files.FD_REG, id=file_id)
    entry.reg.id, entry.reg.flags, entry.reg.pos, entry.reg.name = file_id, 0o1, 4096, name
    fown = entry.reg.fown
    fown.uid, fown.euid, fown.signum, fown.pid_type, fown.pid = 0, 0, 0, 0, 0
    entry.reg.size, entry.reg.mode = 4096, 0o100644
    if ext:
        entry.reg.ext = True
    return entry


def entries(data: bytes) -> list[object]:
    _, bodies = images.split(data)
    out = []
    for body in bodies:
        entry = pb.file_entry()
        entry.ParseFromString(body)
        out.append(entry)
    return out


def test_only_the_named_external_file_is_freed() -> None:
    data = image(reg(1, KEY, True), reg(2, "/dunix/fs/kept", False), reg(3, "file[2a:20]", True))
    new, found = relayed_files.unpin(data, {KEY})
    assert found == {KEY}
    freed, kept, other = entries(new)
    assert freed.reg.pos == relayed_files.NO_POS  # type: ignore[attr-defined]
    assert not freed.reg.HasField("size") and not freed.reg.HasField("mode")  # type: ignore[attr-defined]
    assert freed.reg.name == KEY and freed.reg.flags == 0o1  # type: ignore[attr-defined]
    assert entries(data)[1:] == [kept, other]


def test_a_key_missing_from_the_images_fails_the_move(tmp_path: Path) -> None:
    (tmp_path / "files.img").write_bytes(image(reg(2, "/dunix/fs/kept", False)))
    folder = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(MigrationFailed, match="no external file"):
            relayed_files.rewrite_images(folder, [KEY])
    finally:
        os.close(folder)
