"""Recordings on the server never leave a partial or empty file listed (issue 19, item 1, the server's part): a
recording is written to a hidden temporary file and renamed when finished; one with no frame is not kept; a crash
leaves nothing listed."""

from __future__ import annotations

import numpy as np
import pytest

from wanstream.server.recording import RecordingStore, partial_path


def store_at(folder) -> RecordingStore:
    return RecordingStore(folder, max_per_session=5, max_files=10, max_bytes=2**30)


def frames(n: int):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(n)]


def test_a_running_recording_is_hidden_until_finished_then_renamed(tmp_path):
    store = store_at(tmp_path)
    rec = store.start("a" * 32, "secret-a", 1, 16.0, 64, 64)
    for f in frames(6):
        rec.write(f)
    assert [p.name for p in tmp_path.iterdir()] == [partial_path(rec.path).name]   # hidden, not the final name
    assert partial_path(rec.path).name.startswith(".")
    assert store.listing() == [] and store.path(rec.path.name) is None              # not listed, not downloadable
    assert store.usage(fresh=True)[0] == 1                                          # counted against the budget
    rec.stop(wait=True)
    assert [p.name for p in tmp_path.iterdir()] == [rec.path.name]
    assert rec.kept and rec.error is None and rec.info()["kept"]
    assert [r["file"] for r in store.listing()] == [rec.path.name] and store.path(rec.path.name) == rec.path
    import av
    with av.open(str(rec.path)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 6                      # complete and playable


def test_a_recording_without_frames_is_not_kept(tmp_path):
    """Was: an empty (or header-only) mp4 was left and listed."""
    store = store_at(tmp_path)
    rec = store.start("b" * 32, "secret-b", 1, 16.0, 64, 64)
    rec.stop(wait=True)
    assert list(tmp_path.iterdir()) == [] and store.listing() == []
    assert not rec.kept and "no frame" in rec.error and rec.info()["complete"]


def test_a_crash_leaves_nothing_listed(tmp_path):
    """A server killed mid-recording leaves only the hidden temporary file; the next server lists nothing."""
    first = store_at(tmp_path)
    rec = first.start("c" * 32, "secret-c", 1, 16.0, 64, 64)
    for f in frames(20):
        rec.write(f)
    rec._thread.join(0.5)                               # (the recorder thread keeps running: "killed" here)
    after_crash = store_at(tmp_path)                    # a new server on the same folder
    assert after_crash.listing() == [] and after_crash.path(rec.path.name) is None
    assert after_crash.path(partial_path(rec.path).name) is None
    rec.stop(wait=True)


def test_live_recording_toggled_without_frames_leaves_no_file(tiny_model, tmp_path, clip):
    pytest.importorskip("websockets", reason="the WebSocket transport needs the websockets package")
    from server_helpers import LiveServer, WSClient, server_settings, stream_until, wait_until
    settings = server_settings(tmp_path)
    with LiveServer(tiny_model, settings) as s:
        c = WSClient(s.ws_url)
        own = {"X-Stream-Secret": c.ready()["secret"]}
        assert c.params(recording=True)["type"] == "params"      # no frame sent while it records
        assert c.params(recording=False)["type"] == "params"
        wait_until(lambda: not s.manager.recordings.running(), 30, "the empty recording finished")
        assert s.http("GET", "/api/recordings", headers=own)[1]["recordings"] == []
        assert not any(settings.record_dir.glob("*.mp4")) and not any(settings.record_dir.glob(".*"))
        info = s.manager.get(c.ready()["session"]).info()["recordings"][0]
        assert info["complete"] and not info["kept"] and "no frame" in info["error"]
        assert c.params(recording=True)["type"] == "params"      # one with frames is kept
        stream_until(c, clip, c.frame_count + 6)
        c.params(recording=False)
        wait_until(lambda: not s.manager.recordings.running(), 30, "recording finished")
        listed = s.http("GET", "/api/recordings", headers=own)[1]["recordings"]
        assert len(listed) == 1 and listed[0]["complete"] and listed[0]["frames"] > 0
        assert [p.name for p in settings.record_dir.iterdir()] == [listed[0]["file"]]
        c.close()
