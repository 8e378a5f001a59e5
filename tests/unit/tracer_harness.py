"""Runs native/build/dunix-tracer as the agent would: a SOCK_SEQPACKET pair, messages read
by a thread, `slots`/`mode` pushed on demand. See docs/run.md ("Tracer protocol")."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

NATIVE = Path(__file__).resolve().parents[2] / "native"
TRACER = NATIVE / "build" / "dunix-tracer"

Message = tuple[str, ...]


def build_native() -> None:
    """`make -C native build/dunix-tracer` (only ours: another helper's work in progress
    must not fail these tests)."""
    subprocess.run(["make", "-s", "-C", str(NATIVE), "build/dunix-tracer"], check=True)


def split_packet(data: bytes) -> list[Message]:
    """A packet's messages: one, or a ``batch`` of (field count, fields...) each."""
    fields = data.decode().split("\0")
    if fields[0] != "batch":
        return [tuple(fields)]
    out, i = [], 1
    while i < len(fields):
        n = int(fields[i])
        out.append(tuple(fields[i + 1 : i + 1 + n]))
        i += 1 + n
    return out


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    messages: list[Message]
    packets: int = 0

    def of(self, kind: str) -> list[Message]:
        return [m for m in self.messages if m[0] == kind]

    @property
    def first_pid(self) -> int:
        return int(self.of("started")[0][1])

    @property
    def first_status(self) -> int:
        """Raw wait status of the job's first process, as the tracer reported it."""
        pid = str(self.first_pid)
        return int(next(m[2] for m in self.of("exit") if m[1] == pid))


@dataclass
class TracerRun:
    """One tracer process. `before` messages are queued on the socket before it starts,
    so the tracer reads them before the first exec of the job."""

    argv: Sequence[str]
    options: Sequence[str] = ()
    before: Sequence[Message] = ()
    stdin: int | None = subprocess.DEVNULL
    env: dict[str, str] | None = None
    tracer: Path = TRACER
    messages: list[Message] = field(default_factory=list)
    packets: int = 0  # how many packets carried them

    def __post_init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock = ours
        self._cond = threading.Condition()
        for m in self.before:
            self.send(*m)
        try:
            self.proc = subprocess.Popen(
                [str(self.tracer), "--sock", str(theirs.fileno()), *self.options, "--", *self.argv],
                pass_fds=[theirs.fileno()],
                stdin=self.stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self.env,
            )
        finally:
            theirs.close()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except OSError:
                data = b""
            with self._cond:
                if data:
                    self.packets += 1
                    self.messages.extend(split_packet(data))
                else:
                    self.messages.append(("<eof>",))
                self._cond.notify_all()
            if not data:
                return

    def send(self, *fields: str) -> None:
        self._sock.send("\0".join(fields).encode())

    def hang_up(self) -> None:
        """The agent goes away: the tracer sees EOF on its socket."""
        self._sock.shutdown(socket.SHUT_RDWR)

    def wait_for(self, match: Callable[[Message], bool], timeout: float = 10.0) -> Message:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for m in self.messages:
                    if match(m):
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or ("<eof>",) in self.messages:
                    raise TimeoutError(f"no such message; got {self.messages}")
                self._cond.wait(left)

    def finish(self, timeout: float = 30.0, input: bytes | None = None) -> Result:
        try:
            out, err = self.proc.communicate(input=input, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise
        self._reader.join(timeout)
        self._sock.close()
        msgs = [m for m in self.messages if m != ("<eof>",)]
        return Result(self.proc.returncode, out.decode(), err.decode(), msgs, self.packets)


def trace(argv: Sequence[str], *options: str, timeout: float = 30.0) -> Result:
    """Runs argv under the tracer to the end."""
    return TracerRun(argv, options).finish(timeout)


def untraced(argv: Sequence[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """The same program without the tracer (in its own process group, as traced)."""
    return subprocess.run(
        list(argv),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        process_group=0,
    )


def wait_exec(run: TracerRun, path_end: str, timeout: float = 10.0) -> int:
    m = run.wait_for(lambda m: m[0] == "exec" and m[2].endswith(path_end), timeout)
    return int(m[1])


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict (State, TracerPid, SigBlk ...)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


class FakeAgent:
    """The agent's deputy socket, as far as one deputy needs it: it answers `hello` with
    `ready` and then `exit CODE` (DUNIX_DEPUTY_SOCKET=path points a deputy here)."""

    def __init__(self, path: Path, code: int) -> None:
        self.path = path
        self.code = code
        self.hello: list[str] = []
        self.peer_pid = 0
        self.at_hello: dict[str, object] = {}  # exe, ppid and fds of the deputy then
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._listener.bind(str(path))
        self._listener.listen(1)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._listener.accept()
        with conn:
            creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            self.peer_pid = int.from_bytes(creds[:4], "little")
            self.hello = conn.recv(4096).decode().split("\0")
            self.at_hello = _look_at(self.peer_pid)
            conn.send(b"ready")
            time.sleep(0.1)  # the deputy closes its fds after `ready`
            conn.send(f"exit\0{self.code}".encode())
            conn.recv(4096)  # EOF once it exited

    def join(self, timeout: float = 10.0) -> None:
        self._thread.join(timeout)
        self._listener.close()


def _look_at(pid: int) -> dict[str, object]:
    fds = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            fds[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
    return {
        "exe": os.readlink(f"/proc/{pid}/exe"),
        "ppid": int(proc_status(pid)["PPid"]),
        "nspid": int(proc_status(pid)["NSpid"].split()[-1]),  # in its own PID namespace
        "fds": fds,
    }
