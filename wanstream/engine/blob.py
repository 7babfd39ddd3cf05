"""A parked stream as bytes: the versioned, checksummed, size-capped blob a stream moves between servers in.

Layout (little endian)::

    0   b"WSPK"            magic
    4   uint16             format version (:data:`VERSION`)
    6   uint16             flags (0)
    8   uint64             payload length
    16  32 bytes           SHA-256 of the payload
    48  payload            safetensors: every tensor of the parked state (no pickle anywhere), and in its metadata
                           ``wanstream``: JSON of the host values, the exporter's clock and the owner's values

:func:`dumps` writes one; :func:`loads` never trusts one: size first (before reading more than the cap), magic,
version, length (truncated or padded), checksum, then the safetensors header and the JSON — any failure is a
:class:`BlobError` whose ``kind`` says which (``too_large``, ``malformed``, ``version``), and nothing is built.
Whether the state fits an engine (model, resolution, device, shapes) is :func:`wanstream.engine.parking.check`'s.
"""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import torch

from wanstream.engine.parking import ParkedStream, rebase

MAGIC = b"WSPK"
VERSION = 1
HEADER = struct.Struct("<4sHHQ32s")


class BlobError(ValueError):
    """A blob that cannot be read; ``kind``: ``too_large`` | ``malformed`` | ``version``."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def dumps(parked: ParkedStream, now: float, extra: dict | None = None, images: list | None = None) -> bytes:
    """The blob of a parked stream; ``now``: the exporting engine's clock (the importer moves every time by its
    own clock minus this); ``extra``: JSON-able values of the owner; ``images``: its queued input frames (uint8
    ``[H, W, 3]``, they travel as tensors ``frame.<i>``)."""
    from safetensors.torch import save
    tensors = {f"state.{k}": v for k, v in parked.tensors.items()}
    for i, img in enumerate(images or []):
        tensors[f"frame.{i}"] = torch.from_numpy(np.ascontiguousarray(img, dtype=np.uint8))
    meta = {"host": parked.host, "exported_at": float(now), "extra": extra or {}, "frames": len(images or [])}
    payload = save(tensors, metadata={"wanstream": json.dumps(meta)})
    return HEADER.pack(MAGIC, VERSION, 0, len(payload), hashlib.sha256(payload).digest()) + payload


def loads(data: bytes, max_bytes: int, now: float) -> tuple[ParkedStream, dict, list[np.ndarray]]:
    """``(parked state with its times on the local clock (``now``), owner's values, queued input frames)`` of a
    blob, or :class:`BlobError`."""
    if len(data) > max_bytes:
        raise BlobError("too_large", f"the blob has {len(data)} bytes, more than the {max_bytes} allowed")
    if len(data) < HEADER.size:
        raise BlobError("malformed", "the blob is shorter than its header (truncated)")
    magic, version, _flags, length, digest = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise BlobError("malformed", "not a wanstream stream blob (bad magic)")
    if version != VERSION:
        raise BlobError("version", f"blob format version {version}; this server reads version {VERSION}")
    payload = memoryview(data)[HEADER.size:]
    if len(payload) != length:
        raise BlobError("malformed", f"the blob's payload has {len(payload)} bytes, its header says {length} "
                                     f"({'truncated' if len(payload) < length else 'extra bytes'})")
    if hashlib.sha256(payload).digest() != digest:
        raise BlobError("malformed", "the blob's checksum does not match (corrupt)")
    try:
        meta = _metadata(payload)
        from safetensors.torch import load
        tensors = load(bytes(payload))
    except BlobError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the parser says, the blob is malformed
        raise BlobError("malformed", f"the blob's payload cannot be read ({type(exc).__name__})") from None
    try:
        host, extra, n = meta["host"], meta["extra"], meta["frames"]
        exported_at = float(meta["exported_at"])
        if not isinstance(host, dict) or not isinstance(extra, dict) or not isinstance(n, int) or not 0 <= n <= 64:
            raise TypeError("bad types")
        images = [tensors.pop(f"frame.{i}").numpy() for i in range(n)]
        if any(img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 for img in images):
            raise TypeError("bad frames")
        state = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
        if len(state) != len(tensors):
            raise TypeError("unknown tensors")
        rebase(host, now - exported_at)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BlobError("malformed", f"the blob's description is malformed ({exc})") from None
    return ParkedStream(host, state, None, now), {**extra, "_shift": now - exported_at}, images


def _metadata(payload: memoryview) -> dict:
    """The JSON in the safetensors header's metadata (read before the tensors)."""
    if len(payload) < 8:
        raise BlobError("malformed", "the blob's payload is too short")
    (n,) = struct.unpack_from("<Q", payload)
    if n > min(len(payload) - 8, 100 * 2 ** 20):
        raise BlobError("malformed", "the blob's payload header is too long")
    try:
        header = json.loads(bytes(payload[8: 8 + n]))
        meta = json.loads(header["__metadata__"]["wanstream"])
    except (ValueError, KeyError, TypeError, RecursionError):
        raise BlobError("malformed", "the blob's description is not readable JSON") from None
    if not isinstance(meta, dict):
        raise BlobError("malformed", "the blob's description is not a JSON object")
    return meta
