"""Playing a stream live (issue 24): modulation per chunk, MIDI CC / learn / note slots, beat-quantised changes
with latency compensation, audio features driving parameters. The model worker is driven by hand on a
simulated clock (``run_once`` between frames), so every timing here is exact and independent of the machine."""

from __future__ import annotations

import numpy as np
import pytest
from server_helpers import server_settings

from wanstream.api.modulation import Modulation
from wanstream.api.params import ParamsUpdate
from wanstream.server.sessions import SessionManager

FPS = 16.0


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class Rig:
    """A manager on a simulated clock; ``frame()`` feeds every session its next frame at 16 fps, runs the worker
    until it has nothing to do, and releases the paced output frames that are due (so latency is measured).
    Prompt encoding (a thread, real time) is waited for before each frame, so simulated time never outruns it."""

    def __init__(self, model, tmp_path, clip, n=1, **settings):
        self.clock = Clock()
        self.mgr = SessionManager(model, server_settings(tmp_path, **settings), clock=self.clock)
        self.sessions = [self.mgr.open("test") for _ in range(n)]
        self.clip = clip
        self.k = 0
        self.outputs = [[] for _ in range(n)]       # (release time, frame index, image) per session

    def frame(self, before_tick=None) -> None:
        self.mgr.submit_prompt_work(lambda: None).result(timeout=60)   # prompts asked for so far are encoded
        self.clock.t = self.k / FPS
        for s in self.sessions:
            s.submit(self.clip[self.k % len(self.clip)], t=self.clock.t, frame_id=self.k)
        self.k += 1
        if before_tick is not None:
            before_tick()
        for _ in range(8):
            if not self.mgr.worker.run_once():
                break
        for i, s in enumerate(self.sessions):
            while True:
                r = s.poll_output(self.clock.t + 1e-9)
                if r.frame is None:
                    break
                self.outputs[i].append((self.clock.t, r.frame.index, r.frame.image))

    def run(self, frames: int, **kw) -> None:
        for _ in range(frames):
            self.frame(**kw)

    def close(self) -> None:
        self.mgr.shutdown()


@pytest.fixture
def rig_factory(tiny_model, tmp_path, clip):
    rigs = []

    def make(n=1, **settings):
        rig = Rig(tiny_model, tmp_path, clip, n, **settings)
        rigs.append(rig)
        return rig
    yield make
    for rig in rigs:
        rig.close()


def mapping(target, source, **kw):
    return {"target": target, "source": source, **kw}


# ------------------------------------------------------------------------------------------------ modulation
def test_an_lfo_drives_noise_scale_per_chunk_as_live_changes(rig_factory):
    rig = rig_factory()
    s = rig.sessions[0]
    rig.run(6)                                                      # the stream exists and runs
    s.live.set_modulation(Modulation.model_validate(
        {"mappings": [mapping("noise_scale", {"kind": "lfo", "shape": "saw", "rate_hz": 1.0}, min=0.4, max=0.9)]}))
    seen = []
    for _ in range(24):
        rig.frame()
        seen.append(s.stream.settings.noise_scale)
    expected = {round(0.4 + 0.5 * ((k / FPS) % 1.0), 6) for k in range(6, 30)}
    values = {round(v, 6) for v in seen}
    assert len(values) >= 4 and values <= expected | {0.8}          # only values of the saw, one per chunk
    assert s.live.modulator.evaluations <= 24 // 4 + 2               # once per chunk, not per frame


# ------------------------------------------------------------------------------------------------ quantised
def test_a_quantised_prompt_change_lands_on_the_beat(rig_factory):
    """Two identical streams (same input, seed); one gets a prompt change quantised to the next beat. The change
    goes in before the chunk whose input arrived one output latency before the beat, so that chunk's output is
    released on the beat, and the outputs are identical until the chunk before it (which finishes its last level
    with the new prompt)."""
    rig = rig_factory(n=2, tempo_bpm=100.0)
    a, b = rig.sessions
    rig.run(40)                                                     # latency measured by now
    latency = a.live.latency()
    assert 0.2 < latency < 1.5
    asked = rig.clock.t
    a.apply(ParamsUpdate(prompt="a completely different prompt", quantize="beat"))
    pending = a.live.pending
    assert pending is not None and a.params.prompt != "a completely different prompt"   # not yet
    beat_time = rig.mgr.live.tempo.time_of(pending.beat)
    assert beat_time > asked + latency                               # the first beat the change can reach
    rig.run(int((beat_time - asked) * FPS) + 24)
    assert a.live.pending is None and a.params.prompt == "a completely different prompt"
    applied = a.live.applied[-1]
    first, last = applied["chunk_arrivals"]
    target = beat_time - applied["latency_s"]
    assert last >= target > first - 1 / FPS - 1e-9                   # the chunk holding the frame of beat − L
    due_frames = range(round(first * FPS), round(last * FPS) + 1)
    released = {idx: t for t, idx, _ in rig.outputs[0]}
    landed = [released[i] for i in due_frames if i in released]
    assert landed and min(landed) <= beat_time + 4 / FPS and max(landed) >= beat_time - 4 / FPS
    same = {idx: img for _, idx, img in rig.outputs[1]}
    diffs = {idx: np.abs(img.astype(int) - same[idx].astype(int)).mean() for _, idx, img in rig.outputs[0]
             if idx in same}
    before = [d for idx, d in diffs.items() if idx < due_frames[0] - 4]
    after = [d for idx, d in diffs.items() if idx in due_frames]
    # the tiny random model's prompt moves few pixels, but exactly: identical streams until the chunk before the
    # due one (its last level ran with the new prompt), every frame of the due chunk restyled
    assert before and after and max(before) < min(after) / 2 and min(after) > 0


