"""OSC control over UDP on loopback: a stream's parameters change through python-osc's client, bad messages are
dropped and counted in /metrics, another stream's id with the wrong secret changes nothing, a rate bound per
source."""

from __future__ import annotations

import re
import socket
from types import SimpleNamespace

import pytest

pytest.importorskip("websockets", reason="the WebSocket transport needs the websockets package")
pytest.importorskip("pythonosc", reason="OSC control needs python-osc")

from pythonosc.osc_message_builder import OscMessageBuilder  # noqa: E402
from pythonosc.udp_client import SimpleUDPClient  # noqa: E402
from server_helpers import LiveServer, WSClient, server_settings, stream_until, wait_until  # noqa: E402

from wanstream.api.params import SessionParams  # noqa: E402
from wanstream.server.osc import DROP_REASONS, OSCControl, to_update  # noqa: E402
from wanstream.server.settings import ServerSettings  # noqa: E402
from wanstream.server.stats import ServerTotals  # noqa: E402


@pytest.fixture(scope="module")
def srv(tiny_model, tmp_path_factory):
    with LiveServer(tiny_model, server_settings(tmp_path_factory.mktemp("osc"), osc_port=0)) as s:
        s.osc = SimpleUDPClient("127.0.0.1", s.app.state.osc.port)
        thread = s.app.state.osc._thread
        assert thread.is_alive()
        yield s
    assert s.app.state.osc.port is None and not thread.is_alive()      # stopped with the app


def osc_counts(srv) -> dict[str, float]:
    text = srv.http("GET", "/metrics")[1]
    counts = {r: float(v) for r, v in re.findall(r'wanstream_osc_dropped_total\{reason="(\w+)"\} (\S+)', text)}
    counts["applied"] = float(re.search(r"^wanstream_osc_applied_total (\S+)$", text, re.M).group(1))
    return counts


def wait_counts(srv, before: dict, **more: int) -> dict:
    """Wait (bounded) until each counter grew by ``more[name]``; then check no other counter moved."""
    def grown():
        now = osc_counts(srv)
        return now if all(now[k] >= before[k] + n for k, n in more.items()) else None
    now = wait_until(grown, 30, f"OSC counters {more}")
    for key in now:
        assert now[key] == before[key] + more.get(key, 0), (key, before, now)
    return now


def test_prompt_and_steps_over_osc_reach_the_stream(srv, clip):
    c = WSClient(srv.ws_url)
    ready = c.ready()
    sid, secret = ready["session"], ready["secret"]
    session = srv.manager.get(sid)
    assert srv.http("GET", "/api/health")[1]["osc_port"] == srv.app.state.osc.port   # what the page shows
    stream_until(c, clip, 4)                            # the stream exists and runs
    before = osc_counts(srv)
    srv.osc.send_message(f"/wanstream/{sid}/prompt", [secret, "an ink wash painting"])   # secret as argument
    srv.osc.send_message(f"/wanstream/{sid}/{secret}/steps", 3.0)                         # secret in the address
    wait_until(lambda: session.params.prompt == "an ink wash painting" and session.params.steps == 3, 30,
               "OSC prompt and steps in the session params")
    wait_counts(srv, before, applied=2)
    start = c.frame_count
    stream_until(c, clip, start + 4)
    assert session.stream.settings.steps == 3           # the stream runs with the new step count
    notices = [m for m in c.of_type("params") if m.get("source") == "osc"]
    assert notices and notices[-1]["params"]["steps"] == 3   # the page is told

    srv.osc.send_message(f"/wanstream/{sid}/prompts", [secret, "a", 1.0, "b", 3.0])
    wait_until(lambda: session.params.prompts is not None, 30, "OSC blend")
    srv.osc.send_message(f"/wanstream/{sid}/{secret}/blend", [0.25, 0.75])
    srv.osc.send_message(f"/wanstream/{sid}/{secret}/noise_controller", 0)
    srv.osc.send_message(f"/wanstream/{sid}/{secret}/seed", 42)
    srv.osc.send_message(f"/wanstream/{sid}/{secret}/transition", 2)
    srv.osc.send_message(f"/wanstream/{sid}/{secret}/noise_scale", 0.5)
    wait_until(lambda: session.params.seed == 42 and session.params.transition_chunks == 2
               and session.params.noise_scale == 0.5, 30, "OSC knobs")
    assert [(p.text, p.weight) for p in session.params.prompts] == [("a", 0.25), ("b", 0.75)]
    assert session.params.noise_controller is False
    c.close()
    wait_until(lambda: srv.manager.count == 0, 30, "session freed")


