// wanstream live page: VACE reference image (drop zone, preview) and control kind / strength with a preview of
// what the model receives (server/conditioning.py). Uses the stream of app.js (window.wanstream).
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const TOKEN = new URL(location.href).searchParams.get("token");
  const S = () => window.wanstream;
  const C = (window.wanstream.conditioning = { reference: false, control: "none", strength: 1, acks: 0, errors: [], previews: 0 });

  function own(path) {
    const q = [];
    if (TOKEN) q.push(`token=${encodeURIComponent(TOKEN)}`);
    if (S().secret) q.push(`secret=${encodeURIComponent(S().secret)}`);
    return q.length ? `${path}${path.includes("?") ? "&" : "?"}${q.join("&")}` : path;
  }
  function say(text, info = false) {
    $("banner-text").textContent = text;
    $("banner").className = info ? "banner info" : "banner";
  }
  const live = () => S().session && S().secret && S().status !== "idle";

  async function call(path, init) {
    const resp = await fetch(own(path), init);
    const body = await resp.json().catch(() => ({}));
    if (!resp.ok) {
      const message = body.message || `HTTP ${resp.status}`;
      C.errors.push({ status: resp.status, message });
      throw new Error(message);
    }
    C.acks += 1;
    if (body.conditioning) Object.assign(C, { reference: body.conditioning.reference, control: body.conditioning.control, strength: body.conditioning.strength });
    return body;
  }

  async function upload(file) {
    if (!live()) return say("Start a stream first.", true);
    try {
      await call(`/api/sessions/${S().session}/reference`, { method: "PUT", headers: { "Content-Type": file.type || "application/octet-stream" }, body: file });
      $("ref-preview").src = URL.createObjectURL(file);
      $("ref-preview").classList.remove("hidden");
      $("banner").className = "banner hidden";
    } catch (err) { say(`Reference refused: ${err.message}`); }
  }

  const drop = $("ref-drop");
  drop.onclick = () => $("ref-file").click();
  drop.onkeydown = (e) => { if (e.key === "Enter" || e.key === " ") $("ref-file").click(); };
  drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
  drop.ondragleave = () => drop.classList.remove("over");
  drop.ondrop = (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) upload(e.dataTransfer.files[0]);
  };
  $("ref-file").onchange = () => { if ($("ref-file").files.length) upload($("ref-file").files[0]); $("ref-file").value = ""; };
  $("ref-clear").onclick = async () => {
    if (!live()) return;
    try {
      await call(`/api/sessions/${S().session}/reference`, { method: "DELETE" });
      $("ref-preview").classList.add("hidden");
    } catch (err) { say(`Clear refused: ${err.message}`); }
  };

  async function sendControl() {
    if (!live()) return say("Start a stream first.", true);
    try {
      await call(`/api/sessions/${S().session}/conditioning`, {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ control: $("control").value, strength: Number($("vace-strength").value) }),
      });
      $("banner").className = "banner hidden";
    } catch (err) {
      say(`Control refused: ${err.message}`);
      $("control").value = C.control;
    }
  }
  $("control").onchange = sendControl;
  $("vace-strength").oninput = () => { $("vace-strength-value").textContent = Number($("vace-strength").value).toFixed(2); };
  $("vace-strength").onchange = sendControl;

  // the control frame the model receives: a small preview, refreshed while a control kind is on
  const preview = $("control-preview");
  preview.onload = () => { C.previews += 1; preview.classList.remove("hidden"); };
  preview.onerror = () => preview.classList.add("hidden");
  let ticks = 0;
  setInterval(async () => {
    ticks += 1;
    if (live() && ticks % 4 === 0) {        // a preset or OSC may have changed it: show what the stream has
      try {
        const resp = await fetch(own(`/api/sessions/${S().session}/conditioning`));
        if (resp.ok) {
          const info = await resp.json();
          Object.assign(C, { reference: info.reference, control: info.control, strength: info.strength });
          if (document.activeElement !== $("control")) $("control").value = info.control;
        }
      } catch (err) { /* the next tick */ }
    }
    if (!live() || C.control === "none") { preview.classList.add("hidden"); return; }
    preview.src = own(`/api/sessions/${S().session}/control.jpg?t=${Date.now()}`);
  }, 700);
})();
