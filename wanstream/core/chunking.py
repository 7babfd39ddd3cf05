"""The chunk rule and frame numbering of a stream — the one home of both.

A stream's input frames are cut into chunks by its backbone's :class:`ChunkRule`. StreamDiffusionV2's: the first
chunk has 5 frames (the Wan VAE encodes the first frame alone, so 5 frames → 2 latent frames), every later chunk 4
frames (→ 1 latent frame); the 3-latent blocks of Self-Forcing and LongLive: 9 frames, then 12 (→ 3 latent
frames). Each input frame has an *index* (its position in the stream's input, 0, 1, 2, …), the caller's *frame
id* (what the output frame that restyles it reports; the index unless the caller gives its own) and a *timestamp*
(its capture or arrival time, carried to the output). :class:`ChunkBuffer` holds frames until a chunk is full and
hands out whole chunks with their :class:`ChunkInfo`; at the end of a stream :meth:`ChunkBuffer.take_padded` pads
the last partial chunk by repeating its last frame (the padding frames produce no output). A text-to-video stream
has no input frames: :class:`BlockRequests` stands in for its queue (blocks asked for; each block's output frames
numbered the same way).
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

FIRST_CHUNK_FRAMES = 5      # pixel frames of a stream's first chunk (→ 2 latent frames), StreamDiffusionV2
CHUNK_FRAMES = 4            # pixel frames of every later chunk (→ 1 latent frame)
FIRST_CHUNK_LATENTS = 2
CHUNK_LATENTS = 1


@dataclass(frozen=True)
class ChunkRule:
    """Pixel frames and latent frames of a stream's first chunk and of every later one (the Wan VAE maps
    ``1 + 4(k - 1)`` frames of a stream's start to k latents, then 4 frames to 1)."""

    first_frames: int
    first_latents: int
    frames: int
    latents: int

    @classmethod
    def blocks(cls, latents: int) -> "ChunkRule":
        """Chunks of ``latents`` latent frames: ``4·latents − 3`` frames first, then ``4·latents``."""
        return cls(4 * latents - 3, latents, 4 * latents, latents)

    def chunk_frames(self, prepared: bool) -> int:
        return self.frames if prepared else self.first_frames

    def latent_frames(self, first: bool) -> int:
        return self.first_latents if first else self.latents

    def chunks_in(self, frames: int) -> int:
        return 0 if frames < self.first_frames else 1 + (frames - self.first_frames) // self.frames

    def frames_for(self, chunks: int) -> int:
        return 0 if chunks <= 0 else self.first_frames + self.frames * (chunks - 1)


SDV2_RULE = ChunkRule(FIRST_CHUNK_FRAMES, FIRST_CHUNK_LATENTS, CHUNK_FRAMES, CHUNK_LATENTS)
BLOCK3_RULE = ChunkRule.blocks(3)


def chunk_frames(prepared: bool, rule: ChunkRule = SDV2_RULE) -> int:
    """Pixel frames of the next chunk of a stream (``prepared``: its first chunk has been taken)."""
    return rule.chunk_frames(prepared)


def chunks_in(frames: int, rule: ChunkRule = SDV2_RULE) -> int:
    """Whole chunks that ``frames`` input frames of a new stream fill."""
    return rule.chunks_in(frames)


def frames_for(chunks: int, rule: ChunkRule = SDV2_RULE) -> int:
    """Input frames that fill ``chunks`` whole chunks of a new stream."""
    return rule.frames_for(chunks)


@dataclass
class FrameIn:
    """One queued input frame."""

    image: Any               # the pixels (numpy uint8 [H, W, 3] or a tensor); opaque here
    index: int               # position in the stream's input
    frame_id: int            # reported back with the output frame
    timestamp: float         # carried to the output frame
    arrival: float           # when it arrived (for waiting times and deadlines)


@dataclass
class ChunkInfo:
    """What the output frames of a chunk report: one entry per frame of the chunk."""

    indices: list[int]
    frame_ids: list[int]
    timestamps: list[float]
    arrivals: list[float]
    real: int                # frames that were real input (the rest is end-of-stream padding)
    first: bool = False      # the stream's first chunk

