"""An input's audio track carried into a restyled output, in sync.

The packets are copied as they are (no re-encoding, the decoded samples are the input's) when the output container
takes the codec; otherwise the track is decoded and encoded as AAC. Which one is decided by writing a header with
the track into memory (the muxers' own lists of codecs they take are not reliable: Opus in ``.mov`` is listed but
refused); into MP4 only the codecs players expect there are copied (:data:`MP4_AUDIO`: not PCM).

Timing: every timestamp of the output is the input's minus one shared ``start`` (the earliest start of the streams
kept), so the audio keeps its offset to the video. Audio is muxed while the video is written (:meth:`AudioMux.
mux_until`), so the output stays interleaved, and the rest at the end: the whole track is kept, as long as it is.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av

from wanstream.io.files import VideoError

AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
# FFmpeg's default layout per channel count (a WAV/AVI track often only says "2 channels", which AAC refuses)
_LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "4.0", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}
AAC_FRAME = 1024


@dataclass(frozen=True)
class AudioTrack:
    """The audio stream of an input file (the first one) and where its timeline starts."""

    path: Path
    index: int                 # the stream's index in the container
    codec: str
    start: Fraction            # seconds: the stream's first timestamp


def probe_audio(container: av.container.InputContainer, path: Path) -> AudioTrack | None:
    """The first audio stream of an opened input, or None."""
    if not container.streams.audio:
        return None
    stream = container.streams.audio[0]
    start = stream.start_time * stream.time_base if stream.start_time is not None and stream.time_base else 0
    return AudioTrack(Path(path), stream.index, stream.codec_context.name, Fraction(start))


# MP4 muxers also take PCM (ISO 23003-5), which most players cannot play: there, only these are copied
MP4_AUDIO = {"aac", "mp3", "opus", "flac", "alac", "ac3", "eac3"}


def _container_takes(format_name: str, stream: av.AudioStream) -> bool:
    """Whether a container of ``format_name`` accepts ``stream``'s packets as they are (a header in memory)."""
    if format_name in ("mp4", "ipod") and stream.codec_context.name not in MP4_AUDIO:
        return False
    try:
        with av.open(io.BytesIO(), "w", format=format_name) as probe:
            probe.add_stream_from_template(stream)
            probe.start_encoding()
    except (av.FFmpegError, ValueError, OSError):
        return False
    return True


def _aac_layout(layout: av.AudioLayout) -> str:
    n = len(layout.channels)
    if all(c.name != "NONE" for c in layout.channels) and n <= 8:
        return layout.name
    return _LAYOUTS.get(n, "stereo")


class AudioMux:
    """Carry ``track`` into ``container`` (an output not started yet): the output stream is added at once."""

    def __init__(self, track: AudioTrack, container: av.container.OutputContainer, start: Fraction) -> None:
        self.track = track
        self._start = Fraction(start)
        self._out = container
        try:
            self._in = av.open(str(track.path), mode="r")
            self._stream = self._in.streams[track.index]
        except (av.FFmpegError, OSError, IndexError) as exc:
            raise VideoError(f"{track.path}: cannot read the audio track ({exc})") from None
        self.copy = _container_takes(container.format.name, self._stream)
        try:
            if self.copy:
                self.stream = container.add_stream_from_template(self._stream)
            else:
                ctx = self._stream.codec_context
                rate = ctx.sample_rate if ctx.sample_rate in AAC_RATES else 48000
                self.stream = container.add_stream("aac", rate=rate, layout=_aac_layout(ctx.layout))
                self._resampler = av.AudioResampler(format=self.stream.format.name, layout=self.stream.layout.name,
                                                    rate=rate, frame_size=AAC_FRAME)
                self._next_pts: int | None = None
        except (av.FFmpegError, ValueError) as exc:
            self._in.close()
            raise VideoError(f"{track.path}: the audio track ({track.codec}) can be neither copied into "
                             f"{container.format.name} nor re-encoded ({exc}); use --no-audio") from None
        self._packets = self._in.demux(self._stream)
        self._pending: av.Packet | None = None
        self.muxed = 0             # packets written
        self.closed = False

    def _time(self, packet: av.Packet) -> Fraction:
        ts = packet.pts if packet.pts is not None else packet.dts
        return ts * packet.time_base - self._start

    def _next_packet(self) -> av.Packet | None:
        if self._pending is not None:
            packet, self._pending = self._pending, None
            return packet
        for packet in self._packets:
            if packet.dts is not None or packet.pts is not None:
                return packet
        return None

    def mux_until(self, t: Fraction | None) -> None:
        """Write the packets that start at or before ``t`` seconds of the output (all of them for None)."""
        try:
            while (packet := self._next_packet()) is not None:
                if t is not None and self._time(packet) > t:
                    self._pending = packet
                    return
                self._write(packet)
        except av.FFmpegError as exc:
            raise VideoError(f"{self.track.path}: carrying the audio track failed ({exc})") from None

    def _write(self, packet: av.Packet) -> None:
        if self.copy:
            shift = round(self._start / packet.time_base)
            if packet.pts is not None:
                packet.pts -= shift
            if packet.dts is not None:
                packet.dts -= shift
            packet.stream = self.stream
            self._out.mux(packet)
        else:
            for frame in self._stream.decode(packet):
                self._encode(frame)
        self.muxed += 1

    def _encode(self, frame: av.AudioFrame | None) -> None:
        if frame is not None and self._next_pts is None:
            # the first sample keeps its place on the shared timeline; the rest follow sample by sample
            first = frame.pts * frame.time_base - self._start if frame.pts is not None else Fraction(0)
            self._next_pts = max(0, round(first * self.stream.rate))
        for out in self._resampler.resample(frame):
            out.pts, out.time_base = self._next_pts, Fraction(1, self.stream.rate)
            self._next_pts += out.samples
            self._out.mux(self.stream.encode(out))

    def close(self) -> None:
        """Write the rest of the track and flush the encoder (re-encoding); the input is closed."""
        if self.closed:
            return
        self.closed = True
        try:
            self.mux_until(None)
            if not self.copy and self._next_pts is not None:      # (an encoder that saw no frame has nothing)
                for frame in self._stream.decode(None):
                    self._encode(frame)
                self._encode(None)
                self._out.mux(self.stream.encode(None))
        except av.FFmpegError as exc:
            raise VideoError(f"{self.track.path}: finishing the audio track failed ({exc})") from None
        finally:
            self._in.close()

    def abort(self) -> None:
        self.closed = True
        self._in.close()
