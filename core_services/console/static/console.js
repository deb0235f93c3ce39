// Clinician console: ward view (every patient with live NEWS2, last values and their age,
// alerts) and patient view (live vitals, scrolling ECG, two-way video with call quality).
// Live data comes straight from each session's edge: a WebSocket for vitals and call events,
// WebRTC for media. The core only lists sessions and hands out viewer tokens.
"use strict";

const $ = (id) => document.getElementById(id);
const BANDS = { RISK_BAND_LOW: 1, RISK_BAND_LOW_MEDIUM: 2, RISK_BAND_MEDIUM: 3, RISK_BAND_HIGH: 4 };
const BAND_NAMES = { 0: "unknown", 1: "low", 2: "low-medium", 3: "medium", 4: "high" };
const STALE_S = 60; // older values are shown as stale, never as live
const TREND_S = 300;
const ECG_SECONDS = 5;

const patients = new Map(); // session_id -> live state
let open = null; // session_id in the patient view
let call = null;

// For people debugging and for the browser tests.
const state = (window.telehealth = {
  role: "viewer", patients, connected: false, mode: "", errors: [],
  remoteFrames: () => { const v = $("remote-video"); return v.getVideoPlaybackQuality ? v.getVideoPlaybackQuality().totalVideoFrames : 0; },
  remoteWidth: () => $("remote-video").videoWidth,
});

function age(at) {
  if (!at) return "";
  const s = Math.max(0, Math.round((Date.now() - at) / 1000));
  return s < 60 ? s + " s ago" : Math.round(s / 60) + " min ago";
}

function fmt(v, digits = 0) { return v === undefined || v === null ? "-" : Number(v).toFixed(digits); }

// ---------------------------------------------------------------- ward

// Signed out (or the sign-in expired): back to the sign-in page, then here again.
function signIn() { location.assign("/login?next=" + encodeURIComponent("/console" + location.hash)); }

async function signOut() {
  try { await fetch("/api/v1/logout", { method: "POST" }); } catch (e) { /* signing in again is enough */ }
  signIn();
}

async function loadWard() {
  let body, r;
  try {
    r = await fetch("/console/api/ward");
    body = await r.json();
  } catch (e) { return; }
  if (r.status === 401) { signIn(); return; }
  const warn = $("auth-warning");
  warn.hidden = r.ok;
  if (!r.ok) { warn.textContent = body.message || "The ward cannot be shown (" + r.status + ")."; return; }
  state.user = body.clinician.id;
  $("clinician").textContent = "Signed in as " + body.clinician.id;
  const seen = new Set();
  for (const row of body.sessions) {
    seen.add(row.session_id);
    let p = patients.get(row.session_id);
    if (!p) {
      p = { latest: {}, trends: { hr: [], spo2: [], rr: [] }, ecg: [], ecgRate: 250, alerts: [], news2: null, rppg: null, derived: null };
      patients.set(row.session_id, p);
    }
    const moved = p.row && p.row.edge_id !== row.edge_id;
    p.row = row;
    if (!p.news2 && row.news2_band) p.news2 = { total: row.news2_total, band: row.news2_band, at: Date.now() - (row.news2_age_s || 0) * 1000 };
    if ((!p.ws && !p.connecting) || moved) connectVitals(row.session_id, p, moved);
  }
  for (const [sid, p] of patients) {
    if (!seen.has(sid)) { if (p.ws) { p.ws.onclose = null; p.ws.close(); } clearTimeout(p.refresh); patients.delete(sid); }
  }
  renderWard();
}

function bandOf(p) { return p.news2 ? p.news2.band : 0; }

