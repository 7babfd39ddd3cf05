"""A user's files are sacred: an output that is an input is refused before anything is opened (the input stays
byte-identical), and an output appears only complete — a failure, Ctrl-C (SIGINT) or SIGTERM leaves no partial or
empty file behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from media import restyle_file, write_images

from wanstream.cli.main import main
from wanstream.io.video import (
    VideoError,
    VideoWriter,
    atomic_output,
    check_outputs,
    make_motion_clip,
    read_video,
    write_motion_clip,
    write_text_atomic,
)


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _v2v(model_dir, *args) -> list[str]:
    return ["v2v", *map(str, args), "--model", str(model_dir), "--prompt", "ink", "--device", "cpu"]


@pytest.mark.parametrize("how", ["same", "hard", "symlink-out", "symlink-in", "relative"])
def test_output_that_is_the_input_is_refused_and_the_input_kept(how, tiny_model_dir, tmp_path, capsys, monkeypatch):
    clip = write_motion_clip(tmp_path / "clip.mp4", 5, 32, 32)
    before = clip.read_bytes()
    src, out = clip, clip
    if how == "hard":
        os.link(clip, out := tmp_path / "linked.mp4")
    elif how == "symlink-out":
        (out := tmp_path / "link.mp4").symlink_to(clip)
    elif how == "symlink-in":
        (src := tmp_path / "link.mp4").symlink_to(clip)
    elif how == "relative":
        monkeypatch.chdir(tmp_path)
        src, out = Path("clip.mp4"), Path("..") / tmp_path.name / "clip.mp4"
    snapshot = _listing(tmp_path)
    code = main(_v2v(tiny_model_dir, src, "-o", out))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"refusing to write {out}: it is the input {src}" in err, err
    assert clip.read_bytes() == before and _listing(tmp_path) == snapshot      # nothing written, nothing left


def test_a_folder_of_inputs_into_itself_is_refused(tiny_model_dir, tmp_path, capsys):
    """``wanstream v2v clips/*.mp4 -o clips/`` would overwrite every input: refused, every input kept."""
    clips = tmp_path / "clips"
    inputs = [write_motion_clip(clips / f"{n}.mp4", 5, 32, 32, seed=i) for i, n in enumerate("abc")]
    snapshot = _listing(clips)
    assert main(_v2v(tiny_model_dir, *inputs, "-o", clips)) == 2
    err = capsys.readouterr().err
    assert f"refusing to write {clips / 'a.mp4'}: it is the input {clips / 'a.mp4'}" in err
    assert _listing(clips) == snapshot


def test_check_outputs_names_both_paths(tmp_path):
    a = write_motion_clip(tmp_path / "a.mp4", 3, 32, 32)
    os.link(a, tmp_path / "b.mp4")
    check_outputs([a], [tmp_path / "new.mp4"])                      # an output that does not exist yet: fine
    with pytest.raises(VideoError, match=r"b\.mp4: it is the input .*a\.mp4 \(a hard link\)"):
        check_outputs([a], [tmp_path / "b.mp4"])
    c = write_motion_clip(tmp_path / "c.mp4", 3, 32, 32)
    with pytest.raises(VideoError, match="are the same file"):
        check_outputs([], [c, c])


def test_a_failing_run_leaves_no_output(tiny_model, tmp_path):
    """An image sequence whose 5th image is broken fails mid-run, after frames were written: no output remains."""
    folder = write_images(tmp_path / "shots", frames=8)
    (folder / "frame_5.png").write_bytes(b"\x89PNG broken")
    snapshot = _listing(folder)
    out = tmp_path / "out" / "styled.mp4"
    with pytest.raises(VideoError, match="frame_5.png"):
        restyle_file(tiny_model, folder, out)
    assert not out.exists() and list(out.parent.iterdir()) == []
    assert _listing(folder) == snapshot


def test_an_existing_output_is_replaced_only_when_the_new_one_is_complete(tmp_path):
    target = tmp_path / "out.mp4"
    target.write_bytes(b"previous result")
    frames = make_motion_clip(4, 32, 32)
    with VideoWriter(target, 16, 32, 32) as writer:
        writer.write(frames[:2])
        assert target.read_bytes() == b"previous result"          # still the old file while writing
        assert writer.temp_path.parent == tmp_path and writer.temp_path.name.startswith(".out.mp4.")
        writer.write(frames[2:])
    assert len(read_video(target)[0]) == 4 and not writer.temp_path.exists()
    with pytest.raises(RuntimeError, match="boom"):
        with VideoWriter(target, 16, 32, 32) as writer:
            writer.write(frames)
            raise RuntimeError("boom")
    assert len(read_video(target)[0]) == 4 and sorted(tmp_path.iterdir()) == [target]
    with pytest.raises(VideoError, match="no frame was written, so no file was kept"):
        VideoWriter(tmp_path / "empty.mp4", 16, 32, 32).close()
    assert sorted(tmp_path.iterdir()) == [target]


def test_atomic_text_and_permissions(tmp_path):
    path = write_text_atomic(tmp_path / "r" / "report.json", "{}\n")
    assert path.read_text() == "{}\n"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask           # as a plain open() would create it
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(tmp_path / "r" / "half.html") as tmp:
            tmp.write_text("<html>")
            raise KeyboardInterrupt
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["report.json"]


def _wait_for(predicate, deadline_s: float, what: str):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if (value := predicate()):
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_leaves_no_file(sig, tiny_model_dir, tmp_path):
    """Ctrl-C (SIGINT) or SIGTERM once the output is being written: the process exits 130 and leaves neither the
    output nor its temporary file; the input is byte-identical."""
    clip = write_motion_clip(tmp_path / "in" / "long.mp4", 400, 64, 48)
    before = clip.read_bytes()
    out_dir = tmp_path / "out"
    # SIGINT at its default in the child: a test run started in the background (`cmd &`) ignores SIGINT, which the
    # child would inherit, and Python only turns SIGINT into KeyboardInterrupt where it is not ignored
    proc = subprocess.Popen([sys.executable, "-m", "wanstream.cli", *_v2v(tiny_model_dir, clip, "-o",
                                                                        out_dir / "styled.mp4")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        temp = _wait_for(lambda: out_dir.is_dir() and [p for p in out_dir.iterdir() if p.stat().st_size > 0],
                         240, "the temporary output")
        assert temp[0].name.startswith(".styled.mp4.")
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "wanstream v2v: interrupted" and "Traceback" not in err
    assert list(out_dir.iterdir()) == []
    assert clip.read_bytes() == before
