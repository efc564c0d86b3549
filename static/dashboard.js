// The wellstream operator dashboard: a tile per well, one EventSource per well, DOM writes batched per frame.
// No build step: this file is served as is by the gateway's static mount.
"use strict";

// Reconnects of our own (after an EventSource closed for good): exponential backoff with jitter,
// so a hundred wells coming back after a gateway restart do not arrive as one storm.
const BACKOFF_FIRST_MS = 500;
const BACKOFF_MAX_MS = 30000;
// The first reconnect after a live stream ended is spread over this window, like the server's
// jittered retry hint on shutdown: every dashboard on the wall comes back, but not at once.
const RECONNECT_SPREAD_MS = 2500;
// The whole page says Offline when no well has been live for this long (or the browser is offline).
const OFFLINE_AFTER_MS = 15000;
// STALE: the API gives no expected interval per tag, so it is learnt from the tag's own cadence
// (source timestamps): stale when the age exceeds STALE_FACTOR x the median of the last
// CADENCE_SAMPLES intervals, never less than STALE_FLOOR_MS; until two intervals are seen, STALE_DEFAULT_MS.
const STALE_FACTOR = 3;
const STALE_FLOOR_MS = 5000;
const STALE_DEFAULT_MS = 60000;
const CADENCE_SAMPLES = 15;
const SPARK_WINDOW_MS = 5 * 60 * 1000;
const SPARK_WIDTH = 480; // canvas pixels; CSS scales it to the tile, so drawing never reads layout
const SPARK_HEIGHT = 44;
// What the page exposes for tests and troubleshooting is bounded: it runs all day on a wall.
const RECEIVED_KEEP = 50000;
const TRANSITIONS_KEEP = 1000;
const TENANT_KEY = "wellstream.tenant";
const WELLS_REFRESH_MS = 60000;
const QUALITY_RANK = { GOOD: 0, UNCERTAIN: 1, STALE: 2, BAD: 3 };

const el = {
  tenant: document.getElementById("tenant"),
  summary: document.getElementById("summary"),
  indicator: document.getElementById("indicator"),
  notice: document.getElementById("notice"),
  signIn: document.getElementById("sign-in"),
  signInReason: document.getElementById("sign-in-reason"),
  signInToken: document.getElementById("sign-in-token"),
  signOut: document.getElementById("sign-out"),
  wells: document.getElementById("wells"),
};

// mode "cookie": the HttpOnly session cookie authenticates everything; the EventSource reconnects
// by itself with Last-Event-ID after a clean end. mode "ticket": a Bearer token held in memory buys
// a single-use ticket for every (re)connect, so every reconnect is ours.
const auth = { mode: "cookie", bearer: null, tenant: null, signedOut: false };
const wells = new Map();
let wellsRefused = null; // while the list of wells does not load: its HTTP status (0: no answer)
const dirtyTags = new Set();
const dirtyWells = new Set();
let frame = 0;

// Read by the browser tests and handy in the console; every list is bounded.
const debug = {
  received: [], // {well, event, id} for every snapshot, reading and reset, in arrival order
  indicator: [], // {state, at} on every change of the page's connection indicator
  ownReconnects: 0, // EventSources re-created by the page (closed for good, ticket mode, auth-expired)
  flushes: 0,
  flushMs: [], // how long the last flushes took (bounded), to check for jank
  get mode() { return auth.mode; },
  get protocol() { return navigationProtocol(); },
};
window.wellstream = debug;
debug.indicator.push({ state: el.indicator.dataset.state, at: Date.now() });

function trim(list, keep) {
  // In chunks: one splice per keep/4 pushes, not a shift of the whole list on every event.
  if (list.length > keep * 1.25) list.splice(0, list.length - keep);
}

function claims(jwt) {
  const part = jwt.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
  return JSON.parse(atob(part));
}

function navigationProtocol() {
  const [entry] = performance.getEntriesByType("navigation");
  return entry ? entry.nextHopProtocol : "";
}

