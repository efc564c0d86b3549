// The dashboard's data: wells, their tags, quality, reason and STALE, each well's stream word, the
// stream's position and state, and the header's counts. Plain objects created whole by the
// factories below and sealed, so a field that was never declared fails loudly instead of
// appearing later. Wells, tags and the stream's fields change only through the functions below
// (the page's own flags, signedOut, online and wellsRefused, are set by main.js); nothing here
// touches the DOM. Functions take `now` (ms) instead of reading the clock, so one event or one
// tick sees one time.

// The sparkline's span. A fresh page starts from the stream's snapshots (the latest value of
// each tag), so lines fill as readings arrive: replaying 5 minutes of a whole field costs far
// more than it shows.
export const SPARK_WINDOW_MS = 5 * 60 * 1000;
// STALE is the server's verdict, never the page's guess: a tag is STALE exactly when its latest
// reading is UNCERTAIN with reason "stale" (the server knows each tag's expected interval; the
// page does not, and a deadbanded tag may rightly say nothing for hours). The clock moves only
// the stream's words here (advanceClock), and the ages the tiles show.
// A well reconnecting for this long is offline; the page is, when none has been live for this long.
const OFFLINE_AFTER_MS = 15000;
const QUALITIES = new Set(["GOOD", "UNCERTAIN", "BAD"]);
// The contract's reasons are known words; a reason this page does not know yet is still shown, as
// its own name, so a newer server is never silenced. Both are bounded: they reach the DOM.
const REASON_RE = /^[a-z][a-z_]{0,31}$/;
const STATUS_CODE_RE = /^[A-Za-z][A-Za-z0-9_]{0,63}$/;
const RANK = Object.freeze({ GOOD: 0, UNCERTAIN: 1, STALE: 2, BAD: 3 });
// Worst first: a well the page knows nothing about (no data, or not live) ranks below BAD only.
const TILE_RANK = Object.freeze({ "": 0, GOOD: 1, UNCERTAIN: 2, STALE: 3, NODATA: 4, NOTLIVE: 4, BAD: 5 });

/** @typedef {"GOOD" | "UNCERTAIN" | "BAD"} Quality */
/** @typedef {Quality | "STALE"} TagState  a tag's quality, or STALE when the server said so */
/** @typedef {"connecting" | "live" | "reconnecting" | "offline" | "unavailable"} Link  what a tile says of its stream */
/** @typedef {Quality | "STALE" | "NODATA" | "NOTLIVE"} TileState  a tile's word: NOTLIVE whenever its well is not live, so it never looks GOOD then */
/** @typedef {{BAD: number, STALE: number, UNCERTAIN: number}} Counts  tags in each state that needs an eye */
/** @typedef {"Signed out" | "Offline" | "Live" | "Reconnecting" | "Connecting"} PageState */
/** @typedef {import("./connection.js").State} StreamState */
/** @typedef {import("./connection.js").Refusal} Refusal */

/**
 * @typedef {object} Tag
 * @property {string} name
 * @property {number | null} value  null: no value (BAD)
 * @property {string} unit
 * @property {Quality | ""} quality  "" only until its first reading is applied
 * @property {string} reason  why its reading is not plainly GOOD (comm_failure, override, stale...); "" when plainly so
 * @property {string} statusCode  the source's own status name (e.g. BadSensorFailure); "" without one
 * @property {number} ts  source time of its newest reading (ms); NaN until one had a valid one
 * @property {Array<[number, number | null]>} points  the sparkline, [ts, value]; a null value is a gap
 * @property {boolean} stale  UNCERTAIN with reason "stale": the server says it missed its expected update
 * @property {number} pointsVersion  bumped when a point is added: the sparkline is redrawn only then
 */

/**
 * @typedef {object} Well
 * @property {string} name
 * @property {Map<string, Tag>} tags
 * @property {string | null} lastId  the id of the newest event applied to this well
 * @property {number} readings  reading events applied (snapshots not counted)
 * @property {Link} link
 * @property {number | null} failingSince  since when its stream has failed; null while live or first connecting
 * @property {number} downSince  since when it has not been live (since it was added, if never): the age its tile shows
 * @property {TagState | ""} worst  the worst of its tags; "" without any
 * @property {string[]} reasons  the reasons of its tags in that worst state, sorted, "stale" left out (STALE says it)
 * @property {Counts} counts
 */

