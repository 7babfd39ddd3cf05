"""Audio features for modulation: level, onset and band energies of a stream's audio, read once per chunk.

The audio comes from the stream's own WebRTC / WHIP peer (the browser's or OBS's microphone track, decoded by
aiortc; :func:`frame_to_mono`) and is analysed on arrival in hops of about 10 ms (numpy FFT): RMS level, the
energies of three bands (``low`` < 250 Hz, ``mid`` 250 Hz - 2 kHz, ``high`` > 2 kHz) and onsets (the largest band's spectral flux
over its recent mean by three standard deviations, at most one per ``REFRACTORY_S``). :meth:`AudioAnalyser.read` gives each feature
in [0, 1] since the previous read (the largest value, so a short hit between two chunks is not missed; ``onset``
is 1 when an onset happened): ``level`` is the RMS in dBFS mapped from -60..0, the bands are relative to their
own recent peak (a peak follower decaying over ``PEAK_DECAY_S``), so a quiet room and a club both use the range.

Bound: a peer cannot make the server analyse faster than real time; samples beyond ``max_rate`` times real
time (measured on the server's clock, with a burst of one second) are dropped and counted (``dropped``).
"""

from __future__ import annotations

import math
import threading

import numpy as np

BANDS = {"low": (20.0, 250.0), "mid": (250.0, 2000.0), "high": (2000.0, 16000.0)}
HOP_S = 0.0107              # ~512 samples at 48 kHz
REFRACTORY_S = 0.1
PEAK_DECAY_S = 5.0
FLUX_HISTORY_S = 0.5
ONSET_SPREAD = 3.0          # flux this many standard deviations over its recent mean, plus ONSET_DELTA, is an onset
ONSET_DELTA = 0.3
MIN_HISTORY = 8             # hops of flux history before the first onset can be told
FLOOR_DB = -60.0


def frame_to_mono(frame) -> tuple[np.ndarray, int]:
    """A PyAV ``AudioFrame`` (any sample format and layout) → float32 mono samples in [-1, 1] and the rate."""
    data = frame.to_ndarray()
    fmt = frame.format.name
    channels = len(frame.layout.channels)
    if data.dtype == np.int16:
        x = data.astype(np.float32) / 32768.0
    elif data.dtype == np.int32:
        x = data.astype(np.float32) / 2147483648.0
    elif data.dtype == np.uint8:
        x = (data.astype(np.float32) - 128.0) / 128.0
    else:
        x = data.astype(np.float32)
    if fmt.endswith("p"):                       # planar: [channels, samples]
        mono = x.reshape(channels, -1).mean(axis=0)
    else:                                       # packed: [1, samples · channels] interleaved
        mono = x.reshape(-1, channels).mean(axis=1)
    return mono, int(frame.sample_rate)


