"""Autoencoder work of a tick across streams: encode the chunks that enter, decode the chunks that left clean.

Each stream has its own streaming caches (``EngineStream.enc_state`` / ``dec_state``). With ``batch`` on, streams at
the same phase (first chunk or steady) and shape share one call over their stacked caches (fewer launches; on GPUs
the device never waits on Python between streams); otherwise each stream has its own call. A failing shared call is
retried stream by stream, so only the stream at fault ends (``on_error``).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Callable

import numpy as np
import torch

from wanstream.engine.runner import Done
from wanstream.engine.stream import EngineStream
from wanstream.engine.transfer import download_frames

log = logging.getLogger("wanstream.engine")


class StreamCodec:
    """Encodes and decodes the chunks of many streams of one model (see the module docstring)."""

    def __init__(self, model, batch: bool, on_error: Callable[[EngineStream, str, BaseException], None]):
        self.model = model
        self.batch = batch
        self.on_error = on_error

    def encode(self, streams: list[EngineStream], pixels: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Latents ``[1, T, C, h, w]`` of each stream's new chunk (``pixels[id]``: ``[T, 3, H, W]``), by the
        stream's encoder (Wan VAE or TAEHV); shared calls group streams of one encoder."""
        groups: dict[tuple, list[EngineStream]] = {}
        for s in streams:
            key = (s.encoder, s.enc_state.first_encode, tuple(pixels[s.id].shape)) if self.batch else (s.id,)
            groups.setdefault(key, []).append(s)
        out = {}
        for members in groups.values():
            if len(members) > 1:
                try:
                    z = self._encode_many(members, torch.stack([pixels[s.id] for s in members]))
                    out.update({s.id: z[i: i + 1] for i, s in enumerate(members)})
                    continue
                except Exception:  # noqa: BLE001 - find the stream at fault below
                    log.exception("batched encode failed; encoding stream by stream")
            for s in members:
                try:
                    out[s.id] = self._encode_many([s], pixels[s.id][None])
                except Exception as exc:  # noqa: BLE001
                    self.on_error(s, "encode", exc)
        return out

    def _encode_many(self, members: list[EngineStream], frames: torch.Tensor) -> torch.Tensor:
        if members[0].encoder == "vae":
            vae = self.model.vae
            return vae.encode(members[0].enc_state, frames) if len(members) == 1 else \
                vae.encode_many([s.enc_state for s in members], frames)
        from wanstream.models.taehv import TAEHVStreamEncoder
        return TAEHVStreamEncoder.encode_many([s.enc_state for s in members], frames)

    def decode(self, finished: dict[int, list[tuple[EngineStream, Done]]]
               ) -> list[tuple[EngineStream, Done, np.ndarray]]:
        """uint8 frames ``[T, H, W, 3]`` of each stream's finished chunks, each stream's in order. The k-th chunks
        of all streams go in the k-th round (a stream's chunks decode in order through its caches)."""
        queues = {sid: deque(items) for sid, items in finished.items()}
        out: list[tuple[EngineStream, Done, np.ndarray]] = []
        while queues:
            batch = []
            for sid in list(queues):
                if not queues[sid] or queues[sid][0][0].closed:
                    queues.pop(sid)
                    continue
                batch.append(queues[sid].popleft())
            if not batch:
                break
            out += self._decode_round(batch)
        return out

    def _decode_round(self, batch: list[tuple[EngineStream, Done]]) -> list[tuple[EngineStream, Done, np.ndarray]]:
        images: dict[int, np.ndarray] = {}
        groups: dict[tuple, list[tuple[EngineStream, Done]]] = {}
        for s, d in batch:
            if d.frames is not None:                 # decoded where it finished (the pipeline's last stage)
                images[s.id] = d.frames.cpu().numpy()
                continue
            phase = s.dec_state.first_decode if s.decoder == "vae" else s.dec_state.frames_to_drop
            key = (s.decoder, phase, tuple(d.latent.shape)) if self.batch else (s.id,)
            groups.setdefault(key, []).append((s, d))
        for members in groups.values():
            if len(members) > 1:
                try:
                    pixels = self._decode_many(members)
                    images.update({s.id: download_frames(pixels[i]) for i, (s, _) in enumerate(members)})
                    continue
                except Exception:  # noqa: BLE001 - find the stream at fault below
                    log.exception("batched decode failed; decoding stream by stream")
            for s, d in members:
                try:
                    images[s.id] = download_frames(self._decode_many([(s, d)])[0])
                except Exception as exc:  # noqa: BLE001
                    self.on_error(s, "decode", exc)
        return [(s, d, images[s.id]) for s, d in batch if s.id in images]

    def _decode_many(self, members: list[tuple[EngineStream, Done]]) -> torch.Tensor:
        latents = torch.cat([d.latent for _, d in members])
        if members[0][0].decoder == "vae":
            return self.model.vae.decode_many([s.dec_state for s, _ in members], latents)
        from wanstream.models.taehv import TAEHVStreamDecoder
        return TAEHVStreamDecoder.decode_many([s.dec_state for s, _ in members], latents)
