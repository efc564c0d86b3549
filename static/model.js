// The dashboard's data: wells, their tags, quality and STALE, each tile's stream word and the
// header's counts. Plain objects created whole by the factories below and sealed, so a field
// that was never declared fails loudly instead of appearing later. Wells and tags change only
// through the functions below (the page's own flags, signedOut, online and wellsRefused, are set
// by main.js); nothing here touches the DOM. Functions take `now` (ms) instead of reading the
// clock, so one event or one tick sees one time.

// The sparkline's span; also how far back a fresh page asks the stream to replay.
export const SPARK_WINDOW_MS = 5 * 60 * 1000;
// STALE: the API gives no expected interval per tag, so it is learnt from the tag's own cadence
// (source timestamps): stale when the age exceeds STALE_FACTOR x the median of the last
// CADENCE_SAMPLES intervals, never less than STALE_FLOOR_MS; until two intervals are seen, STALE_DEFAULT_MS.
const STALE_FACTOR = 3;
const STALE_FLOOR_MS = 5000;
const STALE_DEFAULT_MS = 60000;
const CADENCE_SAMPLES = 15;
// A well reconnecting for this long is offline; the page is, when none has been live for this long.
const OFFLINE_AFTER_MS = 15000;
const QUALITIES = new Set(["GOOD", "UNCERTAIN", "BAD"]);
const RANK = Object.freeze({ GOOD: 0, UNCERTAIN: 1, STALE: 2, BAD: 3 });

/** @typedef {"GOOD" | "UNCERTAIN" | "BAD"} Quality */
/** @typedef {"connecting" | "live" | "reconnecting" | "offline" | "unavailable"} Link  what a tile says of its stream */
/** @typedef {{BAD: number, STALE: number, UNCERTAIN: number}} Counts  tags in each state that needs an eye */
/** @typedef {"Signed out" | "Offline" | "Live" | "Reconnecting" | "Connecting"} PageState */

/**
 * @typedef {object} Tag
 * @property {string} name
 * @property {number | null} value  null: no value (BAD)
 * @property {string} unit
 * @property {Quality | ""} quality  "" only until its first reading is applied
 * @property {number} ts  source time of its newest reading (ms); NaN until one had a valid one
 * @property {Array<[number, number | null]>} points  the sparkline, [ts, value]; a null value is a gap
 * @property {number[]} intervals  the last CADENCE_SAMPLES intervals between points
 * @property {boolean} stale
 * @property {number} pointsVersion  bumped when a point is added: the sparkline is redrawn only then
 */

/**
 * @typedef {object} Well
 * @property {string} name
 * @property {Map<string, Tag>} tags
 * @property {string | null} lastId  the newest stream id applied: where a reconnect resumes
 * @property {Link} link
 * @property {number | null} failingSince  since when its stream has not been live; null while live or first connecting
 * @property {Quality | "STALE" | ""} worst  its tile's state: the worst of its tags
 * @property {Counts} counts
 */

/**
 * @typedef {object} Model
 * @property {string | null} tenant  whose wells these are
 * @property {Map<string, Well>} wells  in the order they were added: the order of the tiles
 * @property {number} wellsVersion  bumped when wells are added or removed
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
    tenant: null, wells: new Map(), wellsVersion: 0, signedOut: false, online, wellsRefused: null, counts: noCounts(),
  });
}

/** @param {string} name @returns {Well} */
function createWell(name) {
  return Object.seal({
    name, tags: new Map(), lastId: null, link: "connecting", failingSince: null, worst: "", counts: noCounts(),
  });
}

/** @param {string} name @returns {Tag} */
function createTag(name) {
  return Object.seal({
    name, value: null, unit: "", quality: "", ts: NaN, points: [], intervals: [], stale: false, pointsVersion: 0,
  });
}

/** Forget every well (signed out, or another tenant signed in). @param {Model} model @param {string | null} tenant */
export function resetWells(model, tenant) {
  model.wells.clear();
  model.wellsVersion += 1;
  Object.assign(model.counts, noCounts());
  model.tenant = tenant;
}

