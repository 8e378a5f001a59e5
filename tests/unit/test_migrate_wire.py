"""The messages of `dunix migrate` round-trip through the codec, nested ones included."""

from __future__ import annotations

import dataclasses

from dunix.wire import decode, encode, registered
from dunix.wire.migrate import (
    MIGRATE_PEER_MESSAGES,
    MigrateAnswer,
    MigrateImage,
    MigratePhase,
    MigratePipe,
    MigratePrepare,
    MigrateReply,
    MigrateRequest,
    MigrateStatus,
)

REPLY = MigrateReply(
    gpid=(5 << 22) | 77, source="n2", target="n3", pid=77,
    phases=(MigratePhase("freeze", 150.0), MigratePhase("restore", 240.5)),
    freeze_ms=150.0, downtime_ms=80.25, total_ms=260.0, image_bytes=9_000_000, moves=2,
)  # fmt: skip


def roundtrip(msg: object) -> object:
    return decode(encode(msg))


def test_request_reply_and_forwarded_answer() -> None:
    assert roundtrip(MigrateRequest(12, "home")) == MigrateRequest(12, "home")
    assert roundtrip(REPLY) == REPLY
    ok = MigrateAnswer(3, REPLY, "", "")
    assert roundtrip(ok) == ok
    failed = MigrateAnswer(4, None, "MigrationFailed", "n4 lacks CPU features avx2")
    assert roundtrip(failed) == failed


def test_agent_to_agent_messages() -> None:
    prepare = MigratePrepare(
        move="n1-7", job="n1-1-abc", home="n1", home_pid=40, gpid=1 << 22 | 40, pid=55,
        uid=1000, gid=1000, groups=(1000, 27), mode="remote", cmd="python3",
        origin_flags=0b1011, origin_level=3,
        pipes=(MigratePipe(12345, True, 7), MigratePipe(12346, False, 9)), moves=1,
    )  # fmt: skip
    assert roundtrip(prepare) == prepare
    image = MigrateImage("n1-7", "pages-1.img", 1 << 20, bytes(range(256)) * 4)
    assert roundtrip(image) == image
    status = MigrateStatus("n1-7", "restored", 55, ((7, 4), (9, 6)), "", "")
    assert roundtrip(status) == status


def test_peer_messages_are_registered_frozen_dataclasses() -> None:
    names = registered()
    for cls in MIGRATE_PEER_MESSAGES:
        assert names[cls.__name__] is cls
        assert dataclasses.is_dataclass(cls)
        assert cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
