"""Suspend and resume in the server: a session without input parks its stream in host memory (its cache rows go
back to the pool), resumes on its next frame with output bit-identical to the session API run without a pause;
the host memory of parked streams is bounded (the oldest expire with a clear reason) and counted in /metrics.

Frames travel losslessly (raw RGB); the client sends one chunk at a time and waits until the model has it, so the
chunk boundaries match the reference run. Every wait is bounded; no timing assert."""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("websockets", reason="the WebSocket transport needs the websockets package")

from server_helpers import H, LiveServer, W, WSClient, clip_chunks, server_settings, wait_until  # noqa: E402

from wanstream.api.session import StreamSession  # noqa: E402


def reference(model, chunks, prompt):
    s = StreamSession(model, prompt=prompt, width=W, height=H, steps=2, noise_scale=0.8, seed=0)
    images = {}
    for start, frames in chunks:
        for o in s.push(frames, timestamps=[float(start + i) for i in range(len(frames))]):
            images[o.index] = o.image
    return images


def send_chunks(c: WSClient, chunks, sent: int) -> int:
    """Send chunks one at a time, each once the model has taken the one before (the chunk boundaries of the
    reference run); returns the frames sent in all."""
    for start, frames in chunks:
        before = c.stats()["frames_to_model"]
        for i, f in enumerate(frames):
            c.send_frame(f, start + i)
        sent += len(frames)
        wait_until(lambda: c.stats()["frames_to_model"] == before + len(frames), 120,
                   f"frames up to {sent} at the model")
    return sent


def metric(srv, name: str) -> float:
    _, text = srv.http("GET", "/metrics")
    m = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def pool_rows(srv) -> int:
    return sum(g.runner.pool.used_rows for g in srv.manager.engine.groups.values())


def test_an_idle_stream_parks_and_resumes_with_identical_output(tiny_model, tmp_path, clip):
    chunks = clip_chunks(clip, 10)
    settings = server_settings(tmp_path, park_after_s=0.5, output_queue_frames=64)
    ref = reference(tiny_model, chunks, settings.prompt)
    with LiveServer(tiny_model, settings) as srv:
        c = WSClient(srv.ws_url, "raw")
        c.ready()
        sent = send_chunks(c, chunks[:5], 0)
        wait_until(lambda: len(c.frames) >= sent - 4, 60, "the outputs before the pause")
        session = srv.manager.list()[0]
        wait_until(lambda: session.parked is not None, 60, "the idle stream to park")
        assert session.stream is None and pool_rows(srv) == 0             # its rows are back in the pool
        assert metric(srv, "wanstream_server_parked_streams") == 1 and metric(srv, "wanstream_server_parks_total") == 1
        assert metric(srv, "wanstream_server_parked_bytes") > 0
        assert c.stats()["serving"]["parked"] is True
        send_chunks(c, chunks[5:], sent)                                  # the next frame resumes it
        wait_until(lambda: len(c.frames) >= len(ref) - 4, 60, "the outputs after the pause")
        assert session.parked is None and metric(srv, "wanstream_server_resumes_total") == 1
        got = dict(c.frames)
        assert set(got) <= set(ref) and len(got) == len(ref) - 4          # the last chunk is still in flight
        for index, image in got.items():
            assert np.array_equal(image, ref[index]), f"frame {index} differs from the stream never parked"
        assert c.errors() == []
        c.close()


def test_parked_memory_is_bounded_and_the_oldest_expire(tiny_model, tmp_path, clip):
    chunks = clip_chunks(clip, 2)
    with LiveServer(tiny_model, server_settings(tmp_path, park_after_s=0.3)) as srv:
        a = WSClient(srv.ws_url, "raw")
        a.ready()
        send_chunks(a, chunks, 0)
        sa = srv.manager.list()[0]
        wait_until(lambda: sa.parked is not None, 60, "the first stream to park")
        one = srv.manager.parking.bytes
        srv.manager.parking.max_bytes = int(1.5 * one)                    # room for one parked stream only
        b = WSClient(srv.ws_url, "raw")
        b.ready()
        send_chunks(b, chunks, 0)
        sb = next(s for s in srv.manager.list() if s is not sa)
        wait_until(lambda: sb.parked is not None, 60, "the second stream to park")
        closed = wait_until(lambda: next(iter(a.of_type("closed")), None), 30, "the oldest parked stream to expire")
        assert closed["reason"] == "parked_expired" and "parked" in closed["message"]
        wait_until(lambda: a.closed, 30, "its connection to close")
        assert sa.close_reason == "parked_expired" and not b.closed
        assert metric(srv, "wanstream_server_parked_expired_total") == 1
        assert metric(srv, "wanstream_server_parked_streams") == 1
        assert metric(srv, 'wanstream_server_limit{name="park_max_bytes"}') > 0
        srv.manager.parking.max_bytes = 1                                  # now no state fits: not parked at all
        send_chunks(b, clip_chunks(clip, 3)[2:], 9)
        wait_until(lambda: sb.stream is not None, 30, "b to resume")
        wait_until(lambda: metric(srv, "wanstream_server_parks_refused_total") >= 1, 60, "a refused park")
        assert sb.parked is None and sb.stream is not None
        a.close()
        b.close()
