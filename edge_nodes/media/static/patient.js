// Patient page: joins the session named in the invite link (#session=..&token=..), sends the
// camera and microphone to the edge, shows the clinician, the edge's picture hints and the
// patient's own latest readings. Plain words throughout; no build step.
"use strict";

const params = new URLSearchParams(location.hash.slice(1));
const sessionId = params.get("session") || "";
let token = params.get("token") || "";
// The core's /join page this page came through: it knows where the session lives after a
// move and renews the token (absent when opened with an edge link directly).
const joinUrl = params.get("join") || "";
const $ = (id) => document.getElementById(id);

// Exposed for people debugging a call and for the browser tests.
const state = (window.telehealth = { role: "publisher", connected: false, mode: "", hint: "", callId: "", errors: [], rejoining: false });

let pc = null;
let localStream = null;
let ws = null;
let videoSender = null;
let cameraTrack = null;
let latest = {};

function say(text) { $("status").textContent = text; }

function showHint(h) {
  const el = $("hint");
  state.hint = h.kind || "";
  el.hidden = false;
  el.textContent = h.message;
  el.classList.toggle("good", h.kind === "VISION_HINT_KIND_GOOD");
}

let wsFailures = 0;
let refreshTimer = null;

function connectVitals() {
  const url = location.origin.replace(/^http/, "ws") + "/media/ws";
  const sock = new WebSocket(url);
  ws = sock;
  sock.onopen = () => sock.send(JSON.stringify({ session_id: sessionId, token }));
  sock.onmessage = (m) => {
    const msg = JSON.parse(m.data);
    if (msg.type === "welcome") { wsFailures = 0; scheduleRefresh(msg.token_expires_unix_ms); }
    else if (msg.type === "batch") for (const v of msg.batch.vitals || []) takeReading(v);
    else if (msg.type === "call_hint") showHint(msg.hint);
    else if (msg.type === "call_state") onCallState(msg.state);
    else if (msg.type === "moving" || msg.type === "session_released") rejoin("Your appointment is moving to another server. Reconnecting you…", true);
    else if (msg.type === "error" && msg.error === "unauthenticated" && /expired/.test(msg.message)) refreshToken();
    else if (msg.type === "error") { state.errors.push(msg.message); say("This link does not work any more: " + msg.message); }
  };
  sock.onclose = (e) => {
    if (ws !== sock || state.rejoining) return;
    if (e.code === 4401) return; // token expired: refreshToken() reconnects
    if (e.code >= 4000 && e.code !== 4409) return; // refused: the message says why
    // The edge went away (or let the session go): after two failed tries ask the core
    // where the session lives now.
    wsFailures += 1;
    if (e.code === 4409 || wsFailures > 2) rejoin("We lost the connection to your appointment. Reconnecting you…");
    else setTimeout(connectVitals, 2000);
  };
}

// Through the core's /join page: it finds the session's edge now and brings this page back
// there, joining the call again by itself when it was in one.
function rejoin(message, moving) {
  if (state.rejoining) return;
  if (!joinUrl) { say("Your appointment moved. Please open your invite link again."); return; }
  state.rejoining = true;
  say(message);
  const inCall = pc !== null;
  if (inCall) leave(true);
  // "away": the core may name this edge for a moment more during a move; /join then waits.
  const away = moving ? "&away=" + encodeURIComponent(location.origin) : "";
  location.replace(`${joinUrl}#session=${encodeURIComponent(sessionId)}&token=${encodeURIComponent(token)}${inCall ? "&autojoin=1" : ""}${away}`);
}

// Renew the token at two thirds of its life, from the core (no page reload, the call goes on).
function scheduleRefresh(expiresMs) {
  if (refreshTimer) clearTimeout(refreshTimer);
  if (!joinUrl || !expiresMs) return;
  const left = expiresMs - Date.now();
  refreshTimer = setTimeout(refreshToken, Math.max(1000, (left * 2) / 3));
}

