"""The message loop of ranks 1 .. W-1: take each message from the previous rank, apply it to the :class:`~.stage.Stage`
and pass it on (the last rank sends the RETURN back to rank 0 instead), until STOP.

Messages arrive in one ordered stream per link, so every rank applies prompt changes, stream opens / closes /
resets, row changes, re-seeding and block moves between the same two calls as rank 0 did. Owns the worker side of
the protocol; imports :mod:`.stage`, :mod:`.protocol`, :mod:`.transport`, :mod:`.health` and ``core``, nothing above.
"""

from __future__ import annotations

import logging
import time

from wanstream.core.block_scheduler import Move, format_split
from wanstream.pipeline.health import Health
from wanstream.pipeline.protocol import Kind, Message, PipeConfig, ProtocolError, StepMeta
from wanstream.pipeline.stage import Stage
from wanstream.pipeline.transport import Transport

log = logging.getLogger("wanstream.pipeline")


class Worker:
    """One worker rank: its stage, its links and its health beacon."""

    def __init__(self, stage: Stage, transport: Transport, health: Health, fault: str | None = None):
        self.stage = stage
        self.transport = transport
        self.health = health
        self.fault = fault            # tests only: "hang:<rank>:<call>" (LaunchSpec.fault)
        self.rank = stage.rank
        self.prev = (stage.rank - 1) % stage.world

    def serve(self) -> None:
        """Handle messages from the previous rank until STOP."""
        tr, st = self.transport, self.stage
        while True:
            msg = tr.recv(self.prev, "the next message")
            kind = msg.kind
            if kind == Kind.STEP:
                self._on_step(msg)
            elif kind == Kind.OPEN:
                tr.consume(msg)
                n = PipeConfig.INTS
                cfg = PipeConfig.from_meta(msg.meta[:n])
                stream, rows, seed, fresh = msg.meta[n: n + 4]
                if fresh:
                    st.configure(cfg)
                st.open_stream(stream, rows, seed, msg.payloads[0])
                self._forward(msg)
            elif kind == Kind.CLOSE:
                st.close_stream(msg.meta[0])
                self._forward(msg)
            elif kind == Kind.RESET:
                st.reset_stream(*msg.meta[:3])
                self._forward(msg)
            elif kind == Kind.PROMPT:
                tr.consume(msg)
                st.set_prompt(msg.meta[0], msg.payloads[0])
                self._forward(msg)
            elif kind == Kind.RECONFIG:
                st.reconfigure_rows(*msg.meta[:2])
                self._forward(msg)
            elif kind == Kind.SEED:
                st.reseed(*msg.meta[:2])
                self._forward(msg)
            elif kind == Kind.MOVE:
                self._on_move(msg)
            elif kind == Kind.STOP:
                self._on_stop()
                return
            else:
                raise ProtocolError(f"rank {self.rank}: unexpected {kind.name} from rank {self.prev}")

    def _forward(self, msg: Message) -> None:
        if not self.stage.is_last:
            self.transport.send(self.stage.next, Message(msg.kind, msg.call, list(msg.meta), list(msg.payloads)))

    def _injected_fault(self, call: int) -> None:
        """Tests only (``LaunchSpec.fault = "hang:<rank>:<call>"``): stall like a stuck kernel, heartbeat alive."""
        kind, rank, at = (self.fault.split(":") + ["", "", ""])[:3]
        if kind == "hang" and int(rank) == self.rank and call >= int(at):
            self.health.mark(f"computing call {call}")
            time.sleep(600)

    def _on_step(self, msg: Message) -> None:
        tr, st = self.transport, self.stage
        if self.fault:
            self._injected_fault(msg.call)
        tr.consume(msg)
        m = StepMeta.from_meta(msg.meta)
        hidden, x_lat, ts = msg.payloads
        with st.timed_call():
            out = st.run(hidden, ts, m)
            tr.release(msg)
            if st.is_last:
                reply = st.finish(x_lat, out, ts, m)
        timings = st.timings(m)
        if st.is_last:
            meta = StepMeta.from_meta(reply.meta)
            meta.timings = timings
            reply.meta = meta.to_meta()
            reply.call = msg.call
            tr.send(st.next, reply)
        else:
            m.timings = timings
            tr.send(st.next, Message(Kind.STEP, msg.call, m.to_meta(), [out, x_lat, ts]))

    def _on_move(self, msg: Message) -> None:
        """This rank's part of a move (after the MOVE went on): send or receive the block, update the split."""
        block, src, dst, epoch = msg.meta[:4]
        move = Move(block, src, dst)
        self._forward(msg)
        tr, st = self.transport, self.stage
        if move.src == self.rank:
            out = st.export_block(move.block)
            tr.send(move.dst, out)
            log.info("rank %d: sent block %d to rank %d (%.1f MB)", self.rank, move.block, move.dst,
                     sum(p.numel() * p.element_size() for p in out.payloads) / 1e6)
        elif move.dst == self.rank:
            got = tr.recv(move.src, "a moved block")
            if got.kind != Kind.BLOCK:
                raise ProtocolError(f"rank {self.rank}: expected BLOCK from rank {move.src}, got {got.kind.name}")
            tr.consume(got)
            st.import_block(got)
            log.info("rank %d: received block %d from rank %d", self.rank, move.block, move.src)
        st.apply_move(move)
        st.epoch = epoch
        if self.rank in (move.src, move.dst):
            log.info("rank %d: split now %s", self.rank, format_split(st.ranges))

    def _on_stop(self) -> None:
        """Pass STOP on every outgoing link (the last rank's ring link is the acknowledgement to rank 0), then
        wait for STOP on every other incoming link so all receiver threads end."""
        tr = self.transport
        for dst in tr.outs:
            tr.send(dst, Message(Kind.STOP))
        for src in tr.ins:
            if src == self.prev:
                continue
            while tr.recv(src, "STOP").kind != Kind.STOP:
                pass
