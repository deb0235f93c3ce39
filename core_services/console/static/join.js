// The invite link lands here, on the core, which knows where the session lives right now:
// swap the link's token for a fresh one for that edge and go on to its patient page. The
// patient page comes back here by itself when the session moves to another edge.
"use strict";

const params = new URLSearchParams(location.hash.slice(1));
const status = document.getElementById("status");
window.telehealth = { errors: [] };

async function go() {
  const session_id = params.get("session") || "";
  const token = params.get("token") || "";
  if (!session_id || !token) {
    status.textContent = "This page needs the invite link your clinic sent you.";
    return;
  }
  let r, body;
  try {
    r = await fetch("/api/v1/join", { method: "POST", headers: { "Content-Type": "text/plain" }, body: JSON.stringify({ session_id, token }) });
    body = await r.json();
  } catch (e) {
    status.textContent = "We cannot reach your clinic right now. Please try again in a minute.";
    setTimeout(go, 5000);
    return;
  }
  if (!r.ok) {
    window.telehealth.errors.push(body.message);
    status.textContent = r.status === 401 || r.status === 403
      ? "This invite link has expired or is not valid any more. Please ask your clinic for a new one."
      : r.status === 503 ? "Your appointment is being moved. Trying again…" : "We could not open your appointment: " + body.message;
    if (r.status === 503) setTimeout(go, 2000);
    return;
  }
  // Leaving an edge the session is moving away from: until the core places it on the new
  // edge it still names the old one; wait for the switch (a few seconds at most).
  const away = params.get("away") || "";
  if (away && new URL(body.edge_http).origin === away && tries < 30) {
    tries += 1;
    status.textContent = "Your appointment is moving to another server. One moment…";
    setTimeout(go, 1000);
    return;
  }
  // Keep the page's own wishes (join the call straight away after a move).
  const extra = params.get("autojoin") === "1" ? "&autojoin=1" : "";
  location.replace(body.link + extra);
}

let tries = 0;

go();