@dataclass
class ChunkBuffer:
    """Input frames of one stream, cut into chunks. Thread-safe (transports push, the engine takes).

    ``max_chunks`` bounds the queue to that many chunks (5 frames each before the first chunk is taken, 4 after):
    a frame pushed onto a full queue drops the oldest (``dropped`` counts them), so a stream that outruns the model
    keeps the newest frames and never builds a backlog. ``None``: unbounded (files and the Python API, where every
    frame must come out).
    """

    max_chunks: int | None = None
    on_take: Callable[[ChunkInfo], None] | None = None     # a chunk went to the model (called outside the lock)
    on_drop: Callable[[int], None] | None = None           # frames were discarded (full queue, clear, late)
    prepared: bool = False
    held: bool = False       # frames wait (e.g. for a prompt still being encoded): not ready, not late-dropped
    rule: ChunkRule = SDV2_RULE   # the stream's chunk rule (its backbone's; set before the first frame is taken)
    frames_in: int = 0
    dropped: int = 0
    _queue: deque = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def next_len(self) -> int:
        return self.rule.chunk_frames(self.prepared)

    def __len__(self) -> int:
        return len(self._queue)

    def push(self, image, timestamp: float, arrival: float | None = None, frame_id: int | None = None) -> int:
        """Queue a frame; returns how many old frames it pushed out (0 unless the queue was full)."""
        with self._lock:
            index = self.frames_in
            self.frames_in += 1
            dropped = 0
            if self.max_chunks is not None:
                while len(self._queue) >= self.max_chunks * self.next_len:
                    self._queue.popleft()
                    dropped += 1
            self.dropped += dropped
            self._queue.append(FrameIn(image, index, index if frame_id is None else int(frame_id), float(timestamp),
                                       float(timestamp if arrival is None else arrival)))
        return self._dropped(dropped)

    def ready(self) -> bool:
        """A whole chunk is queued (and the queue is not held)."""
        with self._lock:
            return not self.held and len(self._queue) >= self.next_len

    def arrivals(self) -> list[float]:
        """Arrival times of the queued frames, oldest first."""
        with self._lock:
            return [f.arrival for f in self._queue]

    def drop_oldest(self, n: int) -> int:
        """Discard up to ``n`` of the oldest queued frames; returns how many."""
        with self._lock:
            k = min(n, len(self._queue))
            for _ in range(k):
                self._queue.popleft()
            self.dropped += k
        return self._dropped(k)

    def clear(self) -> int:
        """Discard every queued frame (a reset or a prompt change); returns how many."""
        with self._lock:
            k = len(self._queue)
            self._queue.clear()
            self.dropped += k
        return self._dropped(k)

    def restart(self, discard: bool = True) -> int:
        """A new stream starts (reset): the next chunk has 5 frames; queued frames are discarded, or with
        ``discard=False`` kept as the new stream's first frames (a reset timed to a chunk boundary)."""
        with self._lock:
            k = len(self._queue) if discard else 0
            if discard:
                self._queue.clear()
            self.dropped += k
            self.prepared = False
        return self._dropped(k)

    def snapshot(self) -> tuple[dict, list]:
        """Counters and the queued frames' records (host values) and their images, oldest first: what a stream
        moving to another server takes along (:meth:`restore`)."""
        with self._lock:
            frames = list(self._queue)
            head = {"prepared": self.prepared, "frames_in": self.frames_in, "dropped": self.dropped,
                    "queue": [[f.index, f.frame_id, f.timestamp, f.arrival] for f in frames]}
        return head, [f.image for f in frames]

    def restore(self, head: dict, images: list, shift: float = 0.0) -> None:
        """Take a :meth:`snapshot` (its times moved by ``shift`` seconds); the queued frames replace this queue's.
        Checked first: a malformed snapshot raises ValueError and changes nothing."""
        queue = head["queue"]
        if len(queue) != len(images) or (self.max_chunks is not None and len(queue) > self.max_chunks *
                                         FIRST_CHUNK_FRAMES):
            raise ValueError("input queue: its frame records and images do not match (or too many frames)")
        frames = []
        for (index, frame_id, ts, arrival), image in zip(queue, images):
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (index, frame_id)):
                raise ValueError("input queue: frame numbers must be integers")
            frames.append(FrameIn(image, index, frame_id, float(ts) + shift, float(arrival) + shift))
        for key in ("frames_in", "dropped"):
            if isinstance(head[key], bool) or not isinstance(head[key], int) or head[key] < 0:
                raise ValueError(f"input queue: bad {key}")
        with self._lock:
            self._queue.clear()
            self._queue.extend(frames)
            self.prepared = bool(head["prepared"])
            self.frames_in, self.dropped = head["frames_in"], head["dropped"]

    def _dropped(self, k: int) -> int:
        if k and self.on_drop is not None:
            self.on_drop(k)
        return k

    def take(self) -> tuple[list, ChunkInfo] | None:
        """The next whole chunk (images, info), or None."""
        with self._lock:
            n = self.next_len
            if len(self._queue) < n:
                return None
            chunk = self._take(n, n)
        return self._taken(chunk)

    def take_padded(self) -> tuple[list, ChunkInfo] | None:
        """End of input: the remaining frames as one chunk padded with repeats of its last frame (None if none).

        Every queued frame fits in one chunk when frames are taken as soon as chunks fill."""
        with self._lock:
            n = self.next_len
            real = len(self._queue)
            if real == 0:
                return None
            if real >= n:
                chunk = self._take(n, n)
            else:
                last = self._queue[-1]
                for _ in range(n - real):
                    self._queue.append(FrameIn(last.image, -1, -1, last.timestamp, last.arrival))
                chunk = self._take(n, real)
        return self._taken(chunk)

    def _taken(self, chunk: tuple[list, ChunkInfo]) -> tuple[list, ChunkInfo]:
        if self.on_take is not None:
            self.on_take(chunk[1])
        return chunk

    def _take(self, n: int, real: int) -> tuple[list, ChunkInfo]:
        frames = [self._queue.popleft() for _ in range(n)]
        info = ChunkInfo([f.index for f in frames], [f.frame_id for f in frames], [f.timestamp for f in frames],
                         [f.arrival for f in frames], real, first=not self.prepared)
        self.prepared = True
        return [f.image for f in frames], info


