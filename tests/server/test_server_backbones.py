"""Every backbone live on the server: a prompt switch with KV re-cache (LongLive's mechanism) over HTTP and the
WebSocket, for LongLive and StreamDiffusionV2; the re-cache runs after the tick's frames were handed to the
sessions, is counted in the session's stats and /metrics, and a re-cache with a transition is refused (4xx)."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("websockets", reason="the WebSocket transport needs the websockets package")

from server_helpers import LiveServer, WSClient, server_settings, wait_until  # noqa: E402


@pytest.fixture(scope="module")
def longlive_model(tmp_path_factory):
    """A tiny random LongLive (generator + LoRA in the released layout) with its tiny text encoder."""
    from wanstream.models.loader import load_model
    from wanstream.models.random_init import init_random
    root = tmp_path_factory.mktemp("longlive")
    init_random(root, "tiny", seed=0, log=lambda *_: None, backbone="longlive")
    return load_model(root, device="cpu")


def _stream(client, clip, n, start=0, fps=30.0):
    for i in range(start, start + n):
        client.send_frame(clip[i % len(clip)], i)
        time.sleep(1 / fps)


@pytest.mark.parametrize("which", ["longlive", "streamdiffusionv2"])
def test_prompt_switch_with_recache_live(which, longlive_model, tiny_model, clip, tmp_path):
    model = longlive_model if which == "longlive" else tiny_model
    first = model.backbone.chunk_rule("v2v").first_frames
    with LiveServer(model, server_settings(tmp_path, max_sessions=2)) as srv:
        a, b = WSClient(srv.ws_url), WSClient(srv.ws_url)
        sid = a.ready()["session"]
        own = {"X-Stream-Secret": a.ready()["secret"]}
        b.ready()
        order = []                                    # the other session's delivered frames when a re-cache runs
        engine, run_late = srv.manager.engine, srv.manager.engine.run_late

        def late():
            if any(g.late for g in engine.groups.values()):
                order.append(sum(len(s.outbox) for s in engine.streams.values()))
            run_late()
        engine.run_late = late
        for n in range(3):
            _stream(a, clip, first if n == 0 else first + 3, start=40 * n)
            _stream(b, clip, first if n == 0 else first + 3, start=40 * n)
        a.wait_frames(first)
        status, body = srv.http("POST", f"/api/sessions/{sid}/params", {"prompt": "an ink drawing", "recache": True},
                                headers=own)
        assert status == 200 and body["params"]["recache"] is True and body["params"]["transition_chunks"] == 0
        session = srv.manager.get(sid)
        have = a.frame_count
        for n in range(4):
            _stream(a, clip, 16, start=8 + 16 * n)
            _stream(b, clip, 16, start=8 + 16 * n)
            if session.stream is not None and session.stream.stats.recaches:
                break
        wait_until(lambda: session.stream.stats.recaches == 1, 60, "the re-cache ran")
        wait_until(lambda: a.frame_count > have, 60, "frames after the switch")
        assert order and all(n == 0 for n in order)  # every outbox was empty (delivered) when a re-cache ran
        status, text = srv.http("GET", "/metrics")
        assert f'wanstream_stream_recaches_total{{session="{sid}"}} 1.0' in text
        # over the WebSocket too; with a transition it is refused, nothing changes
        reply = a.params(prompt="a pencil sketch", recache=True)
        assert reply["type"] == "params" and reply["params"]["prompt"] == "a pencil sketch"
        status, body = srv.http("POST", f"/api/sessions/{sid}/params", {"transition_chunks": 4}, headers=own)
        assert 400 <= status < 500 and "re-caches or transitions" in body["message"]
        assert a.errors() == [] and b.errors() == []
        a.close()
        b.close()
