// Draws the model. Events only change the model and ask for a frame; once per animation frame
// this writes what changed since the last one, so a hundred wells at several events a second
// cost one layout per frame, not one per event. It reads the model and never changes it: what
// it has to remember (the elements, what each one shows) lives in its own view objects.

import { recordFlush, recordIndicator } from "./diagnostics.js";
import { SPARK_WINDOW_MS, firstVisiblePoint, pageState } from "./model.js";

const SPARK_WIDTH = 480; // canvas pixels; CSS scales it to the tile, so drawing never reads layout
const SPARK_HEIGHT = 44;
const LINK_WORDS = {
  live: "", connecting: "connecting", reconnecting: "reconnecting", offline: "offline", unavailable: "not available",
};
const numberFormat = new Intl.NumberFormat(undefined, { maximumSignificantDigits: 5 });
const smallFormat = new Intl.NumberFormat(undefined, { maximumFractionDigits: 2 });

/**
 * @typedef {import("./model.js").Model} Model
 * @typedef {import("./model.js").Well} Well
 * @typedef {import("./model.js").Tag} Tag
 * @typedef {import("./page.js").Elements} Elements
 * @typedef {import("./diagnostics.js").Diagnostics} Diagnostics
 */

/**
 * A well's tile, and what it shows.
 * @typedef {object} Tile
 * @property {HTMLElement} element
 * @property {HTMLElement} conn
 * @property {HTMLElement} state
 * @property {HTMLElement} list
 * @property {Map<string, Row>} rows  by tag name
 * @property {string} link
 * @property {string} worst
 */

/**
 * A tag's row, and what it shows.
 * @typedef {object} Row
 * @property {HTMLElement} element
 * @property {HTMLElement} number
 * @property {HTMLElement} unit
 * @property {HTMLElement} quality
 * @property {HTMLElement} ago
 * @property {HTMLElement} stale
 * @property {HTMLCanvasElement} canvas
 * @property {boolean | null} staleShown  null until first shown
 * @property {number} drawn  the tag's pointsVersion the sparkline shows
 */

export class Renderer {
  /** @type {Model} */
  #model;
  /** @type {Elements} */
  #dom;
  /** @type {Diagnostics} */
  #diagnostics;
  #frame = 0;
  /** @type {Map<Well, Tile>} in the model's order */
  #tiles = new Map();
  #wellsVersion = -1; // of the model, when the tiles last matched its wells
  /** @type {Map<Tag, Well>} */
  #dirtyTags = new Map();
  /** @type {Set<Well>} */
  #dirtyWells = new Set();
  #everything = false;
  #sparkColour = "";

  /** @param {Model} model @param {Elements} dom @param {Diagnostics} diagnostics */
  constructor(model, dom, diagnostics) {
    this.#model = model;
    this.#dom = dom;
    this.#diagnostics = diagnostics;
  }

  /**
   * These tags of the well changed, or (with none) only the well's own state: draw them on the next frame.
   * @param {Well} well @param {Tag[]} [tags]
   */
  changed(well, tags = []) {
    for (const tag of tags) this.#dirtyTags.set(tag, well);
    this.#dirtyWells.add(well);
    this.schedule();
  }

  /** The clock moved: every age changes, and whatever STALE and offline did with it. */
  everythingChanged() {
    this.#everything = true;
    this.schedule();
  }

