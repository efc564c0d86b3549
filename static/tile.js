// One well's tile in the DOM: built once, then written field by field, each write skipped when
// the element already shows it. render.js decides when; this decides how. Reads the model, never
// changes it.

import { SPARK_WINDOW_MS, firstVisiblePoint, tagState, tileState } from "./model.js";

const SPARK_WIDTH = 480; // canvas pixels; CSS scales it to the tile, so drawing never reads layout
const SPARK_HEIGHT = 44;
const LINK_WORDS = Object.freeze({
  live: "", connecting: "connecting", reconnecting: "reconnecting", offline: "offline", unavailable: "not available",
});
const STATE_WORDS = Object.freeze({
  GOOD: "GOOD", UNCERTAIN: "UNCERTAIN", STALE: "STALE", BAD: "BAD", NODATA: "NO DATA", NOTLIVE: "NOT LIVE",
});
// The server's reasons in words; a reason this page does not know is shown by its own name.
const REASON_WORDS = Object.freeze({
  comm_failure: "comm failure", device_error: "device error", out_of_range: "out of range", override: "override",
  retained: "retained", stale: "stale",
});
const numberFormat = new Intl.NumberFormat(undefined, { maximumSignificantDigits: 5 });
const smallFormat = new Intl.NumberFormat(undefined, { maximumFractionDigits: 2 });
let sparkColour = "";

/**
 * @typedef {import("./model.js").Well} Well
 * @typedef {import("./model.js").Tag} Tag
 */

/**
 * A well's tile, and what it shows.
 * @typedef {object} Tile
 * @property {string} name
 * @property {HTMLElement} element
 * @property {HTMLElement} conn
 * @property {HTMLElement} why  the reasons of its worst tags, in words
 * @property {HTMLElement} state
 * @property {HTMLElement} list
 * @property {Map<string, Row>} rows  by tag name
 * @property {string} link
 * @property {string} shown  the state word's key it shows
 * @property {boolean} visible  on screen (or near it): only then are its sparklines drawn
 */

/**
 * A tag's row, and what it shows.
 * @typedef {object} Row
 * @property {HTMLElement} element
 * @property {HTMLElement} number
 * @property {HTMLElement} unit
 * @property {HTMLElement} quality
 * @property {HTMLElement} ago
 * @property {HTMLCanvasElement} canvas  without pixels until first drawn: a thousand wells off screen cost no canvas memory
 * @property {number} drawn  the tag's pointsVersion the sparkline shows
 */

/** @param {string} name @returns {Tile} */
export function buildTile(name) {
  const title = node("h2");
  title.textContent = name;
  title.id = `well-${name}`;
  const conn = node("span", "conn");
  conn.id = `well-${name}-conn`;
  const why = node("span", "why");
  why.id = `well-${name}-why`;
  const state = node("span", "state badge");
  state.id = `well-${name}-state`;
  const list = node("ul", "tags");
  const element = node("article", "well", node("header", "", title, conn, why, state), list);
  element.tabIndex = 0;
  element.dataset.well = name;
  element.dataset.conn = "connecting";
  // Focusing a tile reads its name, its state, why, and whether it is streaming.
  element.setAttribute("aria-labelledby", title.id);
  element.setAttribute("aria-describedby", `${state.id} ${why.id} ${conn.id}`);
  return { name, element, conn, why, state, list, rows: new Map(), link: "", shown: "", visible: false };
}

/**
 * The tile's own fields: its state word and why (the server's reasons for its worst tags, e.g.
 * "comm failure"; "override" on a GOOD tile), and what it says of its stream (with how long it
 * has not been live).
 * @param {Tile} tile @param {Well} well @param {number} now
 * @returns {boolean} whether the well became live or stopped being: its rows then change too
 */
export function renderWell(tile, well, now) {
  const state = tileState(well);
  if (tile.shown !== state) {
    tile.shown = state;
    setData(tile.element, "state", state);
    setClass(tile.state, `state badge ${state}`);
    setText(tile.state, STATE_WORDS[state]);
  }
  // The reasons belong to the data shown: a tile that is not live, or has none, gives none.
  const reasons = state === "NOTLIVE" || state === "NODATA" ? [] : well.reasons;
  setText(tile.why, reasons.map(reasonWord).join(", "));
  setData(tile.element, "reason", reasons.join(" "));
  const word = LINK_WORDS[well.link];
  setText(tile.conn, word && `${word} \u00b7 ${formatAge(now - well.downSince)}`);
  if (tile.link === well.link) return false;
  const liveChanged = (tile.link === "live") !== (well.link === "live");
  tile.link = well.link;
  setData(tile.element, "conn", well.link);
  return liveChanged;
}

/**
 * A tag's row: its state in words, with the server's reason ("BAD · comm failure",
 * "GOOD · override", "STALE") and the source's status name as the word's title. While its
 * well is not live the word stays (the last one known) but loses its colour and shape: only a
 * live well shows GOOD.
 * @param {Tile} tile @param {Well} well @param {Tag} tag @param {number} now @param {boolean} drawSpark
 */