@dataclass
class BlockRequests:
    """The input of a text-to-video stream: the blocks asked for, in the shape of a :class:`ChunkBuffer` (what the
    planner and the engine read of a queue). Each request is one block of ``rule.latents`` latent frames; its
    :class:`ChunkInfo` numbers the output frames the block decodes to (``rule.first_frames`` for the first block,
    ``rule.frames`` after), ``real`` cut at ``total_frames`` (the frames of the clip) when one is set. Thread-safe."""

    rule: ChunkRule = BLOCK3_RULE
    total_frames: int | None = None       # frames of the whole clip (None: as many blocks as requested)
    held: bool = False
    prepared: bool = False
    frames_in: int = 0                    # output frames planned so far (the requests taken)
    dropped: int = 0
    _queue: deque = field(default_factory=deque)      # arrival time of each requested block
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def next_len(self) -> int:
        return 1

    def blocks_for(self, frames: int) -> int:
        """Blocks whose decoded frames cover ``frames`` output frames."""
        if frames < 1:
            raise ValueError(f"frames must be >= 1, got {frames}")
        return 1 + max(0, -(-(frames - self.rule.first_frames) // self.rule.frames))

    def request(self, blocks: int, now: float = 0.0) -> None:
        with self._lock:
            self._queue.extend([float(now)] * int(blocks))

    def __len__(self) -> int:
        return len(self._queue)

    def ready(self) -> bool:
        with self._lock:
            return not self.held and bool(self._queue)

    def arrivals(self) -> list[float]:
        with self._lock:
            return list(self._queue)

    def drop_oldest(self, n: int) -> int:
        with self._lock:
            k = min(n, max(0, len(self._queue) - 1))       # the newest request stays
            for _ in range(k):
                self._queue.popleft()
            self.dropped += k
        return k

    def clear(self) -> int:
        with self._lock:
            k = len(self._queue)
            self._queue.clear()
            self.dropped += k
        return k

    def restart(self) -> int:
        """A reset: the clip starts over (requests kept: the new start is generated)."""
        with self._lock:
            self.prepared = False
            self.frames_in = 0
        return 0

    def take(self) -> tuple[list, ChunkInfo] | None:
        with self._lock:
            if not self._queue:
                return None
            arrival = self._queue.popleft()
            n = self.rule.chunk_frames(self.prepared)
            start = self.frames_in
            real = n if self.total_frames is None else max(0, min(n, self.total_frames - start))
            ids = list(range(start, start + n))
            info = ChunkInfo(ids, ids, [arrival] * n, [arrival] * n, real, first=not self.prepared)
            self.frames_in += n
            self.prepared = True
        return [], info

    def take_padded(self) -> tuple[list, ChunkInfo] | None:
        return self.take()
