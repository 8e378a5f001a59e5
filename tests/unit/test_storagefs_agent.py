"""The agent's storagefs service when it cannot serve: one log line, and the agent runs on.

A real agent on loopback TLS (as in test_agent_loopback.py) with ``storagefs = true`` and a
store it cannot create; its control socket must still answer. No mount is attempted.
"""

from __future__ import annotations

import logging
import random
import socket
from pathlib import Path

import pytest
import trio

from dunix.agent.config import AgentConfig, load_config
from dunix.agent.daemon import Agent
from dunix.client import Client
from dunix.wire import keygen


def _free_port() -> int:
    for _ in range(100):
        port = random.randrange(20000, 60000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.9", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port")


def test_config_knobs_are_off_by_default() -> None:
    config = AgentConfig()
    assert config.storagefs is False and str(config.storagefs_mount) == "/dunix/fs"


def test_agent_runs_on_when_storagefs_cannot_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keygen(tmp_path / "tls", nodes=["s1"], clients=["admin"])
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store should go")
    config = load_config(
        None,
        {
            "name": "s1",
            "listen": f"127.0.0.9:{_free_port()}",
            "control": tmp_path / "s1.sock",
            "tls_dir": tmp_path / "tls",
            "storagefs": True,
            "storagefs_store": blocker / "store",
            "storagefs_mount": tmp_path / "mnt",
        },
    )
    agent = Agent(config)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: agent.run(handle_signals=False,
                                                              task_status=task_status))  # fmt: skip
            async with await Client.connect(tmp_path / "s1.sock") as client:
                assert [n.name for n in await client.nodes()] == ["s1"]
            assert not agent.storage.serving
            agent.storage.peer_gone(12345)  # harmless when not serving
            nursery.cancel_scope.cancel()

    with caplog.at_level(logging.ERROR, logger="dunix.agent.storage"):
        trio.run(main)
    assert any("no " in r.getMessage() and "the agent runs on" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    assert not (tmp_path / "mnt").exists()
