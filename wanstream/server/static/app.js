// wanstream live page: source (camera / screen / file) → server (WebSocket or WebRTC) → restyled output.
// Plain script, no build step. State for tests and debugging lives in window.wanstream.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const url = new URL(location.href);
  const TOKEN = url.searchParams.get("token");
  const authHeaders = TOKEN ? { Authorization: `Bearer ${TOKEN}` } : {};
  const api = (path) => (TOKEN ? `${path}${path.includes("?") ? "&" : "?"}token=${encodeURIComponent(TOKEN)}` : path);
  // the stream's secret (from "ready"): the server's proof that a recording download is ours
  const ownApi = (path) => (S.secret ? api(`${path}${path.includes("?") ? "&" : "?"}secret=${encodeURIComponent(S.secret)}`) : api(path));

  const S = (window.wanstream = {
    status: "idle", transport: null, session: null, secret: null, ready: null, params: null, stats: null,
    framesSent: 0, framesOut: 0, ttffPage: null, fpsShown: null, paramAcks: 0, errors: [], messages: [],
  });

  class UserError extends Error {
    constructor(message, code) { super(message); this.code = code; }
  }

  let media = null;        // MediaStream of the source (camera / screen / captured file)
  let conn = null;         // { send(obj), close() } of the active transport
  let stopping = false;
  let startedAt = 0;
  let shownTimes = [];

  // ------------------------------------------------------------------ UI helpers
  function setStatus(text, cls = "") {
    S.status = text;
    $("status").textContent = text;
    $("status").className = `pill ${cls}`;
  }

  function banner(text, kind = "error") {
    S.messages.push({ kind, text });
    $("banner-text").textContent = text;
    $("banner").className = `banner ${kind === "info" ? "info" : ""}`;
  }

  function clearBanner() { $("banner").className = "banner hidden"; }
  $("banner-close").onclick = clearBanner;

  const fmt = (v, digits = 1) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));

  function renderStats() {
    const s = S.stats || {};
    const lat = s.latency_ms || {};
    const ttff = S.ttffPage !== null ? S.ttffPage : s.ttff_s;
    $("stats").textContent =
      `in ${fmt(s.fps_in)} fps · out ${fmt(s.fps_out)} fps (shown ${fmt(S.fpsShown)}) · ` +
      `latency p50 ${fmt(lat.p50, 0)} / p95 ${fmt(lat.p95, 0)} ms · TTFF ${fmt(ttff, 2)} s · ` +
      `dropped ${s.frames_dropped ?? "–"}` + servingText(s.serving || {});
  }

  // degradation rung, viewer stalls, drift watchdog (docs/deploy.md)
  function servingText(v) {
    let t = "";
    if (v.rung) t += ` · degraded: ${v.steps_now} step${v.steps_now > 1 ? "s" : ""}${v.decoder_now === "taehv" ? ", TAEHV" : ""}`;
    if (v.stalls) t += ` · stalls ${v.stalls}`;
    if (v.drift) t += ` · drift ${fmt(v.drift.score, 2)}${v.drift.refreshes ? ` (refreshed ${v.drift.refreshes}×)` : ""}`;
    return t;
  }

  function renderRecordings(list) {
    const box = $("recordings");
    box.textContent = "";
    for (const r of list || []) {
      const line = document.createElement("div");
      if (r.complete && !r.error) {
        const a = document.createElement("a");
        a.href = ownApi(`/api/recordings/${encodeURIComponent(r.file)}`);
        a.textContent = `${r.file} (${r.frames} frames)`;
        a.download = r.file;
        line.appendChild(a);
      } else {
        line.textContent = r.error ? `${r.file}: ${r.error}` : `● recording ${r.file} (${r.frames} frames)`;
      }
      box.appendChild(line);
    }
  }

  function frameShown(total) {
    const now = performance.now();
    S.framesOut = total === undefined ? S.framesOut + 1 : total;
    if (S.ttffPage === null) {
      S.ttffPage = (now - startedAt) / 1000;
      $("output-placeholder").classList.add("hidden");
    }
    shownTimes.push(now);
    while (shownTimes.length && shownTimes[0] < now - 2000) shownTimes.shift();
    const span = Math.min(2000, now - startedAt);
    S.fpsShown = span > 250 ? (shownTimes.length * 1000) / span : null;
  }

  // ------------------------------------------------------------------ framing (the rule of io.video.fit_frames)
  const OBJECT_FIT = { crop: "cover", pad: "contain", stretch: "fill" };   // the preview shows the model's frame

  function drawFramed(ctx, src, vw, vh, w, h, fit) {
    if (fit === "stretch") { ctx.drawImage(src, 0, 0, vw, vh, 0, 0, w, h); return; }
    if (fit === "pad") {
      const s = Math.min(w / vw, h / vh), dw = Math.round(vw * s), dh = Math.round(vh * s);
      ctx.fillStyle = "#000";
      ctx.fillRect(0, 0, w, h);
      ctx.drawImage(src, 0, 0, vw, vh, (w - dw) / 2, (h - dh) / 2, dw, dh);
      return;
    }
    const s = Math.max(w / vw, h / vh), sw = w / s, sh = h / s;   // crop: the centred region of the aspect
    ctx.drawImage(src, (vw - sw) / 2, (vh - sh) / 2, sw, sh, 0, 0, w, h);
  }

  function showFit() { $("input").style.objectFit = OBJECT_FIT[$("fit").value] || "cover"; }

  // ------------------------------------------------------------------ parameters
  function uiParams() {
    const p = {
      steps: currentSteps(),
      noise_scale: Number($("noise").value),
      noise_controller: $("controller").checked,
      seed: Math.max(0, Math.min(4294967295, Math.floor(Number($("seed").value) || 0))),
      transition_chunks: $("recache").checked ? 0 : Number($("transition").value),
      recache: $("recache").checked,
      fit: $("fit").value,
    };
    const prompt = $("prompt").value.trim();
    if (prompt) p.prompt = prompt;
    return p;
  }

  function sendParams(params) {
    if (!conn) return false;
    conn.send({ type: "params", params });
    return true;
  }
  S.sendParams = sendParams;

  function showParams(p) {
    S.params = p;
    for (const b of $("steps").querySelectorAll("button")) b.classList.toggle("active", Number(b.dataset.steps) === p.steps);
    $("noise").value = p.noise_scale;
    $("noise-value").textContent = Number(p.noise_scale).toFixed(2);
    $("controller").checked = p.noise_controller;
    if (p.fit) { $("fit").value = p.fit; showFit(); }
    $("seed").value = p.seed;
    $("transition").value = p.transition_chunks;
    $("recache").checked = !!p.recache;
    showTransition();
    $("record").classList.toggle("on", p.recording);
    $("record").textContent = p.recording ? "■ Stop recording" : "● Record";
    if (!$("prompt").value.trim()) { $("prompt").value = p.prompt; countPrompt(); }
  }

  function currentSteps() {
    const active = $("steps").querySelector("button.active");
    return active ? Number(active.dataset.steps) : 2;
  }

  function handleMessage(msg) {
    switch (msg.type) {
      case "ready":
        S.ready = msg;
        S.session = msg.session;
        S.secret = msg.secret || null;
        $("server-info").textContent = `session ${msg.session.slice(0, 8)} · ${msg.width}x${msg.height}`;
        $("input").style.aspectRatio = `${msg.width} / ${msg.height}`;   // the input as the model frames it
        $("input").style.height = "auto";
        showFit();
        if (!$("prompt").value.trim()) { $("prompt").value = msg.params.prompt; countPrompt(); }
        showOsc();
        loadMappings();
        break;
      case "params":
        S.paramAcks += 1;
        showParams(msg.params);
        break;
      case "stats":
        S.stats = msg;
        renderStats();
        renderRecordings(msg.recordings);
        break;
      case "error":
        S.errors.push(msg);
        banner(errorText(msg), msg.code === "rate_limited" ? "info" : "error");
        break;
      case "closed":
        banner(msg.message || `The session was closed (${msg.reason}).`, "info");
        break;
      case "learned":
        banner(`MIDI learn: ${msg.mapping.target} ← CC ${msg.mapping.source.control}`, "info");
        loadMappings();
        break;
      case "push":
        if (msg.state === "failed") banner(`Push ${msg.url} failed: ${msg.error}`);
        break;
    }
  }

  function errorText(msg) {
    if (msg.code === "server_full") return msg.message || "Server is full. Try again later.";
    if (msg.code === "unauthorized") return "This server needs a token: open the URL printed by `wanstream serve` (it ends in ?token=…).";
    return msg.message || msg.code;
  }

  // ------------------------------------------------------------------ sources
  function explainMediaError(err, what) {
    const name = err && err.name;
    if (name === "NotAllowedError" || name === "SecurityError" || name === "PermissionDeniedError")
      return new UserError(`${what} access was denied. Allow it in the browser's site settings (or pick another source), then press Start again.`, "camera_denied");
    if (name === "NotFoundError" || name === "OverconstrainedError")
      return new UserError(`No ${what.toLowerCase()} found. Pick another source (screen share or a video file).`, "camera_missing");
    if (name === "NotReadableError")
      return new UserError(`The ${what.toLowerCase()} is busy (another application may be using it).`, "camera_busy");
    return new UserError(`${what} failed: ${err && err.message ? err.message : err}`, "source_error");
  }

  async function openSource() {
    const kind = $("source").value;
    const video = $("input");
    if (kind !== "file" && !(navigator.mediaDevices && navigator.mediaDevices.getUserMedia))
      throw new UserError("The camera needs a secure page: open it as http://localhost / 127.0.0.1 (an SSH tunnel works) or over https.", "insecure");
    if (kind === "camera") {
      try {
        media = await navigator.mediaDevices.getUserMedia({
          video: { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 30 } }, audio: false });
      } catch (err) { throw explainMediaError(err, "Camera"); }
    } else if (kind === "screen") {
      try {
        media = await navigator.mediaDevices.getDisplayMedia({ video: { frameRate: { ideal: 30 } }, audio: false });
      } catch (err) { throw explainMediaError(err, "Screen"); }
    } else {
      const file = $("file").files[0];
      if (!file) throw new UserError("Choose a video file first.", "no_file");
      video.srcObject = null;
      video.src = URL.createObjectURL(file);
      video.loop = true;
      await video.play();
      media = video.captureStream ? video.captureStream() : video.mozCaptureStream();
      $("input-placeholder").classList.add("hidden");
      return;
    }
    video.srcObject = media;
    await video.play().catch(() => {});
    $("input-placeholder").classList.add("hidden");
    const track = media.getVideoTracks()[0];
    if (track) track.onended = () => { if (conn) { banner("The source ended.", "info"); stop(); } };
  }

  function closeSource() {
    if (media) for (const t of media.getTracks()) t.stop();
    media = null;
    const video = $("input");
    video.srcObject = null;
    if (video.src) { URL.revokeObjectURL(video.src); video.removeAttribute("src"); video.load(); }
    $("input-placeholder").classList.remove("hidden");
  }

  // ------------------------------------------------------------------ WebSocket transport
  function startWebSocket() {
    return new Promise((resolve, reject) => {
      const proto = location.protocol === "https:" ? "wss" : "ws";
      let ws = null;
      let paused = false;        // the stream is moving to another server: hold the frames
      let redirect = null;       // where it goes on ({url}: /api/ws?resume=...)
      const input = $("input");
      const out = $("output-canvas");
      const octx = out.getContext("2d");
      const cap = document.createElement("canvas");
      const cctx = cap.getContext("2d");
      let ready = false, encoding = false, drawing = 0, lastSend = 0, lastSize = 0, running = true, lastError = null;

      $("output-video").classList.add("hidden");
      out.classList.remove("hidden");

      function schedule() {
        if (!running) return;
        if (input.requestVideoFrameCallback && input.readyState >= 2) input.requestVideoFrameCallback(tick);
        else setTimeout(tick, 33);
      }

      function tick() {
        schedule();
        const now = performance.now();
        if (!ws || paused || ws.readyState !== WebSocket.OPEN || encoding || now - lastSend < 30) return;
        if (ws.bufferedAmount > 2 * lastSize + 16384) return;      // the network is behind: skip this frame
        if (input.readyState < 2 || !input.videoWidth) return;
        const vw = input.videoWidth, vh = input.videoHeight;
        drawFramed(cctx, input, vw, vh, cap.width, cap.height, $("fit").value);
        encoding = true;
        lastSend = now;
        cap.toBlob((blob) => {
          encoding = false;
          if (blob && ws.readyState === WebSocket.OPEN) { ws.send(blob); lastSize = blob.size; S.framesSent += 1; }
        }, "image/jpeg", 0.85);
      }

      function open(path) {
      ws = new WebSocket(`${proto}://${location.host}${api(path)}`);
      ws.binaryType = "blob";
      ws.onmessage = async (ev) => {
        if (typeof ev.data === "string") {
          let msg;
          try { msg = JSON.parse(ev.data); } catch { return; }
          if (msg.type === "error" || msg.type === "closed") lastError = msg;
          handleMessage(msg);
          if (msg.type === "migrate") {                // docs/deploy.md: live migration
            paused = msg.state === "start";
            banner(msg.state === "start" ? "Moving this stream to another server…" : msg.message, "info");
          }
          if (msg.type === "redirect") { redirect = msg; S.migrations = (S.migrations || 0) + 1; }
          if (msg.type === "ready" && paused) { paused = false; clearBanner(); }
          if (msg.type === "ready" && !ready) {
            ready = true;
            cap.width = msg.width; cap.height = msg.height;
            out.width = msg.width; out.height = msg.height;
            resolve({
              send: (obj) => { if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(obj)); },
              close: () => { running = false; ws.close(1000, "stop"); },
            });
            schedule();
          }
          return;
        }
        if (drawing > 1) return;                                   // the page is behind: show the newest
        drawing += 1;
        try {
          const bmp = await createImageBitmap(ev.data);
          if (out.width !== bmp.width || out.height !== bmp.height) { out.width = bmp.width; out.height = bmp.height; }
          octx.drawImage(bmp, 0, 0);
          bmp.close();
          frameShown();
        } catch (err) { /* a broken frame: skip it */ } finally { drawing -= 1; }
      };
      ws.onclose = (ev) => {
        if (redirect) {                                 // the stream goes on elsewhere: follow it
          const url = new URL(redirect.url, location.href);
          redirect = null;
          open(url.pathname + url.search);
          return;
        }
        running = false;
        if (!ready) {
          reject(lastError ? new UserError(errorText(lastError), lastError.code)
            : new UserError(`Cannot reach the server (WebSocket closed, code ${ev.code}).`, "disconnected"));
          return;
        }
        const why = lastError && (lastError.type === "closed" || lastError.code === "model_error")
          ? lastError.message : `WebSocket closed, code ${ev.code}${ev.reason ? `: ${ev.reason}` : ""}`;
        disconnected(why);
      };
      }
      open("/api/ws");
    });
  }

  // ------------------------------------------------------------------ WebRTC transport
  function waitGathering(pc, timeoutMs) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => { if (pc.iceGatheringState === "complete") { pc.removeEventListener("icegatheringstatechange", done); resolve(); } };
      pc.addEventListener("icegatheringstatechange", done);
      setTimeout(resolve, timeoutMs);
    });
  }

  async function startWebRTC() {
    const track = media && media.getVideoTracks()[0];
    if (!track) throw new UserError("The source has no video track.", "source_error");
    const pc = new RTCPeerConnection({ iceServers: [] });
    const dc = pc.createDataChannel("control");
    const pending = [];
    try { track.contentHint = "detail"; } catch { /* older browsers */ }
    pc.addTransceiver(track, { direction: "sendrecv", streams: [media] });
    const outVideo = $("output-video");
    pc.ontrack = (ev) => {
      outVideo.srcObject = ev.streams && ev.streams[0] ? ev.streams[0] : new MediaStream([ev.track]);
      outVideo.play().catch(() => {});
      if (outVideo.requestVideoFrameCallback) {
        const cb = (now, meta) => { frameShown(meta.presentedFrames); outVideo.requestVideoFrameCallback(cb); };
        outVideo.requestVideoFrameCallback(cb);
      }
    };
    dc.onmessage = (ev) => { try { handleMessage(JSON.parse(ev.data)); } catch { /* ignore */ } };
    dc.onopen = () => { while (pending.length) dc.send(pending.shift()); };
    await pc.setLocalDescription(await pc.createOffer());
    await waitGathering(pc, 3000);
    let resp, body;
    try {
      resp = await fetch(api("/api/webrtc/offer"), {
        method: "POST", headers: { ...authHeaders, "Content-Type": "application/json" },
        body: JSON.stringify({ sdp: pc.localDescription.sdp, type: "offer" }),
      });
      body = await resp.json().catch(() => ({}));
    } catch (err) {
      pc.close();
      throw new UserError("Cannot reach the server.", "disconnected");
    }
    if (!resp.ok) {
      pc.close();
      const msg = { type: "error", code: body.error || body.code || "error", message: body.message || `offer refused (HTTP ${resp.status})` };
      throw new UserError(errorText(msg), msg.code);
    }
    await pc.setRemoteDescription({ type: "answer", sdp: body.sdp });
    handleMessage({ ...body, type: "ready" });
    $("output-canvas").classList.add("hidden");
    outVideo.classList.remove("hidden");
    pc.onconnectionstatechange = () => {
      const st = pc.connectionState;
      if (st === "connected") setStatus("live · WebRTC", "live");
      else if (st === "disconnected") setStatus("reconnecting…", "connecting");
      else if (st === "failed" || st === "closed") disconnected(`WebRTC connection ${st}`);
    };
    return {
      send: (obj) => { const text = JSON.stringify(obj); if (dc.readyState === "open") dc.send(text); else pending.push(text); },
      close: () => { dc.close(); pc.close(); },
    };
  }

  // ------------------------------------------------------------------ start / stop
  async function start() {
    if (conn) return;
    clearBanner();
    stopping = false;
    S.framesOut = 0; S.framesSent = 0; S.ttffPage = null; S.fpsShown = null; S.stats = null; shownTimes = [];
    startedAt = performance.now();
    $("start").disabled = true;
    setStatus("starting…", "connecting");
    const transport = $("transport").value;
    S.transport = transport;
    try {
      await openSource();
      conn = transport === "webrtc" ? await startWebRTC() : await startWebSocket();
    } catch (err) {
      conn = null;
      closeSource();
      const code = err.code || "error";
      S.errors.push({ type: "error", code, message: err.message });
      banner(err.message || String(err));
      setStatus(code === "server_full" ? "server full" : code === "camera_denied" ? "camera denied" : "error", "error");
      $("start").disabled = false;
      return;
    }
    sendParams(startParams());
    setStatus(`live · ${transport === "webrtc" ? "WebRTC" : "WebSocket"}`, "live");
    $("stop").disabled = false;
  }

  function stop() {
    stopping = true;
    if (conn) { try { conn.close(); } catch { /* already closed */ } }
    conn = null;
    closeSource();
    $("output-video").srcObject = null;
    $("start").disabled = false;
    $("stop").disabled = true;
    setStatus("idle");
  }

  function disconnected(reason) {
    if (stopping || !conn) return;
    conn = null;
    closeSource();
    banner(`Disconnected from the server (${reason}). Press Start to reconnect.`);
    setStatus("disconnected", "error");
    $("start").disabled = false;
    $("stop").disabled = true;
  }

  S.start = start;
  S.stop = stop;

  // ------------------------------------------------------------------ controls
  function countPrompt() { $("prompt-count").textContent = `${$("prompt").value.length} / 2000`; }
  function promptChange() {
    // a re-cache and a transition exclude each other: the checkbox wins
    return $("recache").checked ? { transition_chunks: 0, recache: true }
      : { transition_chunks: Number($("transition").value), recache: false };
  }
  function showTransition() {
    $("transition").disabled = $("recache").checked;
    const k = Number($("transition").value);
    $("transition-value").textContent = k ? `${k} ch` : "off";
    $("transition").title = k ? `blend into a new prompt over ${k} chunks (4 frames each)` : "switch prompts at once";
  }

  $("start").onclick = start;
  $("stop").onclick = stop;
  $("source").onchange = () => $("file-row").classList.toggle("hidden", $("source").value !== "file");
  $("prompt").oninput = countPrompt;
  $("prompt").onkeydown = (ev) => { if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); $("apply-prompt").click(); } };
  $("apply-prompt").onclick = () => {
    const prompt = $("prompt").value.trim();
    if (prompt) sendParams(timed({ prompt, ...promptChange() }));
  };
  $("transition").oninput = showTransition;
  $("transition").onchange = () => sendParams(promptChange());
  $("recache").onchange = () => { showTransition(); sendParams(promptChange()); };
  for (const b of $("steps").querySelectorAll("button")) {
    b.onclick = () => {
      for (const o of $("steps").querySelectorAll("button")) o.classList.toggle("active", o === b);
      sendParams({ steps: Number(b.dataset.steps) });
    };
  }
  $("noise").oninput = () => { $("noise-value").textContent = Number($("noise").value).toFixed(2); };
  $("noise").onchange = () => sendParams({ noise_scale: Number($("noise").value) });
  $("fit").onchange = () => { showFit(); sendParams({ fit: $("fit").value }); };
  $("controller").onchange = () => sendParams({ noise_controller: $("controller").checked });
  $("seed").onchange = () => sendParams(timed({ seed: uiParams().seed }));
  $("seed-random").onclick = () => { $("seed").value = Math.floor(Math.random() * 2 ** 31); $("seed").onchange(); };
  $("reset").onclick = () => sendParams(timed({ reset: true }));
  $("record").onclick = () => sendParams({ recording: !(S.params && S.params.recording) });

  function addBlendRow(text = "", weight = 0.5) {
    const row = document.createElement("div");
    row.className = "blend-row";
    row.innerHTML = `<input type="text" maxlength="2000" placeholder="prompt"><input type="range" min="0" max="1" step="0.05"><span class="value"></span><button class="link" title="remove">✕</button>`;
    const [txt, rng, val, del] = row.children;
    txt.value = text;
    rng.value = weight;
    val.textContent = Number(weight).toFixed(2);
    rng.oninput = () => { val.textContent = Number(rng.value).toFixed(2); };
    del.onclick = () => row.remove();
    $("blend-rows").appendChild(row);
  }
  $("blend-add").onclick = () => addBlendRow();
  $("blend-apply").onclick = () => {
    const prompts = [...$("blend-rows").children]
      .map((row) => ({ text: row.children[0].value.trim(), weight: Number(row.children[1].value) }))
      .filter((p) => p.text);
    if (!prompts.length) { banner("Add at least one prompt to blend.", "info"); return; }
    if (prompts.every((p) => p.weight <= 0)) { banner("Give at least one prompt a weight above 0.", "info"); return; }
    sendParams({ prompts, ...promptChange() });
  };
  addBlendRow("", 0.5);
  addBlendRow("", 0.5);

  // ------------------------------------------------------------------ OSC (when the server has --osc-port)
  function showOsc() {
    const port = S.health && S.health.osc_port;
    $("osc").classList.toggle("hidden", !port || !S.secret);
    if (!port || !S.secret) return;
    $("osc-target").textContent = `udp ${location.hostname}:${port}`;
    S.oscAddress = `/wanstream/${S.session}/${S.secret}/`;
    $("osc-address").textContent = `${S.oscAddress}<param>`;
  }

  // ------------------------------------------------------------------ playing live: tempo, quantise, learn, mappings
  // a prompt, seed or reset on the next beat / bar (the server times it so the restyled frame lands on it)
  const timed = (p) => ($("quantize").value ? { ...p, quantize: $("quantize").value } : p);

  async function liveCall(path, init = {}) {
    const resp = await fetch(ownApi(path), { ...init, headers: { ...authHeaders, "Content-Type": "application/json" } });
    const body = await resp.json().catch(() => ({}));
    if (!resp.ok) throw new UserError(body.message || `HTTP ${resp.status}`, body.error || "live");
    return body;
  }

  async function loadMappings() {
    if (!S.session || !S.secret) return;
    try {
      const live = await liveCall(`/api/sessions/${S.session}/modulation`);
      $("mappings").value = JSON.stringify(live.modulation, null, 1);
    } catch (err) { /* shown on the next action */ }
  }

  async function pollTempo() {
    try {
      const resp = await fetch(api("/api/live"), { headers: authHeaders });
      if (!resp.ok) return;
      const live = await resp.json();
      const t = live.tempo;
      S.tempo = t;
      $("tempo").textContent = `${t.bpm} BPM · ${t.source}${t.running ? "" : " (stopped)"}` +
        (live.midi_ports.length ? ` · MIDI: ${live.midi_ports.join(", ")}` : " · no MIDI input");
      const now = Math.floor(t.bar_phase * t.beats_per_bar);
      $("beat-dots").textContent = Array.from({ length: t.beats_per_bar }, (_, i) => (i === now ? "●" : "○")).join(" ");
    } catch (err) { /* the next poll */ }
  }
  setInterval(pollTempo, 250);

  $("learn").onclick = async () => {
    if (!liveSession()) return banner("Start a stream first.", "info");
    try {
      await liveCall(`/api/sessions/${S.session}/learn`, { method: "POST", body: JSON.stringify({ target: $("learn-target").value }) });
      banner(`MIDI learn: move a control for ${$("learn-target").value}…`, "info");
    } catch (err) { banner(err.message); }
  };

  $("mappings-apply").onclick = async () => {
    if (!liveSession()) return banner("Start a stream first.", "info");
    let spec;
    try { spec = JSON.parse($("mappings").value || "{}"); } catch (err) { return banner(`Mappings: not JSON (${err.message})`); }
    try {
      await liveCall(`/api/sessions/${S.session}/modulation`, { method: "PUT", body: JSON.stringify(spec) });
      clearBanner();
    } catch (err) { banner(`Mappings refused: ${err.message}`); }
  };

  // ------------------------------------------------------------------ presets (format and checks: the server's)
  async function presetCall(path, init = {}) {
    const resp = await fetch(path, { ...init, headers: { ...authHeaders, "Content-Type": "application/json", ...(init.headers || {}) } });
    const body = await resp.json().catch(() => ({}));
    if (!resp.ok) throw new UserError(`Preset refused: ${body.message || resp.status}`, body.error || "bad_preset");
    return body;
  }

  const liveSession = () => (conn && S.session ? S.session : null);   // S.session stays set after Stop

  function uiPreset() {
    const p = uiParams();
    const blend = S.params && S.params.prompts;
    if (blend && blend.length) { delete p.prompt; p.prompts = blend; }
    return p;
  }

  function showPreset(params) {
    if (params.prompt !== undefined) { $("prompt").value = params.prompt; countPrompt(); }
    if (params.prompts) {
      $("blend-rows").textContent = "";
      for (const q of params.prompts) addBlendRow(q.text, q.weight);
      $("blend").open = true;
    }
    showParams({ recording: false, prompt: "", ...uiParams(), ...(S.params || {}), ...params });
  }

  $("preset-save").onclick = async () => {
    try {
      // a stream's own state (with its LoRA strengths) when one runs; else the page's controls, normalised
      const sid = liveSession();
      const preset = sid
        ? await presetCall(ownApi(`/api/sessions/${encodeURIComponent(sid)}/preset`))
        : (await presetCall(api("/api/presets/validate"), { method: "POST", body: JSON.stringify(uiPreset()) })).preset;
      const a = document.createElement("a");
      a.href = URL.createObjectURL(new Blob([JSON.stringify(preset, null, 2) + "\n"], { type: "application/json" }));
      a.download = "wanstream-preset.json";
      a.click();
      setTimeout(() => URL.revokeObjectURL(a.href), 1000);
      S.savedPreset = preset;
    } catch (err) {
      banner(err.message);
    }
  };
  $("preset-load").onclick = () => $("preset-file").click();
  async function loadPreset(text) {
    let preset;
    try {
      preset = JSON.parse(text);
    } catch (err) {
      banner(`This preset is not JSON: ${err.message}`);
      return;
    }
    try {
      const body = JSON.stringify(preset);
      // on a stream: validated and applied in one call; else validated, and shown on the controls
      const sid = liveSession();
      const reply = sid
        ? await presetCall(ownApi(`/api/sessions/${encodeURIComponent(sid)}/preset`), { method: "POST", body })
        : await presetCall(api("/api/presets/validate"), { method: "POST", body });
      showPreset(reply.params);
      clearBanner();
      S.loadedPreset = reply.params;
      if (!sid) S.pendingPreset = reply.params;
    } catch (err) {
      banner(err.message);
    }
  }
  S.loadPreset = loadPreset;
  function startParams() {
    // the controls, and a preset loaded before Start (its blend and LoRA strengths are not on the controls)
    const p = { ...uiParams(), ...(S.pendingPreset || {}) };
    if (S.pendingPreset && S.pendingPreset.prompts) delete p.prompt;
    S.pendingPreset = null;
    return p;
  }
  $("preset-file").onchange = async () => {
    const file = $("preset-file").files[0];
    $("preset-file").value = "";
    if (file) await loadPreset(await file.text());
  };

  // ------------------------------------------------------------------ boot
  async function boot() {
    const t = url.searchParams.get("transport");
    if (t === "ws" || t === "webrtc") $("transport").value = t;
    const src = url.searchParams.get("source");
    if (["camera", "screen", "file"].includes(src)) { $("source").value = src; $("source").onchange(); }
    for (const b of $("steps").querySelectorAll("button")) b.classList.toggle("active", b.dataset.steps === "2");
    countPrompt();
    showTransition();
    try {
      const resp = await fetch(api("/api/health"), { headers: authHeaders });
      if (resp.status === 401) {
        banner("This server needs a token: open the URL printed by `wanstream serve` (it ends in ?token=…).");
        setStatus("token needed", "error");
        return;
      }
      const h = await resp.json();
      S.health = h;
      $("server-info").textContent = `${h.width}x${h.height} · ${h.sessions}/${h.capacity} sessions · ${h.device}`;
      for (const b of $("steps").querySelectorAll("button")) b.classList.toggle("active", Number(b.dataset.steps) === h.steps);
      if (h.defaults) {
        // the server's defaults for a new stream (serve --preset / --fit): on the controls, so Start keeps them
        showPreset(h.defaults);
        if (h.defaults.prompts && h.defaults.prompts.length) S.pendingPreset = { prompts: h.defaults.prompts };
      }
      if (!h.transports.includes("webrtc")) {
        $("transport").querySelector('option[value="webrtc"]').disabled = true;
        if ($("transport").value === "webrtc") $("transport").value = "ws";
      }
    } catch (err) {
      banner("Cannot reach the server.");
      setStatus("offline", "error");
      return;
    }
    if (url.searchParams.get("autostart") === "1") start();
  }
  boot();
})();