function renderWard() {
  const rows = [...patients.entries()].sort((a, b) => bandOf(b[1]) - bandOf(a[1]) || a[1].row.opened_unix_ms - b[1].row.opened_unix_ms);
  const tbody = $("ward-rows");
  if (!rows.length) { tbody.innerHTML = '<tr><td colspan="10" class="muted">No open sessions.</td></tr>'; return; }
  tbody.innerHTML = "";
  for (const [sid, p] of rows) {
    const l = p.latest;
    const newest = Math.max(0, ...Object.values(l).map((x) => x.at));
    const tr = document.createElement("tr");
    tr.className = "row";
    tr.dataset.session = sid;
    const cell = (k, d = 0) => (l[k] ? `<span class="${Date.now() - l[k].at > STALE_S * 1000 ? "stale" : ""}">${fmt(l[k].value, d)}</span>` : "-");
    const n = p.news2;
    tr.innerHTML =
      `<td><strong>${esc(p.row.patient_id)}</strong><br><span class="muted small">${esc(p.row.edge_id)}</span></td>` +
      `<td><span class="news2 band-${bandOf(p)}" title="risk ${BAND_NAMES[bandOf(p)]}">${n ? n.total : "-"}</span></td>` +
      `<td>${cell("heart_rate_bpm")}</td><td>${cell("spo2_percent")}</td><td>${cell("respiration_rate_bpm")}</td>` +
      `<td>${cell("systolic_mmhg")}/${cell("diastolic_mmhg")}</td><td>${cell("temperature_c", 1)}</td>` +
      `<td class="${newest && Date.now() - newest > STALE_S * 1000 ? "stale" : "muted"}">${newest ? age(newest) : "none yet"}</td>` +
      `<td class="alert-cell">${p.alerts.length ? esc(p.alerts[0].message) + ` <span class="muted">${age(p.alerts[0].at)}</span>` : ""}</td>` +
      `<td><button data-open="${esc(sid)}">Open</button></td>`;
    tr.onclick = () => openPatient(sid);
    tbody.appendChild(tr);
  }
}

function esc(s) { return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]); }

async function attach(sid) {
  const r = await fetch(`/console/api/sessions/${encodeURIComponent(sid)}/attach`, { method: "POST" });
  if (r.status === 401) { signIn(); throw new Error("signed out"); }
  const body = await r.json();
  if (!r.ok) throw new Error(body.message);
  return body;
}

// One live view per patient, straight from the session's edge. A new view replaces the old
// one make-before-break: it resumes after the last batch seen (the edge replays what came
// since, so nothing is lost or shown twice), and the old one closes when the new one is in.
// That happens when the session moves to another edge, and before the view's token expires.
async function connectVitals(sid, p, moved, awayFrom, tries = 0) {
  if (p.connecting) return;
  p.connecting = true;
  let a;
  try { a = await attach(sid); } catch (e) { p.connecting = false; return; }
  p.connecting = false;
  if (!patients.has(sid)) return;
  if (awayFrom && a.edge_http === awayFrom) {
    // Told the session is moving, but the core still names this edge: the switch comes
    // within seconds; the old view goes on meanwhile.
    if (tries < 30) setTimeout(() => connectVitals(sid, p, moved, awayFrom, tries + 1), 1000);
    return;
  }
  const movedEdge = p.edgeHttp && p.edgeHttp !== a.edge_http;
  p.edgeHttp = a.edge_http;
  p.token = a.token;
  const old = p.ws;
  const ws = new WebSocket(a.edge_http.replace(/^http/, "ws") + "/media/ws");
  ws.onopen = () => ws.send(JSON.stringify({ session_id: sid, token: a.token, resume_after_seq: p.lastSeq || 0 }));
  ws.onmessage = (m) => {
    const msg = JSON.parse(m.data);
    if (msg.type === "welcome") {
      // The new view is in: the old one can go, and this one is renewed before it expires.
      if (old && old !== ws) { old.onclose = null; old.close(); }
      p.ws = ws;
      state.views = (state.views || 0) + 1;
      clearTimeout(p.refresh);
      const left = (msg.token_expires_unix_ms || a.expires_unix_ms) - Date.now();
      p.refresh = setTimeout(() => connectVitals(sid, p, false), Math.max(1000, (left * 2) / 3));
    }
    if (p.ws === ws || msg.type === "welcome") onVitals(sid, p, msg, ws);
  };
  ws.onclose = (e) => {
    if (p.ws !== ws && p.ws) return;
    p.ws = null;
    // Expired or released (moved): view again at once, resuming; otherwise the next ward
    // refresh re-attaches (and finds a moved session's new edge).
    if (e.code === 4401 || e.code === 4409) connectVitals(sid, p, e.code === 4409);
    if (e.code === 4409 && open === sid) banner("The session moved to another edge; reconnecting…", "info");
  };
  if (!old) p.ws = ws; // the first view: nothing to replace
  if ((moved || movedEdge) && open === sid) {
    banner("The session moved to edge " + a.edge_id + "; reconnecting the call…", "info");
    if (call && call.edgeHttp !== a.edge_http) restartCall();
  }
}