def test_bad_messages_are_dropped_and_counted(srv):
    a, b = WSClient(srv.ws_url), WSClient(srv.ws_url)
    sa, secret_a = a.ready()["session"], a.ready()["secret"]
    sb = b.ready()["session"]
    session_b = srv.manager.get(sb)
    params_b = session_b.params.model_dump()
    before = osc_counts(srv)
    srv.osc.send_message(f"/wanstream/{sb}/prompt", [secret_a, "hijacked"])       # b's id, a's secret
    srv.osc.send_message(f"/wanstream/{sb}/steps", [1])                           # no secret at all
    srv.osc.send_message(f"/wanstream/{sb}/{secret_a}/steps", 1)
    wait_counts(srv, before, forbidden=3)
    assert session_b.params.model_dump() == params_b                              # nothing changed on b

    before = osc_counts(srv)
    for args in (["3"], [9], [2.5], [True], []):                                   # types, range, arity
        srv.osc.send_message(f"/wanstream/{sa}/{secret_a}/steps", args)
    srv.osc.send_message(f"/wanstream/{sa}/{secret_a}/noise_scale", 0.0)           # range (> 0)
    srv.osc.send_message(f"/wanstream/{sa}/{secret_a}/lora/style", 0.5)            # no such LoRA
    srv.osc.send_message(f"/wanstream/{sa}/{secret_a}/blend", [0.5])               # no blend to weigh
    srv.osc.send_message(f"/wanstream/{sa}/{secret_a}/volume", 1)                  # unknown parameter
    srv.osc.send_message("/other/thing", 1)                                        # not ours
    srv.osc.send_message(f"/wanstream/{'0' * 32}/steps", ["x", 1])                 # unknown stream
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as raw:                  # not OSC
        raw.sendto(b"\xffnot osc at all", ("127.0.0.1", srv.app.state.osc.port))
    wait_counts(srv, before, invalid=8, bad_address=2, unknown_stream=1, malformed=1)
    assert srv.manager.get(sa).params.steps == 2                                   # a kept its value
    text = srv.http("GET", "/metrics")[1]
    for reason in DROP_REASONS:
        assert f'wanstream_osc_dropped_total{{reason="{reason}"}}' in text
    assert 'wanstream_server_limit{name="osc_rate"}' in text
    a.close()
    b.close()
    wait_until(lambda: srv.manager.count == 0, 30, "sessions freed")


def test_rate_bound_per_source():
    now = [0.0]
    settings = ServerSettings(osc_rate=1.0, osc_burst=3, osc_max_sources=2)
    manager = SimpleNamespace(settings=settings, clock=lambda: now[0], totals=ServerTotals(), get=lambda sid: None)
    osc = OSCControl(manager)
    msg = OscMessageBuilder(f"/wanstream/{'0' * 32}/steps")
    msg.add_arg("secret")
    msg.add_arg(2)
    data = msg.build().dgram
    for _ in range(5):
        osc.handle_packet(data, "10.0.0.1")
    assert osc.counters.dropped["unknown_stream"] == 3 and osc.counters.dropped["rate_limited"] == 2
    osc.handle_packet(data, "10.0.0.2")                 # another source has its own bucket
    assert osc.counters.dropped["unknown_stream"] == 4
    now[0] = 1.0                                        # one token back after 1 s at 1 / s
    osc.handle_packet(data, "10.0.0.1")
    osc.handle_packet(data, "10.0.0.1")
    assert osc.counters.dropped["unknown_stream"] == 5 and osc.counters.dropped["rate_limited"] == 3
    osc.handle_packet(data, "10.0.0.3")                 # a third source: the least recent one is forgotten
    assert len(osc._buckets) == 2 and "10.0.0.2" not in osc._buckets


