"""Point-to-point transport between pipeline ranks.

Links: the ring ``r → r+1`` (the last rank's link goes to rank 0: the return path) and, for block moves towards
the start of the pipeline, ``r → r-1``. Each link is one ordered stream: one **sender thread** on the source
writes it, one **receiver thread** on the destination reads it, so the compute thread never blocks inside a
collective library call; it exchanges :class:`~.protocol.Message` objects with those threads through queues
and, while it waits, watches the other ranks' health.

Groups: control (headers and tables) always on gloo (CPU tensors); data (payloads) on NCCL when the device is
CUDA, else on the same gloo groups. Each direction has its own group (``up``: src < dst, ``down``: src > dst), so
on every pair of ranks a group carries one direction only and operations are issued in the same order on both
sides (NCCL's requirement).

CUDA: payloads are produced on the compute stream; the producer records an event, the sender thread's stream
waits on it before ``send`` (no reliance on incidental host syncs). The receiver thread receives on its own
stream and records a ready event that the consumer's stream waits on (:meth:`Transport.consume`). At most
``max_outstanding`` messages per link are queued or in flight. The big activation payload of ``STEP`` messages
is received into a small pool of reused buffers, given back by :meth:`Transport.release` once consumed.

While it waits for a message, a rank watches the others through :class:`~.health.Health`, so a failure anywhere
becomes a :class:`~.health.PipelineError` naming the culprit instead of a hang. Owns the links; imports
:mod:`.protocol` and :mod:`.health` only.
"""

from __future__ import annotations

import datetime
import os
import queue
import threading
import time
from collections import deque

import torch
import torch.distributed as dist

from wanstream.pipeline.health import Health, PipelineError
from wanstream.pipeline.protocol import HEADER_INTS, Kind, Message, ProtocolError, encode, parse_header, parse_table

LONG = datetime.timedelta(days=7)       # receiver threads wait on idle links; failures are detected by Health


# ------------------------------------------------------------------------------------------------ links
def out_targets(rank: int, world: int) -> list[int]:
    """Ranks this rank sends to: the next one on the ring, and the previous one (block moves) if any."""
    out = [(rank + 1) % world]
    if rank >= 1 and rank - 1 not in out:
        out.append(rank - 1)
    return out


def in_sources(rank: int, world: int) -> list[int]:
    out = [(rank - 1) % world]
    if rank + 1 < world and rank + 1 not in out:
        out.append(rank + 1)
    return out


# ------------------------------------------------------------------------------------------ buffer pool
class BufferPool:
    """Reused receive buffers per (shape, dtype): at most ``depth`` each; a buffer comes back with
    :meth:`release` (on CUDA with an event of the consumer's stream that the next receive waits on)."""

    def __init__(self, device: torch.device, depth: int = 4):
        self.device = device
        self.depth = depth
        self._free: dict[tuple, list] = {}
        self._count: dict[tuple, int] = {}
        self._cond = threading.Condition()
        self.allocated = 0
        self.reused = 0

    def acquire(self, shape: tuple, dtype: torch.dtype, stop: threading.Event):
        key = (tuple(shape), dtype)
        with self._cond:
            while True:
                free = self._free.setdefault(key, [])
                if free:
                    self.reused += 1
                    return free.pop()
                if self._count.get(key, 0) < self.depth:
                    self._count[key] = self._count.get(key, 0) + 1
                    self.allocated += 1
                    return torch.empty(shape, dtype=dtype, device=self.device), None
                if stop.is_set():
                    raise PipelineError("transport closed while waiting for a receive buffer")
                self._cond.wait(0.5)

    def release(self, buf: torch.Tensor, event=None) -> None:
        with self._cond:
            self._free.setdefault((tuple(buf.shape), buf.dtype), []).append((buf, event))
            self._cond.notify()


class _LinkDown:
    def __init__(self, src: int, error: BaseException):
        self.src = src
        self.error = error


# ------------------------------------------------------------------------------------------- transport
def _gloo(store, name: str, rank: int, world: int, hostname: str | None):
    """A gloo group on ``hostname`` (127.0.0.1 when spawned locally), else ``GLOO_SOCKET_IFNAME`` or the default."""
    opts = dist.ProcessGroupGloo._Options()
    ifname = os.environ.get("GLOO_SOCKET_IFNAME")
    if hostname:
        dev = dist.ProcessGroupGloo.create_device(hostname=hostname)
    elif ifname:
        dev = dist.ProcessGroupGloo.create_device(interface=ifname.split(",")[0])
    else:
        dev = dist.ProcessGroupGloo.create_default_device()
    opts._devices = [dev]
    opts._timeout = LONG
    return dist.ProcessGroupGloo(dist.PrefixStore(name, store), rank, world, opts)


