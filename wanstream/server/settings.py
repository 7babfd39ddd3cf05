"""Server settings: one dataclass filled from the command line (or by tests), read by every server module."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 7860
    max_sessions: int = 4
    token: str | None = None
    width: int = 512
    height: int = 512
    steps: int = 2                          # default steps of a new session (1..4; live-changeable)
    noise_scale: float = 0.8
    decoder: str = "vae"                    # "vae" | "taehv" (the model must be loaded with taehv=True)
    prompt: str = "a watercolor painting, soft brush strokes, vivid colours"
    record_dir: Path = Path("recordings")
    idle_timeout_s: float = 60.0            # a session without input frames for this long is closed
    target_latency_s: float = 1.0           # deadline of the SLO metrics
    max_frame_bytes: int = 2 * 1024 * 1024  # one uploaded frame (JPEG or raw); larger ones are refused
    max_frame_pixels: int = 4096 * 4096     # decoded size cap of one uploaded frame (decompression bombs)
    max_control_bytes: int = 64 * 1024      # one JSON control message
    control_rate: float = 30.0              # control messages per second per session (token bucket) ...
    control_burst: int = 60                 # ... and its burst
    output_queue_frames: int = 8            # paced output frames waiting to be sent; older ones are dropped
    queue_chunks: int = 1                   # input queue = this many chunks (newest frames kept)
    stats_interval_s: float = 0.5           # stats push period to the client
    jpeg_quality: int = 85                  # downlink JPEG quality (WebSocket)
    ice_servers: list[str] = field(default_factory=list)   # WebRTC STUN/TURN urls; none by default
    webrtc_bitrate_kbps: int = 1500         # bitrate floor both ways (start = floor, max = 2x floor)
    webrtc_loopback_candidates: bool = False  # use only the offer's 127.0.0.1 candidates (hermetic tests)
    vram_reserve_bytes: int = 1 << 30       # GPU admission: memory kept free beyond the per-session estimate
    codec_threads: int = 2                  # threads for JPEG / video frame conversion

    def __post_init__(self) -> None:
        if self.max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {self.max_sessions}")
        if self.width % 16 or self.height % 16 or self.width <= 0 or self.height <= 0:
            raise ValueError(f"resolution must be positive multiples of 16, got {self.width}x{self.height}")
        if not 1 <= self.steps <= 4:
            raise ValueError(f"steps must be in 1..4, got {self.steps}")
        if self.decoder not in ("vae", "taehv"):
            raise ValueError(f"decoder must be 'vae' or 'taehv', got {self.decoder!r}")
        if self.token is not None and not self.token:
            raise ValueError("token must not be empty")
        self.record_dir = Path(self.record_dir)

    @property
    def loopback_only(self) -> bool:
        """Bound to loopback: WebRTC then offers and accepts 127.0.0.1 candidates only."""
        return self.host in LOOPBACK_HOSTS