def test_to_update_maps_addresses_to_the_live_schema():
    current = SessionParams(prompt="x")
    assert to_update(["steps"], [4.0], current).steps == 4
    assert to_update(["noise_controller"], [1], current).noise_controller is True
    assert to_update(["lora", "ink"], [0.5], current).lora == {"ink": 0.5}
    assert to_update(["reset"], [], current).reset is True
    assert not to_update(["reset"], [0], current).model_fields_set                # a button's release
    assert to_update(["prompts"], ["a", 1, "b", 2.0], current).prompts[1].weight == 2.0


@pytest.fixture(scope="module")
def lora_srv(tiny_model, tiny_model_dir, tmp_path_factory):
    """A server whose model has a LoRA named ``ink`` (default strength 0.25), with OSC."""
    from lora_files import random_lora, write_lora

    from wanstream.models.loader import load_model
    lora = random_lora(tiny_model.dit, ["blocks.0.attn1.to_q", "blocks.0.attn2.to_k"], seed=5, alpha=8.0, std=0.3)
    path = write_lora(lora, "kohya", tmp_path_factory.mktemp("lora"), "ink")
    model = load_model(tiny_model_dir, device="cpu", lora=[f"{path}:0.25"])
    with LiveServer(model, server_settings(tmp_path_factory.mktemp("osc_lora"), osc_port=0)) as s:
        s.osc = SimpleUDPClient("127.0.0.1", s.app.state.osc.port)
        yield s


def test_lora_strength_over_osc_and_in_the_saved_preset(lora_srv, clip):
    srv = lora_srv
    c = WSClient(srv.ws_url)
    sid, secret = c.ready()["session"], c.ready()["secret"]
    session = srv.manager.get(sid)
    own = {"X-Stream-Secret": secret}
    status, saved = srv.http("GET", f"/api/sessions/{sid}/preset", headers=own)
    assert status == 200 and saved["loras"] == [{"path": "ink.safetensors", "strength": 0.25}]   # load-time default
    stream_until(c, clip, 4)
    before = osc_counts(srv)
    srv.osc.send_message(f"/wanstream/{sid}/{secret}/lora/ink", 0.5)
    srv.osc.send_message(f"/wanstream/{sid}/{secret}/lora/oil", 0.5)              # not loaded: dropped
    wait_until(lambda: session.params.lora == {"ink": 0.5}, 30, "OSC LoRA strength")
    wait_counts(srv, before, applied=1, invalid=1)
    start = c.frame_count
    stream_until(c, clip, start + 4)
    assert session.stream.settings.lora == (0.5,)                                 # the stream runs at 0.5
    status, saved = srv.http("GET", f"/api/sessions/{sid}/preset", headers=own)
    assert saved["loras"] == [{"path": "ink.safetensors", "strength": 0.5}]
    saved["loras"][0] = {"path": "styles/ink.safetensors", "strength": 0.0}        # matched by name, not path
    status, body = srv.http("POST", f"/api/sessions/{sid}/preset", saved, headers=own)
    assert status == 200 and body["params"]["lora"] == {"ink": 0.0}
    c.close()
    wait_until(lambda: srv.manager.count == 0, 30, "session freed")


def test_serve_flag():
    import argparse

    from wanstream.cli.serve import configure_serve_parser, settings_from_args
    parser = configure_serve_parser(argparse.ArgumentParser())
    assert settings_from_args(parser.parse_args(["--model", "m"])).osc_port is None          # off by default
    assert settings_from_args(parser.parse_args(["--model", "m", "--osc-port", "9000"])).osc_port == 9000
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--osc-port", "70000"])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")   # uvicorn's sys.exit(3)
def test_an_osc_port_in_use_fails_the_start(tiny_model, tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        server = LiveServer(tiny_model, server_settings(tmp_path, osc_port=busy.getsockname()[1]))
        with pytest.raises(AssertionError, match="failed to start"):
            server.__enter__()
        server.thread.join(30)
        assert not server.thread.is_alive()