/**
 * @typedef {object} Model
 * @property {string | null} tenant  whose wells these are
 * @property {Map<string, Well>} wells  in the order they were added
 * @property {number} wellsVersion  bumped when wells are added or removed
 * @property {string | null} lastId  the newest stream id applied: where a reconnect resumes (one id for every well)
 * @property {StreamState} stream  the stream's state (connection.js)
 * @property {boolean} awaitingSnapshots  a fresh stream is live, its snapshots not all in: a well is live once its own came
 * @property {Refusal | null} refusal  why the stream is not live, while that lasts
 * @property {boolean} signedOut
 * @property {boolean} online  the browser's network
 * @property {number | null} wellsRefused  while the list of wells does not load: its HTTP status (0: no answer)
 * @property {Counts} counts  over all wells: the header's summary
 */

/** @returns {Counts} */
function noCounts() {
  return Object.seal({ BAD: 0, STALE: 0, UNCERTAIN: 0 });
}

/** @param {boolean} online @returns {Model} */
export function createModel(online) {
  return Object.seal({
    tenant: null, wells: new Map(), wellsVersion: 0, lastId: null, stream: "idle", awaitingSnapshots: false,
    refusal: null, signedOut: false, online, wellsRefused: null, counts: noCounts(),
  });
}

/** @param {string} name @param {Link} link @param {number} now @returns {Well} */
function createWell(name, link, now) {
  return Object.seal({
    name, tags: new Map(), lastId: null, readings: 0, link, failingSince: null, downSince: now, worst: "", reasons: [],
    counts: noCounts(),
  });
}

/** @param {string} name @returns {Tag} */
function createTag(name) {
  return Object.seal({
    name, value: null, unit: "", quality: "", reason: "", statusCode: "", ts: NaN, points: [], stale: false,
    pointsVersion: 0,
  });
}

/**
 * Forget every well and the stream's position (signed out, or another tenant signed in): the
 * next stream starts fresh, with snapshots.
 * @param {Model} model @param {string | null} tenant
 */
export function resetWells(model, tenant) {
  model.wells.clear();
  model.wellsVersion += 1;
  model.lastId = null;
  model.awaitingSnapshots = false;
  Object.assign(model.counts, noCounts());
  model.tenant = tenant;
}

/**
 * A well joins the wall. The stream carries every well the token may see, including wells
 * registered after it opened: once its snapshots are in, a new well is live at once.
 * @param {Model} model @param {string} name @param {number} now @returns {Well}
 */
export function addWell(model, name, now) {
  const covered = model.stream === "live" && !model.awaitingSnapshots;
  const well = createWell(name, covered ? "live" : "connecting", now);
  model.wells.set(name, well);
  model.wellsVersion += 1;
  return well;
}

/** The well an event names, added if the page did not know it yet. @param {Model} model @param {string} name @param {number} now */
export function wellNamed(model, name, now) {
  return model.wells.get(name) ?? addWell(model, name, now);
}

// ---- stream ids: "<ms>-<seq>", compared numerically ----

/** @param {string} id @returns {[number, number]} */
export function parseId(id) {
  const [ms, seq] = String(id).split("-");
  return [Number(ms), Number(seq || 0)];
}

/** @param {string} a @param {string} b @returns {number} */
function compareIds(a, b) {
  const [am, as] = parseId(a);
  const [bm, bs] = parseId(b);
  return am === bm ? as - bs : am - bm;
}

// ---- readings ----

/**
 * One reading into its tag.
 * @param {Model} model @param {Well} well @param {any} reading  as parsed from the wire
 * @param {number} now
 * @returns {Tag | null} the tag it changed; null for what is not a reading
 */
export function applyReading(model, well, reading, now) {
  if (!reading || typeof reading.tagName !== "string") return null;
  let tag = well.tags.get(reading.tagName);
  if (!tag) {
    tag = createTag(reading.tagName);
    well.tags.set(tag.name, tag);
  }
  const { quality, reason } = tag;
  tag.value = typeof reading.value === "number" ? reading.value : null;
  tag.unit = reading.unit || "";
  tag.quality = QUALITIES.has(reading.quality) ? reading.quality : "BAD"; // what cannot be trusted is BAD
  tag.reason = matching(reading.reason, REASON_RE);
  tag.statusCode = matching(reading.statusCode, STATUS_CODE_RE);
  tag.stale = tag.quality === "UNCERTAIN" && tag.reason === "stale";
  const ts = Date.parse(reading.timestamp);
  if (Number.isFinite(ts)) {
    if (!(ts <= tag.ts)) tag.ts = ts;
    addPoint(tag, ts, now);
  }
  if (tag.quality !== quality || tag.reason !== reason) summarize(model, well);
  return tag;
}