def test_a_quantised_seed_and_reset_wait_for_the_bar(rig_factory):
    rig = rig_factory(tempo_bpm=120.0, beat_latency_s=0.5)
    s = rig.sessions[0]
    rig.run(12)
    s.apply(ParamsUpdate(seed=7, reset=True, quantize="bar"))
    beat = s.live.pending.beat
    assert beat % 4 == 0
    while s.live.pending is not None and rig.k < 200:
        assert s.stream.settings.seed == 0
        rig.frame()
    assert s.live.pending is None
    rig.run(2)
    assert s.stream.settings.seed == 7 and s.params.seed == 7
    first, last = s.live.applied[-1]["chunk_arrivals"]
    assert last >= rig.mgr.live.tempo.time_of(beat) - 0.5 > first - 1 / FPS - 1e-9
    rig.run(12)
    assert s.stream is not None and not s.closed                    # the reset stream runs on


# ------------------------------------------------------------------------------------------------ audio
def kick_track(seconds: float, beats: list[float], rate: int = 48000) -> np.ndarray:
    """Quiet noise with a decaying 60 Hz kick at each time of ``beats``."""
    x = 0.02 * np.random.default_rng(0).standard_normal(int(seconds * rate))
    n = int(0.12 * rate)
    tt = np.arange(n) / rate
    for b in beats:
        i = int(b * rate)
        x[i:i + n] += 0.8 * np.sin(2 * np.pi * 60 * tt) * np.exp(-tt / 0.04)
    return x.astype(np.float32)


def test_a_synthetic_tracks_beats_drive_a_parameter_at_the_right_chunks(rig_factory):
    """Kicks every 0.5 s, each in the middle of a 4-frame chunk (0.25 s): the onset mapping puts noise_scale at
    its max on exactly the chunks that hold a kick, and at its min on the others."""
    rig = rig_factory()
    s = rig.sessions[0]
    rate, seconds = 48000, 6.0
    beats = [2.1 + 0.5 * i for i in range(7)]
    track = kick_track(seconds, beats, rate)
    per_frame = int(rate / FPS)
    s.live.set_modulation(Modulation.model_validate(
        {"mappings": [mapping("noise_scale", {"kind": "audio", "feature": "onset"}, min=0.3, max=1.0)]}))
    by_chunk = []

    def audio_then_record():
        t, i = rig.clock.t, rig.k - 1                  # frame i arrives at i / FPS with the audio heard until then
        if i:
            s.live.audio_in(track[(i - 1) * per_frame: i * per_frame], rate, t)
        if s.buffer.ready():
            by_chunk.append((t, s))
    values = []
    while rig.k < int(seconds * FPS) - 1:
        rig.frame(before_tick=audio_then_record)
        if by_chunk and by_chunk[-1][1] is s and s.stream is not None:
            values.append((by_chunk.pop()[0], s.stream.settings.noise_scale))
    onsets = s.live.audio.onsets
    assert len(onsets) == len(beats) and all(abs(o - b) < 0.03 for o, b in zip(onsets, beats)), onsets
    checked = 0
    prev = None
    for t, value in values:
        if prev is not None and prev >= 2.0:
            kick = any(prev < b <= t for b in beats)
            assert value == pytest.approx(1.0 if kick else 0.3), (prev, t, value)
            checked += 1
        prev = t
    assert checked >= 12


# ------------------------------------------------------------------------------------------------ MIDI
def midi_port(rig):
    """An in-memory MIDI input (mido's EchoPort) read by the server's MIDI thread, as a real port would be."""
    mido = pytest.importorskip("mido", reason="mido is not installed (pip install 'wanstream[midi]')")
    from wanstream.server.midi import MidiInputs
    port = mido.ports.EchoPort()
    inputs = MidiInputs(rig.mgr.live)
    inputs.attach(port, "test controller")
    return mido, port, inputs


