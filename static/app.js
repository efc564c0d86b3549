// A minimal live view for the demo: one EventSource per well, resuming by its own when closed.
"use strict";

const token = new URLSearchParams(location.hash.slice(1)).get("token");
const statusEl = document.getElementById("status");
const wellsEl = document.getElementById("wells");
const streams = new Map();

function claims(jwt) {
  const part = jwt.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
  return JSON.parse(atob(part));
}

function setStatus() {
  const states = [...streams.values()].map((s) => s.source && s.source.readyState);
  statusEl.textContent = states.length && states.every((s) => s === EventSource.OPEN) ? "Live" : "Reconnecting…";
}

function tile(well) {
  const section = document.createElement("section");
  section.innerHTML = `<h2></h2><dl></dl>`;
  section.querySelector("h2").textContent = well;
  wellsEl.append(section);
  return section.querySelector("dl");
}

function show(list, reading) {
  let row = list.querySelector(`[data-tag="${reading.tagName}"]`);
  if (!row) {
    row = document.createElement("div");
    row.dataset.tag = reading.tagName;
    row.style.display = "contents";
    row.innerHTML = "<dt></dt><dd class=v></dd><dd class=q></dd>";
    row.querySelector("dt").textContent = reading.tagName;
    list.append(row);
  }
  const value = reading.value === null ? "—" : `${reading.value} ${reading.unit || ""}`;
  row.querySelector(".v").textContent = value;
  const q = row.querySelector(".q");
  q.textContent = reading.quality;
  q.className = `q ${reading.quality}`;
}

async function ticket(tenant, well) {
  // A single-use ticket keeps the long-lived token out of URLs and access logs.
  const response = await fetch(`/tenants/${tenant}/stream-tickets`, {
    method: "POST",
    headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
    body: JSON.stringify({ wells: [well] }),
  });
  if (!response.ok) throw new Error(`ticket: ${response.status}`);
  return (await response.json()).ticket;
}

function retry(tenant, well, state) {
  setTimeout(() => open(tenant, well), state.backoff);
  state.backoff = Math.min(state.backoff * 2, 30000);
}

async function open(tenant, well) {
  const state = streams.get(well) || { list: tile(well), lastId: null, backoff: 1000 };
  streams.set(well, state);
  let params;
  try {
    params = new URLSearchParams({ ticket: await ticket(tenant, well) });
  } catch (error) {
    setStatus();
    retry(tenant, well, state);
    return;
  }
  if (state.lastId) params.set("lastEventId", state.lastId);
  const source = new EventSource(`/tenants/${tenant}/wells/${well}/stream?${params}`);
  state.source = source;
  source.addEventListener("open", () => { state.backoff = 1000; setStatus(); });
  source.addEventListener("snapshot", (e) => {
    setStatus();
    state.lastId = e.lastEventId;
    JSON.parse(e.data).readings.forEach((r) => show(state.list, r));
  });
  source.addEventListener("reading", (e) => { state.lastId = e.lastEventId; show(state.list, JSON.parse(e.data)); });
  source.addEventListener("auth-expired", () => { source.close(); retry(tenant, well, state); });
  source.addEventListener("error", () => {
    // A ticket is single use, so every reconnect is ours: a fresh ticket and the last id seen.
    source.close();
    setStatus();
    retry(tenant, well, state);
  });
}

async function main() {
  if (!token) { document.getElementById("hint").hidden = false; statusEl.textContent = "No token"; return; }
  const tenant = claims(token).tenant_id;
  document.getElementById("tenant").textContent = tenant;
  const response = await fetch(`/tenants/${tenant}/wells`, { headers: { Authorization: `Bearer ${token}` } });
  if (!response.ok) { statusEl.textContent = `Error ${response.status}`; return; }
  const { wells } = await response.json();
  wells.forEach((well) => open(tenant, well));
}

main();
