"""Playing a stream live: modulation, MIDI control and learn, note slots, beat-quantised changes, audio features.

:class:`LiveHub` is the server's one home of what is shared: the tempo (:class:`~wanstream.core.tempo.TempoClock`,
free-running at ``--tempo``, or driven by MIDI clock or Ableton Link), the state of the MIDI controllers (CC values,
held notes) and the counters. :class:`LiveControl` is one session's part: its mappings and note slots
(:class:`~wanstream.api.modulation.Modulation`), their evaluator (:class:`~wanstream.core.modulation.Modulator`),
its audio analyser, a pending learn request and the changes waiting for a beat.

Per chunk (the model worker, between ticks, in :meth:`Session.sync <wanstream.server.session.Session.sync>`):
:meth:`LiveControl.due` hands over a quantised change whose chunk has come (the chunk whose output lands on the
beat, :func:`~wanstream.core.tempo.chunk_due`), and :meth:`LiveControl.modulate` evaluates the mappings once
(O(mappings), host floats) and hands the values that moved to the engine as ordinary live changes (knobs through
``Engine.update``, a modulated blend as a prompt embedding mixed on the device from embeddings encoded before on
the prompt thread): no host-device sync, nothing another stream waits for.

Who may steer what: a MIDI port, the tempo and Link belong to the server's operator (``serve --midi`` /
``--link`` / ``--tempo``); a stream's mappings, learn requests and note slots belong to the stream (set with its
secret), so a CC changes exactly the streams that mapped it and nothing else. A mapped parameter follows its
source; a change by hand to it holds until the source moves.

Bounds (each a setting and counted in ``/metrics``): mappings and note slots per stream (the schema's
``MAX_MAPPINGS`` / ``MAX_NOTE_SLOTS``), MIDI messages per second per port (``midi_rate`` / ``midi_burst``; more are
dropped), note-slot prompt switches through the stream's control-message bucket, audio analysed at most
``audio_max_rate`` × real time, one learn request per stream that expires after ``learn_timeout_s``.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import ValidationError

from wanstream.api.modulation import MappingSpec, Modulation
from wanstream.api.params import PROMPT_FIELDS, ParamsUpdate, blend_embeddings
from wanstream.core.modulation import Inputs, Modulator
from wanstream.core.tempo import MidiClockFollower, TempoClock, chunk_due, target_beat
from wanstream.server.audio import AudioAnalyser

log = logging.getLogger("wanstream.server.live")

KNOB_TARGETS = ("noise_scale", "steps", "seed")


class LiveError(ValueError):
    """A live request that cannot be done (the message says why; the routes answer 4xx)."""


@dataclass
class LiveCounters:
    midi_messages: int = 0              # MIDI messages handled
    midi_dropped: int = 0               # over a port's rate
    learned: int = 0                    # mappings made by learn
    note_switches: int = 0              # prompt switches by note slots
    note_switches_dropped: int = 0      # over the stream's control rate
    modulated: int = 0                  # live changes made by modulation
    quantised: int = 0                  # quantised changes handed over on their beat
    audio_dropped: int = 0              # audio samples over the real-time budget (closed sessions)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)


class LiveHub:
    """The server-wide live state (module docstring); one per :class:`~wanstream.server.sessions.SessionManager`."""

    def __init__(self, manager, settings):
        self.manager = manager
        self.settings = settings
        self.clock = manager.clock
        self.tempo = TempoClock(settings.tempo_bpm, settings.beats_per_bar, t0=self.clock())
        self.midi_clock = MidiClockFollower(self.tempo)
        self.cc: dict[tuple[int, int], float] = {}
        self.notes: dict[tuple[int, int], float] = {}
        self.counters = LiveCounters()
        self.midi_ports: list[str] = []     # names of the open MIDI inputs (set by server/midi.py)
        self.link = None                    # the Ableton Link session (server/midi.py: LinkTempo), if any
        manager.totals.registry.register(self)
        manager.totals.limits(midi_rate=settings.midi_rate, midi_burst=settings.midi_burst,
                              learn_timeout_s=settings.learn_timeout_s, audio_max_rate=settings.audio_max_rate,
                              max_mappings_per_stream=Modulation.model_fields["mappings"].metadata[0].max_length)

    # ------------------------------------------------------------------ MIDI in (the ports' threads)
    def midi(self, msg, t: float | None = None) -> None:
        """One MIDI message (a ``mido.Message``) at ``t``: clock and transport drive the tempo, a CC's value and a
        note's velocity are kept for the mappings, a CC completes the learn requests, a note on fires the streams'
        note slots."""
        t = self.clock() if t is None else t
        kind = msg.type
        self.counters.add("midi_messages")
        if kind == "clock":
            if self.tempo.source != "link":
                self.tempo.source = "midi"
                self.midi_clock.pulse(t)
        elif kind == "start":
            self.midi_clock.start(t)
        elif kind == "stop":
            self.midi_clock.stop(t)
        elif kind == "continue":
            self.midi_clock.resume(t)
        elif kind == "songpos":
            self.midi_clock.song_position(msg.pos, t)
        elif kind == "control_change":
            self.cc[(msg.channel, msg.control)] = msg.value / 127.0
            for s in self.manager.list():
                s.live.learn_cc(msg.channel, msg.control)
        elif kind == "note_on" and msg.velocity > 0:
            self.notes[(msg.channel, msg.note)] = msg.velocity / 127.0
            for s in self.manager.list():
                s.live.note_on(msg.channel, msg.note)
        elif kind in ("note_off", "note_on"):
            self.notes[(msg.channel, msg.note)] = 0.0

    # ------------------------------------------------------------------ status, metrics
    def status(self) -> dict:
        return {"tempo": self.tempo.snapshot(self.clock()), "midi_ports": list(self.midi_ports),
                "link": None if self.link is None else self.link.status()}

    def collect(self):
        c = self.counters
        with c._lock:
            values = {k: getattr(c, k) for k in ("midi_messages", "midi_dropped", "learned", "note_switches",
                                                  "note_switches_dropped", "modulated", "quantised")}
            audio_dropped = c.audio_dropped
        docs = {"midi_messages": "MIDI messages handled", "midi_dropped": "MIDI messages dropped over midi_rate",
                "learned": "Mappings made by MIDI learn", "note_switches": "Prompt switches by note slots",
                "note_switches_dropped": "Note-slot switches dropped over the stream's control rate",
                "modulated": "Live changes made by modulation", "quantised": "Beat-quantised changes handed over"}
        for key, value in values.items():
            m = CounterMetricFamily(f"wanstream_live_{key}", docs[key])
            m.add_metric([], value)
            yield m
        sessions = self.manager.list()
        m = CounterMetricFamily("wanstream_live_audio_dropped_samples", "Audio samples over audio_max_rate x real "
                                "time (not analysed)")
        m.add_metric([], audio_dropped + sum(s.live.audio.dropped for s in sessions if s.live.audio is not None))
        yield m
        g = GaugeMetricFamily("wanstream_live_mappings", "Mappings of all active streams")
        g.add_metric([], sum(len(s.live.spec.mappings) for s in sessions))
        yield g
        g = GaugeMetricFamily("wanstream_live_tempo_bpm", "The server's tempo")
        g.add_metric([], self.tempo.bpm)
        yield g


@dataclass
class Pending:
    """A change waiting for its beat: the update, the beat it lands on, the prompt being encoded for it."""

    update: ParamsUpdate
    beat: float
    future: object = None


class LiveControl:
    """One session's live part (module docstring). Its methods run on the threads named in each."""

    def __init__(self, session):
        self.session = session
        self.hub: LiveHub = session.manager.live
        self.spec = Modulation()
        self.modulator = Modulator()
        self.audio: AudioAnalyser | None = None
        self.values: dict[str, float] = {}          # the modulated values now (shown on the page)
        self.learning: tuple[dict, float] | None = None
        self.pending: Pending | None = None
        self.applied: list[dict] = []               # the last quantised changes: beat, time, first frame id
        self._parts: tuple[tuple[str, ...], object] | None = None   # (blend texts, future of their embeddings)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ mappings (HTTP, presets)
    def set_modulation(self, spec: Modulation) -> None:
        """Replace the stream's mappings and note slots (validated; LoRA targets must be loaded)."""
        names = self.session.manager.lora_names()
        for i, name in spec.lora_names():
            if name not in names:
                raise LiveError(f"mappings.{i}.target: LoRA {name[:100]!r} is not loaded on this server "
                                f"(loaded: {', '.join(names) or 'none'})")
        with self._lock:
            self.spec = spec.model_copy(deep=True)
            self.modulator = Modulator(self.spec.to_core())
            self.values = {}
            self._parts = None

    def learn(self, template: dict, now: float) -> None:
        """Map the next CC that arrives to ``template`` (a mapping without its source; checked now)."""
        try:
            MappingSpec.model_validate({**template, "source": {"kind": "cc", "control": 0}})
        except ValidationError as exc:
            from wanstream.server.protocol import describe_errors
            raise LiveError(describe_errors(exc.errors())) from None
        if not self.hub.midi_ports:
            raise LiveError("no MIDI input is open on this server (start it with --midi)")
        with self._lock:
            self.learning = (dict(template), now + self.hub.settings.learn_timeout_s)

    def learn_cc(self, channel: int, control: int) -> None:
        """(MIDI thread) A CC arrived: complete this stream's learn request, if any."""
        with self._lock:
            request, self.learning = self.learning, None
            if request is None:
                return
            template, deadline = request
            if self.hub.clock() > deadline:
                return
            mapping = MappingSpec.model_validate({**template, "source": {"kind": "cc", "channel": channel,
                                                                         "control": control}})
            kept = [m for m in self.spec.mappings if m.target != mapping.target]
            if len(kept) >= Modulation.model_fields["mappings"].metadata[0].max_length:
                self.session.report_error("learn_refused", "the stream has all its mappings already")
                return
            self.spec = Modulation(mappings=[*kept, mapping], notes=self.spec.notes)
            self.modulator = Modulator(self.spec.to_core())
        self.hub.counters.add("learned")
        self.session.notify({"type": "learned", "mapping": mapping.model_dump(mode="json", exclude_none=True)})

    def note_on(self, channel: int, note: int) -> None:
        """(MIDI thread) A note was pressed: switch to the prompt of this stream's slot for it, if any."""
        slot = next((n for n in self.spec.notes if n.matches(channel, note)), None)
        if slot is None or self.session.closed:
            return
        if not self.session.control_bucket.take():
            self.hub.counters.add("note_switches_dropped")
            return
        try:
            self.session.apply(slot.update())
        except (ValueError, RuntimeError) as exc:
            self.session.report_error("note_slot", str(exc))
            return
        self.hub.counters.add("note_switches")
        self.session.notify({"type": "params", "ok": True, "params": self.session.params.model_dump(),
                             "source": "midi"})

    # ------------------------------------------------------------------ audio (the transport's thread)
    def audio_in(self, samples, rate: int, t: float | None = None) -> None:
        if self.audio is None:
            self.audio = AudioAnalyser(self.hub.clock, self.hub.settings.audio_max_rate)
        t = self.hub.clock() if t is None else t
        self.audio.push(samples, rate, t)
        if self.session.pushes.pushes:
            self.session.pushes.audio(samples, rate, t)

    # ------------------------------------------------------------------ quantised changes (any thread)
    def latency(self) -> float:
        """The stream's output latency: ``beat_latency_s`` when set, else its measured median (0 before any)."""
        fixed = self.hub.settings.beat_latency_s
        if fixed is not None:
            return fixed
        p50 = self.session.stats.summary()["latency_ms"]["p50"]
        return (p50 or 0.0) / 1000.0

    def schedule(self, update: ParamsUpdate, now: float, encode) -> dict:
        """Hold ``update`` for the next beat / bar it can land on (a newer one replaces it); its prompt is encoded
        now (``encode(params)`` → future). Returns when it lands."""
        tempo = self.hub.tempo
        beat = target_beat(tempo, now, self.latency(), update.quantize)
        future = None
        if update.model_fields_set & PROMPT_FIELDS:
            future = encode(self.session.params.merged(update)[0])
        with self._lock:
            self.pending = Pending(update, beat, future)
        return {"beat": beat, "at": round(tempo.time_of(beat) - now, 3)}

    def due(self) -> tuple[ParamsUpdate, object] | None:
        """(Worker, before a tick.) The pending change and its encoded prompt (or None) when the chunk about to
        enter is the one whose output lands on its beat, the clock stopped, or its prompt failed to encode."""
        with self._lock:
            p = self.pending
            if p is None or (p.future is not None and not p.future.done()):
                return None
            buffer = self.session.buffer
            arrivals = buffer.arrivals()[: buffer.next_len]
            if len(arrivals) < buffer.next_len:
                return None
            tempo = self.hub.tempo
            if tempo.running and not chunk_due(tempo, p.beat, self.latency(), arrivals):
                return None
            self.pending = None
        embedding = None
        if p.future is not None:
            try:
                embedding = p.future.result()
            except Exception as exc:  # noqa: BLE001 - the stream keeps its prompt; the client is told
                self.session.report_error("prompt_error", f"cannot use this prompt ({type(exc).__name__}: {exc})")
                return None
        self.hub.counters.add("quantised")
        self.applied.append({"beat": p.beat, "beat_time": round(tempo.time_of(p.beat), 4),
                             "latency_s": round(self.latency(), 4), "chunk_arrivals": [arrivals[0], arrivals[-1]]})
        del self.applied[:-16]
        return p.update, embedding

    # ------------------------------------------------------------------ modulation (worker, before a tick)
    def inputs(self, now: float) -> Inputs:
        hub = self.hub
        return Inputs(now=now, beat=hub.tempo.beat_at(now), bpm=hub.tempo.bpm,
                      audio=self.audio.read() if self.audio is not None else {}, cc=hub.cc, notes=hub.notes)

    def modulate(self, engine, stream, dirty: set[str]) -> None:
        """Evaluate the mappings once for the chunk about to enter; hand the values that moved to the stream."""
        with self._lock:
            modulator, spec = self.modulator, self.spec
        if not spec.mappings or not self.session.buffer.ready():
            return
        for key in dirty:                              # set by hand: a mapping sends its value again
            modulator.forget(key)
        changed = modulator.evaluate(self.inputs(self.hub.clock()))
        if not changed:
            return
        self.values.update(changed)
        self.hub.counters.add("modulated", len(changed))
        knobs = {k: (int(v) if k in ("steps", "seed") else v) for k, v in changed.items() if k in KNOB_TARGETS}
        loras = {k[5:]: v for k, v in self.values.items() if k.startswith("lora.")}
        if any(k.startswith("lora.") for k in changed):
            knobs["lora"] = {**self.session.params.lora, **loras}
        if knobs:
            engine.update(stream, **knobs)
        if "transition_chunks" in changed:
            self.session.params.transition_chunks = int(changed["transition_chunks"])
        if any(k.startswith("prompts.") for k in changed):
            self._blend(engine, stream)

    def _blend(self, engine, stream) -> None:
        """A modulated blend: mix the blend's prompt embeddings (encoded once on the prompt thread) with the
        modulated weights, on the device; the stream gets it as its prompt from its next chunk."""
        params = self.session.params
        if not params.prompts or stream.transition is not None or not self.session.has_newest_prompt():
            return
        texts = tuple(p.text for p in params.prompts)
        if self._parts is None or self._parts[0] != texts:
            model = self.session.manager.model
            self._parts = (texts, self.session.manager.submit_prompt_work(
                lambda: [engine.pad_prompt(model.prompt_embedding(t)) for t in texts]))
        future = self._parts[1]
        if not future.done():
            return                                      # the next chunk will have them
        try:
            parts = future.result()
        except Exception as exc:  # noqa: BLE001
            self.session.report_error("prompt_error", f"cannot blend these prompts ({type(exc).__name__}: {exc})")
            return
        weights = [self.values.get(f"prompts.{i}.weight", p.weight) for i, p in enumerate(params.prompts)]
        if sum(weights) <= 0:
            return
        stream.queue_update("prompt", (blend_embeddings(parts, weights), 0))   # already padded and checked

    def info(self) -> dict:
        with self._lock:
            return {"modulation": self.spec.model_dump(mode="json", exclude_none=True),
                    "values": {k: round(v, 4) for k, v in self.values.items()},
                    "learning": self.learning[0] if self.learning else None,
                    "pending": None if self.pending is None else {
                        "beat": self.pending.beat,
                        "fields": sorted(self.pending.update.model_fields_set - {"quantize"})},
                    "applied": list(self.applied[-4:]),
                    "audio": None if self.audio is None else {k: round(v, 3) for k, v in
                                                               self.audio.last().items()}}
