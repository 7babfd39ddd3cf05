"""Helpers of the deployment tests: ``python -m wanstream.server`` as a real process on a free 127.0.0.1
port, one bounded HTTP call, HAProxy started from the shipped config. Every wait is bounded; loopback only."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from server_helpers import H, W, wait_until

ROOT = Path(__file__).resolve().parents[2]


def http_json(url: str, headers: dict | None = None, timeout: float = 10.0) -> tuple[int, dict | str]:
    """``(status, JSON body or text)`` of one GET (any status; connection errors raise)."""
    req = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, payload, ctype = r.status, r.read(), r.headers.get("content-type", "")
    except urllib.error.HTTPError as e:
        status, payload, ctype = e.code, e.read(), e.headers.get("content-type", "")
    return status, json.loads(payload) if "json" in ctype else payload.decode(errors="replace")


class ServerProcess:
    """``python -m wanstream.server`` (the tiny model at 64x64) on a port the OS picks, logs in ``workdir``."""

    def __init__(self, model_dir: Path, workdir: Path, max_sessions: int = 2, drain_grace: float = 30.0,
                 prefix: list[str] | None = None, extra: list[str] | None = None, env: dict | None = None):
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "server.log"
        self.cmd = list(prefix or []) + [
            sys.executable, "-m", "wanstream.server", "--model", str(model_dir), "--device", "cpu",
            "--port", "0", "--resolution", f"{W}x{H}", "--max-sessions", str(max_sessions),
            "--drain-grace", str(drain_grace), "--record-dir", str(workdir / "recordings"), *(extra or [])]
        self.env = dict(env or {})
        self.popen: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        """Start the process (``__enter__`` then waits until it listens; start several first to overlap)."""
        if self.popen is None:
            env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **self.env}
            self._log = open(self.log_path, "wb")
            self.popen = subprocess.Popen(self.cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        return self

    def __enter__(self) -> ServerProcess:
        self.start()
        found = wait_until(lambda: self.popen.poll() is not None or
                           re.search(r"wanstream serve: open http://127\.0\.0\.1:(\d+)/", self.log()), 120,
                           "the server to listen")
        assert self.popen.poll() is None, f"server exited ({self.popen.returncode}):\n{self.log()}"
        self.port = int(found.group(1))
        self.base = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/api/ws"
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(30)

    def __exit__(self, *exc) -> None:
        self.kill()
        self._log.close()


class HAProxy:
    """HAProxy running the shipped ``deploy/haproxy.cfg`` with only its addresses changed: the frontend on
    ``port``, the ``server`` lines pointing at ``servers`` (name → port), the stats socket in ``workdir``."""

    def __init__(self, workdir: Path, port: int, servers: dict[str, int]):
        import shutil
        self.exe = shutil.which("haproxy")
        self.workdir = workdir
        self.sock = workdir / "haproxy.sock"
        cfg = (ROOT / "deploy" / "haproxy.cfg").read_text()
        cfg, n_bind = re.subn(r"(?m)^(\s*bind )\S+$", rf"\g<1>127.0.0.1:{port}", cfg)
        cfg, n_sock = re.subn(r"(?m)^(\s*stats socket )\S+", rf"\g<1>{self.sock}", cfg)
        lines = [f"    server {name} 127.0.0.1:{p} cookie {name}" for name, p in servers.items()]
        cfg, n_srv = re.subn(r"(?m)^\s*server .*\n?", "", cfg)
        assert (n_bind, n_sock, n_srv) == (1, 1, 2), "deploy/haproxy.cfg changed shape: update this helper"
        self.cfg_path = workdir / "haproxy.cfg"
        self.cfg_path.write_text(cfg.rstrip("\n") + "\n" + "\n".join(lines) + "\n")
        self.base = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}/api/ws"
        self.log_path = workdir / "haproxy.log"

    def __enter__(self) -> HAProxy:
        check = subprocess.run([self.exe, "-c", "-f", str(self.cfg_path)], capture_output=True, text=True)
        assert check.returncode == 0, f"haproxy rejects the config:\n{check.stdout}\n{check.stderr}"
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen([self.exe, "-db", "-f", str(self.cfg_path)], stdout=self._log,
                                      stderr=subprocess.STDOUT)
        wait_until(lambda: self.popen.poll() is not None or self.sock.exists(), 30, "haproxy to start")
        assert self.popen.poll() is None, f"haproxy exited:\n{self.log()}"
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict[str, str]:
        """HAProxy's view of each server of the backend (``UP`` / ``DOWN`` / ...), from its stats socket."""
        import socket
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.sock))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        rows = [line.split(",") for line in data.decode().splitlines() if line and not line.startswith("#")]
        return {r[1]: r[17] for r in rows if r[0] == "wanstream_servers" and r[1] not in ("BACKEND", "FRONTEND")}

    def wait_status(self, want: dict[str, str], timeout: float = 30) -> None:
        wait_until(lambda: all(self.status().get(k, "").startswith(v) for k, v in want.items()), timeout,
                   f"haproxy to see {want} (now {self.status()})", interval=0.1)

    def __exit__(self, *exc) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)
        self._log.close()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