function onVitals(sid, p, msg, ws) {
  const now = Date.now();
  if (msg.type === "batch" && msg.batch.seq) {
    // Views overlap for a moment when one replaces another: each batch is shown once.
    const seq = Number(msg.batch.seq);
    if (seq <= (p.lastSeq || 0)) return;
    // A jump (the new edge does not hold what came before a move, or this view fell behind
    // and the edge dropped some for it): the archive has the rest.
    if (p.lastSeq && seq > p.lastSeq + 1) {
      const offsetMs = now - Number(msg.batch.device_time_unix_ns || 0) / 1e6;
      fillFromArchive(sid, p, p.lastSeq, seq - 1, offsetMs, new Set());
    }
    p.lastSeq = seq;
  }
  if (msg.type === "moving") {
    // Make-before-break: the old edge keeps serving until the new view is in.
    state.moves = (state.moves || 0) + 1;
    if (open === sid) banner("The session is moving to edge " + msg.moving.new_edge_id + "; reconnecting…", "info");
    connectVitals(sid, p, true, p.edgeHttp);
    return;
  }
  if (msg.type === "gap" && msg.gap && msg.gap.first_missing_seq) {
    // This edge does not hold those readings (the archive does): the trend shows a hole.
    p.gaps = (p.gaps || 0) + 1;
  }
  if (msg.type === "batch") {
    for (const v of msg.batch.vitals || []) {
      for (const k of ["heart_rate_bpm", "spo2_percent", "respiration_rate_bpm", "systolic_mmhg", "diastolic_mmhg", "temperature_c"]) {
        if (v[k] !== undefined) p.latest[k] = { value: v[k], at: now };
      }
      push(p.trends.hr, now, v.heart_rate_bpm);
      push(p.trends.spo2, now, v.spo2_percent);
      push(p.trends.rr, now, v.respiration_rate_bpm);
    }
    for (const w of msg.batch.waveforms || []) {
      if (w.kind === "WAVEFORM_KIND_ECG_LEAD_II") {
        p.ecgRate = w.sample_rate_hz || 250;
        for (const s of w.samples || []) p.ecg.push(s);
        const keep = Math.round(p.ecgRate * ECG_SECONDS);
        if (p.ecg.length > keep) p.ecg.splice(0, p.ecg.length - keep);
      }
    }
  } else if (msg.type === "news2") {
    p.news2 = { total: msg.news2.total || 0, band: BANDS[msg.news2.band] || 0, at: now };
  } else if (msg.type === "alert") {
    p.alerts.unshift({ message: msg.alert.message, at: now });
    p.alerts.length = Math.min(p.alerts.length, 20);
  } else if (msg.type === "derived_heart_rate") {
    const d = msg.derived_heart_rate;
    if (d.rppg_heart_rate_bpm) p.rppg = { value: d.rppg_heart_rate_bpm, at: now };
    if (d.ecg_heart_rate_bpm) p.derived = { value: d.ecg_heart_rate_bpm, at: now };
  } else if (msg.type === "call_state" && open === sid) {
    onCallState(msg.state);
  } else if (msg.type === "call_hint" && open === sid) {
    $("q-hint").textContent = msg.hint.message;
  } else if (msg.type === "session_released" && open === sid) {
    banner("Session moved: " + msg.message, "info");
  }
}