def _nccl(store, name: str, rank: int, world: int):
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = LONG
    return dist.ProcessGroupNCCL(dist.PrefixStore(name, store), rank, world, opts)


class Transport:
    """Message passing for one rank (see the module docstring)."""

    def __init__(self, rank: int, world: int, store, device: torch.device, health: Health, *,
                 timeout: float = 120.0, poll: float = 0.2, max_outstanding: int = 2, pool_depth: int = 4,
                 hostname: str | None = "127.0.0.1"):
        self.rank, self.world, self.device = rank, world, torch.device(device)
        self.health = health
        self.timeout = timeout
        self.poll = poll
        self.max_outstanding = max_outstanding
        self.cuda = self.device.type == "cuda"
        self.ctrl = {"up": _gloo(store, "ctrl_up", rank, world, hostname),
                     "down": _gloo(store, "ctrl_down", rank, world, hostname)}
        if self.cuda:
            if not dist.is_nccl_available():
                raise PipelineError("CUDA pipeline stages need NCCL, which this torch build lacks", rank)
            self.data = {"up": _nccl(store, "data_up", rank, world), "down": _nccl(store, "data_down", rank, world)}
            self.send_stream = torch.cuda.Stream(device=self.device)
            self.recv_stream = torch.cuda.Stream(device=self.device)
        else:
            self.data = self.ctrl
        self.pool = BufferPool(self.device, pool_depth)
        self._stop = threading.Event()
        self.outs = out_targets(rank, world)
        self.ins = in_sources(rank, world)
        self.inbox = {src: queue.Queue() for src in self.ins}
        self.outbox = {dst: queue.Queue(maxsize=max_outstanding) for dst in self.outs}
        self.sent = {dst: 0 for dst in self.outs}
        self.bytes_sent = 0
        self._send_error: dict[int, BaseException] = {}
        self._threads = []
        for dst in self.outs:
            t = threading.Thread(target=self._sender, args=(dst,), name=f"wanstream-send-{rank}to{dst}", daemon=True)
            t.start()
            self._threads.append(t)
        for src in self.ins:
            t = threading.Thread(target=self._receiver, args=(src,), name=f"wanstream-recv-{src}to{rank}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    @staticmethod
    def _dir(src: int, dst: int) -> str:
        return "up" if src < dst else "down"

    # -------------------------------------------------------------- compute-thread API
    def send(self, dst: int, msg: Message) -> None:
        """Queue ``msg`` for ``dst`` (blocks while ``max_outstanding`` messages of that link are pending)."""
        if dst not in self.outbox:
            raise ProtocolError(f"rank {self.rank} has no link to rank {dst}")
        if self.cuda and msg.payloads:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            msg.ready = ev
        start = time.monotonic()
        while True:
            if dst in self._send_error:
                self._link_failed(dst, self._send_error[dst])
            try:
                self.outbox[dst].put(msg, timeout=self.poll)
                return
            except queue.Full:
                self.health.mark(f"waiting for rank {dst} (send)")
                self.health.check()
                if time.monotonic() - start > self.timeout:
                    err = self.health.diagnose(dst, time.monotonic() - start)
                    if err is not None:
                        raise err
                    start = time.monotonic()

    def recv(self, src: int, what: str = "a message") -> Message:
        """The next message from ``src``; raises :class:`PipelineError` naming the culprit on failure."""
        if src not in self.inbox:
            raise ProtocolError(f"rank {self.rank} has no link from rank {src}")
        start = time.monotonic()
        self.health.mark(f"waiting for rank {src} ({what})")
        while True:
            try:
                item = self.inbox[src].get(timeout=self.poll)
            except queue.Empty:
                self.health.check()
                if time.monotonic() - start > self.timeout:
                    err = self.health.diagnose(src, time.monotonic() - start)
                    if err is not None:
                        raise err from None
                    start = time.monotonic()     # the wait leads to an idle rank 0: nothing is stuck
                continue
            if isinstance(item, _LinkDown):
                self._link_failed(src, item.error)
            self.health.mark("busy")
            self.health.tick()
            return item

    def _link_failed(self, peer: int, error: BaseException):
        """A link broke: give the store a moment to reveal the root cause, else blame the peer."""
        deadline = time.monotonic() + self.health.dead_after + 2 * self.poll
        while time.monotonic() < deadline:
            self.health.check()
            time.sleep(self.poll)
        raise PipelineError(f"lost the connection to rank {peer}: {error}", peer)

    def consume(self, msg: Message) -> None:
        """Make the current (compute) stream wait until the payloads of ``msg`` have arrived."""
        if self.cuda and msg.ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(msg.ready)
            for p in msg.payloads:
                if p.is_cuda:
                    p.record_stream(stream)
            msg.ready = None

    def release(self, msg: Message) -> None:
        """Give the pooled receive buffers of ``msg`` back (after the compute that reads them is queued)."""
        if not msg.pooled:
            return
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        for buf in msg.pooled:
            self.pool.release(buf, event)
        msg.pooled = None

    def close(self, wait: float = 10.0) -> None:
        """Stop the sender threads once their queues are empty (receivers end on STOP or a broken link)."""
        self._stop.set()
        deadline = time.monotonic() + wait
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))

    # -------------------------------------------------------------- threads
    def _sender(self, dst: int) -> None:
        if self.cuda:
            torch.cuda.set_device(self.device)       # the current device is per thread
        ctrl = self.ctrl[self._dir(self.rank, dst)]
        data = self.data[self._dir(self.rank, dst)]
        inflight: deque = deque()
        try:
            while True:
                try:
                    msg = self.outbox[dst].get(timeout=0.5)
                except queue.Empty:
                    if self._stop.is_set():
                        return
                    continue
                header, table = encode(msg, self.sent[dst], self.rank)
                self.sent[dst] += 1
                ctrl.send([header], dst, 0).wait()
                if table is not None:
                    ctrl.send([table], dst, 0).wait()
                if msg.payloads:
                    self._send_payloads(data, dst, msg, inflight)
                if msg.kind == Kind.STOP:
                    break
            while inflight:
                inflight.popleft()[0].synchronize()
        except BaseException as exc:  # noqa: BLE001 - reported to the compute thread
            self._send_error[dst] = exc

    def _send_payloads(self, data, dst: int, msg: Message, inflight: deque) -> None:
        payloads = [p.contiguous() for p in msg.payloads]
        self.bytes_sent += sum(p.numel() * p.element_size() for p in payloads)
        if not self.cuda:
            for p in payloads:
                data.send([p], dst, 0).wait()
            return
        with torch.cuda.stream(self.send_stream):
            if msg.ready is not None:
                self.send_stream.wait_event(msg.ready)
            for p in payloads:
                data.send([p], dst, 0).wait()   # NCCL: the side stream waits on the send, the host does not
            done = torch.cuda.Event()
            done.record(self.send_stream)
        inflight.append((done, payloads))
        while inflight and (len(inflight) > self.max_outstanding or inflight[0][0].query()):
            inflight.popleft()[0].synchronize()

    def _receiver(self, src: int) -> None:
        if self.cuda:
            torch.cuda.set_device(self.device)
        ctrl = self.ctrl[self._dir(src, self.rank)]
        data = self.data[self._dir(src, self.rank)]
        seq = 0
        try:
            while True:
                header = torch.empty(HEADER_INTS, dtype=torch.int64)
                ctrl.recv([header], src, 0).wait()
                h = parse_header(header, src, seq)
                seq += 1
                table = None
                if h.table_len:
                    table = torch.empty(h.table_len, dtype=torch.int64)
                    ctrl.recv([table], src, 0).wait()
                meta, specs = parse_table(h, table)
                msg = Message(h.kind, h.call, meta, [], h.flags, h.sender, h.seq)
                if specs:
                    self._recv_payloads(data, src, msg, specs)
                self.inbox[src].put(msg)
                if h.kind == Kind.STOP:
                    return
        except BaseException as exc:  # noqa: BLE001 - reported to the compute thread
            self.inbox[src].put(_LinkDown(src, exc))

    def _recv_payloads(self, data, src: int, msg: Message, specs) -> None:
        bufs, pooled = [], []
        ctx = torch.cuda.stream(self.recv_stream) if self.cuda else _null()
        with ctx:
            for i, (dtype, shape) in enumerate(specs):
                if msg.kind == Kind.STEP and i == 0:
                    buf, event = self.pool.acquire(shape, dtype, self._stop)
                    if event is not None:
                        self.recv_stream.wait_event(event)
                    pooled.append(buf)
                else:
                    buf = torch.empty(shape, dtype=dtype, device=self.device)
                data.recv([buf], src, 0).wait()
                bufs.append(buf)
            if self.cuda:
                ev = torch.cuda.Event()
                ev.record(self.recv_stream)
                msg.ready = ev
        msg.payloads = bufs
        msg.pooled = pooled or None


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