function authHeaders(extra = {}) {
  return auth.bearer ? { ...extra, Authorization: `Bearer ${auth.bearer}` } : extra;
}

function tenantPath(suffix) {
  return `/tenants/${encodeURIComponent(auth.tenant)}${suffix}`;
}

// ---- stream ids: "<ms>-<seq>", compared numerically ----

function parseId(id) {
  const [ms, seq] = String(id).split("-");
  return [Number(ms), Number(seq || 0)];
}

function compareIds(a, b) {
  const [am, as] = parseId(a);
  const [bm, bs] = parseId(b);
  return am === bm ? as - bs : am - bm;
}

// ---- model ----

function newWell(name) {
  const well = {
    name, tags: new Map(), lastId: null, source: null, timer: null, backoff: BACKOFF_FIRST_MS,
    conn: "connecting", failingSince: null, opened: 0, state: "", connecting: false,
  };
  well.el = buildTile(name);
  return well;
}

function tagOf(well, name) {
  let tag = well.tags.get(name);
  if (!tag) {
    tag = { well, name, value: null, unit: "", quality: "", ts: NaN, points: [], intervals: [], row: null,
            stale: null, sparkDirty: true };
    well.tags.set(name, tag);
  }
  return tag;
}

// `seed` readings (from GET /latest, before the stream's replay) give every tag a value and an
// age at once, but no sparkline point: the replay that follows brings the points in order.
function apply(well, reading, seed = false) {
  if (!reading || typeof reading.tagName !== "string") return;
  const tag = tagOf(well, reading.tagName);
  tag.value = typeof reading.value === "number" ? reading.value : null;
  tag.unit = reading.unit || "";
  tag.quality = QUALITY_RANK[reading.quality] !== undefined ? reading.quality : "BAD";
  const ts = Date.parse(reading.timestamp);
  if (Number.isFinite(ts)) {
    if (!(ts <= tag.ts)) tag.ts = ts;
    const last = tag.points[tag.points.length - 1];
    if (!seed && (!last || ts > last[0])) {
      if (last) {
        tag.intervals.push(ts - last[0]);
        if (tag.intervals.length > CADENCE_SAMPLES) tag.intervals.shift();
      }
      tag.points.push([ts, tag.value]);
      tag.sparkDirty = true;
    }
  }
  dirtyTags.add(tag);
  schedule();
}

