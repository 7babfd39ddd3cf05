"""Live migration between two servers (in this process; tests/deploy/test_migration.py does it behind HAProxy):
a WebSocket stream moves from A to B on a POST, its client follows the redirect, and its output frames are the
session API's, bit for bit, none lost or repeated; blobs that are corrupt, truncated, too large, of another
version, model or resolution get a 4xx and change nothing."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest

pytest.importorskip("websockets", reason="the WebSocket transport needs the websockets package")

from server_helpers import H, LiveServer, W, WSClient, clip_chunks, server_settings, wait_until  # noqa: E402
from test_server_parking import metric, reference, send_chunks  # noqa: E402

from wanstream.engine.blob import dumps, loads  # noqa: E402

ADMIN = "admin-token-shared-by-the-servers"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


def test_a_stream_migrates_to_another_server_with_identical_output(tiny_model, tmp_path, clip):
    chunks = clip_chunks(clip, 10)
    with LiveServer(tiny_model, server_settings(tmp_path / "b", admin_token=ADMIN)) as b, \
            LiveServer(tiny_model, server_settings(tmp_path / "a", admin_token=ADMIN, migrate_to=b.base,
                                                   output_queue_frames=64)) as a:
        ref = reference(tiny_model, chunks, a.settings.prompt)
        c = WSClient(a.ws_url, "raw")
        ready = c.ready()
        sent = send_chunks(c, chunks[:5], 0)
        status, body = a.http("POST", f"/api/sessions/{ready['session']}/migrate", headers=AUTH)
        assert status == 200 and body["migrated"], body
        redirect = wait_until(lambda: next(iter(c.of_type("redirect")), None), 60, "the redirect")
        wait_until(lambda: c.closed, 30, "the old connection to close")
        assert [m["state"] for m in c.of_type("migrate")] == ["start"]
        assert a.manager.count == 0 and metric(a, "wanstream_server_migrations_out_total") == 1
        assert metric(b, "wanstream_server_migrations_in_total") == 1 and b.manager.count == 1
        before = list(c.frames)
        assert c.messages[-1]["type"] == "redirect"                 # its last message, after its last frame
        d = WSClient(b.base.replace("http", "ws") + redirect["url"], "raw")
        again = d.ready()
        assert again["session"] == ready["session"] and again["secret"] == ready["secret"]
        send_chunks(d, chunks[5:], sent)
        wait_until(lambda: len(before) + len(d.frames) >= len(ref) - 4, 60, "the outputs on B")
        got = before + list(d.frames)
        assert [i for i, _ in got] == sorted(ref)[: len(got)]       # in order: none lost, none repeated
        for index, image in got:
            assert np.array_equal(image, ref[index]), f"frame {index} differs from the stream never moved"
        status, info = b.http("GET", f"/api/sessions/{ready['session']}", headers={"X-Stream-Secret": ready["secret"]})
        assert status == 200 and info["transport"] == "websocket"
        d.close()
        # a used resume token does not open anything
        e = WSClient(b.base.replace("http", "ws") + redirect["url"], "raw")
        assert e.wait_error("bad_resume")["code"] == "bad_resume"
        e.close()


def _blob(model, clip, **session):
    """A valid blob of a 2-chunk stream, made by an engine here, with the session values of a server."""
    from wanstream.engine.loop import Engine
    eng = Engine(model)
    emb = model.prompt_embedding("a watercolor painting")
    s = eng.open(prompt_embeds=emb, width=W, height=H, steps=2)
    eng.feed(s, clip[:9])
    eng.run_until_idle()
    s.take_outputs()
    parked = eng.park(s)
    head, images = parked.buffer.snapshot()
    info = {"id": "0" * 32, "secret": "s" * 32, "params": {"prompt": "a watercolor painting"}, "arrivals": 9,
            "width": W, "height": H, **session}
    return parked, eng, dumps(parked, eng.clock(), {"session": info, "buffer": head}, images)


def test_blobs_are_never_trusted(tiny_model, tmp_path, clip):
    parked, eng, good = _blob(tiny_model, clip)
    with LiveServer(tiny_model, server_settings(tmp_path, admin_token=ADMIN, max_sessions=1)) as b:
        def post(data, headers=AUTH):
            return b.http("POST", "/api/migrations", raw=data, headers={**headers,
                                                                        "Content-Type": "application/octet-stream"})
        p2, extra, images = loads(good, len(good), eng.clock())
        other_model = copy.deepcopy(p2)
        other_model.host["model"] = "0" * 32
        cases = [("no admin token", good[:2000], {}, 403),
                 ("corrupt", good[:200] + bytes([good[200] ^ 1]) + good[201:], AUTH, 400),
                 ("truncated", good[: len(good) // 2], AUTH, 400),
                 ("not a blob", b"hello" * 20, AUTH, 400),
                 ("another version", good[:4] + (7).to_bytes(2, "little") + good[6:], AUTH, 422),
                 ("another model", dumps(other_model, 0.0, {k: v for k, v in extra.items() if k != "_shift"},
                                         images), AUTH, 422),
                 ("a bad session id", _blob(tiny_model, clip, id="../etc")[2], AUTH, 422)]
        for what, data, headers, want in cases:
            status, body = post(data, headers)
            assert status == want, (what, status, body)
            assert b.manager.count == 0, what                      # nothing changed
        b.settings.max_blob_bytes = 1000                            # refused by its length, before it is read
        status, _ = post(good[:2000])
        assert status == 413 and b.manager.count == 0
        b.settings.max_blob_bytes = 1 << 30
        assert metric(b, "wanstream_server_blobs_refused_total") == 6
        status, body = post(good)                                   # the good one is taken ...
        assert status == 201 and re.fullmatch(r"[\w-]{20,}", body["resume"]) and b.manager.count == 1
        status, _ = post(good)                                      # ... once: the same session again: 409/503
        assert status in (409, 503) and b.manager.count == 1
    with LiveServer(tiny_model, server_settings(tmp_path / "c", admin_token=ADMIN)) as c:
        c.settings.width = 128                                      # a server of another resolution
        status, body = c.http("POST", "/api/migrations", raw=good, headers=AUTH)
        assert status == 422 and "64x64" in body["message"] and c.manager.count == 0


def test_a_migrated_stream_whose_client_never_comes_back_is_freed(tiny_model, tmp_path, clip):
    _, _, good = _blob(tiny_model, clip)
    with LiveServer(tiny_model, server_settings(tmp_path, admin_token=ADMIN, resume_timeout_s=0.5)) as b:
        status, _ = b.http("POST", "/api/migrations", raw=good, headers=AUTH)
        assert status == 201 and b.manager.count == 1 and len(b.manager.parking) == 1
        wait_until(lambda: b.manager.count == 0, 30, "the unclaimed stream to be freed")
        assert len(b.manager.parking) == 0
