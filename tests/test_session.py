"""Session API: frame-count law, chunking invariance, determinism, isolation, live changes, T2V."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wanstream.api.session import StreamSession
from wanstream.api.t2v import latent_frames_for, text_to_video
from wanstream.io.video import make_motion_clip

W, H = 80, 48


@pytest.fixture(scope="module")
def clip():
    return make_motion_clip(30, W, H, seed=3)


def _run(model, frames, sizes=None, **kw):
    kw.setdefault("prompt", "a watercolor painting")
    s = StreamSession(model, width=W, height=H, **kw)
    out = []
    sizes = sizes or [len(frames)]
    i = 0
    for n in sizes:
        out += s.push(frames[i:i + n], timestamps=[float(t) for t in range(i, i + n)])
        i += n
    out += s.flush()
    return out


def _images(out):
    return np.stack([o.image for o in out])


@pytest.mark.parametrize("n", [1, 4, 5, 6, 9, 14])
def test_every_input_frame_gets_one_output(tiny_model, clip, n):
    out = _run(tiny_model, clip[:n], steps=2)
    assert [o.index for o in out] == list(range(n))
    assert [o.timestamp for o in out] == [float(i) for i in range(n)]
    assert all(o.image.shape == (H, W, 3) and o.image.dtype == np.uint8 for o in out)


@pytest.mark.parametrize("steps,batch", [(1, True), (3, True), (4, True), (2, False), (4, False)])
def test_frame_count_law_all_modes(tiny_model, clip, steps, batch):
    out = _run(tiny_model, clip[:17], steps=steps, batch=batch)
    assert [o.index for o in out] == list(range(17))


def test_chunking_of_pushes_does_not_matter(tiny_model, clip):
    whole = _run(tiny_model, clip[:21], seed=4)
    pieces = _run(tiny_model, clip[:21], sizes=[1, 2, 3, 7, 1, 7], seed=4)
    assert np.array_equal(_images(whole), _images(pieces))


def test_outputs_arrive_with_stream_batch_delay(tiny_model, clip):
    s = StreamSession(tiny_model, prompt="x", width=W, height=H, steps=3)
    got = [len(s.push(clip[i])) for i in range(17)]
    # prepare emits 5 frames at frame 5; a chunk entering at frame 9 leaves 2 calls later (steps 3)
    assert got[4] == 5 and sum(got[:16]) == 5 and got[16] == 4


def test_same_seed_same_output_and_seed_matters(tiny_model, clip):
    a = _images(_run(tiny_model, clip[:13], seed=7))
    b = _images(_run(tiny_model, clip[:13], seed=7))
    c = _images(_run(tiny_model, clip[:13], seed=8))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_no_state_leaks_between_streams(tiny_model, clip):
    other = make_motion_clip(13, W, H, seed=9)
    alone = _images(_run(tiny_model, clip[:13], seed=2))
    _run(tiny_model, other, seed=5, steps=3)                    # an earlier stream on the same model
    after = _images(_run(tiny_model, clip[:13], seed=2))
    assert np.array_equal(alone, after)
    # interleaved sessions
    s1 = StreamSession(tiny_model, prompt="a watercolor painting", width=W, height=H, seed=2)
    s2 = StreamSession(tiny_model, prompt="an oil painting", width=W, height=H, seed=5, steps=4)
    o1 = []
    for i in range(13):
        o1 += s1.push(clip[i], timestamps=[float(i)])
        s2.push(other[i])
    o1 += s1.flush()
    assert np.array_equal(_images(o1), alone)


def test_reset_equals_a_fresh_stream(tiny_model, clip):
    fresh = _images(_run(tiny_model, clip[:9], seed=3))
    s = StreamSession(tiny_model, prompt="a watercolor painting", width=W, height=H, seed=3)
    s.push(clip[9:20])
    s.reset()
    again = _images(s.push(clip[:9]) + s.flush())
    assert np.array_equal(fresh, again)


def test_live_changes_apply_from_the_next_chunk(tiny_model, clip):
    base = _run(tiny_model, clip[:17], seed=1)
    s = StreamSession(tiny_model, prompt="a watercolor painting", width=W, height=H, seed=1)
    out = s.push(clip[:9])
    n_before = len(out)
    s.update(prompt="a neon city at night")
    out += s.push(clip[9:17]) + s.flush()
    assert [o.index for o in out] == list(range(17))
    assert np.array_equal(_images(out[:n_before]), _images(base[:n_before]))
    assert not np.array_equal(_images(out[-4:]), _images(base[-4:]))


def test_steps_noise_and_transition_changes_keep_every_frame(tiny_model, clip):
    s = StreamSession(tiny_model, prompt="a watercolor painting", width=W, height=H, steps=2)
    out = s.push(clip[:9])
    s.update(steps=4, noise_scale=0.7, noise_controller=False, seed=3)   # frames it finishes: next push
    out += s.push(clip[9:17])
    emb = torch.randn(1, 12, 4096)
    s.update(prompt_embeds=emb, transition_chunks=2)
    s.update(steps=1)
    out += s.push(clip[17:30]) + s.flush()
    assert [o.index for o in out] == list(range(30))


def test_bad_input_is_rejected_clearly(tiny_model, clip):
    s = StreamSession(tiny_model, prompt="x", width=W, height=H)
    with pytest.raises(ValueError, match="uint8"):
        s.push(clip[:2].astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        s.push(np.zeros((2, H, W), np.uint8))
    with pytest.raises(ValueError, match="multiples of 16"):
        StreamSession(tiny_model, prompt="x", width=50, height=48)
    with pytest.raises(ValueError, match="steps"):
        s.update(steps=5)
    with pytest.raises(ValueError, match="embedding"):
        StreamSession(tiny_model, prompt_embeds=torch.zeros(3, 7), width=W, height=H)
    big = np.repeat(np.repeat(clip[:5], 2, axis=1), 2, axis=2)   # wrong size → resized
    assert len(s.push(big)) == 5
    s.close()
    with pytest.raises(RuntimeError, match="closed"):
        s.push(clip[:1])


def test_taehv_decoder_keeps_the_frame_law(tiny_model_dir, clip):
    from wanstream.models.loader import load_model
    model = load_model(tiny_model_dir, device="cpu", taehv=True)
    out = _run(model, clip[:14], decoder="taehv")
    assert [o.index for o in out] == list(range(14))


@pytest.mark.parametrize("frames", [1, 9, 22])
def test_t2v_frame_count(tiny_model, frames):
    emb = tiny_model.prompt_embedding("a fox in the snow")
    video = list(text_to_video(tiny_model, emb, frames, width=W, height=H, steps=2, seed=0))
    assert len(video) == frames and video[0].shape == (H, W, 3)
    assert latent_frames_for(frames) % 3 == 0