// The readings a view missed, from the core's archive, into the trends where they belong
// (device time, shifted onto this browser's clock by the batch that came after the hole).
// Asked again while the archive's watermark is below the hole: failover resends reach it
// within seconds. A seq missing below the watermark was refused at the edge: never shown.
async function fillFromArchive(sid, p, after, through, offsetMs, got, tries = 0) {
  let body = null;
  try {
    const r = await fetch(`/api/v1/sessions/${encodeURIComponent(sid)}/vitals?after_seq=${after}&through_seq=${through}`);
    if (r.status === 401) { signIn(); return; }
    if (r.status === 403 || r.status === 404) return; // not this clinician's, or closed
    if (r.ok) body = await r.json();
  } catch (e) { /* the core is away: ask again */ }
  if (!patients.has(sid) || patients.get(sid) !== p) return;
  let from = after;
  if (body) {
    for (const b of body.batches) {
      const seq = Number(b.seq);
      from = seq;
      if (got.has(seq)) continue;
      got.add(seq);
      state.filled = (state.filled || 0) + 1;
      for (const v of b.vitals || []) {
        const t = Number(v.device_time_unix_ns || b.device_time_unix_ns) / 1e6 + offsetMs;
        insert(p.trends.hr, t, v.heart_rate_bpm);
        insert(p.trends.spo2, t, v.spo2_percent);
        insert(p.trends.rr, t, v.respiration_rate_bpm);
      }
    }
    if (body.truncated) return fillFromArchive(sid, p, from, through, offsetMs, got, tries);
    if (Number(body.archived_seq) >= through) return;
  }
  // Not all archived yet: the whole hole again (the archive may fill it out of order).
  if (tries < 20) setTimeout(() => fillFromArchive(sid, p, after, through, offsetMs, got, tries + 1), 1000);
  else state.unfilled = (state.unfilled || 0) + through - after - got.size;
}

function insert(arr, t, v) {
  if (v === undefined || v === null || !arr.length || t < arr[0][0]) return; // outside the trend
  let i = arr.length;
  while (i > 0 && arr[i - 1][0] > t) i--;
  arr.splice(i, 0, [t, v]);
}

function push(arr, t, v) {
  if (v === undefined || v === null) return;
  arr.push([t, v]);
  while (arr.length && arr[0][0] < t - TREND_S * 1000) arr.shift();
}

// ---------------------------------------------------------------- patient view

function openPatient(sid) {
  open = sid;
  const p = patients.get(sid);
  $("ward").hidden = true;
  $("patient").hidden = false;
  $("p-title").textContent = p ? p.row.patient_id : sid;
  $("p-banner").hidden = true;
  $("invite-link").textContent = "";
  history.replaceState(null, "", "#patient=" + encodeURIComponent(sid));
}

function closePatient() {
  hangup();
  open = null;
  $("patient").hidden = true;
  $("ward").hidden = false;
  history.replaceState(null, "", "#");
}

function banner(text, kind) {
  const b = $("p-banner");
  if (!text) { b.hidden = true; return; }
  b.hidden = false;
  b.className = "banner " + kind;
  b.textContent = text;
}

const MODE_LABELS = { CALL_MODE_FULL: "Full video", CALL_MODE_REDUCED: "Reduced video", CALL_MODE_AUDIO_ONLY: "Audio only" };

