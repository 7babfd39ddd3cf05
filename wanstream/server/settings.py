"""Server settings: one dataclass filled from the command line (or by tests), read by every server module."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from wanstream.core.geometry import check_resolution

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
    fit: str = "crop"                       # default framing of a new session: crop | pad | stretch
    session_defaults: dict = field(default_factory=dict)   # more defaults of a new session: a ParamsUpdate's
    #                                         fields (serve --preset: prompt or prompts, seed, noise ...)
    decoder: str = "vae"                    # "vae" | "taehv" (the model must be loaded with taehv=True)
    encoder: str = "vae"                    # "vae" | "taehv" (likewise)
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
    # --- authority (see auth.py): the access token is `token`; the admin sees and steers every stream
    admin_token: str | None = None          # admin: all sessions / recordings; None: nobody is admin
    allowed_hosts: list[str] = field(default_factory=list)    # Host names accepted besides IP literals and
    #                                         localhost ("*": any; needed behind a proxy with a domain name)
    allowed_origins: list[str] = field(default_factory=list)  # browser Origins accepted besides the page's own
    api_docs: bool = False                  # serve /docs, /redoc, /openapi.json (behind the token)
    # --- bounds of what a client can cause (each has a counter in /metrics)
    max_body_bytes: int = 256 * 1024        # one HTTP request body (read, bounded, before any validation)
    max_reference_bytes: int = 4 * 2**20    # one uploaded VACE reference image (its own body bound; bigger: 413)
    default_reference: object = None        # VACE conditioning a new session starts with (serve --reference,
    default_strength: float = 1.0           # --reference-strength, --control): uint8 [H, W, 3] images or None,
    default_control: str = "none"           # the hints' scale, the control kind
    body_timeout_s: float = 10.0            # to send that body
    header_timeout_s: float = 10.0          # to send a request's line and headers once the connection is idle
    keep_alive_timeout_s: int = 5           # an idle keep-alive connection is closed after this long
    max_connections: int = 256              # open TCP connections (HTTP and WebSocket); more are closed at once
    offer_timeout_s: float = 15.0           # a WebRTC session whose peer does not connect within this is freed
    whep_max_viewers: int = 4               # WHEP viewers of one WHIP stream (more get 503)
    max_recordings_per_session: int = 16    # recordings one stream may start
    max_recording_files: int = 1000         # mp4 files in record_dir (new recordings refused beyond)
    max_recording_bytes: int = 2 * 2**30    # all recordings in record_dir together (new ones refused, running
    #                                         ones finished when reached)
    prompt_cache_bytes: int = 64 * 2**20    # text encoder prompt cache (embeddings kept to their true length)
    heap_trim_s: float = 10.0               # while streams run, freed host heap goes back to the OS this often
    stuck_after_s: float = 30.0             # /api/health says "stuck" when one model tick runs longer than this
    # --- OSC control (see osc.py): off unless a port is given (0: any free port); UDP on `host`
    osc_port: int | None = None
    osc_rate: float = 200.0                 # OSC messages per second per source address (token bucket) ...
    osc_burst: int = 400                    # ... and its burst
    osc_max_sources: int = 1024             # source addresses with a bucket (the least recent is forgotten)
    drain_grace_s: float = 30.0             # SIGTERM: running streams may go on this long (see lifecycle.py)
    # --- playing live (see live.py, midi.py, outputs.py): tempo, MIDI, Link, audio, pushes
    tempo_bpm: float = 120.0                # the free-running tempo (until MIDI clock or Link drives it)
    beats_per_bar: int = 4
    beat_latency_s: float | None = None     # latency a quantised change is timed with (None: each stream's
    #                                         measured median)
    midi_ports: list[str] | None = None     # MIDI inputs to open (None: none; ["*"]: every port)
    midi_rate: float = 1000.0               # MIDI messages per second per port (token bucket) ...
    midi_burst: int = 2000                  # ... and its burst; more are dropped (counted)
    link: bool = False                      # follow an Ableton Link session (aalink)
    learn_timeout_s: float = 30.0           # a MIDI learn request waits this long for a CC
    audio_max_rate: float = 2.0             # a stream's audio is analysed at most this many times real time
    push_allow: list[str] = field(default_factory=list)   # URL prefixes pushes may go to (none: pushes off)
    max_pushes_per_session: int = 2         # RTMP / SRT pushes one stream may run at once
    max_pushes: int = 8                     # ... all streams together
    push_queue_frames: int = 32             # frames waiting for a push (the oldest dropped beyond)
    push_stall_s: float = 10.0              # a push without progress this long is ended
    # --- serving beyond one server (docs/deploy.md: slack, parking, migration, drift watchdog)
    policy: str = "continuous"              # tick policy: continuous (SLO-aware) | slack (playback slack)
    ladder_taehv: bool = False              # load TAEHV so the slack policy's last rung decodes with it
    park_after_s: float = 10.0              # a stream without input this long is parked in host memory (0: never)
    park_max_bytes: int = 4 * 2**30         # host memory of all parked streams; the oldest expire beyond it
    parked_timeout_s: float = 600.0         # a parked stream without input this long is closed
    migrate_to: str | None = None           # base URL streams migrate to: a load balancer (or one peer)
    max_blob_bytes: int = 8 * 2**30         # a migration blob received (bigger: 413)
    blob_timeout_s: float = 300.0           # ... and the time to receive it
    resume_timeout_s: float = 30.0          # a migrated stream whose client has not come back by then is freed
    drift_watchdog: bool = False            # the online drift watchdog (engine/drift.py) on every stream

    def __post_init__(self) -> None:
        if self.max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {self.max_sessions}")
        check_resolution(self.width, self.height)
        if not 1 <= self.steps <= 4:
            raise ValueError(f"steps must be in 1..4, got {self.steps}")
        if self.fit not in ("crop", "pad", "stretch"):
            raise ValueError(f"fit must be crop, pad or stretch, got {self.fit!r}")
        for name in ("decoder", "encoder"):
            if getattr(self, name) not in ("vae", "taehv"):
                raise ValueError(f"{name} must be 'vae' or 'taehv', got {getattr(self, name)!r}")
        for name in ("token", "admin_token"):
            value = getattr(self, name)
            if value is not None and not value:
                raise ValueError(f"{name} must not be empty")
        if self.admin_token is not None and self.admin_token == self.token:
            raise ValueError("admin_token must differ from token (every user of the page holds the token)")
        for name in ("max_body_bytes", "max_connections", "max_recording_files", "max_recording_bytes",
                     "prompt_cache_bytes", "whep_max_viewers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_recordings_per_session < 0:
            raise ValueError(f"max_recordings_per_session must be >= 0, got {self.max_recordings_per_session}")
        if self.osc_port is not None and not 0 <= self.osc_port <= 65535:
            raise ValueError(f"osc_port must be in 0..65535, got {self.osc_port}")
        if not self.osc_rate > 0 or self.osc_burst < 1 or self.osc_max_sources < 1:
            raise ValueError("osc_rate must be > 0, osc_burst and osc_max_sources >= 1")
        from wanstream.core.tempo import check_bpm
        check_bpm(self.tempo_bpm)
        if not 1 <= self.beats_per_bar <= 32:
            raise ValueError(f"beats_per_bar must be in 1..32, got {self.beats_per_bar}")
        if self.beat_latency_s is not None and not 0 <= self.beat_latency_s <= 10:
            raise ValueError(f"beat_latency_s must be in 0..10, got {self.beat_latency_s}")
        if not self.midi_rate > 0 or self.midi_burst < 1 or not self.learn_timeout_s > 0 \
                or not self.audio_max_rate >= 1:
            raise ValueError("midi_rate and learn_timeout_s must be > 0, midi_burst >= 1, audio_max_rate >= 1")
        if self.max_pushes_per_session < 0 or self.max_pushes < 0 or self.push_queue_frames < 1 \
                or not self.push_stall_s > 0:
            raise ValueError("max_pushes(_per_session) must be >= 0, push_queue_frames >= 1, push_stall_s > 0")
        if self.policy not in ("continuous", "slack"):
            raise ValueError(f"policy must be continuous or slack, got {self.policy!r}")
        if not self.park_after_s >= 0 or self.park_max_bytes < 0 or not self.parked_timeout_s > 0:
            raise ValueError("park_after_s and park_max_bytes must be >= 0, parked_timeout_s > 0")
        if self.max_reference_bytes < 1:
            raise ValueError("max_reference_bytes must be >= 1")
        if self.max_blob_bytes < 1 or not self.blob_timeout_s > 0 or not self.resume_timeout_s > 0:
            raise ValueError("max_blob_bytes must be >= 1, blob_timeout_s and resume_timeout_s > 0")
        if self.migrate_to is not None and not self.migrate_to.startswith(("http://", "https://")):
            raise ValueError(f"migrate_to must be an http(s) URL, got {self.migrate_to!r}")
        if not self.drain_grace_s >= 0:
            raise ValueError(f"drain_grace_s must be >= 0, got {self.drain_grace_s}")
        for name in ("body_timeout_s", "header_timeout_s", "keep_alive_timeout_s", "offer_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        self.allowed_hosts = [h.lower() for h in self.allowed_hosts]
        self.record_dir = Path(self.record_dir)

    @property
    def loopback_only(self) -> bool:
        """Bound to loopback: WebRTC then offers and accepts 127.0.0.1 candidates only."""
        return self.host in LOOPBACK_HOSTS