  /** The next frame draws the header, and adds or removes tiles if the model's wells changed. */
  schedule() {
    if (!this.#frame) this.#frame = requestAnimationFrame(() => this.#flush());
  }

  #flush() {
    this.#frame = 0;
    const began = performance.now();
    const now = Date.now();
    if (this.#wellsVersion !== this.#model.wellsVersion) this.#syncTiles();
    if (this.#everything) this.#markEverything();
    for (const [tag, well] of this.#dirtyTags) {
      const tile = this.#tiles.get(well);
      if (tile) this.#renderTag(tile, tag, now);
    }
    for (const well of this.#dirtyWells) {
      const tile = this.#tiles.get(well);
      if (tile) this.#renderWell(tile, well);
    }
    this.#dirtyTags.clear();
    this.#dirtyWells.clear();
    this.#everything = false;
    this.#renderHeader(now);
    recordFlush(this.#diagnostics, performance.now() - began);
  }

  #markEverything() {
    for (const well of this.#model.wells.values()) {
      for (const tag of well.tags.values()) this.#dirtyTags.set(tag, well);
      this.#dirtyWells.add(well);
    }
  }

  #syncTiles() {
    this.#wellsVersion = this.#model.wellsVersion;
    for (const [well, tile] of this.#tiles) {
      if (this.#model.wells.get(well.name) === well) continue;
      tile.element.remove();
      this.#tiles.delete(well);
    }
    // New wells come last in the model's order, so appending keeps the tiles in that order.
    for (const well of this.#model.wells.values()) {
      if (this.#tiles.has(well)) continue;
      const tile = buildTile(well.name);
      this.#dom.wells.append(tile.element);
      this.#tiles.set(well, tile);
      this.#dirtyWells.add(well);
      for (const tag of well.tags.values()) this.#dirtyTags.set(tag, well);
    }
  }

  /** @param {Tile} tile @param {Tag} tag @param {number} now */
  #renderTag(tile, tag, now) {
    const row = rowOf(tile, tag.name);
    setText(row.number, formatValue(tag.value));
    setText(row.unit, tag.unit);
    setText(row.quality, tag.quality);
    setClass(row.quality, `quality badge ${tag.quality}`);
    setData(row.element, "quality", tag.quality);
    const age = now - tag.ts;
    setText(row.ago, Number.isFinite(age) ? formatAge(age) : "");
    if (row.staleShown !== tag.stale) {
      row.staleShown = tag.stale;
      row.stale.hidden = !tag.stale;
      setData(row.element, "stale", String(tag.stale));
    }
    if (row.drawn !== tag.pointsVersion) {
      row.drawn = tag.pointsVersion;
      this.#drawSpark(row.canvas, tag.points, now);
    }
  }

  /** @param {HTMLCanvasElement} canvas @param {Array<[number, number | null]>} allPoints @param {number} now */
  #drawSpark(canvas, allPoints, now) {
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
    ctx.strokeStyle = this.#sparkColourOnce();
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
  #sparkColourOnce() {
    if (!this.#sparkColour) {
      this.#sparkColour = getComputedStyle(document.documentElement).getPropertyValue("--spark").trim() || "#6cb6ff";
    }
    return this.#sparkColour;
  }

  /** @param {Tile} tile @param {Well} well */
  #renderWell(tile, well) {
    if (tile.worst !== well.worst) {
      tile.worst = well.worst;
      setData(tile.element, "state", well.worst);
      setClass(tile.state, `state badge ${well.worst}`);
      setText(tile.state, well.worst);
    }
    if (tile.link !== well.link) {
      tile.link = well.link;
      setData(tile.element, "conn", well.link);
      setText(tile.conn, LINK_WORDS[well.link]);
    }
  }

  /** @param {number} now */
  #renderHeader(now) {
    const model = this.#model;
    const { indicator, summary } = this.#dom;
    const { state, live, total } = pageState(model, now);
    if (indicator.dataset.state !== state) {
      indicator.dataset.state = state;
      recordIndicator(this.#diagnostics, state, now);
    }
    let text = state === "Live" || !total ? state : `${state} (${live}/${total} live)`;
    if (state === "Offline" && model.wellsRefused) text = `Offline (${model.wellsRefused})`;
    setText(indicator, text);
    const problems = Object.entries(model.counts).filter(([, n]) => n).map(([word, n]) => `${n} ${word}`);
    setText(summary, `${model.wells.size} wells${problems.length ? " \u00b7 " + problems.join(" \u00b7 ") : ""}`);
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

/** @param {string} name @returns {Tile} */
function buildTile(name) {
  const title = node("h2");
  title.textContent = name;
  title.id = `well-${name}`;
  const conn = node("span", "conn");
  conn.id = `well-${name}-conn`;
  const state = node("span", "state badge");
  state.id = `well-${name}-state`;
  const list = node("ul", "tags");
  const element = node("article", "well", node("header", "", title, conn, state), list);
  element.tabIndex = 0;
  element.dataset.well = name;
  element.dataset.conn = "connecting";
  // Focusing a tile reads its name, its worst state and whether it is streaming.
  element.setAttribute("aria-labelledby", title.id);
  element.setAttribute("aria-describedby", `${state.id} ${conn.id}`);
  return { element, conn, state, list, rows: new Map(), link: "connecting", worst: "" };
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
  canvas.width = SPARK_WIDTH;
  canvas.height = SPARK_HEIGHT;
  const ago = node("span", "ago");
  const stale = node("span", "stale badge STALE");
  stale.textContent = "STALE";
  stale.hidden = true;
  const element = node("li", "tag", label, node("span", "value", number, unit), quality, canvas,
    node("span", "age", ago, stale));
  element.dataset.tag = name;
  return { element, number, unit, quality, ago, stale, canvas, staleShown: null, drawn: -1 };
}

// ---- writes that skip what is already shown ----

/** @param {HTMLElement} node @param {string} text */
function setText(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

/** @param {HTMLElement} node @param {string} key @param {string} value */
function setData(node, key, value) {
  if (node.dataset[key] !== value) node.dataset[key] = value;
}

/** @param {HTMLElement} node @param {string} className */
function setClass(node, className) {
  if (node.className !== className) node.className = className;
}

/** @param {number | null} value */
function formatValue(value) {
  if (value === null) return "\u2014";
  return Math.abs(value) >= 1000 ? smallFormat.format(value) : numberFormat.format(value);
}

/** @param {number} ms */
function formatAge(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  return `${Math.floor(s / 3600)} h`;
}