export function renderTag(tile, well, tag, now, drawSpark) {
  const row = rowOf(tile, tag.name);
  setText(row.number, formatValue(tag.value));
  setText(row.unit, tag.unit);
  const state = tagState(tag);
  setText(row.quality, state === "STALE" || !tag.reason ? state : `${state} \u00b7 ${reasonWord(tag.reason)}`);
  setClass(row.quality, well.link === "live" ? `quality badge ${state}` : "quality badge");
  setTitle(row.quality, tag.statusCode);
  setData(row.element, "quality", tag.quality);
  setData(row.element, "stale", String(tag.stale));
  setData(row.element, "reason", tag.reason);
  const age = now - tag.ts;
  setText(row.ago, Number.isFinite(age) ? formatAge(age) : "");
  if (drawSpark && row.drawn !== tag.pointsVersion) {
    row.drawn = tag.pointsVersion;
    drawSparkline(row.canvas, tag.points, now);
  }
}

// ---- elements ----

/**
 * @param {string} tag @param {string} [className] @param {...Node} children
 * @returns {HTMLElement}
 */
function node(tag, className, ...children) {
  const element = document.createElement(tag);
  if (className) element.className = className;
  element.append(...children);
  return element;
}

/** @param {Tile} tile @param {string} name @returns {Row} */
function rowOf(tile, name) {
  let row = tile.rows.get(name);
  if (!row) {
    row = buildRow(name);
    // Rows stay in tag-name order, whatever order the tags first arrive in.
    const next = [...tile.list.children].find((other) => (/** @type {HTMLElement} */ (other).dataset.tag ?? "") > name);
    tile.list.insertBefore(row.element, next || null);
    tile.rows.set(name, row);
  }
  return row;
}

/** @param {string} name @returns {Row} */
function buildRow(name) {
  const label = node("span", "name");
  label.textContent = name;
  label.title = name;
  const number = node("span", "number");
  const unit = node("span", "unit");
  const quality = node("span", "quality badge");
  const canvas = /** @type {HTMLCanvasElement} */ (node("canvas", "spark"));
  canvas.setAttribute("aria-hidden", "true");
  canvas.width = 0; // pixels come with the first drawing
  canvas.height = 0;
  const ago = node("span", "ago");
  const element = node("li", "tag", label, node("span", "value", number, unit), quality, canvas,
    node("span", "age", ago));
  element.dataset.tag = name;
  return { element, number, unit, quality, ago, canvas, drawn: -1 };
}

// ---- sparklines ----

/** @param {HTMLCanvasElement} canvas @param {Array<[number, number | null]>} allPoints @param {number} now */
function drawSparkline(canvas, allPoints, now) {
  if (canvas.width !== SPARK_WIDTH) {
    canvas.width = SPARK_WIDTH;
    canvas.height = SPARK_HEIGHT;
  }
  const start = now - SPARK_WINDOW_MS;
  const points = allPoints.slice(firstVisiblePoint(allPoints, start));
  const ctx = /** @type {CanvasRenderingContext2D} */ (canvas.getContext("2d"));
  ctx.clearRect(0, 0, SPARK_WIDTH, SPARK_HEIGHT);
  const values = points.map((p) => p[1]).filter((v) => v !== null);
  if (!values.length) return;
  let low = Math.min(...values);
  let high = Math.max(...values);
  if (high - low < 1e-9) { high += 1; low -= 1; }
  // Until the window has filled, the line spans what there is rather than a sliver at the right.
  const first = Math.max(start, points[0][0]);
  const end = Math.max(now, points[points.length - 1][0], first + 1000);
  const x = (/** @type {number} */ t) => ((t - first) / (end - first)) * (SPARK_WIDTH - 4) + 2;
  const y = (/** @type {number} */ v) => SPARK_HEIGHT - 3 - ((v - low) / (high - low)) * (SPARK_HEIGHT - 6);
  ctx.lineWidth = 3;
  ctx.strokeStyle = sparkColourOnce();
  ctx.beginPath();
  let pen = false;
  for (const [t, v] of points) {
    if (v === null) { pen = false; continue; } // a BAD reading is a gap in the line, not a zero
    if (pen) ctx.lineTo(x(t), y(v)); else ctx.moveTo(x(t), y(v));
    pen = true;
  }
  ctx.stroke();
}

// Read once: getComputedStyle in every draw would cost a style recalculation each time.
function sparkColourOnce() {
  if (!sparkColour) {
    sparkColour = getComputedStyle(document.documentElement).getPropertyValue("--spark").trim() || "#6cb6ff";
  }
  return sparkColour;
}

// ---- writes that skip what is already shown ----

/** @param {HTMLElement} node @param {string} text */
export function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

/** @param {HTMLElement} node @param {string} key @param {string} value */
function setData(node, key, value) {
  if (node.dataset[key] !== value) node.dataset[key] = value;
}

/** @param {HTMLElement} node @param {string} title  "" removes it */
function setTitle(node, title) {
  if (node.title === title) return;
  if (title) node.title = title;
  else node.removeAttribute("title");
}

/** @param {HTMLElement} node @param {string} className */
function setClass(node, className) {
  if (node.className !== className) node.className = className;
}

/** @param {string} reason */
function reasonWord(reason) {
  return REASON_WORDS[/** @type {keyof typeof REASON_WORDS} */ (reason)] ?? reason.replaceAll("_", " ");
}

/** @param {number | null} value */
function formatValue(value) {
  if (value === null) return "\u2014";
  return Math.abs(value) >= 1000 ? smallFormat.format(value) : numberFormat.format(value);
}

/** @param {number} ms */
export function formatAge(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  return `${Math.floor(s / 3600)} h`;
}