/** @param {unknown} value @param {RegExp} pattern @returns {string} the value if it is such a string, else "" */
function matching(value, pattern) {
  return typeof value === "string" && pattern.test(value) ? value : "";
}

/** @param {Tag} tag @param {number} ts @param {number} now */
function addPoint(tag, ts, now) {
  const last = tag.points[tag.points.length - 1];
  // A late or repeated reading (a STALE verdict repeats the last timestamp) updates the value, not the line.
  if (last && ts <= last[0]) return;
  tag.points.push([ts, tag.value]);
  const drop = firstVisiblePoint(tag.points, now - SPARK_WINDOW_MS);
  if (drop) tag.points.splice(0, drop);
  tag.pointsVersion += 1;
}

/**
 * Where a sparkline starting at `start` begins: points older than that have left it, but the
 * newest point always stays, so a tag that went quiet keeps its last value on the line.
 * @param {Array<[number, number | null]>} points @param {number} start @returns {number}
 */
export function firstVisiblePoint(points, start) {
  let first = 0;
  while (first < points.length - 1 && points[first][0] < start) first += 1;
  return first;
}

/**
 * Whether a reading with this id is news; if so, the stream's position and the well's move to
 * it. A tenant's ids are totally ordered, so one position covers every well. Defensive: never
 * show a reading twice, whatever the server sends.
 * @param {Model} model @param {Well} well @param {string} id @returns {boolean}
 */
export function advanceTo(model, well, id) {
  if (model.lastId && id && compareIds(id, model.lastId) <= 0) return false;
  if (id) model.lastId = well.lastId = id;
  well.readings += 1;
  return true;
}

/**
 * A snapshot: the latest reading of every tag, and where the stream now stands. The snapshots
 * of one stream all carry the same id (the tenant's clock when they were read).
 * @param {Model} model @param {Well} well @param {string} id @param {any} data @param {number} now
 * @returns {Tag[]}
 */
export function applySnapshot(model, well, id, data, now) {
  const at = id || data.lastEventId;
  if (at) {
    well.lastId = at;
    if (!model.lastId || compareIds(at, model.lastId) > 0) model.lastId = at;
  }
  const tags = [];
  for (const reading of data.readings || []) {
    const tag = applyReading(model, well, reading, now);
    if (tag) tags.push(tag);
  }
  return tags;
}

/**
 * History no longer reaches back to the stream's position for this well; its snapshot follows.
 * Each sparkline gets a gap; a gap at the end draws nothing, so it is drawn with the next point.
 * @param {Well} well
 */
export function applyReset(well) {
  for (const tag of well.tags.values()) {
    const last = tag.points[tag.points.length - 1];
    if (last) tag.points.push([last[0], null]);
  }
}

// ---- the tags' and the tiles' states ----

/**
 * What a tag says: its quality, or STALE (which stands for its UNCERTAIN, so a STALE tag is
 * counted once). An override is GOOD: marked on its row, never a problem for its tile.
 * @param {Tag} tag @returns {TagState}
 */
export function tagState(tag) {
  return tag.stale ? "STALE" : /** @type {Quality} */ (tag.quality);
}

/** A well's worst state, its reasons and counts, and the page's counts with them. @param {Model} model @param {Well} well */
function summarize(model, well) {
  /** @type {Well["worst"]} */
  let worst = "";
  const counts = noCounts();
  /** @type {Set<string>} */
  let reasons = new Set();
  for (const tag of well.tags.values()) {
    if (!tag.quality) continue;
    const state = tagState(tag);
    if (state !== "GOOD") counts[state] += 1;
    if (!worst || RANK[state] > RANK[worst]) {
      worst = state;
      reasons = new Set();
    }
    if (state === worst && tag.reason && tag.reason !== "stale") reasons.add(tag.reason);
  }
  for (const key of /** @type {Array<keyof Counts>} */ (Object.keys(counts))) {
    model.counts[key] += counts[key] - well.counts[key];
    well.counts[key] = counts[key];
  }
  well.worst = worst;
  well.reasons = [...reasons].sort();
}

/**
 * What a tile says: the worst of its tags while its well is live, else NOTLIVE. A value the
 * page cannot vouch for is never shown as GOOD.
 * @param {Well} well @returns {TileState}
 */
export function tileState(well) {
  if (well.link !== "live") return "NOTLIVE";
  return well.worst || "NODATA";
}

/** For sorting worst first: higher is worse. @param {Well} well @returns {number} */
export function tileRank(well) {
  return TILE_RANK[tileState(well)];
}

