"""The node agent: one trio nursery hosting membership, load sampling and the control API.

Services, all in one nursery:

* the TLS listener, where peer agents deliver gossip and remote clients send requests;
* the local control socket, where clients on this host are known by SO_PEERCRED;
* the protocol loop, which ticks the sans-IO ``Membership`` at its deadlines and carries
  out the actions it returns (sends through ``PeerLinks``, events to watchers);
* the load sampler, which feeds the local load into the gossip;
* optional multicast discovery, for a first contact without ``--join``.

SIGTERM or SIGINT make the agent announce that it leaves, give the announcement a moment
to go out, and exit.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import signal
import time
from typing import Any

import trio

from dunix.agent.balance import BalanceService, balancer_config
from dunix.agent.config import AgentConfig
from dunix.agent.control import ControlService
from dunix.agent.fanout import PeerQueries
from dunix.agent.jobs import Job, JobService
from dunix.agent.migration import MigrationService
from dunix.agent.peers import PeerLinks
from dunix.agent.remote import JOB_MESSAGES, JobLinks, RemoteService
from dunix.agent.storage import STORAGE_MESSAGES, StorageService
from dunix.agent.tasks import TaskGroup
from dunix.agent.tracer import WentRemote
from dunix.errors import DunixError
from dunix.fdmove import STREAM_MESSAGES
from dunix.fdmove.deputy import DeputyListener
from dunix.loadbalance import (
    MESSAGE_TYPES,
    Member,
    MemberEvent,
    Membership,
    MembershipConfig,
    NodeLoad,
    Send,
    derive_node_id,
)
from dunix.loadbalance.placement import PlacementConfig, PlacementPolicy
from dunix.loadbalance.sampler import LoadSampler
from dunix.migrate.cpufeatures import read_cpu_features
from dunix.wire import Channel, TLSIdentity, serve_tls, serve_unix
from dunix.wire.control import NodeEvent, NodeInfo
from dunix.wire.jobs import KillAnswer, KillQuery, PsAnswer, PsQuery
from dunix.wire.migrate import MIGRATE_PEER_MESSAGES, MigrateAnswer, MigrateQuery

log = logging.getLogger("dunix.agent")

LEAVE_GRACE = 0.3  # seconds to let the leave announcement go out before exiting
AGENT_NICE = -10  # the agent's nice value; what it starts gets 0 (see run_ahead_of_jobs)


def run_ahead_of_jobs() -> None:
    """Let the agent's thread win the CPU from the jobs of its node (nice -10), while
    every process and thread it starts is back at nice 0 (``SCHED_RESET_ON_FORK``,
    sched(7)). The agent shares its host's CPU quota with the jobs: when a burst of 32
    CPU-bound jobs started on a 0.5-CPU home, its first 8 local jobs left the agent 1/9
    of the quota: the remote execs it had to hand over started up to 1.8 s late (up to
    0.4 to 0.6 s at nice -10), and once its peers, unanswered, declared it dead and
    killed its guests (a 9-job home; probe runs of spread_bench's CPU part). Where
    CAP_SYS_NICE is missing the agent runs as before."""
    try:
        os.sched_setscheduler(0, os.SCHED_OTHER | os.SCHED_RESET_ON_FORK, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, 0, AGENT_NICE)  # this thread (Linux)
    except OSError as exc:
        log.warning("the agent runs at the jobs' priority: %s", exc)


class Agent:
    """One node's daemon. ``run()`` serves until cancelled or signalled."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.identity = TLSIdentity.load(config.tls_dir, config.name, "node")
        self.features = read_cpu_features().restricted_to(config.cpu_flags)
        self.sampler = LoadSampler()
        self.jobs = JobService(self)
        self.jobs.default_mode = config.placement
        self.placement = PlacementPolicy(PlacementConfig(), random.Random())
        self._runnable: float | None = None  # runnable threads here, from the last sample
        self._no_peer_said = float("-inf")  # when "no peer can take an exec" was logged
        self.membership = Membership(
            config.name,
            config.address,
            derive_node_id(config.name),
            MembershipConfig(**config.membership),
            random.Random(),
            load=self._load_record(),
            incarnation=int(time.time()),
        )
        self.queries = PeerQueries(self.send_peer)
        self._watchers: set[trio.MemorySendChannel[NodeEvent]] = set()
        self._wake = trio.Event()
        self._links: PeerLinks | None = None
        self.control = ControlService(self)
        self.storage = StorageService(self)
        self.balance: BalanceService | None = None
        if config.balancer:
            self.balance = BalanceService(self, balancer_config(config.balancer_settings))

    # -- views used by the control service --------------------------------------------

    @property
    def node_id(self) -> int:
        return self.membership.node_id  # type: ignore[no-any-return]

    def wall(self, monotonic: float) -> float:
        """A trio-clock instant as wall-clock time (for people and JSON)."""
        return time.time() - (trio.current_time() - monotonic)

    def node_info(self, member: Member) -> NodeInfo:
        load: NodeLoad = member.load
        return NodeInfo(
            name=member.name,
            address=member.address,
            node_id=member.node_id,
            state=member.state,
            incarnation=member.incarnation,
            load=load.load1,
            load_now=load.load_now,
            cpus=load.cpus,
            mem_free=load.mem_free,
            cpu_level=load.cpu_level,
            cpu_flags=load.cpu_flags,
            procs=load.procs,
            since=self.wall(member.state_since),
        )

    def nodes(self) -> list[NodeInfo]:
        return sorted((self.node_info(m) for m in self.membership.members()), key=lambda n: n.name)

    def subscribe(
        self,
    ) -> tuple[trio.MemorySendChannel[NodeEvent], trio.MemoryReceiveChannel[NodeEvent]]:
        """A feed of membership events; pass the send end to :meth:`unsubscribe`."""
        send, receive = trio.open_memory_channel[NodeEvent](1024)
        self._watchers.add(send)
        return send, receive

    def unsubscribe(self, send: trio.MemorySendChannel[NodeEvent]) -> None:
        self._watchers.discard(send)

    # -- protocol loop ------------------------------------------------------------------

    def _load_record(self, sample: Any = None) -> NodeLoad:
        sample = sample or self.sampler.sample(time.monotonic())
        return NodeLoad(
            load1=round(sample.load1, 3),
            load_now=round(sample.load_now, 3),
            cpus=sample.cpus,
            mem_free=sample.mem_free,
            procs=len(self.jobs.procs),
            cpu_level=self.features.level,
            cpu_flags=self.features.flags,
        )

    def _apply(self, actions: list[Any]) -> None:
        assert self._links is not None
        for action in actions:
            if isinstance(action, Send):
                self._links.send(action.to, action.msg)
            elif isinstance(action, MemberEvent):
                self._publish(action)

    def _publish(self, event: MemberEvent) -> None:
        member = event.member
        log.info("member %s (%s) is now %s", member.name, member.address, event.kind)
        if event.kind in ("dead", "left") and self._links is not None:
            self._links.forget(member.address)
        if event.kind in ("dead", "left"):
            self.storage.peer_gone(member.node_id)
        remote = getattr(self, "remote", None)  # processes lost with a host, or orphaned
        if remote is not None:
            remote.member_changed(event.kind, member.name)
        record = NodeEvent(event.kind, self.node_info(member), time.time())
        for send in list(self._watchers):
            try:
                send.send_nowait(record)
            except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
                self._watchers.discard(send)  # a watcher that cannot keep up is dropped

    def join(self, seeds: list[str]) -> None:
        """Join (again) through ``seeds``, e.g. a peer found by discovery."""
        self._apply(self.membership.join(seeds, trio.current_time()))
        self._wake.set()

    def send_peer(self, address: str, msg: Any) -> None:
        """Best-effort delivery to a peer agent (see PeerLinks)."""
        if self._links is not None:
            self._links.send(address, msg)

    def alive_peers(self) -> list[tuple[str, str]]:
        me = self.config.name
        return [
            (m.name, m.address)
            for m in self.membership.members()
            if m.name != me and m.state == "alive"
        ]

    def peer_by_node_id(self, node_id: int) -> tuple[str, str] | None:
        for m in self.membership.members():
            if m.node_id == node_id and m.state in ("alive", "suspect"):
                return m.name, m.address
        return None

    def receive_gossip(self, sender: str, msg: Any) -> None:
        if isinstance(msg, MESSAGE_TYPES):
            self._apply(self.membership.receive(sender, msg, trio.current_time()))
            self._wake.set()
        elif isinstance(msg, PsQuery):
            self.send_peer(sender, PsAnswer(msg.query, tuple(self.jobs.ps())))
        elif isinstance(msg, PsAnswer | KillAnswer | MigrateAnswer):
            self.queries.answer(sender, msg.query, msg)
        elif isinstance(msg, MigrateQuery):
            self.migration.on_query(sender, msg)
        elif isinstance(msg, KillQuery):
            self.send_peer(sender, self._kill_answer(msg))
        else:
            log.warning("ignoring a %s from peer %s", type(msg).__name__, sender)

    def _kill_answer(self, q: KillQuery) -> KillAnswer:
        try:
            self.jobs.kill(q.gpid, q.signal, None if q.uid < 0 else q.uid)
        except DunixError as exc:
            return KillAnswer(q.query, type(exc).__name__, str(exc))
        return KillAnswer(q.query, "", "")

    async def _protocol_loop(self) -> None:
        self._apply(self.membership.join(list(self.config.join), trio.current_time()))
        while True:
            deadline = min(self.membership.next_deadline(), trio.current_time() + 0.05)
            with trio.move_on_at(deadline):
                await self._wake.wait()
            self._wake = trio.Event()
            self._apply(self.membership.tick(trio.current_time()))

    def slot_table(self, mode: str) -> list[tuple[str, int]]:
        """Where this node's tracers may send execs now (docs/run.md, ``slots``)."""
        now = trio.current_time()
        members = self.membership.members()
        hint = self._runnable if mode == "remote" else self._runnable_now()
        table = self.placement.plan(
            self.config.name, members, now, hint, force_remote=(mode == "remote")
        )
        if mode == "remote" and not table.slots and now - self._no_peer_said > 10:
            # seen once in CI: a forced-remote job ran at home with nothing in the log
            self._no_peer_said = now
            log.warning(
                "placement remote, but no peer can take an exec now: %s",
                ", ".join(
                    f"{m.name} {m.state} load heard {now - m.load_at:.1f} s ago, {m.load.cpus} cpus"
                    for m in members
                    if m.name != self.config.name
                )
                or "no peer known",
            )
        return list(table.slots)

    def spill_table(
        self, slots: list[tuple[str, int]] | None = None
    ) -> tuple[int, list[tuple[str, int]]]:
        """Where an auto job's burst may go before gossip shows it (docs/run.md, ``spill``);
        ``slots``: the slot table pushed with it (the tracer spends that first)."""
        order = self.placement.spill(
            self.config.name,
            self.membership.members(),
            trio.current_time(),
            self._runnable_now(),
            slots=slots or (),
        )
        return order.at, order.runs()

    def _runnable_now(self) -> float:
        """Runnable threads here now (the last sample may be a second old: see sampler.py)."""
        return float(self.sampler.fresh_runnable(time.monotonic()))

    def _went_remote(self, job: Job, event: WentRemote) -> None:
        # counted against the peer until its gossiped load shows it (PlacementPolicy.charge)
        self.placement.charge(event.node, at=trio.current_time())
        self.remote.went_remote(job, event)

    async def _slots_loop(self) -> None:
        """Push fresh slot tables to every running tracer."""
        # a job's first tables came with its start (runner.py, remote.py); re-planned in
        # the round right after, a burst's own forked children (runnable until they exec)
        # made the home look busy and the peers got slots on top of the order (32 jobs:
        # 5/9/9/9 instead of 8/8/8/8), so a job sits out the first round it is seen in
        seen: set[str] = set()
        while True:
            await trio.sleep(self.config.sample_interval)
            seen &= set(self.jobs.jobs)
            for key, job in list(self.jobs.jobs.items()):
                if job.mode == "local" or key not in seen:
                    seen.add(key)
                    continue
                table = self.slot_table(job.mode)
                spill = self.spill_table(table) if job.mode == "auto" else None
                for tracer in list(job.tracers):
                    with contextlib.suppress(OSError, trio.ClosedResourceError):
                        await tracer.push_slots(table)
                        if spill is not None:
                            await tracer.push_spill(*spill)

    async def _sample_loop(self) -> None:
        while True:
            sample = await trio.to_thread.run_sync(self.sampler.sample, time.monotonic())
            self._runnable = sample.load_now * sample.cpus
            self.membership.set_local_load(self._load_record(sample))
            await trio.sleep(self.config.sample_interval)

    # -- inbound ------------------------------------------------------------------------

    async def _on_tls(self, channel: Channel) -> None:
        if channel.peer_role == "node":
            peer = channel.peer_name
            async for msg in channel:
                if isinstance(msg, STREAM_MESSAGES):
                    hub = self.job_links.hubs.get(peer) or await self.job_links.hub(peer)
                    hub.deliver(msg)
                elif isinstance(msg, JOB_MESSAGES):
                    self.remote.on_peer_message(peer, msg)
                elif isinstance(msg, STORAGE_MESSAGES):
                    self.storage.on_peer_message(msg)
                elif isinstance(msg, MIGRATE_PEER_MESSAGES):
                    self.migration.on_peer_message(peer, msg)
                else:
                    self.receive_gossip(channel.peer_address, msg)
        else:
            await self.control.serve(channel)

    async def leave(self) -> None:
        """Tell the cluster this node leaves, and give the news a moment to go out."""
        self._apply(self.membership.leave(trio.current_time()))
        await trio.sleep(LEAVE_GRACE)

    async def _signals(self, cancel: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for signum in sigs:
                if signum == signal.SIGHUP:
                    continue
                log.info("signal %d: leaving the cluster", signum)
                await self.leave()
                cancel.cancel()
                return

    async def run(
        self, *, handle_signals: bool = True, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        cfg = self.config
        run_ahead_of_jobs()
        cfg.control.parent.mkdir(parents=True, exist_ok=True)
        async with trio.open_nursery() as nursery:
            self.nursery = TaskGroup(nursery)
            self.jobs.aim_pids()
            self.jobs.sweep_leftovers()  # what an agent killed here before still ran
            self.job_links = JobLinks(self, nursery)
            self.remote = RemoteService(self, self.job_links)
            self.migration = MigrationService(self)
            self.jobs.on_remote = self._went_remote
            self.jobs.on_stopped = self.remote.stopped
            self.jobs.on_exited = self.remote.exited
            deputy_socket = cfg.control.parent / "deputy.sock"
            await nursery.start(DeputyListener(deputy_socket, self.remote.serve_deputy).serve)
            nursery.start_soon(self._slots_loop)
            self._links = PeerLinks(
                nursery,
                self.identity,
                cfg.address,
                queue_size=cfg.peer_queue,
                connect_timeout=cfg.connect_timeout,
            )
            await nursery.start(serve_tls, cfg.listen, self.identity, self._on_tls)
            if cfg.storagefs:
                await nursery.start(self.storage.run)
            await nursery.start(
                functools.partial(serve_unix, str(cfg.control), self.control.serve, name=cfg.name)
            )
            nursery.start_soon(self._sample_loop)
            nursery.start_soon(self._protocol_loop)
            if self.balance is not None:
                nursery.start_soon(self.balance.run)
            if handle_signals:
                nursery.start_soon(self._signals, nursery.cancel_scope)
            if cfg.discover:
                from dunix.agent.discovery import Discovery

                nursery.start_soon(Discovery(self).run)
            log.info(
                "agent %s (node id %d, pid %d) serving on %s, control %s",
                cfg.name,
                self.node_id,
                os.getpid(),
                cfg.listen,
                cfg.control,
            )
            task_status.started()
        self._links.close()
        log.info("agent %s stopped", cfg.name)
