"""Video I/O in one import: reading (:mod:`~wanstream.io.reading`), writing (:mod:`~wanstream.io.writing`, with the
audio of :mod:`~wanstream.io.audio`), sizes and pixels (:mod:`~wanstream.io.framing`), safe output files
(:mod:`~wanstream.io.files`) and the synthetic clip (:mod:`~wanstream.io.synthetic`).

Frames are RGB ``uint8`` arrays, ``[H, W, 3]`` for one frame and ``[T, H, W, 3]`` for several. Model tensors are
``[T, 3, H, W]`` floats in ``[-1, 1]``.
"""

from __future__ import annotations

from wanstream.core.geometry import FIT_MODES, check_fit, fit_resolution, parse_resolution
from wanstream.io.audio import AudioTrack
from wanstream.io.files import (
    OUTPUT_EXTENSIONS,
    PathLike,
    VideoError,
    atomic_output,
    check_output_name,
    check_outputs,
    same_file,
    write_text_atomic,
)
from wanstream.io.framing import fit_frames, frames_to_tensor, resize_frames, tensor_to_frames
from wanstream.io.reading import (
    DEFAULT_IMAGE_FPS,
    DEFAULT_STILL_FRAMES,
    IMAGE_EXTENSIONS,
    Frame,
    VideoInfo,
    VideoSource,
    iter_frames,
    open_video,
    probe_video,
    read_video,
)
from wanstream.io.synthetic import make_motion_clip, write_motion_clip
from wanstream.io.writing import ENCODER_THREADS, VideoWriter, x264_asm_flags

__all__ = ["FIT_MODES", "check_fit", "fit_resolution", "parse_resolution", "AudioTrack", "OUTPUT_EXTENSIONS",
           "PathLike", "VideoError", "atomic_output", "check_output_name", "check_outputs", "same_file",
           "write_text_atomic", "fit_frames", "frames_to_tensor", "resize_frames", "tensor_to_frames",
           "DEFAULT_IMAGE_FPS", "DEFAULT_STILL_FRAMES", "IMAGE_EXTENSIONS", "Frame", "VideoInfo", "VideoSource",
           "iter_frames", "open_video", "probe_video", "read_video", "make_motion_clip", "write_motion_clip",
           "ENCODER_THREADS", "VideoWriter", "x264_asm_flags"]
