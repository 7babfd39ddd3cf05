"""The viewer's playout buffer of one stream, as a model on host numbers (no torch): playback slack.

Output frames reach the viewer in bursts (a chunk of 4 at once); the viewer shows them one by one at the stream's
frame interval (its input rate: live video plays in real time — the server's even output pacing,
``server/pacing.py``, is the same idea on the sending side), after a start-up buffer of ``start_delay_s``.
:class:`PlayoutBuffer` follows that viewer:

* ``deliver(n, now)``: ``n`` frames arrive; the viewer has frames to show until ``ahead_until``;
* ``slack(now)``: seconds of video buffered ahead of the viewer (0 when it waits for frames) — how long the
  stream can go without output before the picture freezes;
* a **stall** is a wait after the first frame in which the viewer has nothing to show: counted, with its duration.
  Playback goes on at once with the next frames (no re-buffering). When the input itself paused (no frame for
  ``pause_gap_s``: a tab in the background, a parked stream), the wait that follows is not a stall;
* the **continuous-playback ratio** is the share of wall time since the first frame in which the viewer was not
  stalled.

The frame interval is measured from the gaps between the input frames of a chunk (an exponential average), so the
model needs no setting; until it is known it is ``default_interval_s``. A frame dropped before the model (a late
or overflowing frame) is video the viewer never gets: the buffer runs dry sooner, as it would for a real viewer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PlayoutBuffer:
    """A stream's viewer (see the module docstring). All times are the engine clock's."""

    default_interval_s: float = 1 / 16
    start_delay_s: float = 0.25           # the viewer starts this long after its first frame (a jitter buffer)
    pause_gap_s: float = 1.0              # an input gap this long is a pause of the source, not a stall
    smoothing: float = 0.1
    interval_s: float | None = None       # measured frame interval (None: not yet)
    first_at: float | None = None         # when the first frame arrived
    ahead_until: float | None = None      # the viewer has frames until then
    last_at: float | None = None          # the last delivery
    last_arrival: float | None = None     # the newest input frame seen
    paused: bool = False                  # the input paused since the last delivery
    frames: int = 0                       # frames delivered
    stalls: int = 0
    stalled_s: float = 0.0
    longest_stall_s: float = 0.0

    TIMES = ("first_at", "ahead_until", "last_at", "last_arrival")
    STATE = ("interval_s", "first_at", "ahead_until", "last_at", "last_arrival", "paused", "frames", "stalls",
             "stalled_s", "longest_stall_s")

    @property
    def interval(self) -> float:
        return self.interval_s if self.interval_s is not None else self.default_interval_s

    def note_arrivals(self, arrivals) -> None:
        """The input frames of a chunk entering the model (arrival times, oldest first)."""
        arrivals = [float(a) for a in arrivals]
        if not arrivals:
            return
        for a, b in zip(arrivals, arrivals[1:]):
            if b > a:
                gap = b - a
                self.interval_s = gap if self.interval_s is None else \
                    self.interval_s + self.smoothing * (gap - self.interval_s)
        if self.last_arrival is not None and arrivals[0] - self.last_arrival >= self.pause_gap_s:
            self.paused = True
        self.last_arrival = max(arrivals[-1], self.last_arrival or arrivals[-1])

    def deliver(self, n: int, now: float) -> None:
        """``n`` output frames reached the viewer at ``now``."""
        if n <= 0:
            return
        if self.first_at is None:
            self.first_at = now
            self.ahead_until = now + self.start_delay_s
        elif now > self.ahead_until:                    # the viewer ran out
            gap = now - self.ahead_until
            if not self.paused:
                self.stalls += 1
                self.stalled_s += gap
                self.longest_stall_s = max(self.longest_stall_s, gap)
            self.ahead_until = now
        self.paused = False
        self.ahead_until += n * self.interval
        self.frames += n
        self.last_at = now

    def slack(self, now: float) -> float | None:
        """Seconds of video ahead of the viewer at ``now`` (None before the first frame)."""
        if self.ahead_until is None:
            return None
        return max(0.0, self.ahead_until - now)

    def stalled_now(self, now: float) -> float:
        """Seconds the viewer has been waiting at ``now`` (0 while it has frames or the input paused)."""
        if self.ahead_until is None or now <= self.ahead_until or self.paused:
            return 0.0
        return now - self.ahead_until

    def continuous_ratio(self, now: float) -> float | None:
        """Share of the wall time from the first frame to ``now`` with a picture playing (a stall running at
        ``now`` counts)."""
        if self.first_at is None or now <= self.first_at:
            return None
        stalled = self.stalled_s + self.stalled_now(now)
        return max(0.0, 1.0 - stalled / (now - self.first_at))

    def summary(self, now: float) -> dict:
        ratio = self.continuous_ratio(now)
        return {"slack_s": self.slack(now), "stalls": self.stalls, "stalled_s": round(self.stalled_s, 4),
                "longest_stall_s": round(self.longest_stall_s, 4),
                "continuous_ratio": None if ratio is None else round(ratio, 4)}

    def state(self) -> dict:
        """Host values (parking, migration); times are the engine clock's."""
        return {k: getattr(self, k) for k in self.STATE}

    def restore(self, state: dict) -> None:
        """Take a :meth:`state` back (checked: a value of the wrong type raises ValueError, nothing set)."""
        values = {}
        for k in self.STATE:
            v = state[k]
            if k == "paused":
                if not isinstance(v, bool):
                    raise ValueError("playout: bad paused")
            elif k in ("frames", "stalls"):
                if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                    raise ValueError(f"playout: bad {k}")
            elif v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v != v):
                raise ValueError(f"playout: bad {k}")
            elif v is None and k in ("stalled_s", "longest_stall_s"):
                raise ValueError(f"playout: bad {k}")
            values[k] = v
        for k, v in values.items():
            setattr(self, k, v)