def wait_for(predicate, what):
    import time
    deadline = time.monotonic() + 30
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_a_cc_changes_the_parameter_of_the_stream_that_mapped_it_only(rig_factory):
    rig = rig_factory(n=2)
    a, b = rig.sessions
    mido, port, inputs = midi_port(rig)
    try:
        rig.run(6)
        a.live.set_modulation(Modulation.model_validate(
            {"mappings": [mapping("noise_scale", {"kind": "cc", "channel": 2, "control": 21}, min=0.2, max=1.0),
                          mapping("seed", {"kind": "cc", "control": 22}, min=0, max=127)]}))
        rig.run(8)
        assert a.stream.settings.noise_scale == b.stream.settings.noise_scale == 0.8   # no CC yet: untouched
        port.send(mido.Message("control_change", channel=2, control=21, value=127))
        port.send(mido.Message("control_change", channel=5, control=22, value=42))
        port.send(mido.Message("control_change", channel=3, control=21, value=0))       # another channel
        wait_for(lambda: rig.mgr.live.counters.midi_messages >= 3, "the MIDI thread")
        rig.run(8)
        assert a.stream.settings.noise_scale == pytest.approx(1.0) and a.stream.settings.seed == 42
        assert b.stream.settings.noise_scale == 0.8 and b.stream.settings.seed == 0   # the other stream: unchanged
        assert a.params.noise_scale == 0.8                     # the hand-set value stays; the mapping rules
        assert a.info()["live"]["values"] == {"noise_scale": 1.0, "seed": 42.0}
    finally:
        inputs.close()


def test_learn_maps_the_next_cc_and_note_slots_switch_prompts(rig_factory):
    rig = rig_factory(n=2)
    a, b = rig.sessions
    mido, port, inputs = midi_port(rig)
    told = []
    a.add_listener(told.append)
    try:
        rig.run(6)
        a.live.learn({"target": "noise_scale", "min": 0.5, "max": 0.9}, rig.clock())
        port.send(mido.Message("control_change", channel=0, control=74, value=0))
        wait_for(lambda: a.live.spec.mappings, "the learned mapping")
        m = a.live.spec.mappings[0]
        assert (m.target, m.source.kind, m.source.channel, m.source.control, m.min, m.max) == \
            ("noise_scale", "cc", 0, 74, 0.5, 0.9)
        assert any(msg.get("type") == "learned" for msg in told) and not b.live.spec.mappings
        rig.run(8)
        assert a.stream.settings.noise_scale == pytest.approx(0.5) and b.stream.settings.noise_scale == 0.8
        a.live.set_modulation(Modulation.model_validate(
            {"mappings": [m.model_dump()], "notes": [{"note": 36, "prompt": "slot one", "transition_chunks": 2}]}))
        port.send(mido.Message("note_on", note=36, velocity=100))
        wait_for(lambda: a.params.prompt == "slot one", "the note slot")
        assert a.params.transition_chunks == 2 and b.params.prompt != "slot one"
        assert rig.mgr.live.counters.note_switches == 1 and rig.mgr.live.counters.learned == 1
    finally:
        inputs.close()


def test_midi_clock_drives_the_tempo():
    from wanstream.core.tempo import PPQN, MidiClockFollower, TempoClock
    clock = TempoClock(120.0)
    follower = MidiClockFollower(clock)
    follower.start(0.0)
    interval = 60.0 / (90.0 * PPQN)                    # 90 BPM
    for i in range(PPQN * 4 + 1):
        follower.pulse(0.25 + i * interval)
    t = 0.25 + PPQN * 4 * interval
    assert clock.bpm == pytest.approx(90.0) and clock.beat_at(t) == pytest.approx(4.0)
    assert clock.time_of(5.0) == pytest.approx(t + 60 / 90)
    follower.stop(t)
    assert clock.beat_at(t + 10) == pytest.approx(4.0)


def test_a_virtual_midi_port_when_the_machine_has_one():
    mido = pytest.importorskip("mido", reason="mido is not installed (pip install 'wanstream[midi]')")
    from wanstream.server.midi import available
    reason = available()
    if reason is not None:
        pytest.skip(f"no MIDI backend here ({reason}); the in-memory port tests drive the same code")
    try:
        port = mido.open_output("wanstream-test", virtual=True)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"cannot make a virtual MIDI port here: {exc}")
    with port:
        assert "wanstream-test" in " ".join(mido.get_input_names())