function onCallState(s) {
  state.mode = s.mode;
  state.callState = s;
  // The patient's side as the edge sees it: frames per second arriving, or why nothing does.
  const fps = s.patient_fps || 0;
  $("q-patient").textContent = s.patient_connected ? fmt(fps) + " fps" : "not connected";
  const m = $("p-mode");
  // The edge says so when the patient's media stopped (before ICE gives up, ~30 s later):
  // such a call is never shown as "Full video".
  const stopped = !s.patient_connected && (s.reason || "").startsWith("no video");
  const label = stopped ? "No video from patient" : !s.patient_connected ? "Waiting for patient" : MODE_LABELS[s.mode] || "";
  m.textContent = call ? label : "";
  m.className = "mode" + (!s.patient_connected || (s.mode && s.mode !== "CALL_MODE_FULL") ? " degraded" : "");
  state.modeLabel = m.textContent;
  if (!call) return;
  if (stopped) banner("The patient's video and sound stopped arriving: their connection may have dropped", "bad");
  else if (!s.patient_connected) banner("Waiting for the patient to join the call", "info");
  else if (s.mode === "CALL_MODE_AUDIO_ONLY") banner("Link degraded: audio only with vitals (" + s.reason + ")", "bad");
  else if (s.mode === "CALL_MODE_REDUCED") banner("Link degraded: reduced video (" + s.reason + ")", "bad");
  else banner("", "");
}

function renderPatient() {
  if (!open) return;
  const p = patients.get(open);
  if (!p) return;
  const n = p.news2;
  const badge = $("p-news2");
  badge.className = "news2 band-" + bandOf(p);
  badge.textContent = n ? "NEWS2 " + n.total + " · " + BAND_NAMES[bandOf(p)] : "NEWS2 -";
  const l = p.latest;
  const box = (label, val, at, unit) => {
    const stale = at && Date.now() - at > STALE_S * 1000;
    return `<div><dt>${label}</dt><dd class="${stale ? "stale" : ""}">${val} <span class="age">${unit}</span><br><span class="age">${at ? age(at) : "no reading"}</span></dd></div>`;
  };
  const g = (k, d = 0) => (l[k] ? fmt(l[k].value, d) : "-");
  const at = (k) => (l[k] ? l[k].at : 0);
  $("p-values").innerHTML =
    box("Pulse (device)", g("heart_rate_bpm"), at("heart_rate_bpm"), "bpm") +
    box("Pulse (ECG)", p.derived ? fmt(p.derived.value) : "-", p.derived && p.derived.at, "bpm") +
    box("Pulse (video)", p.rppg ? fmt(p.rppg.value) : "-", p.rppg && p.rppg.at, "bpm") +
    box("SpO₂", g("spo2_percent"), at("spo2_percent"), "%") +
    box("Resp. rate", g("respiration_rate_bpm"), at("respiration_rate_bpm"), "/min") +
    box("Blood pressure", g("systolic_mmhg") + "/" + g("diastolic_mmhg"), at("systolic_mmhg"), "mmHg") +
    box("Temperature", g("temperature_c", 1), at("temperature_c"), "°C");
  $("p-alerts").innerHTML = p.alerts.map((a) => `<li>${esc(a.message)} <span class="muted">${age(a.at)}</span></li>`).join("") || '<li class="muted" style="border:0">No alerts</li>';
  drawTrend($("trend-hr"), p.trends.hr, "Pulse bpm", "#c0392b", 30, 180);
  drawTrend($("trend-spo2"), p.trends.spo2, "SpO₂ %", "#2471a3", 80, 100);
  drawTrend($("trend-rr"), p.trends.rr, "Resp /min", "#117a65", 0, 40);
}

function drawTrend(c, data, label, colour, lo, hi) {
  const g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  g.fillStyle = "#7f8c8d";
  g.font = "12px system-ui";
  g.fillText(label + (data.length ? " " + fmt(data[data.length - 1][1]) : ""), 6, 14);
  if (data.length < 2) return;
  const now = Date.now();
  g.strokeStyle = colour;
  g.lineWidth = 2;
  g.beginPath();
  data.forEach(([t, v], i) => {
    const x = c.width - ((now - t) / (TREND_S * 1000)) * c.width;
    const y = c.height - 4 - ((Math.min(hi, Math.max(lo, v)) - lo) / (hi - lo)) * (c.height - 22);
    i ? g.lineTo(x, y) : g.moveTo(x, y);
  });
  g.stroke();
}

