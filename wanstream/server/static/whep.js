// WHEP player of one wanstream stream (an OBS browser source, or any page):
//   /static/whep.html?stream=NAME[&token=TOKEN]
// POSTs a receive-only offer to /whep/NAME (Authorization: Bearer TOKEN), plays the answer's video, DELETEs its
// resource when the page goes away. No STUN: ICE servers come only from the server's Link headers.
(() => {
  "use strict";
  const params = new URL(location.href).searchParams;
  const stream = params.get("stream") || "";
  const token = params.get("token");
  const video = document.getElementById("video");
  const statusEl = document.getElementById("status");
  const state = { status: "connecting", framesShown: 0, error: null, resource: null };
  window.whep = state;

  const setStatus = (status, text) => {
    state.status = status;
    statusEl.textContent = text || status;
    document.body.classList.toggle("playing", status === "playing");
  };
  const auth = token ? { Authorization: `Bearer ${token}` } : {};

  // ICE servers announced by the server (Link: <url>; rel="ice-server"); none unless it was started with them.
  const iceServers = (link) => [...(link || "").matchAll(/<([^>]+)>\s*;\s*rel="ice-server"/g)].map((m) => ({ urls: m[1] }));

  const countFrames = () => {
    if (!video.requestVideoFrameCallback) return;
    const tick = () => { state.framesShown += 1; video.requestVideoFrameCallback(tick); };
    video.requestVideoFrameCallback(tick);
  };

  async function start() {
    if (!/^[A-Za-z0-9_-]{1,64}$/.test(stream)) throw new Error("add ?stream=NAME (the name the WHIP publisher used)");
    const probe = await fetch(`/whep/${stream}`, { method: "OPTIONS", headers: auth });
    const pc = new RTCPeerConnection({ iceServers: iceServers(probe.headers.get("Link")) });
    pc.addTransceiver("video", { direction: "recvonly" });
    pc.ontrack = (event) => { video.srcObject = event.streams[0] || new MediaStream([event.track]); };
    pc.onconnectionstatechange = () => {
      if (pc.connectionState === "failed" || pc.connectionState === "closed") setStatus("ended", "the stream ended");
    };
    await pc.setLocalDescription(await pc.createOffer());
    await new Promise((resolve) => {                // no trickle ICE: send the offer with its candidates
      if (pc.iceGatheringState === "complete") return resolve();
      pc.onicegatheringstatechange = () => { if (pc.iceGatheringState === "complete") resolve(); };
      setTimeout(resolve, 3000);
    });
    const resp = await fetch(`/whep/${stream}`, {
      method: "POST", headers: { "Content-Type": "application/sdp", ...auth }, body: pc.localDescription.sdp,
    });
    if (resp.status !== 201) {
      let message = `${resp.status}`;
      try { message = (await resp.json()).message || message; } catch (_) { /* not JSON */ }
      throw new Error(message);
    }
    state.resource = resp.headers.get("Location");
    await pc.setRemoteDescription({ type: "answer", sdp: await resp.text() });
    video.onplaying = () => setStatus("playing");
    countFrames();
    window.addEventListener("pagehide", () => {
      if (state.resource) fetch(state.resource, { method: "DELETE", headers: auth, keepalive: true });
      pc.close();
    });
  }

  start().catch((err) => { state.error = String(err.message || err); setStatus("error", state.error); });
})();