class AudioAnalyser:
    """Features of one stream's audio (see the module docstring). ``push`` from the transport's thread,
    ``read`` from the model worker's; both are cheap and lock-guarded."""

    def __init__(self, clock, max_rate: float = 2.0):
        self.clock = clock
        self.max_rate = max_rate
        self.rate = 0
        self.samples_in = 0
        self.dropped = 0
        self.onsets: list[float] = []           # recent onset times (stream clock), for tests and the page
        self._lock = threading.Lock()
        self._pending = np.zeros(0, np.float32)
        self._pending_t = 0.0                   # clock time of the first pending sample
        self._prev_mag: np.ndarray | None = None
        self._flux: list[float] = []
        self._peaks = dict.fromkeys(BANDS, 0.0)
        self._max = self._zero()
        self._last = self._zero()
        self._last_onset = -math.inf
        self._hops = 0                          # hops analysed since the last read
        self._budget = None                     # (samples allowed, at time)

    @staticmethod
    def _zero() -> dict[str, float]:
        return {"level": 0.0, "onset": 0.0, **dict.fromkeys(BANDS, 0.0)}

    def _setup(self, rate: int) -> None:
        self.rate = rate
        self.hop = max(64, int(round(HOP_S * rate)))
        self.win = 4 * self.hop                 # ~43 ms: enough bins in the low band for a steady flux
        self.window = np.hanning(self.win).astype(np.float32)
        freqs = np.fft.rfftfreq(self.win, 1.0 / rate)
        self.band_bins = {name: (freqs >= lo) & (freqs < hi) for name, (lo, hi) in BANDS.items()}
        self._pending = np.zeros(0, np.float32)
        self._prev_mag = None

    def _allowed(self, n: int, t: float) -> int:
        """Samples of ``n`` within the real-time budget (token bucket of ``max_rate`` × rate, 1 s burst)."""
        cap = self.max_rate * self.rate
        if self._budget is None:
            self._budget = (cap, t)
        tokens, t0 = self._budget
        tokens = min(cap, tokens + (t - t0) * cap)
        take = int(min(n, tokens))
        self._budget = (tokens - take, t)
        return take

    def push(self, samples: np.ndarray, rate: int, t: float | None = None) -> None:
        """Mono float samples at ``rate`` Hz whose last sample was heard at ``t`` (default: now)."""
        t = self.clock() if t is None else t
        if not 8000 <= rate <= 192000:
            raise ValueError(f"audio sample rate {rate} Hz is not in 8-192 kHz")
        samples = np.asarray(samples, np.float32).reshape(-1)
        with self._lock:
            if rate != self.rate:
                self._setup(rate)
            n = self._allowed(len(samples), t)
            if n < len(samples):
                self.dropped += len(samples) - n
                samples = samples[:n]
            if not n:
                return
            self.samples_in += n
            if not len(self._pending):
                self._pending_t = t - n / rate
            self._pending = np.concatenate([self._pending, samples])
            while len(self._pending) >= self.win:
                frame = self._pending[: self.win]
                self._pending = self._pending[self.hop:]
                self._pending_t += self.hop / rate
                self._analyse(frame, self._pending_t + self.hop / rate)

    def _analyse(self, frame: np.ndarray, t: float) -> None:
        rms = float(np.sqrt(np.mean(frame * frame)) + 1e-12)
        level = min(1.0, max(0.0, (20 * math.log10(rms) - FLOOR_DB) / -FLOOR_DB))
        mag = np.abs(np.fft.rfft(frame * self.window))
        decay = math.exp(-(self.hop / self.rate) / PEAK_DECAY_S)
        values = {"level": level, "onset": 0.0}
        for name, bins in self.band_bins.items():
            energy = float(np.sqrt(np.mean(mag[bins] ** 2))) if bins.any() else 0.0
            peak = self._peaks[name] = max(energy, self._peaks[name] * decay)
            values[name] = energy / peak if peak > 1e-6 else 0.0
        log_mag = np.log1p(100.0 * mag)
        if self._prev_mag is not None:       # spectral flux: the largest band's mean rise of log magnitude
            rise = np.maximum(log_mag - self._prev_mag, 0.0)
            flux = max(float(rise[bins].mean()) for bins in self.band_bins.values() if bins.any())
            history = self._flux[-max(1, int(FLUX_HISTORY_S * self.rate / self.hop)):]
            mean = sum(history) / len(history) if history else 0.0
            spread = math.sqrt(sum((f - mean) ** 2 for f in history) / len(history)) if history else 0.0
            if (len(history) >= MIN_HISTORY and flux > mean + ONSET_SPREAD * spread + ONSET_DELTA
                    and t - self._last_onset >= REFRACTORY_S):
                self._last_onset = t
                values["onset"] = 1.0
                self.onsets.append(t)
                del self.onsets[:-64]
            self._flux.append(flux)
            del self._flux[:-256]
        self._prev_mag = log_mag
        for key, v in values.items():
            self._max[key] = max(self._max[key], v)
        self._hops += 1

    def last(self) -> dict[str, float]:
        """The values of the last read (for the page)."""
        with self._lock:
            return dict(self._last)

    def read(self) -> dict[str, float]:
        """Each feature's largest value since the previous read (the last values, onset 0, when no audio was
        analysed since)."""
        with self._lock:
            if self._hops:
                self._last, self._max, self._hops = self._max, self._zero(), 0
                return dict(self._last)
            return {**self._last, "onset": 0.0}
