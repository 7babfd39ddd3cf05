"""The pipeline's wire protocol: a typed header, a table of ints, then the payload tensors.

Every message on a link ``src → dst`` is, in this order:

1. **header** ``int64[8]``: ``[MAGIC, kind, seq, call, n_meta, n_payloads, sender, flags]``;
   ``seq`` counts the messages of this link (the receiver checks it), ``call`` is the stream-batch call the
   message belongs to (-1 if none);
2. **table** ``int64[n_meta + 8 * n_payloads]`` (sent only when not empty): the message's metadata ints
   (positions, rows, block indices, timings, settings; floats travel as their IEEE-754 bits) followed by one
   descriptor per payload ``[dtype code, ndim, d0 .. d5]``;
3. the **payloads**, one tensor each, exactly the shapes and dtypes announced.

Header and table are CPU tensors (they go over the control group, gloo); payloads may live on the GPU (they go
over the data group, NCCL there). Nothing depends on tags: every link is one ordered stream written by one
sender thread and read by one receiver thread, and a message is parsed from what its header announces.

The metadata layouts of the kinds that carry more than a few ints live here too: :class:`PipeConfig` (OPEN: the
settings every stream of the ring shares) and :class:`StepMeta` (STEP / RETURN: a call's rows exactly as the
scheduler planned them). Owns the wire format only; imports ``core`` and torch, nothing of the pipeline.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

import torch

from wanstream.core.config import CacheConfig
from wanstream.core.schedule import Row

MAGIC = 0x57535031  # "WSP1"
HEADER_INTS = 8
DESC_INTS = 8
MAX_NDIM = DESC_INTS - 2

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.uint8,
          torch.bool]
DTYPE_CODE = {dt: i for i, dt in enumerate(DTYPES)}


class ProtocolError(RuntimeError):
    """A message that does not follow the protocol (wrong magic, order, kind or shape)."""


class Kind(IntEnum):
    PROMPT = 2     # new prompt embedding (payload 0) of a stream (meta: [stream])
    STEP = 3       # one DiT call travelling forward: hidden / latents, slot latents, timesteps
    RETURN = 4     # last stage → stage 0: re-noised slot latents, the finished chunk (latent, pixels)
    RECONFIG = 5   # a stream's cache rows change (a step change, after its drain): stream, rows
    SEED = 6       # re-seed the last stage's re-noise source of a stream (meta: [stream, seed])
    MOVE = 7       # move one block between neighbouring stages
    BLOCK = 8      # the moved block: weights, KV cache rows, prompt K/V (old owner → new owner)
    STOP = 9       # end of the pipeline: forwarded around the ring, then every rank exits
    OPEN = 10      # one more stream: PipeConfig + [stream, rows, renoise seed, fresh], prompt embedding (payload 0)
    CLOSE = 11     # a stream leaves: its cache rows and prompt slot go back to the pool (meta: [stream])
    RESET = 12     # a stream starts over: zeroed rows, fresh re-noise source and decoder ([stream, rows, seed])


@dataclass
class Message:
    kind: Kind
    call: int = -1
    meta: list[int] = field(default_factory=list)
    payloads: list[torch.Tensor] = field(default_factory=list)
    flags: int = 0
    sender: int = -1
    seq: int = -1
    ready: object = None       # CUDA event: payloads are ready (set by the producer / the receiver)
    pooled: object = None      # buffers to give back to the receive pool once consumed


# ------------------------------------------------------------------------------------------------ floats
def f2i(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def i2f(x: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(x)))[0]


# ------------------------------------------------------------------------------------------------ wire
def encode(msg: Message, seq: int, sender: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Header and table of ``msg`` (CPU int64)."""
    for p in msg.payloads:
        if p.ndim > MAX_NDIM:
            raise ProtocolError(f"payload of {p.ndim} dims (at most {MAX_NDIM})")
        if p.dtype not in DTYPE_CODE:
            raise ProtocolError(f"payload dtype {p.dtype} is not in the protocol")
    header = torch.tensor([MAGIC, int(msg.kind), seq, msg.call, len(msg.meta), len(msg.payloads), sender,
                           msg.flags], dtype=torch.int64)
    table = list(msg.meta)
    for p in msg.payloads:
        dims = list(p.shape) + [0] * (MAX_NDIM - p.ndim)
        table += [DTYPE_CODE[p.dtype], p.ndim] + dims
    return header, (torch.tensor(table, dtype=torch.int64) if table else None)


@dataclass
class Header:
    kind: Kind
    seq: int
    call: int
    n_meta: int
    n_payloads: int
    sender: int
    flags: int

    @property
    def table_len(self) -> int:
        return self.n_meta + DESC_INTS * self.n_payloads