async function refreshToken() {
  if (!joinUrl || state.rejoining) return;
  const api = new URL(joinUrl).origin + "/api/v1/join";
  let r, body;
  try {
    r = await fetch(api, { method: "POST", headers: { "Content-Type": "text/plain" }, body: JSON.stringify({ session_id: sessionId, token }) });
    body = await r.json();
  } catch (e) { setTimeout(refreshToken, 5000); return; }
  if (!r.ok) { state.errors.push(body.message); say("Your appointment link has expired. Please ask your clinic for a new one."); return; }
  token = body.token;
  state.tokenRefreshed = (state.tokenRefreshed || 0) + 1;
  if (new URL(body.edge_http).origin !== location.origin) { rejoin("Your appointment moved. Reconnecting you…"); return; }
  const old = ws;
  connectVitals();
  if (old) { old.onclose = null; old.close(); }
}

function takeReading(v) {
  const now = Date.now();
  for (const k of ["heart_rate_bpm", "spo2_percent", "respiration_rate_bpm", "systolic_mmhg", "diastolic_mmhg", "temperature_c"]) {
    if (v[k] !== undefined) latest[k] = { value: v[k], at: now };
  }
}

function showReadings() {
  const val = (k, digits = 0) => (latest[k] ? Number(latest[k].value).toFixed(digits) : null);
  const set = (id, text) => { $(id).textContent = text === null ? "-" : text; };
  set("r-hr", val("heart_rate_bpm") && val("heart_rate_bpm") + " beats/min");
  set("r-spo2", val("spo2_percent") && val("spo2_percent") + " %");
  set("r-rr", val("respiration_rate_bpm") && val("respiration_rate_bpm") + " breaths/min");
  set("r-bp", val("systolic_mmhg") && val("systolic_mmhg") + "/" + (val("diastolic_mmhg") || "-"));
  set("r-temp", val("temperature_c", 1) && val("temperature_c", 1) + " °C");
  const ages = Object.values(latest).map((r) => r.at);
  $("r-age").textContent = ages.length ? "Updated " + Math.round((Date.now() - Math.max(...ages)) / 1000) + " seconds ago" : "No readings yet";
}
setInterval(showReadings, 1000);

async function onCallState(s) {
  state.mode = s.mode;
  state.clinicians = s.clinicians_connected || 0;
  if (!pc) return;
  if (!s.clinicians_connected) say("Connected. Waiting for your clinician to join…");
  else if (s.mode === "CALL_MODE_AUDIO_ONLY") say("Your connection is weak: sound only for now. Your readings still reach your clinician.");
  else if (s.mode === "CALL_MODE_REDUCED") say("Your connection is slow: the picture is smaller for now.");
  else say("You are talking to your clinician.");
  // What to send is the edge's send_mode (lower than the call's mode only matters to a viewer
  // on a poor link); the edge forwards what arrives as it is.
  await adaptSending(s.send_mode || s.mode);
}

// The edge decides; the page sends less when asked, and more again on recovery.
async function adaptSending(mode) {
  if (!videoSender || !cameraTrack) return;
  state.sendMode = mode;
  const wantVideo = mode !== "CALL_MODE_AUDIO_ONLY" && cameraTrack.enabled;
  if (!wantVideo && videoSender.track) await videoSender.replaceTrack(null);
  if (wantVideo && !videoSender.track) await videoSender.replaceTrack(cameraTrack);
  const p = videoSender.getParameters();
  if (!p.encodings || !p.encodings.length) return;
  const reduced = mode === "CALL_MODE_REDUCED";
  p.encodings[0].scaleResolutionDownBy = reduced ? 2 : 1;
  p.encodings[0].maxFramerate = reduced ? 15 : 30;
  try { await videoSender.setParameters(p); } catch (e) { /* not every browser allows it mid-call */ }
}

// STUN/TURN servers from the edge (TURN with short-lived credentials); none when the edge is
// reachable directly, or when asking fails (a direct call may still work).
async function iceServers() {
  try {
    const r = await fetch(`/media/sessions/${encodeURIComponent(sessionId)}/ice-servers`, {
      method: "POST", headers: { "Content-Type": "application/json", Authorization: "Bearer " + token }, body: "{}",
    });
    if (!r.ok) return [];
    const body = await r.json();
    state.iceServers = body.ice_servers;
    return body.ice_servers;
  } catch (e) { return []; }
}

