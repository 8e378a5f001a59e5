"""The node agent."""

from __future__ import annotations

import trio

from dunix.agent.config import AgentConfig, load_config


def run_agent(config: AgentConfig) -> None:
    """Run one agent in the foreground until it is signalled."""
    from dunix.agent.daemon import Agent

    trio.run(Agent(config).run)


__all__ = ["AgentConfig", "load_config", "run_agent"]