function drawEcg() {
  requestAnimationFrame(drawEcg);
  if (!open) return;
  const p = patients.get(open);
  const c = $("ecg");
  const g = c.getContext("2d");
  g.fillStyle = "#0b1a10";
  g.fillRect(0, 0, c.width, c.height);
  g.strokeStyle = "#17381f";
  for (let x = 0; x < c.width; x += c.width / (ECG_SECONDS * 5)) { g.beginPath(); g.moveTo(x, 0); g.lineTo(x, c.height); g.stroke(); }
  if (!p || p.ecg.length < 2) return;
  const n = Math.round(p.ecgRate * ECG_SECONDS);
  const samples = p.ecg.slice(-n);
  g.strokeStyle = "#2ecc71";
  g.lineWidth = 1.5;
  g.beginPath();
  const off = n - samples.length; // newest sample at the right edge: the trace scrolls left
  samples.forEach((s, i) => {
    const x = ((off + i) / n) * c.width;
    const y = c.height / 2 - s * (c.height / 3);
    i ? g.lineTo(x, y) : g.moveTo(x, y);
  });
  g.stroke();
}

// ---------------------------------------------------------------- the call

function gathered(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    pc.addEventListener("icegatheringstatechange", () => { if (pc.iceGatheringState === "complete") resolve(); });
    setTimeout(resolve, timeoutMs);
  });
}

// STUN/TURN servers from the session's edge (TURN with short-lived credentials); none when
// the edge is reachable directly, or when asking fails (a direct call may still work).
async function iceServers(a) {
  try {
    const r = await fetch(`${a.edge_http}/media/sessions/${encodeURIComponent(a.session_id)}/ice-servers`, {
      method: "POST", headers: { "Content-Type": "application/json", Authorization: "Bearer " + a.token }, body: "{}",
    });
    if (!r.ok) return [];
    const body = await r.json();
    state.iceServers = body.ice_servers;
    return body.ice_servers;
  } catch (e) { return []; }
}

async function startCall() {
  const sid = open;
  const p = patients.get(sid);
  if (!p) return;
  $("call").disabled = true;
  try {
    const a = await attach(sid);
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true, video: { width: 640, height: 480 } });
    $("local-video").srcObject = stream;
    const pc = new RTCPeerConnection({ iceServers: await iceServers(a) });
    for (const t of stream.getTracks()) pc.addTrack(t, stream);
    const remote = new MediaStream();
    $("remote-video").srcObject = remote;
    pc.ontrack = (e) => remote.addTrack(e.track);
    pc.onconnectionstatechange = () => {
      state.connection = pc.connectionState;
      state.connected = pc.connectionState === "connected";
      if (pc.connectionState === "failed") banner("The call dropped; press Start video call to reconnect", "bad");
    };
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc, 3000);
    const r = await fetch(`${a.edge_http}/media/sessions/${encodeURIComponent(sid)}/offer`, {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: "Bearer " + a.token },
      body: JSON.stringify({ sdp: pc.localDescription.sdp, role: "viewer" }),
    });
    const body = await r.json();
    if (!r.ok) throw new Error(body.message);
    await pc.setRemoteDescription({ type: "answer", sdp: body.sdp });
    call = { pc, stream, sid, edgeHttp: a.edge_http, token: a.token, callId: body.call_id, last: null };
    state.callId = body.call_id;
    if (state.callState) onCallState(state.callState); // the mode label at once, not at the next change
    for (const id of ["mute", "camera", "hangup"]) $(id).disabled = false;
  } catch (e) {
    state.errors.push(String(e.message || e));
    banner("Could not start the call: " + (e.message || e), "bad");
    $("call").disabled = false;
  }
}