def parse_header(t: torch.Tensor, src: int, expected_seq: int) -> Header:
    v = t.tolist()
    if v[0] != MAGIC:
        raise ProtocolError(f"message from rank {src}: bad magic {v[0]:#x} (not a wanstream pipeline peer, or "
                            f"the stream lost sync)")
    try:
        kind = Kind(v[1])
    except ValueError:
        raise ProtocolError(f"message from rank {src}: unknown kind {v[1]}") from None
    if v[2] != expected_seq:
        raise ProtocolError(f"message from rank {src}: sequence {v[2]}, expected {expected_seq}")
    if v[6] != src:
        raise ProtocolError(f"message on the link from rank {src} claims sender {v[6]}")
    if v[4] < 0 or v[5] < 0:
        raise ProtocolError(f"message from rank {src}: negative counts")
    return Header(kind, v[2], v[3], v[4], v[5], v[6], v[7])


def parse_table(h: Header, table: torch.Tensor | None) -> tuple[list[int], list[tuple[torch.dtype, tuple]]]:
    v = table.tolist() if table is not None else []
    if len(v) != h.table_len:
        raise ProtocolError(f"table of {len(v)} ints, header announced {h.table_len}")
    meta = v[: h.n_meta]
    specs = []
    for i in range(h.n_payloads):
        d = v[h.n_meta + DESC_INTS * i: h.n_meta + DESC_INTS * (i + 1)]
        if not 0 <= d[0] < len(DTYPES) or not 0 <= d[1] <= MAX_NDIM:
            raise ProtocolError(f"bad payload descriptor {d}")
        specs.append((DTYPES[d[0]], tuple(d[2: 2 + d[1]])))
    return meta, specs


# ------------------------------------------------------------------------------------------------ metadata
DECODE_NONE, DECODE_VAE, DECODE_TAEHV = 0, 1, 2
DECODERS = {"none": DECODE_NONE, "vae": DECODE_VAE, "taehv": DECODE_TAEHV}


@dataclass
class PipeConfig:
    """What every stream of the ring shares (travels in OPEN): token grid size, cache settings, the last stage's
    decoder."""

    tokens_per_frame: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    decode: int = DECODE_NONE

    INTS = 7            # its length in a message's metadata

    def to_meta(self) -> list[int]:
        c = self.cache
        return [self.tokens_per_frame, c.capacity, c.sink, f2i(c.sink_threshold), c.rope_wrap_at, c.rope_wrap_to,
                self.decode]

    @classmethod
    def from_meta(cls, m: list[int]) -> "PipeConfig":
        cache = CacheConfig(capacity=m[1], sink=m[2], sink_threshold=i2f(m[3]), rope_wrap_at=m[4], rope_wrap_to=m[5])
        return cls(m[0], cache, m[6])


ROW_INTS = 8     # per row in a STEP: stream, level, cache row, frame, rope, final, t, t_next (float bits)


@dataclass
class StepMeta:
    """Metadata of a STEP / RETURN (host ints): the call's rows exactly as the scheduler planned them, so every
    stage builds the same CacheStep and the last stage settles the rows the same way the runner does."""

    epoch: int
    rows: list[Row]                    # the call's rows (chunk ids stay on rank 0)
    grid: tuple[int, int, int]
    copy_row0: bool = False            # after the call: the rows' streams copy cache row 0 to all rows (prepare)
    keep: int = 0                      # RETURN: re-noised rows returned
    finished: int = 0                  # RETURN: clean rows returned
    decoded: bool = False              # RETURN: their decoded frames are included
    timings: list[tuple[int, int, int]] = field(default_factory=list)   # per stage: (dit us, busy us, blocks)

    def to_meta(self) -> list[int]:
        out = [self.epoch, len(self.rows), *self.grid, int(self.copy_row0), self.keep, self.finished,
               int(self.decoded), len(self.timings)]
        for r in self.rows:
            out += [int(r.stream), r.level, r.cache_row, r.frame, r.rope, int(r.final), f2i(r.t), f2i(r.t_next)]
        for t in self.timings:
            out += list(t)
        return out

    @classmethod
    def from_meta(cls, m: list[int]) -> "StepMeta":
        epoch, n, f, h, w, copy, keep, fin, dec, nt = m[:10]
        body = m[10:]
        if len(body) != ROW_INTS * n + 3 * nt:
            raise ProtocolError(f"step metadata of {len(m)} ints does not match its counts")
        rows = []
        for i in range(n):
            sid, level, crow, frame, rope, final, t, t_next = body[ROW_INTS * i: ROW_INTS * (i + 1)]
            rows.append(Row(sid, None, level, crow, frame, rope, bool(final), False, i2f(t), i2f(t_next)))
        tail = body[ROW_INTS * n:]
        timings = [tuple(tail[3 * i: 3 * i + 3]) for i in range(nt)]
        return cls(epoch, rows, (f, h, w), bool(copy), keep, fin, bool(dec), timings)