/**
 * What time alone changes in the model: a well reconnecting for OFFLINE_AFTER_MS says offline.
 * Never a tag's state: STALE is the server's to say (see the top of this file).
 * @param {Model} model @param {number} now
 */
export function advanceClock(model, now) {
  for (const well of model.wells.values()) {
    if (well.link === "reconnecting" && well.failingSince !== null && now - well.failingSince > OFFLINE_AFTER_MS) {
      setLink(well, "offline", now);
    }
  }
}

// ---- the stream ----

/**
 * What a well's tile says about its stream. Failing starts with the first word that is not
 * live (a first connection is not failing yet) and ends when it is live again.
 * @param {Well} well @param {Link} link @param {number} now
 * @returns {boolean} whether the word changed
 */
function setLink(well, link, now) {
  if (link === well.link) return false;
  if (link === "live") well.failingSince = null;
  else if (well.failingSince === null && link !== "connecting") well.failingSince = now;
  if (well.link === "live") well.downSince = now;
  well.link = link;
  return true;
}

/**
 * Every well's word after the stream moved; returns the wells whose word changed.
 * A fresh stream (the page has no position) is live for a well once that well's snapshot came;
 * a resumed one is live for every well at once: its replay brings each up to date, in order.
 * @param {Model} model @param {StreamState} to @param {Refusal | null} refusal @param {number} now
 * @returns {Well[]}
 */
export function streamMoved(model, to, refusal, now) {
  model.stream = to;
  if (to === "live" || to === "idle") model.refusal = null;
  else if (to !== "connecting") model.refusal = refusal; // a retry keeps the last refusal shown until it is answered
  model.awaitingSnapshots = to === "live" && model.lastId === null;
  const link = linkFor(model, to);
  if (!link) return [];
  return [...model.wells.values()].filter((well) => setLink(well, linkOf(well, link), now));
}

/**
 * @param {Model} model @param {StreamState} to @returns {Link | "keep" | null}
 * the word for every well; "keep": each keeps its own unless live; null: no change at all
 */
function linkFor(model, to) {
  switch (to) {
    case "live": return model.awaitingSnapshots ? null : "live";
    case "connecting": return "keep"; // a first attempt keeps "connecting"; after auth-expired, live wells are not
    case "backoff": return model.online ? "reconnecting" : "offline";
    case "unavailable": return "unavailable";
    default: return null; // idle (signed out): each keeps its word until it connects again
  }
}

/** @param {Well} well @param {Link | "keep"} link @returns {Link} */
function linkOf(well, link) {
  if (link === "keep") return well.link === "live" ? "reconnecting" : well.link;
  if (link === "reconnecting" && well.link === "offline") return "offline"; // offline stays until live again
  return link;
}

/**
 * An event about this well came on a live stream: the well is live, if it was not.
 * @param {Model} model @param {Well} well @param {number} now @returns {boolean} whether its word changed
 */
export function wellHeard(model, well, now) {
  return model.stream === "live" && setLink(well, "live", now);
}

/**
 * A fresh stream sent something that is not a snapshot: its snapshots are all in, and every
 * well it carries is live (a well registered later comes with its readings).
 * @param {Model} model @param {number} now @returns {Well[]} the wells whose word changed
 */
export function snapshotsDone(model, now) {
  if (!model.awaitingSnapshots) return [];
  model.awaitingSnapshots = false;
  return [...model.wells.values()].filter((well) => setLink(well, "live", now));
}

/**
 * The page's connection, as the header shows it: Live when every well is.
 * @param {Model} model @param {number} now
 * @returns {{state: PageState, live: number, total: number}}
 */
export function pageState(model, now) {
  let live = 0;
  let failing = 0;
  let failingSince = Infinity;
  for (const well of model.wells.values()) {
    if (well.link === "live") live += 1;
    else if (well.failingSince !== null) {
      failing += 1;
      failingSince = Math.min(failingSince, well.failingSince);
    }
  }
  const total = model.wells.size;
  /** @type {PageState} */
  let state;
  if (model.signedOut) state = "Signed out";
  else if (!model.online) state = "Offline"; // the browser has no network: what is open will not last
  else if (model.wellsRefused !== null || model.stream === "unavailable") state = "Offline"; // refused for good
  else if (total && live === total) state = "Live";
  else if (live === 0 && now - failingSince > OFFLINE_AFTER_MS) state = "Offline";
  else state = failing ? "Reconnecting" : "Connecting"; // Connecting: the first connection still on its way
  return { state, live, total };
}
