// Sign-in page: posts the user name and password to the core, which sets an HttpOnly session
// cookie (this page never keeps the token), then goes back to the page that sent us here.
"use strict";

const $ = (id) => document.getElementById(id);

function nextPage() {
  const n = new URLSearchParams(location.search).get("next") || "";
  // Only a path on this site: never an open redirect to another one.
  return n.startsWith("/") && !n.startsWith("//") && !n.startsWith("/\\") ? n : "/console";
}

function say(text) {
  const m = $("message");
  m.textContent = text;
  m.hidden = !text;
}

$("login").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const user = $("user").value.trim();
  const password = $("password").value;
  if (!user || !password) { say("Please enter your user name and password."); return; }
  $("sign-in").disabled = true;
  say("");
  try {
    const r = await fetch("/api/v1/login", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ user, password }),
    });
    if (r.ok) { location.assign(nextPage()); return; }
    const body = await r.json().catch(() => ({}));
    if (r.status === 401) say("That user name and password do not match. Please try again.");
    else if (r.status === 429) say("Too many attempts. " + (body.message || "Please wait and try again."));
    else say(body.message || "Sign-in failed (" + r.status + "). Please try again.");
    $("password").value = "";
    $("password").focus();
  } catch (e) {
    say("Cannot reach the server. Check the network and try again.");
  } finally {
    $("sign-in").disabled = false;
  }
});
