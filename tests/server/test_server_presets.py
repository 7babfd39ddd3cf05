"""Presets over HTTP (the page's Save / Load preset): validated with the preset schema, applied to a stream, a
stream's state saved in the file format of wanstream.api.presets; bad presets get a 4xx naming the field."""

from __future__ import annotations

import pytest

pytest.importorskip("websockets", reason="the WebSocket transport needs the websockets package")

from server_helpers import LiveServer, WSClient, server_settings, wait_until  # noqa: E402

from wanstream.api.presets import Preset
from wanstream.server.app import STATIC as STATIC_DIR  # noqa: E402


@pytest.fixture(scope="module")
def srv(tiny_model, tmp_path_factory):
    with LiveServer(tiny_model, server_settings(tmp_path_factory.mktemp("presets"))) as s:
        yield s


PRESET = {"format": "wanstream-preset", "version": 1,
          "prompts": [{"text": "ink wash", "weight": 2.0}, {"text": "neon city", "weight": 1.0}],
          "transition_chunks": 4, "steps": 3, "noise_scale": 0.7, "noise_controller": False, "seed": 7, "fit": "pad"}


def test_validate_answers_the_preset_and_its_live_update(srv):
    status, body = srv.http("POST", "/api/presets/validate", PRESET)
    assert status == 200, body
    assert body["preset"] == {**PRESET, "loras": []}
    assert body["params"]["steps"] == 3 and body["params"]["prompts"][0] == {"text": "ink wash", "weight": 2.0}
    status, body = srv.http("POST", "/api/presets/validate", {"prompt": "a fox", "seed": 3})   # fields optional
    assert status == 200 and body["preset"]["format"] == "wanstream-preset" and body["params"] == {
        "prompt": "a fox", "seed": 3}


@pytest.mark.parametrize("bad, field", [
    ({**PRESET, "steps": 9}, "steps"),
    ({**PRESET, "noise_scale": "0.5"}, "noise_scale"),
    ({**PRESET, "format": "something-else"}, "format"),
    ({**PRESET, "version": 2}, "version"),
    ({**PRESET, "colour": 1}, "colour"),
    ({**PRESET, "prompts": [{"text": "x", "weight": -1}]}, "prompts.0.weight"),
    ({**PRESET, "loras": [{"path": "styles/ink.safetensors", "strength": 0.5}]}, "loras.0.path"),
    ({**PRESET, "lora": {"ink": 1.0}}, "lora"),
])
def test_bad_presets_are_refused_naming_the_field(srv, bad, field):
    status, body = srv.http("POST", "/api/presets/validate", bad)
    assert status == 422, body
    assert f"{field}:" in body["message"], body


def test_apply_and_save_a_sessions_preset(srv):
    c = WSClient(srv.ws_url)
    sid, secret = c.ready()["session"], c.ready()["secret"]
    own = {"X-Stream-Secret": secret}
    status, body = srv.http("POST", f"/api/sessions/{sid}/preset", PRESET, headers=own)
    assert status == 200, body
    params = srv.manager.get(sid).params
    assert params.steps == 3 and params.seed == 7 and params.noise_controller is False and params.fit == "pad"
    assert [(p.text, p.weight) for p in params.prompts] == [("ink wash", 2.0), ("neon city", 1.0)]
    status, saved = srv.http("GET", f"/api/sessions/{sid}/preset", headers=own)
    assert status == 200 and saved == {**PRESET, "loras": []}
    assert Preset.model_validate(saved).to_params() == Preset.model_validate(PRESET).to_params()
    # a bad preset changes nothing; another stream's secret (or none) is refused
    assert srv.http("POST", f"/api/sessions/{sid}/preset", {**PRESET, "steps": 1, "seed": -1}, headers=own)[0] == 422
    assert srv.manager.get(sid).params.steps == 3
    assert srv.http("POST", f"/api/sessions/{sid}/preset", PRESET)[0] == 403
    assert srv.http("GET", f"/api/sessions/{sid}/preset", headers={"X-Stream-Secret": "nope"})[0] == 403
    c.close()
    wait_until(lambda: srv.manager.count == 0, 30, "session freed")


def test_the_page_has_preset_buttons(srv):
    status, html = srv.http("GET", "/")
    assert status == 200
    for element in ('id="preset-save"', 'id="preset-load"', 'id="preset-file"'):
        assert element in html, element
    script = (STATIC_DIR / "app.js").read_text()
    assert "/api/presets/validate" in script and "/preset" in script
