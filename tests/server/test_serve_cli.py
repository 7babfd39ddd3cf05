"""``wanstream serve`` start-up (issue 19, item 7): the port is bound before the model loads and before the URL is
printed; tokens from a file or the environment (a command-line token warns); ``--preset`` and ``--fit`` are the
defaults of new sessions."""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from wanstream.cli.serve import add_serve_parser, read_token, settings_from_args, token_query

ROOT = Path(__file__).resolve().parents[2]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="wanstream")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["serve", "--model", "m", *argv])


def serve(*argv: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wanstream.server", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


# ----------------------------------------------------------------------------------------------- the port
def test_a_busy_port_is_one_error_line_before_the_model_loads(tmp_path):
    """Was: the URL was printed (the URL of whatever holds the port), then uvicorn failed."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = serve("--model", str(tmp_path / "no-model-here"), "--port", str(port))
    assert out.returncode == 2, out
    assert "open http" not in out.stdout, out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}" in lines[0] and "--port" in lines[0], lines


def test_a_busy_osc_port_fails_before_the_model_loads(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        out = serve("--model", str(tmp_path / "no-model-here"), "--port", "0", "--osc-port",
                    str(busy.getsockname()[1]))
    assert out.returncode == 2 and "open http" not in out.stdout
    assert "cannot receive OSC" in out.stderr and "--osc-port" in out.stderr, out.stderr


def test_a_model_that_does_not_load_prints_no_url(tmp_path):
    out = serve("--model", str(tmp_path / "no-model-here"), "--port", "0")
    assert out.returncode == 2 and "open http" not in out.stdout, out
    assert "error" in out.stderr and "Traceback" not in out.stderr


def test_the_url_names_the_bound_port_and_hides_a_token_from_the_environment(tiny_model_dir, tmp_path):
    token = "env-token-" + "z" * 16
    proc = subprocess.Popen([sys.executable, "-m", "wanstream.server", "--model", str(tiny_model_dir), "--port", "0",
                             "--resolution", "64x64", "--device", "cpu", "--record-dir", str(tmp_path / "rec")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "WANSTREAM_TOKEN": token})
    try:
        deadline, lines = time.monotonic() + 240, []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "open http" in line:
                break
        url = next((ln for ln in lines if "open http" in ln), None)
        assert url is not None, "".join(lines)
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", url).group(1))
        assert port > 0 and token not in url and "WANSTREAM_TOKEN" in url, url
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/health", headers={"X-Token": token})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200 and json.loads(r.read())["status"] == "ok"
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    assert proc.returncode == 0


# ---------------------------------------------------------------------------------------------- the tokens
def test_tokens_from_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("WANSTREAM_TOKEN", raising=False)
    monkeypatch.delenv("WANSTREAM_ADMIN_TOKEN", raising=False)
    assert settings_from_args(parse()).token is None
    (tmp_path / "tok").write_text("  from-a-file  \nsecond line ignored\n")
    (tmp_path / "adm").write_text("admin-from-a-file\n")
    s = settings_from_args(parse("--token-file", str(tmp_path / "tok"), "--admin-token-file", str(tmp_path / "adm")))
    assert (s.token, s.admin_token) == ("from-a-file", "admin-from-a-file")
    monkeypatch.setenv("WANSTREAM_TOKEN", "from-the-env")
    monkeypatch.setenv("WANSTREAM_ADMIN_TOKEN", "admin-from-the-env")
    s = settings_from_args(parse())
    assert (s.token, s.admin_token) == ("from-the-env", "admin-from-the-env")
    assert settings_from_args(parse("--token", "flag")).token == "flag"                   # a flag wins
    assert settings_from_args(parse("--token-file", str(tmp_path / "tok"))).token == "from-a-file"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="first line is empty"):
        read_token(parse("--token-file", str(tmp_path / "empty")), "token")
    with pytest.raises(ValueError, match="cannot read it"):
        read_token(parse("--token-file", str(tmp_path / "missing")), "token")
    with pytest.raises(SystemExit):                                                      # one source per token
        parse("--token", "a", "--token-file", str(tmp_path / "tok"))


def test_the_printed_url_carries_only_a_command_line_token(tmp_path, monkeypatch):
    monkeypatch.setenv("WANSTREAM_TOKEN", "env-secret")
    args = parse()
    assert token_query(args, settings_from_args(args)) == "?token=<the token: $WANSTREAM_TOKEN>"
    (tmp_path / "tok").write_text("file-secret\n")
    args = parse("--token-file", str(tmp_path / "tok"))
    assert "file-secret" not in token_query(args, settings_from_args(args))
    args = parse("--token", "cli-token")
    assert token_query(args, settings_from_args(args)) == "?token=cli-token"


def test_a_command_line_token_warns_that_ps_shows_it(tmp_path):
    with socket.socket() as busy:               # the warning comes before the port check: no model needed
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        out = serve("--model", str(tmp_path / "m"), "--port", str(busy.getsockname()[1]), "--token", "visible")
    assert out.returncode == 2
    assert re.search(r"--token on the command line is visible .*\(ps\).*--token-file", out.stderr), out.stderr
    assert "visible" not in serve("--model", str(tmp_path / "m"), "--port", "0").stderr


# -------------------------------------------------------------------------------------------- the defaults
PRESET = {"format": "wanstream-preset", "version": 1,
          "prompts": [{"text": "ink wash", "weight": 2.0}, {"text": "neon city", "weight": 1.0}],
          "transition_chunks": 2, "steps": 3, "noise_scale": 0.6, "noise_controller": False, "seed": 9, "fit": "pad"}


def test_preset_and_fit_set_the_defaults_of_new_sessions(tiny_model, tmp_path):
    pytest.importorskip("websockets", reason="the WebSocket transport needs the websockets package")
    from server_helpers import LiveServer, WSClient

    (tmp_path / "p.json").write_text(json.dumps(PRESET))
    s = settings_from_args(parse("--preset", str(tmp_path / "p.json")))
    assert (s.steps, s.fit) == (3, "pad")                                  # the preset's steps and framing
    s2 = settings_from_args(parse("--preset", str(tmp_path / "p.json"), "--steps", "1", "--fit", "stretch"))
    assert (s2.steps, s2.fit) == (1, "stretch")                            # flags win
    assert settings_from_args(parse("--fit", "pad")).fit == "pad"
    assert settings_from_args(parse()).fit == "crop" and settings_from_args(parse()).steps == 2
    s.width = s.height = 64
    s.record_dir = tmp_path / "rec"
    with LiveServer(tiny_model, s) as srv:
        c = WSClient(srv.ws_url)
        params = c.ready()["params"]
        assert (params["steps"], params["fit"], params["seed"], params["noise_scale"], params["noise_controller"],
                params["transition_chunks"]) == (3, "pad", 9, 0.6, False, 2), params
        assert [(p["text"], p["weight"]) for p in params["prompts"]] == [("ink wash", 2.0), ("neon city", 1.0)]
        health = srv.http("GET", "/api/health")[1]
        assert health["defaults"]["fit"] == "pad" and health["defaults"]["prompts"] == params["prompts"]
        status, saved = srv.http("GET", f"/api/sessions/{c.ready()['session']}/preset",
                                 headers={"X-Stream-Secret": c.ready()["secret"]})
        assert status == 200 and saved == {**PRESET, "loras": []}          # Save gives back the same, framing too
        c.close()


def test_a_preset_with_loras_loads_them_unless_lora_is_given(tmp_path):
    from wanstream.cli.presets import lora_specs
    (tmp_path / "p.json").write_text(json.dumps({"loras": [{"path": "styles/ink.safetensors", "strength": 0.5}]}))
    args = parse("--preset", str(tmp_path / "p.json"))
    settings_from_args(args)
    assert [(s.path, s.strength) for s in lora_specs(args)] == [(tmp_path / "styles" / "ink.safetensors", 0.5)]
    args = parse("--preset", str(tmp_path / "p.json"), "--lora", "other.safetensors:0.3")
    settings_from_args(args)
    assert [(s.path.name, s.strength) for s in lora_specs(args)] == [("other.safetensors", 0.3)]
    (tmp_path / "bad.json").write_text(json.dumps({"steps": 9}))
    with pytest.raises(ValueError, match="steps"):
        settings_from_args(parse("--preset", str(tmp_path / "bad.json")))
