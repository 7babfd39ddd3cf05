"""A user's files are never harmed: outputs are checked against inputs before anything is opened, and written to a
temporary file beside the target that is renamed into place only once complete.

* :func:`check_outputs` refuses an output that is an input (the same path, a hard link, a symbolic link: the same
  ``st_dev``/``st_ino``), naming both paths.
* :func:`temp_beside` creates the hidden temporary file (``.NAME.XXXXXXXX.part.SUFFIX`` in the target's folder,
  so the rename stays on one file system and the suffix still tells a muxer the format).
* :func:`atomic_output` / :func:`write_text_atomic`: the rename on success; on an exception (KeyboardInterrupt
  included) the temporary file is removed, so no partial or empty file is left behind.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

PathLike = str | os.PathLike

# Containers an output video may be written as (H.264 video in each); the reader takes far more.
OUTPUT_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv")


class VideoError(ValueError):
    """A video file is missing, unreadable, empty, or cannot be written."""


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()          # follows symbolic links: a link to an input is that input
    except OSError:
        return None


def same_file(a: PathLike, b: PathLike) -> bool:
    """True when both paths exist and are one file (same path, hard link or symbolic link)."""
    sa, sb = _stat(Path(a)), _stat(Path(b))
    return sa is not None and sb is not None and (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def check_outputs(inputs: Iterable[PathLike], outputs: Iterable[PathLike], flag: str = "-o/--output") -> None:
    """Refuse (:class:`VideoError`) any output that is one of the inputs, or the same output given twice, before
    anything is opened. The message names both paths and says how they are the same file."""
    ins = [(Path(p), _stat(Path(p))) for p in inputs]
    seen: dict[tuple[int, int], Path] = {}
    for out in map(Path, outputs):
        st = _stat(out)
        if st is None:
            continue
        key = (st.st_dev, st.st_ino)
        for src, sst in ins:
            if sst is not None and (sst.st_dev, sst.st_ino) == key:
                how = ("the same path" if os.path.abspath(src) == os.path.abspath(out) else
                       "via a symbolic link" if out.is_symlink() or src.is_symlink() else "a hard link")
                raise VideoError(f"refusing to write {out}: it is the input {src} ({how}); choose another {flag}")
        if key in seen:
            raise VideoError(f"{out} and {seen[key]} are the same file: give each output its own name")
        seen[key] = out


def check_output_name(path: PathLike, flag: str = "-o/--output") -> Path:
    """An output video path must name a file with a known extension, not an existing folder (one-line errors)."""
    p = Path(path)
    if not os.fspath(path):
        raise VideoError("output video path is empty ('')")
    if p.is_dir():
        raise VideoError(f"{p} is a folder: give {flag} a file name such as {p / 'out.mp4'}")
    if p.suffix.lower() not in OUTPUT_EXTENSIONS:
        raise VideoError(f"{p}: {flag} needs a video file extension ({', '.join(OUTPUT_EXTENSIONS)})"
                         + (f", got {p.suffix!r}" if p.suffix else ", got none"))
    return p


def temp_beside(target: PathLike) -> Path:
    """Create (exclusively, with the umask's permissions) a hidden temporary file in ``target``'s folder whose
    name keeps ``target``'s suffix; the folder is created when missing."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part{target.suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp


def commit(tmp: Path, target: Path) -> None:
    """Move a finished temporary file into place (atomic on one file system; a symbolic link at ``target`` is
    replaced, never the file it points to)."""
    os.replace(tmp, target)


def discard(tmp: Path | None) -> None:
    if tmp is not None:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass


@contextmanager
def atomic_output(target: PathLike) -> Iterator[Path]:
    """``with atomic_output(path) as tmp:`` write ``tmp``; it becomes ``path`` when the block ends normally and
    is removed when it raises (Ctrl-C included)."""
    target = Path(target)
    tmp = temp_beside(target)
    try:
        yield tmp
        commit(tmp, target)
    except BaseException:
        discard(tmp)
        raise


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write a text file through :func:`atomic_output` (never a half-written report)."""
    with atomic_output(path) as tmp:
        tmp.write_text(text)
    return Path(path)
