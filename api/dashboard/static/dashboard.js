// The dashboard shell: loads the server-rendered fragment of the page it is on, keeps live regions
// fresh by short polling, appends job events on the API's after_id cursor, and cancels jobs.
// No build step, no dependencies. Server data reaches the page only as fragments the server rendered
// with autoescaping, or through textContent: never as markup assembled here.
"use strict";

const TOKEN_KEY = "newslora.token";
const timers = new Set();

class AuthNeeded extends Error {}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

async function api(url, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  const t = token();
  if (t) headers.Authorization = "Bearer " + t;
  const r = await fetch(url, Object.assign({}, options, { headers, cache: "no-store" }));
  if (r.status === 401) {
    showTokenForm(t ? "that token was refused" : "");
    throw new AuthNeeded();
  }
  return r;
}

async function detail(r) {
  try {
    const body = await r.json();
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (e) {
    return r.statusText;
  }
}

function flash(message, kind) {
  const el = document.getElementById("flash");
  el.textContent = message;
  el.className = "flash " + (kind || "info");
  el.hidden = !message;
}

// ------------------------------------------------------------------ the token (beyond loopback)

function showTokenForm(error) {
  const form = document.getElementById("token-form");
  form.hidden = false;
  document.getElementById("token-error").textContent = error || "";
  form.querySelector("input").focus();
}

function renderAuthState() {
  const el = document.getElementById("auth-state");
  el.replaceChildren();
  if (!token()) return;
  el.append("token set · ");
  const forget = document.createElement("button");
  forget.type = "button";
  forget.className = "link";
  forget.textContent = "forget";
  forget.addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); location.reload(); });
  el.append(forget);
}

// ------------------------------------------------------------------ pages

function fragmentUrl() {
  let page = location.pathname.replace(/^\/dashboard\/?/, "").replace(/\/$/, "");
  if (!page) page = "jobs";
  return "/dashboard/fragments/" + page + location.search;
}

function stopTimers() {
  for (const t of timers) clearTimeout(t);
  timers.clear();
}

async function loadPage() {
  stopTimers();
  const main = document.getElementById("main");
  const section = (location.pathname.split("/")[2] || "jobs");
  for (const a of document.querySelectorAll("nav a[data-nav]")) {
    a.classList.toggle("active", a.dataset.nav === section);
  }
  let r;
  try {
    r = await api(fragmentUrl());
  } catch (e) {
    if (!(e instanceof AuthNeeded)) main.textContent = "The API did not answer: " + e.message;
    else main.replaceChildren();
    return;
  }
  if (!r.ok) {
    const p = document.createElement("p");
    p.className = "error-box";
    p.textContent = r.status + ": " + (await detail(r));
    main.replaceChildren(p);
    return;
  }
  main.innerHTML = await r.text();  // rendered by the server with autoescaping
  const h1 = main.querySelector("h1");
  if (h1) document.title = h1.textContent + " · newslora";
  for (const el of main.querySelectorAll("[data-live-url]")) poll(el);
  for (const el of main.querySelectorAll("[data-events-url]")) followEvents(el);
}

function poll(el) {
  const every = Number(el.dataset.liveMs || 1000);
  const tick = async () => {
    if (!document.hidden) {
      try {
        const r = await api(el.dataset.liveUrl);
        if (r.ok) el.innerHTML = await r.text();
      } catch (e) {
        if (e instanceof AuthNeeded) return;  // stop; the token form is up
      }
    }
    timers.add(setTimeout(tick, every));
  };
  timers.add(setTimeout(tick, every));
}

// Events arrive in id order; after_id is the cursor of the last one shown.
function followEvents(table) {
  const body = table.querySelector("tbody");
  let after = 0;
  const tick = async () => {
    try {
      for (;;) {
        const r = await api(table.dataset.eventsUrl + "?limit=500&after_id=" + after);
        if (!r.ok) break;
        const events = await r.json();
        for (const e of events) {
          const tr = document.createElement("tr");
          tr.className = "level-" + e.level;
          const metrics = e.metrics ? JSON.stringify(e.metrics) : "";
          for (const text of [e.time.replace("T", " ").slice(0, 19), e.level, e.message, metrics]) {
            const td = document.createElement("td");
            td.textContent = text;
            tr.append(td);
          }
          body.prepend(tr);  // newest first
          after = e.id;
        }
        if (events.length < 500) break;
      }
    } catch (e) {
      if (e instanceof AuthNeeded) return;
    }
    timers.add(setTimeout(tick, 1000));
  };
  tick();
}

async function refreshLive() {
  for (const el of document.querySelectorAll("[data-live-url]")) {
    try {
      const r = await api(el.dataset.liveUrl);
      if (r.ok) el.innerHTML = await r.text();
    } catch (e) { /* the next poll tries again */ }
  }
}

async function cancelJob(button) {
  const id = button.dataset.cancel;
  button.disabled = true;
  try {
    const r = await api("/jobs/" + encodeURIComponent(id) + "/cancel", { method: "POST" });
    if (r.ok) {
      const job = await r.json();
      flash("job #" + job.id + (job.status === "cancelled" ? " cancelled" : ": cancel requested"), "info");
    } else {
      flash("cancel of job #" + id + " refused: " + (await detail(r)), "error");
    }
  } catch (e) {
    if (!(e instanceof AuthNeeded)) flash("cancel failed: " + e.message, "error");
    button.disabled = false;
    return;
  }
  await refreshLive();
}

// A link to an API document (a report): with a token, fetch it with the header and open the bytes.
async function openAuthLink(a) {
  const r = await api(a.getAttribute("href"));
  if (!r.ok) { flash(await detail(r), "error"); return; }
  const url = URL.createObjectURL(await r.blob());
  if (a.dataset.download) {
    const tmp = document.createElement("a");
    tmp.href = url;
    tmp.download = a.dataset.download;
    tmp.click();
  } else {
    window.open(url, "_blank", "noopener");
  }
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

// ------------------------------------------------------------------ wiring (delegated: fragments come and go)

document.addEventListener("click", (ev) => {
  const cancel = ev.target.closest("button[data-cancel]");
  if (cancel) { ev.preventDefault(); cancelJob(cancel); return; }
  const link = ev.target.closest("a[data-auth-href]");
  if (link && token()) { ev.preventDefault(); openAuthLink(link).catch(() => {}); }
});

document.addEventListener("change", (ev) => {
  const el = ev.target.closest("[data-autosubmit]");
  if (el && el.form) el.form.requestSubmit();
});

// Filter forms: drop empty fields so the address stays readable.
document.addEventListener("submit", (ev) => {
  const form = ev.target;
  if (form.id === "token-form") {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, form.elements.token.value.trim());
    form.reset();
    form.hidden = true;
    renderAuthState();
    loadPage();
    return;
  }
  if (form.closest("#main") && (form.method || "get").toLowerCase() === "get") {
    ev.preventDefault();
    const params = new URLSearchParams();
    for (const [k, v] of new FormData(form)) if (String(v).trim() !== "") params.append(k, v);
    const qs = params.toString();
    location.assign(form.getAttribute("action") + (qs ? "?" + qs : ""));
  }
});

document.addEventListener("DOMContentLoaded", () => {
  renderAuthState();
  loadPage();
});