function median(numbers) {
  const sorted = [...numbers].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

function staleAfterMs(tag) {
  if (tag.intervals.length < 2) return STALE_DEFAULT_MS;
  return Math.max(STALE_FACTOR * median(tag.intervals), STALE_FLOOR_MS);
}

// ---- rendering: everything the DOM sees goes through one flush per animation frame ----

function schedule() {
  if (!frame) frame = requestAnimationFrame(flush);
}

function flush() {
  frame = 0;
  debug.flushes += 1;
  const began = performance.now();
  const now = Date.now();
  for (const tag of dirtyTags) renderTag(tag, now);
  dirtyTags.clear();
  for (const well of dirtyWells) renderWell(well);
  dirtyWells.clear();
  renderIndicator(now);
  debug.flushMs.push(performance.now() - began);
  trim(debug.flushMs, TRANSITIONS_KEEP);
}

function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

function setData(node, key, value) {
  if (node.dataset[key] !== value) node.dataset[key] = value;
}

const numberFormat = new Intl.NumberFormat(undefined, { maximumSignificantDigits: 5 });
const smallFormat = new Intl.NumberFormat(undefined, { maximumFractionDigits: 2 });

function formatValue(value) {
  if (value === null) return "\u2014";
  return Math.abs(value) >= 1000 ? smallFormat.format(value) : numberFormat.format(value);
}

function formatAge(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  return `${Math.floor(s / 3600)} h`;
}

function buildTile(name) {
  const tile = document.createElement("article");
  tile.className = "well";
  tile.tabIndex = 0;
  tile.dataset.well = name;
  tile.dataset.conn = "connecting";
  tile.innerHTML = '<header><h2></h2><span class="conn"></span><span class="state badge"></span></header>' +
    '<ul class="tags"></ul>';
  const title = tile.querySelector("h2");
  title.textContent = name;
  title.id = `well-${name}`;
  tile.querySelector(".state").id = `well-${name}-state`;
  tile.querySelector(".conn").id = `well-${name}-conn`;
  // Focusing a tile reads its name, its worst state and whether it is streaming.
  tile.setAttribute("aria-labelledby", title.id);
  tile.setAttribute("aria-describedby", `well-${name}-state well-${name}-conn`);
  el.wells.append(tile);
  return tile;
}

function buildRow(tag) {
  const row = document.createElement("li");
  row.className = "tag";
  row.dataset.tag = tag.name;
  row.innerHTML = '<span class="name"></span><span class="value"><span class="number"></span><span class="unit">' +
    '</span></span><span class="quality badge"></span><canvas class="spark" aria-hidden="true"></canvas>' +
    '<span class="age"><span class="ago"></span><span class="stale badge STALE" hidden>STALE</span></span>';
  row.querySelector(".name").textContent = tag.name;
  row.querySelector(".name").title = tag.name;
  const canvas = row.querySelector("canvas");
  canvas.width = SPARK_WIDTH;
  canvas.height = SPARK_HEIGHT;
  tag.parts = {
    number: row.querySelector(".number"), unit: row.querySelector(".unit"), quality: row.querySelector(".quality"),
    ago: row.querySelector(".ago"), stale: row.querySelector(".stale"), canvas,
  };
  // Rows stay in tag-name order, whatever order the tags first arrive in.
  const list = tag.well.el.querySelector(".tags");
  const next = [...list.children].find((other) => other.dataset.tag > tag.name);
  list.insertBefore(row, next || null);
  tag.row = row;
}

function renderTag(tag, now) {
  if (!tag.row) buildRow(tag);
  const { parts } = tag;
  setText(parts.number, formatValue(tag.value));
  setText(parts.unit, tag.unit);
  setText(parts.quality, tag.quality);
  parts.quality.className = `quality badge ${tag.quality}`;
  setData(tag.row, "quality", tag.quality);
  const age = now - tag.ts;
  setText(parts.ago, Number.isFinite(age) ? formatAge(age) : "");
  const stale = Number.isFinite(age) && age > staleAfterMs(tag);
  if (stale !== tag.stale) {
    tag.stale = stale;
    parts.stale.hidden = !stale;
    setData(tag.row, "stale", String(stale));
  }
  if (tag.sparkDirty) drawSpark(tag, now);
  dirtyWells.add(tag.well);
}

function drawSpark(tag, now) {
  tag.sparkDirty = false;
  const start = now - SPARK_WINDOW_MS;
  let drop = 0;
  while (drop < tag.points.length - 1 && tag.points[drop][0] < start) drop += 1;
  if (drop) tag.points.splice(0, drop);
  const ctx = tag.parts.canvas.getContext("2d");
  ctx.clearRect(0, 0, SPARK_WIDTH, SPARK_HEIGHT);
  const values = tag.points.map((p) => p[1]).filter((v) => v !== null);
  if (!values.length) return;
  let low = Math.min(...values);
  let high = Math.max(...values);
  if (high - low < 1e-9) { high += 1; low -= 1; }
  // Until the window has filled, the line spans what there is rather than a sliver at the right.
  const first = Math.max(start, tag.points[0][0]);
  const end = Math.max(now, tag.points[tag.points.length - 1][0], first + 1000);
  const x = (t) => ((t - first) / (end - first)) * (SPARK_WIDTH - 4) + 2;
  const y = (v) => SPARK_HEIGHT - 3 - ((v - low) / (high - low)) * (SPARK_HEIGHT - 6);
  ctx.lineWidth = 3;
  ctx.strokeStyle = getSparkColour();
  ctx.beginPath();
  let pen = false;
  for (const [t, v] of tag.points) {
    if (v === null) { pen = false; continue; } // a BAD reading is a gap in the line, not a zero
    if (pen) ctx.lineTo(x(t), y(v)); else ctx.moveTo(x(t), y(v));
    pen = true;
  }
  ctx.stroke();
}

let sparkColour = "";
function getSparkColour() {
  if (!sparkColour) sparkColour = getComputedStyle(document.documentElement).getPropertyValue("--spark").trim() || "#6cb6ff";
  return sparkColour;
}

function renderWell(well) {
  let worst = "";
  const counts = { BAD: 0, STALE: 0, UNCERTAIN: 0 };
  for (const tag of well.tags.values()) {
    if (!tag.quality) continue;
    const states = [tag.quality, ...(tag.stale ? ["STALE"] : [])];
    for (const state of states) {
      if (counts[state] !== undefined) counts[state] += 1;
      if (!worst || QUALITY_RANK[state] > QUALITY_RANK[worst]) worst = state;
    }
  }
  well.counts = counts;
  if (worst !== well.state) {
    well.state = worst;
    setData(well.el, "state", worst);
    const badge = well.el.querySelector(".state");
    badge.className = `state badge ${worst}`;
    setText(badge, worst);
  }
}

const CONN_WORDS = { live: "", connecting: "connecting", reconnecting: "reconnecting", offline: "offline",
                     unavailable: "not available" };

function setConn(well, conn) {
  if (conn === "live") well.failingSince = null;
  else if (well.failingSince === null && conn !== "connecting") well.failingSince = Date.now();
  if (well.conn === conn) return;
  well.conn = conn;
  setData(well.el, "conn", conn);
  setText(well.el.querySelector(".conn"), CONN_WORDS[conn]);
  schedule();
}

function renderIndicator(now) {
  let live = 0;
  let total = 0;
  let failing = 0;
  let failingSince = Infinity;
  const counts = { BAD: 0, STALE: 0, UNCERTAIN: 0 };
  for (const well of wells.values()) {
    for (const key in counts) counts[key] += well.counts ? well.counts[key] : 0;
    if (well.conn === "unavailable") continue;
    total += 1;
    if (well.conn === "live") live += 1;
    else if (well.failingSince !== null) {
      failing += 1;
      failingSince = Math.min(failingSince, well.failingSince);
    }
  }
  let state;
  if (auth.signedOut) state = "Signed out";
  else if (!navigator.onLine) state = "Offline"; // the browser has no network: what is open will not last
  else if (wellsRefused !== null) state = "Offline"; // not even the list of wells came
  else if (total && live === total) state = "Live";
  else if (live === 0 && now - failingSince > OFFLINE_AFTER_MS) state = "Offline";
  else state = failing ? "Reconnecting" : "Connecting"; // Connecting: first connections still on their way
  if (el.indicator.dataset.state !== state) {
    el.indicator.dataset.state = state;
    debug.indicator.push({ state, at: now });
    trim(debug.indicator, TRANSITIONS_KEEP);
  }
  let text = state === "Live" || !total ? state : `${state} (${live}/${total} live)`;
  if (state === "Offline" && wellsRefused) text = `Offline (${wellsRefused})`;
  setText(el.indicator, text);
  const problems = Object.entries(counts).filter(([, n]) => n).map(([word, n]) => `${n} ${word}`);
  setText(el.summary, `${wells.size} wells${problems.length ? " \u00b7 " + problems.join(" \u00b7 ") : ""}`);
  for (const well of wells.values()) {
    if (well.conn === "reconnecting" && well.failingSince !== null && now - well.failingSince > OFFLINE_AFTER_MS) {
      setConn(well, "offline");
    }
  }
}

// Ages and STALE move with the clock, not only with readings.
setInterval(() => {
  for (const well of wells.values()) for (const tag of well.tags.values()) dirtyTags.add(tag);
  schedule();
}, 1000);
window.addEventListener("offline", schedule);
window.addEventListener("online", () => {
  // Back on the network: wells waiting out a backoff try now instead of at the end of it.
  for (const well of wells.values()) {
    if (well.timer) {
      clearTimeout(well.timer);
      well.backoff = BACKOFF_FIRST_MS;
      connect(well);
    }
  }
  schedule();
});

// ---- streams ----

function record(well, event, id) {
  debug.received.push({ well: well.name, event, id });
  trim(debug.received, RECEIVED_KEEP);
}

function onSnapshot(well, e) {
  record(well, "snapshot", e.lastEventId);
  let data;
  try { data = JSON.parse(e.data); } catch { return; }
  well.lastId = e.lastEventId || data.lastEventId || well.lastId;
  for (const reading of data.readings || []) apply(well, reading);
}

function onReading(well, e) {
  record(well, "reading", e.lastEventId);
  // Defensive: never show a reading twice, whatever the server sends.
  if (well.lastId && e.lastEventId && compareIds(e.lastEventId, well.lastId) <= 0) return;
  if (e.lastEventId) well.lastId = e.lastEventId;
  let reading;
  try { reading = JSON.parse(e.data); } catch { return; }
  apply(well, reading);
}

function onReset(well, e) {
  // History no longer reaches back to our id: a snapshot follows. The sparkline gets a gap.
  record(well, "reset", e.lastEventId);
  for (const tag of well.tags.values()) {
    const last = tag.points[tag.points.length - 1];
    if (last) tag.points.push([last[0], null]);
  }
}

function scheduleReconnect(well, retryAfterS = 0, wasLive = false) {
  clearTimeout(well.timer);
  const base = well.backoff;
  well.backoff = Math.min(well.backoff * 2, BACKOFF_MAX_MS);
  const jittered = wasLive ? Math.random() * RECONNECT_SPREAD_MS : base / 2 + Math.random() * (base / 2);
  const delay = Math.max(retryAfterS * 1000, jittered);
  setConn(well, well.conn === "offline" ? "offline" : "reconnecting");
  well.timer = setTimeout(() => connect(well), delay);
}

function dropSource(well) {
  if (well.source) well.source.close();
  well.source = null;
}

// No stream and no pending retry: a well left with a cleared but non-null timer would look
// "retrying" to addWells and never connect again.
function stopWell(well) {
  dropSource(well);
  clearTimeout(well.timer);
  well.timer = null;
}

async function connect(well) {
  well.timer = null;
  if (auth.signedOut || well.connecting) return;
  well.connecting = true;
  try {
    await connectOnce(well);
  } finally {
    well.connecting = false;
  }
}

// A fresh page starts from the latest value of every tag, then asks the stream to replay the
// last SPARK_WINDOW_MS of history (measured on the server's clock: the newest entry's id), so
// sparklines are full at once after a reload. Where history does not reach back that far, the
// stream answers with reset + snapshot, which the page handles like any other.
async function backfill(well) {
  let latest;
  try {
    const response = await fetch(tenantPath(`/wells/${encodeURIComponent(well.name)}/latest`), {
      credentials: "same-origin", headers: authHeaders(),
    });
    if (!response.ok) return;
    latest = await response.json();
  } catch {
    return; // the stream's snapshot will do
  }
  if (gone(well)) return;
  for (const reading of latest.readings || []) apply(well, reading, true);
  const [newest] = parseId(latest.lastEventId || "0-0");
  if (newest > SPARK_WINDOW_MS) well.lastId = `${newest - SPARK_WINDOW_MS}-0`;
}

// After each await: the operator may have signed out, or another tenant's wall replaced this well.
function gone(well) {
  return auth.signedOut || wells.get(well.name) !== well;
}

async function connectOnce(well) {
  if (!well.lastId) await backfill(well); // until a first snapshot or replay, so a failed one is tried again
  if (gone(well)) return;
  const path = tenantPath(`/wells/${encodeURIComponent(well.name)}/stream`);
  const params = new URLSearchParams();
  if (well.lastId) params.set("lastEventId", well.lastId);
  let status = 200;
  let retryAfter = 0;
  try {
    let response = null;
    if (auth.mode === "ticket") {
      response = await fetch(tenantPath("/stream-tickets"), {
        method: "POST", credentials: "same-origin", headers: authHeaders({ "Content-Type": "application/json" }),
        body: JSON.stringify({ wells: [well.name] }),
      });
      if (response.ok) params.set("ticket", (await response.json()).ticket);
    } else if (well.opened > 0) {
      // An EventSource hides why it was refused; HEAD (which the stream route answers without
      // streaming) tells an expired session (401: sign in again) from a proxy's 502 (wait, retry).
      response = await fetch(`${path}?${params}`, { method: "HEAD", credentials: "same-origin" });
    }
    if (response) {
      status = response.status;
      retryAfter = Number(response.headers.get("Retry-After")) || 0;
    }
  } catch {
    status = 0; // network error: the gateway or the proxy is down
  }
  if (gone(well)) return;
  if (status === 401) { signOut("Your session has ended. Sign in again."); return; }
  if (status === 403 || status === 404) { setConn(well, "unavailable"); return; }
  if (status < 200 || status > 299) { scheduleReconnect(well, retryAfter); return; }
  openSource(well, `${path}?${params}`);
}

function openSource(well, url) {
  dropSource(well);
  if (well.opened > 0) debug.ownReconnects += 1;
  well.opened += 1;
  const source = new EventSource(url, { withCredentials: true });
  well.source = source;
  source.addEventListener("open", () => {
    well.backoff = BACKOFF_FIRST_MS;
    setConn(well, "live");
  });
  source.addEventListener("snapshot", (e) => onSnapshot(well, e));
  source.addEventListener("reading", (e) => onReading(well, e));
  source.addEventListener("reset", (e) => onReset(well, e));
  source.addEventListener("auth-expired", () => {
    // The token behind this stream expired: a fresh ticket (or the cookie, if renewed) resumes
    // from the last id; a 401 on the way means the operator has to sign in again.
    dropSource(well);
    setConn(well, "reconnecting");
    connect(well);
  });
  source.addEventListener("error", () => {
    if (well.source !== source) return;
    if (auth.mode === "ticket" || source.readyState === EventSource.CLOSED) {
      // A used ticket cannot reconnect, and a CLOSED EventSource (a 502/503 from a proxy, a 401)
      // never retries: reconnect ourselves, from the last id we have.
      dropSource(well);
      scheduleReconnect(well, 0, well.conn === "live");
    } else {
      setConn(well, "reconnecting"); // the browser retries by itself with Last-Event-ID
    }
  });
}

// ---- sign-in ----

function showNotice(text) {
  el.notice.hidden = !text;
  el.notice.textContent = text || "";
}

function signOut(reason) {
  auth.signedOut = true;
  auth.bearer = null;
  for (const well of wells.values()) stopWell(well);
  el.signOut.hidden = true;
  el.signInReason.textContent = reason || "";
  el.signIn.hidden = false;
  schedule();
}

async function signIn(token, preferTickets) {
  let tenant;
  try { tenant = claims(token).tenant_id || claims(token).tenantId; } catch { tenant = null; }
  if (!tenant) throw new Error("That is not a wellstream token.");
  if (!preferTickets) {
    // The cookie is HttpOnly: after this the token is not kept anywhere the page's scripts can read.
    const response = await fetch("/auth/session", {
      method: "POST", credentials: "same-origin", headers: { Authorization: `Bearer ${token}` },
    });
    if (response.status === 401 || response.status === 403) throw new Error("The token was refused (expired or invalid).");
    if (response.ok) {
      auth.mode = "cookie";
      auth.bearer = null;
      auth.tenant = (await response.json()).tenantId || tenant;
      localStorage.setItem(TENANT_KEY, auth.tenant);
      return;
    }
  }
  auth.mode = "ticket";
  auth.bearer = token;
  auth.tenant = tenant;
}

// The tenant's wells: `names` when they came, else the status that refused them (0: no answer).
async function fetchWells() {
  try {
    const response = await fetch(tenantPath("/wells"), { credentials: "same-origin", headers: authHeaders() });
    return { status: response.status, names: response.ok ? (await response.json()).wells : null };
  } catch {
    return { status: 0, names: null };
  }
}

async function loadWells() {
  let backoff = BACKOFF_FIRST_MS;
  for (;;) {
    const { status, names } = await fetchWells();
    wellsRefused = names || status === 401 ? null : status;
    schedule();
    if (status === 401) { signOut("Sign in to see your wells."); return null; }
    if (names) return names;
    await new Promise((resolve) => setTimeout(resolve, backoff));
    backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
  }
}

let shownTenant = null;

async function start() {
  if (shownTenant !== auth.tenant) {
    // Another tenant signed in: nothing of the previous one stays on the wall.
    for (const well of wells.values()) { stopWell(well); well.el.remove(); }
    wells.clear();
    shownTenant = auth.tenant;
  }
  el.signIn.hidden = true;
  auth.signedOut = false;
  el.tenant.textContent = auth.tenant;
  el.signOut.hidden = false;
  const names = await loadWells();
  if (!names) return;
  if (!names.length) showNotice("This token may not see any well of this tenant.");
  else if (names.length > 5 && navigationProtocol() === "http/1.1") {
    showNotice("This page came over HTTP/1.1, where a browser keeps at most 6 connections per server: only about " +
      "5 wells can stream at once. Serve the dashboard over HTTPS with HTTP/2 to see them all live.");
  }
  addWells(names);
  clearInterval(wellsTimer);
  wellsTimer = setInterval(refreshWells, WELLS_REFRESH_MS);
}

let wellsTimer = 0;

// Wells registered later (a new site, ingestion publishing for a new well) get a tile without a reload.
async function refreshWells() {
  if (auth.signedOut) return;
  const { names } = await fetchWells();
  if (names && !auth.signedOut) addWells(names);
}

function addWells(names) {
  for (const name of names) {
    if (!wells.has(name)) wells.set(name, newWell(name));
  }
  for (const well of wells.values()) {
    if (!well.source && !well.timer) connect(well);
  }
  schedule();
}

el.signIn.addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    await signIn(el.signInToken.value.trim(), false);
  } catch (error) {
    el.signInReason.textContent = error.message;
    return;
  }
  el.signInToken.value = "";
  for (const well of wells.values()) well.backoff = BACKOFF_FIRST_MS;
  await start();
});