function hangup() {
  if (!call) return;
  const c = call;
  call = null;
  fetch(`${c.edgeHttp}/media/sessions/${encodeURIComponent(c.sid)}/calls/${c.callId}/hangup`, {
    method: "POST", headers: { "Content-Type": "application/json", Authorization: "Bearer " + c.token }, body: "{}",
  }).catch(() => {});
  c.pc.close();
  c.stream.getTracks().forEach((t) => t.stop());
  state.connected = false;
  $("call").disabled = false;
  for (const id of ["mute", "camera", "hangup"]) $(id).disabled = true;
  $("p-mode").textContent = "";
}

async function restartCall() { hangup(); await startCall(); }

function toggle(kind, button, onText, offText) {
  if (!call) return;
  const t = call.stream.getTracks().find((x) => x.kind === kind);
  if (!t) return;
  t.enabled = !t.enabled;
  button.setAttribute("aria-pressed", String(!t.enabled));
  button.textContent = t.enabled ? onText : offText;
}

// Call quality from the browser's own WebRTC statistics, once a second.
async function sampleStats() {
  if (!call) return;
  const report = await call.pc.getStats();
  let rtt = null, fps = null, bytes = 0, lost = 0, recv = 0, w = 0, h = 0;
  report.forEach((s) => {
    if (s.type === "candidate-pair" && s.nominated && s.currentRoundTripTime !== undefined) rtt = s.currentRoundTripTime;
    if (s.type === "inbound-rtp" && s.kind === "video") {
      fps = s.framesPerSecond ?? fps;
      bytes += s.bytesReceived || 0;
      lost += s.packetsLost || 0;
      recv += s.packetsReceived || 0;
      w = s.frameWidth || w;
      h = s.frameHeight || h;
    }
  });
  const now = performance.now();
  const last = call.last;
  call.last = { now, bytes, lost, recv };
  $("q-rtt").textContent = rtt === null ? "-" : Math.round(rtt * 1000) + " ms";
  $("q-fps").textContent = fps === null ? "-" : fmt(fps);
  $("q-res").textContent = w ? w + "×" + h : "-";
  if (last) {
    const kbps = ((bytes - last.bytes) * 8) / (now - last.now);
    const dl = lost - last.lost, dr = recv - last.recv;
    $("q-bitrate").textContent = fmt(kbps) + " kbit/s";
    $("q-loss").textContent = dl + dr > 0 ? fmt((100 * dl) / (dl + dr), 1) + " %" : "0 %";
  }
  state.stats = { rtt, fps, width: w, height: h };
}

async function invite() {
  const r = await fetch(`/console/api/sessions/${encodeURIComponent(open)}/invite`, { method: "POST" });
  if (r.status === 401) { signIn(); return; }
  const body = await r.json();
  if (!r.ok) { banner(body.message, "bad"); return; }
  state.inviteLink = body.link;
  $("invite-link").textContent = body.link;
  try { await navigator.clipboard.writeText(body.link); } catch (e) { /* shown on the page instead */ }
}

$("back").onclick = closePatient;
$("sign-out").onclick = signOut;
$("call").onclick = startCall;
$("hangup").onclick = hangup;
$("invite").onclick = invite;
$("mute").onclick = (e) => toggle("audio", e.currentTarget, "Mute", "Unmute");
$("camera").onclick = (e) => toggle("video", e.currentTarget, "Camera off", "Camera on");

setInterval(loadWard, 2000);
setInterval(() => { renderWard(); renderPatient(); }, 1000);
setInterval(sampleStats, 1000);
requestAnimationFrame(drawEcg);
loadWard().then(() => {
  const m = location.hash.match(/^#patient=(.+)$/);
  if (m) openPatient(decodeURIComponent(m[1]));
});