/** @param {Model} model @param {string} name @returns {Well} */
export function addWell(model, name) {
  const well = createWell(name);
  model.wells.set(name, well);
  model.wellsVersion += 1;
  return well;
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
 * One reading into its tag. `seed` readings (from GET /latest, before the stream's replay) give
 * a tag a value and an age at once, but no sparkline point: the replay that follows brings the
 * points in order.
 * @param {Model} model @param {Well} well @param {any} reading  as parsed from the wire
 * @param {number} now @param {boolean} [seed]
 * @returns {Tag | null} the tag it changed; null for what is not a reading
 */
export function applyReading(model, well, reading, now, seed = false) {
  if (!reading || typeof reading.tagName !== "string") return null;
  let tag = well.tags.get(reading.tagName);
  if (!tag) {
    tag = createTag(reading.tagName);
    well.tags.set(tag.name, tag);
  }
  const { quality, stale } = tag;
  tag.value = typeof reading.value === "number" ? reading.value : null;
  tag.unit = reading.unit || "";
  tag.quality = QUALITIES.has(reading.quality) ? reading.quality : "BAD"; // what cannot be trusted is BAD
  const ts = Date.parse(reading.timestamp);
  if (Number.isFinite(ts)) {
    if (!(ts <= tag.ts)) tag.ts = ts;
    if (!seed) addPoint(tag, ts, now);
  }
  tag.stale = isStale(tag, now);
  if (tag.quality !== quality || tag.stale !== stale) summarize(model, well);
  return tag;
}

/** @param {Tag} tag @param {number} ts @param {number} now */
function addPoint(tag, ts, now) {
  const last = tag.points[tag.points.length - 1];
  if (last && ts <= last[0]) return; // a late or repeated reading updates the value, not the line
  if (last) {
    tag.intervals.push(ts - last[0]);
    if (tag.intervals.length > CADENCE_SAMPLES) tag.intervals.shift();
  }
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
 * Whether a reading with this id is news, and if so the well's position moves to it. Defensive:
 * never show a reading twice, whatever the server sends.
 * @param {Well} well @param {string} id @returns {boolean}
 */
export function advanceTo(well, id) {
  if (well.lastId && id && compareIds(id, well.lastId) <= 0) return false;
  if (id) well.lastId = id;
  return true;
}

/**
 * A snapshot: the latest reading of every tag, and where the stream now stands.
 * @param {Model} model @param {Well} well @param {string} id @param {any} data @param {number} now
 * @returns {Tag[]}
 */
export function applySnapshot(model, well, id, data, now) {
  well.lastId = id || data.lastEventId || well.lastId;
  return applyAll(model, well, data.readings || [], now, false);
}

/**
 * GET /latest on a fresh page: every tag's value at once, and a position SPARK_WINDOW_MS before
 * the newest entry (the server's clock: its id), so the stream replays a full sparkline.
 * Where history does not reach back that far, the stream answers reset + snapshot.
 * @param {Model} model @param {Well} well @param {any} latest @param {number} now @returns {Tag[]}
 */
export function applyLatest(model, well, latest, now) {
  const tags = applyAll(model, well, latest.readings || [], now, true);
  const [newest] = parseId(latest.lastEventId || "0-0");
  if (newest > SPARK_WINDOW_MS) well.lastId = `${newest - SPARK_WINDOW_MS}-0`;
  return tags;
}

/** @param {Model} model @param {Well} well @param {Iterable<any>} readings @param {number} now @param {boolean} seed */
function applyAll(model, well, readings, now, seed) {
  const tags = [];
  for (const reading of readings) {
    const tag = applyReading(model, well, reading, now, seed);
    if (tag) tags.push(tag);
  }
  return tags;
}

/**
 * History no longer reaches back to the well's position; a snapshot follows. Each sparkline gets
 * a gap; a gap at the end draws nothing, so it is drawn with the next point.
 * @param {Well} well
 */
export function applyReset(well) {
  for (const tag of well.tags.values()) {
    const last = tag.points[tag.points.length - 1];
    if (last) tag.points.push([last[0], null]);
  }
}

// ---- STALE and the tiles' states ----

/** @param {number[]} numbers */
function median(numbers) {
  const sorted = [...numbers].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

/** @param {Tag} tag */
function staleAfterMs(tag) {
  if (tag.intervals.length < 2) return STALE_DEFAULT_MS;
  return Math.max(STALE_FACTOR * median(tag.intervals), STALE_FLOOR_MS);
}

/** @param {Tag} tag @param {number} now */
function isStale(tag, now) {
  const age = now - tag.ts;
  return Number.isFinite(age) && age > staleAfterMs(tag);
}

/** A well's worst state and counts, and the page's counts with them. @param {Model} model @param {Well} well */
function summarize(model, well) {
  /** @type {Well["worst"]} */
  let worst = "";
  const counts = noCounts();
  for (const tag of well.tags.values()) {
    if (!tag.quality) continue;
    /** @type {Array<keyof typeof RANK>} */
    const states = tag.stale ? [tag.quality, "STALE"] : [tag.quality];
    for (const state of states) {
      if (state !== "GOOD") counts[state] += 1;
      if (!worst || RANK[state] > RANK[worst]) worst = state;
    }
  }
  for (const key of /** @type {Array<keyof Counts>} */ (Object.keys(counts))) {
    model.counts[key] += counts[key] - well.counts[key];
    well.counts[key] = counts[key];
  }
  well.worst = worst;
}

/**
 * What time alone changes: tags turn STALE (or stop being), and a well reconnecting for
 * OFFLINE_AFTER_MS says offline.
 * @param {Model} model @param {number} now
 */
export function advanceClock(model, now) {
  for (const well of model.wells.values()) {
    let changed = false;
    for (const tag of well.tags.values()) {
      const stale = isStale(tag, now);
      changed ||= stale !== tag.stale;
      tag.stale = stale;
    }
    if (changed) summarize(model, well);
    if (well.link === "reconnecting" && well.failingSince !== null && now - well.failingSince > OFFLINE_AFTER_MS) {
      setLink(well, "offline", now);
    }
  }
}

// ---- connection ----

/**
 * What the well's tile says about its stream. Failing starts with the first word that is not
 * live (a first connection is not failing yet) and ends when it is live again.
 * @param {Well} well @param {Link} link @param {number} now
 */
export function setLink(well, link, now) {
  if (link === "live") well.failingSince = null;
  else if (well.failingSince === null && link !== "connecting") well.failingSince = now;
  well.link = link;
}

/**
 * The page's connection, as the header shows it: Live when every well that may stream does.
 * Wells that are not available (403, 404) do not count.
 * @param {Model} model @param {number} now
 * @returns {{state: PageState, live: number, total: number}}
 */
export function pageState(model, now) {
  let live = 0;
  let total = 0;
  let failing = 0;
  let failingSince = Infinity;
  for (const well of model.wells.values()) {
    if (well.link === "unavailable") continue;
    total += 1;
    if (well.link === "live") live += 1;
    else if (well.failingSince !== null) {
      failing += 1;
      failingSince = Math.min(failingSince, well.failingSince);
    }
  }
  /** @type {PageState} */
  let state;
  if (model.signedOut) state = "Signed out";
  else if (!model.online) state = "Offline"; // the browser has no network: what is open will not last
  else if (model.wellsRefused !== null) state = "Offline"; // not even the list of wells came
  else if (total && live === total) state = "Live";
  else if (live === 0 && now - failingSince > OFFLINE_AFTER_MS) state = "Offline";
  else state = failing ? "Reconnecting" : "Connecting"; // Connecting: first connections still on their way
  return { state, live, total };
}