el.signOut.addEventListener("click", async () => {
  await fetch("/auth/session", { method: "DELETE", credentials: "same-origin" }).catch(() => null);
  localStorage.removeItem(TENANT_KEY);
  signOut("Signed out.");
  // Signed out on purpose: nothing of this tenant stays on the screen.
  for (const well of wells.values()) well.el.remove();
  wells.clear();
  shownTenant = null;
  schedule();
});

// ---- keyboard: Tab reaches the tiles; arrows, Home and End move between them ----

el.wells.addEventListener("keydown", (event) => {
  const tile = event.target.closest(".well");
  if (!tile) return;
  const tiles = [...el.wells.children];
  const index = tiles.indexOf(tile);
  const columns = getComputedStyle(el.wells).gridTemplateColumns.split(" ").length || 1;
  const moves = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: columns, ArrowUp: -columns, Home: -index,
                  End: tiles.length - 1 - index };
  if (!(event.key in moves)) return;
  const target = tiles[index + moves[event.key]];
  event.preventDefault();
  if (target) target.focus();
});

// ---- start: a token in the URL (the demo's link), else the session cookie ----

async function main() {
  const hash = new URLSearchParams(location.hash.slice(1));
  const token = hash.get("token");
  if (token) {
    // Keep the token out of the address bar, bookmarks and screenshots.
    history.replaceState(null, "", location.pathname + location.search);
    try {
      await signIn(token, hash.get("auth") === "ticket");
    } catch (error) {
      signOut(error.message);
      return;
    }
  } else {
    auth.tenant = new URLSearchParams(location.search).get("tenant") || localStorage.getItem(TENANT_KEY);
    if (!auth.tenant) { signOut(""); return; }
  }
  await start();
}

main();
