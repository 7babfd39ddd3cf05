"""RTMP push of a stream's output with its audio (issue 24), against nginx's RTMP module on loopback; a stalled
RTMP server ends only its own push. nginx and libnginx-mod-rtmp are Debian packages (.ci/run installs them);
without them these tests skip with the reason."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import av
import pytest
from test_live import FPS, Rig, kick_track, wait_for

from wanstream.server.outputs import PushError, check_url

RTMP_MODULE = Path("/usr/lib/nginx/modules/ngx_rtmp_module.so")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def rtmp_server(tmp_path):
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx is None or not RTMP_MODULE.exists():
        pytest.skip("needs nginx and libnginx-mod-rtmp (Debian packages; .ci/run installs them as root)")
    port = free_port()
    rec = tmp_path / "rec"
    rec.mkdir()
    rec.chmod(0o777)
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"""
daemon off; master_process off; user root; pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log info;
load_module {RTMP_MODULE};
events {{ worker_connections 64; }}
rtmp {{ server {{ listen 127.0.0.1:{port};
  application live {{ live on; record all; record_path {rec}; record_unique off; }} }} }}
""")
    proc = subprocess.Popen([nginx, "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.skip(f"nginx did not start: {proc.stderr.read().decode()[-300:]}")
            time.sleep(0.05)
    yield port, rec
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture
def rig(tiny_model, tmp_path, clip):
    rigs = []

    def make(n=1, **settings):
        r = Rig(tiny_model, tmp_path, clip, n, **settings)
        rigs.append(r)
        return r
    yield make
    for r in rigs:
        r.close()


def test_push_urls_are_checked_against_the_allowed_prefixes():
    assert check_url("rtmp://127.0.0.1:1935/live/key", ["rtmp://127.0.0.1:"]) == "flv"
    assert check_url("srt://127.0.0.1:9000", ["srt://127.0.0.1:"]) == "mpegts"
    for url, allowed, status in [("rtmp://10.0.0.1/live/x", ["rtmp://127.0.0.1:"], 403),
                                 ("rtmp://127.0.0.1/live/x", [], 403), ("file:///etc/passwd", ["file:"], 422),
                                 ("http://127.0.0.1/x", ["http:"], 422), ("rtmp://127.0.0.1/a b", ["rtmp:"], 422),
                                 ("rtmp://" + "a" * 3000, ["rtmp:"], 422)]:
        with pytest.raises(PushError) as err:
            check_url(url, allowed)
        assert err.value.status == status, url


def test_an_rtmp_push_delivers_decodable_frames_with_audio(rig, rtmp_server):
    port, rec = rtmp_server
    r = rig(push_allow=[f"rtmp://127.0.0.1:{port}/"])
    s = r.sessions[0]
    rate = 48000
    track = kick_track(8.0, [1.0 + 0.5 * i for i in range(12)], rate)
    per_frame = int(rate / FPS)
    r.run(4)
    push = s.pushes.start(f"rtmp://127.0.0.1:{port}/live/test")

    def audio():
        i = r.k - 1
        s.live.audio_in(track[(i - 1) * per_frame: i * per_frame], rate, r.clock.t)
    r.run(96, before_tick=audio)
    wait_for(lambda: push.frames_sent >= 64 or push.state == "failed", "frames sent")
    s.pushes.stop(push.number)
    assert push.state == "stopped" and push.error is None, push.info()
    recorded = rec / "test.flv"
    wait_for(recorded.exists, "nginx's recording")
    time.sleep(0.5)
    with av.open(str(recorded)) as container:
        kinds = {st.type for st in container.streams}
        frames = {"video": 0, "audio": 0}
        for packet in container.demux():
            for frame in packet.decode():
                frames[packet.stream.type] += 1
                if packet.stream.type == "video":
                    assert frame.width == s.width and frame.height == s.height
    assert kinds == {"video", "audio"}
    assert frames["video"] >= 64 and frames["audio"] >= 50, frames
    assert push.info()["url"].endswith("/live/***")                    # the stream key is never listed


def test_a_stalled_rtmp_server_ends_only_its_own_push(rig):
    """A server that accepts and never answers: the push makes no progress, is killed after push_stall_s and
    reported; its stream and the other stream run on all along."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    held = []
    threading.Thread(target=lambda: held.append(listener.accept()), daemon=True).start()
    port = listener.getsockname()[1]
    r = rig(n=2, push_allow=[f"rtmp://127.0.0.1:{port}/"], push_stall_s=1.5, push_queue_frames=8)
    a, b = r.sessions
    told = []
    a.add_listener(told.append)
    r.run(4)
    push = a.pushes.start(f"rtmp://127.0.0.1:{port}/live/stall")
    t0 = time.monotonic()
    while push.state != "failed" and time.monotonic() - t0 < 60:
        r.frame()
        time.sleep(0.02)
    assert push.state == "failed" and "stopped taking data" in push.error, push.info()
    push.proc.wait(30)                                                  # killed (the kill is not instant)
    # the backlog to the stalled process stays bounded whatever the machine's speed: every frame handed to the
    # push was sent, dropped, or is among the at most 8 queued and the few in the OS pipe (64 KiB: 5 frames of
    # 64x64 RGB, plus the one being written and the one the push process holds)
    assert 0 <= push.frames_in - push.frames_sent - push.frames_dropped <= 8 + 7, push.info()
    wait_for(lambda: any(m.get("type") == "push" and m.get("state") == "failed" for m in told),
             "the stream told of the failed push")                # the message follows the state change
    before = [len(o) for o in r.outputs]
    r.run(16)
    assert all(len(o) > n for o, n in zip(r.outputs, before))           # both streams go on
    assert r.mgr.totals.counters["pushes_failed"] == 1 and r.mgr.pushes_running() == 0
    listener.close()