# ------------------------------------------------------------------------------------------------ HTTP
def test_mappings_over_http_round_trip_through_presets_and_bad_ones_are_4xx(tiny_model, tmp_path):
    from server_helpers import LiveServer, WSClient, wait_until
    with LiveServer(tiny_model, server_settings(tmp_path, push_allow=["rtmp://127.0.0.1:1/"])) as srv:
        a, b = WSClient(srv.ws_url), WSClient(srv.ws_url)
        try:
            ready_a = wait_until(lambda: next((m for m in a.messages if m["type"] == "ready"), None), 30, "ready")
            ready_b = wait_until(lambda: next((m for m in b.messages if m["type"] == "ready"), None), 30, "ready")
            sid, own = ready_a["session"], {"X-Stream-Secret": ready_a["secret"]}
            other = {"X-Stream-Secret": ready_b["secret"]}
            spec = {"mappings": [mapping("noise_scale", {"kind": "lfo", "shape": "triangle", "beats": 4},
                                         min=0.5, max=0.9, smoothing_s=0.1),
                                 mapping("prompts.1.weight", {"kind": "audio", "feature": "low"})],
                    "notes": [{"note": 36, "prompt": "neon city", "quantize": "bar"}]}
            status, body = srv.http("PUT", f"/api/sessions/{sid}/modulation", spec, own)
            assert status == 200 and body["modulation"]["mappings"][0]["source"]["beats"] == 4
            assert srv.http("PUT", f"/api/sessions/{sid}/modulation", spec, other)[0] == 403   # not yours
            assert srv.http("PUT", f"/api/sessions/{sid}/modulation", spec)[0] == 403
            status, preset = srv.http("GET", f"/api/sessions/{sid}/preset", headers=own)
            assert status == 200 and preset["modulation"] == body["modulation"]
            status, check = srv.http("POST", "/api/presets/validate", preset)
            assert status == 200 and check["preset"]["modulation"] == preset["modulation"]
            assert srv.http("POST", f"/api/sessions/{ready_b['session']}/preset", preset, other)[0] == 200
            status, got = srv.http("GET", f"/api/sessions/{ready_b['session']}/modulation", headers=other)
            assert got["modulation"] == body["modulation"]                      # the preset carried them
            bad = [{"mappings": [mapping("noise_scale", {"kind": "lfo", "beats": 4}, min=0.0)]},
                   {"mappings": [mapping("steps", {"kind": "cc", "control": 128})]},
                   {"mappings": [mapping("lora.ink", {"kind": "cc", "control": 1})]},          # not loaded
                   {"mappings": [mapping("nope", {"kind": "cc", "control": 1})]},
                   {"mappings": [mapping("seed", {"kind": "wave"})]},
                   {"mappings": [mapping("seed", {"kind": "cc", "control": 1})] * 33},
                   {"notes": [{"note": 1}]}, {"mappings": "x"}, {"extra": 1}, [1, 2],
                   {"mappings": [mapping("noise_scale", {"kind": "lfo", "rate_hz": float("nan")})]}]
            for spec_bad in bad:
                raw = json_bytes(spec_bad)
                status, answer = srv.http("PUT", f"/api/sessions/{sid}/modulation", raw=raw, headers=own)
                assert status == 422 and answer["message"], (spec_bad, status, answer)
            status, answer = srv.http("POST", "/api/presets/validate", {"modulation": bad[2]})
            assert status == 422 and "modulation.mappings.0.target" in answer["message"]
            assert srv.http("POST", f"/api/sessions/{sid}/learn", {"target": "noise_scale"}, own)[0] == 409
            assert srv.http("POST", f"/api/sessions/{sid}/learn", {"target": "x"}, own)[0] == 422
            assert srv.http("POST", f"/api/sessions/{sid}/outputs", {"url": "rtmp://10.1.2.3/live/k"}, own)[0] == 403
            assert srv.http("POST", f"/api/sessions/{sid}/outputs", {"url": "file:///etc/passwd"}, own)[0] == 422
            assert srv.http("POST", f"/api/sessions/{sid}/outputs", {"url": "rtmp://127.0.0.1:1/x"}, other)[0] == 403
            assert srv.http("DELETE", f"/api/sessions/{sid}/outputs/7", headers=own)[0] == 404
            status, live = srv.http("GET", "/api/live")
            assert status == 200 and live["tempo"]["bpm"] == 120.0 and live["midi_ports"] == []
            assert srv.http("POST", f"/api/sessions/{sid}/params", {"prompt": "x", "quantize": "bars"}, own)[0] == 422
            status, _ = srv.http("POST", f"/api/sessions/{sid}/params", {"seed": 5, "quantize": "beat"}, own)
            assert status == 200
            metrics = srv.http("GET", "/metrics")[1]
            for name in ("wanstream_live_midi_messages_total", "wanstream_live_mappings", "wanstream_server_pushes",
                         "wanstream_server_pushes_refused_total", 'wanstream_server_limit{name="max_pushes"}',
                         'wanstream_server_limit{name="midi_rate"}', "wanstream_live_audio_dropped_samples_total"):
                assert name in metrics, name
        finally:
            a.close()
            b.close()


def json_bytes(obj) -> bytes:
    import json
    return json.dumps(obj).encode()