function gathered(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === "complete") resolve(); };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, timeoutMs);
  });
}

async function join() {
  $("join").disabled = true;
  say("Starting your camera…");
  try {
    localStream = await navigator.mediaDevices.getUserMedia({ audio: true, video: { width: 640, height: 480 } });
  } catch (e) {
    say("We could not use your camera or microphone. Please allow them and try again.");
    $("join").disabled = false;
    return;
  }
  $("local-video").srcObject = localStream;
  cameraTrack = localStream.getVideoTracks()[0] || null;
  pc = new RTCPeerConnection({ iceServers: await iceServers() });
  for (const t of localStream.getTracks()) {
    const sender = pc.addTrack(t, localStream);
    if (t.kind === "video") videoSender = sender;
  }
  const remote = new MediaStream();
  $("remote-video").srcObject = remote;
  pc.ontrack = (e) => {
    remote.addTrack(e.track);
    if (e.track.kind === "video") $("remote-placeholder").hidden = true;
  };
  pc.onconnectionstatechange = () => {
    state.connection = pc.connectionState;
    state.connected = pc.connectionState === "connected";
    if (pc.connectionState === "failed") say("The call dropped. Press the green button to try again.");
  };
  say("Connecting…");
  await pc.setLocalDescription(await pc.createOffer());
  await gathered(pc, 3000);
  const r = await fetch(`/media/sessions/${encodeURIComponent(sessionId)}/offer`, {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: "Bearer " + token },
    body: JSON.stringify({ sdp: pc.localDescription.sdp, role: "publisher" }),
  });
  const body = await r.json();
  if (!r.ok) {
    state.errors.push(body.message);
    say("We could not start the call: " + body.message);
    pc.close();
    pc = null;
    $("join").disabled = false;
    return;
  }
  state.callId = body.call_id;
  await pc.setRemoteDescription({ type: "answer", sdp: body.sdp });
  $("join").hidden = true;
  for (const id of ["mute", "camera", "leave"]) $(id).hidden = false;
  say("Connected. Waiting for your clinician to join…");
}

function toggle(kind, button, onText, offText) {
  const track = localStream && localStream.getTracks().find((t) => t.kind === kind);
  if (!track) return;
  track.enabled = !track.enabled;
  button.setAttribute("aria-pressed", String(!track.enabled));
  button.textContent = track.enabled ? onText : offText;
}

function leave(quiet) {
  if (state.callId) {
    navigator.sendBeacon(`/media/sessions/${encodeURIComponent(sessionId)}/calls/${state.callId}/hangup`, JSON.stringify({ token }));
    state.callId = "";
  }
  if (pc) pc.close();
  pc = null;
  if (localStream) localStream.getTracks().forEach((t) => t.stop());
  if (quiet !== true) say("Call ended. You can close this page.");
  for (const id of ["mute", "camera", "leave"]) $(id).hidden = true;
}

// Remote frames decoded so far (tests poll it; also handy when checking a call by hand).
state.remoteFrames = () => {
  const v = $("remote-video");
  return v.getVideoPlaybackQuality ? v.getVideoPlaybackQuality().totalVideoFrames : 0;
};
state.remoteWidth = () => $("remote-video").videoWidth;

$("join").onclick = join;
$("mute").onclick = (e) => toggle("audio", e.currentTarget, "Mute microphone", "Unmute microphone");
$("camera").onclick = (e) => toggle("video", e.currentTarget, "Turn camera off", "Turn camera on");
$("leave").onclick = () => leave();
window.addEventListener("pagehide", () => leave(true));

if (!sessionId || !token) {
  say("This page needs the invite link your clinic sent you.");
  $("join").disabled = true;
} else {
  connectVitals();
  if (params.get("autojoin") === "1") join();
}
