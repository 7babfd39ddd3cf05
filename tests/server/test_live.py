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
