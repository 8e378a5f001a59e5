"""A failing per-job task is logged and ends alone; the agent's nursery goes on."""

from __future__ import annotations

import logging

import pytest
import trio

from dunix.agent.tasks import TaskGroup


def test_a_failing_task_does_not_cancel_its_siblings(caplog: pytest.LogCaptureFixture) -> None:
    done: list[str] = []

    async def boom() -> None:
        raise RuntimeError("StreamHub.run is not running")

    async def steady() -> None:
        await trio.sleep(0.05)
        done.append("steady")

    async def main() -> int:
        async with trio.open_nursery() as nursery:
            tasks = TaskGroup(nursery)
            tasks.start_soon(steady)
            tasks.start_soon(boom)
        return tasks.failures

    with caplog.at_level(logging.ERROR, logger="dunix.agent"):
        failures = trio.run(main)
    assert done == ["steady"] and failures == 1
    assert "StreamHub.run is not running" in caplog.text and "boom" in caplog.text


def test_cancellation_is_not_a_failure() -> None:
    async def main() -> int:
        async with trio.open_nursery() as nursery:
            tasks = TaskGroup(nursery)
            tasks.start_soon(trio.sleep_forever)
            await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        return tasks.failures

    assert trio.run(main) == 0
