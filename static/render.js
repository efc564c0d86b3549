// Draws the model. Events only change the model and ask for a frame; once per animation frame
// this writes what changed since the last one, so a thousand wells at several events a second
// cost one layout per frame, not one per event. It reads the model and the view and never
// changes them: what it has to remember (the tiles, what each one shows) lives in its own view
// objects (tile.js). Sparklines are drawn only for tiles on screen; tiles are put in order at
// most once a second (and when the view changes), so a wall sorted by state does not jitter.

import { recordFlush, recordIndicator } from "./diagnostics.js";
import { pageState, tileRank } from "./model.js";
import { buildTile, formatAge, renderTag, renderWell, setText } from "./tile.js";
import { shows } from "./toolbar.js";

const byName = new Intl.Collator(undefined, { numeric: true }).compare; // w2 before w10

/**
 * @typedef {import("./model.js").Model} Model
 * @typedef {import("./model.js").Well} Well
 * @typedef {import("./model.js").Tag} Tag
 * @typedef {import("./tile.js").Tile} Tile
 * @typedef {import("./page.js").Elements} Elements
 * @typedef {import("./toolbar.js").View} View
 * @typedef {import("./diagnostics.js").Diagnostics} Diagnostics
 */

export class Renderer {
  /** @type {Model} */
  #model;
  /** @type {View} */
  #view;
  /** @type {Elements} */
  #dom;
  /** @type {Diagnostics} */
  #diagnostics;
  #frame = 0;
  /** @type {Map<Well, Tile>} */
  #tiles = new Map();
  /** @type {WeakMap<Element, [Well, Tile]>} for the visibility observer */
  #byElement = new WeakMap();
  #wellsVersion = -1; // of the model, when the tiles last matched its wells
  /** @type {Map<Tag, Well>} */
  #dirtyTags = new Map();
  /** @type {Set<Well>} */
  #dirtyWells = new Set();
  #everything = false;
  #viewChanged = true;
  #orderDue = true;
  /** @type {IntersectionObserver} */
  #visibility;

  /** @param {Model} model @param {View} view @param {Elements} dom @param {Diagnostics} diagnostics */
  constructor(model, view, dom, diagnostics) {
    this.#model = model;
    this.#view = view;
    this.#dom = dom;
    this.#diagnostics = diagnostics;
    // A margin, so a tile scrolled into view already has its sparklines.
    this.#visibility = new IntersectionObserver((entries) => this.#seen(entries), { rootMargin: "300px 0px" });
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

  /** The clock moved: every age changes, and whatever offline did with it; tiles sorted by state move. */
  everythingChanged() {
    this.#everything = true;
    if (this.#view.sort === "state") this.#orderDue = true;
    this.schedule();
  }

  /** The filter, the order or the tile size changed. */
  viewChanged() {
    this.#viewChanged = true;
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
    if (this.#viewChanged) this.#applyView();
    if (this.#everything) this.#markEverything();
    this.#renderDirty(now);
    if (this.#orderDue) this.#order();
    this.#renderHeader(now);
    this.#renderStreamStatus(now);
    recordFlush(this.#diagnostics, performance.now() - began);
  }

  /** @param {number} now */
  #renderDirty(now) {
    for (const well of this.#dirtyWells) {
      const tile = this.#tiles.get(well);
      // Live or not changes how every row shows its quality.
      if (tile && renderWell(tile, well, now)) for (const tag of well.tags.values()) this.#dirtyTags.set(tag, well);
    }
    const sparks = !this.#view.compact;
    for (const [tag, well] of this.#dirtyTags) {
      const tile = this.#tiles.get(well);
      if (tile) renderTag(tile, well, tag, now, sparks && tile.visible);
    }
    this.#dirtyTags.clear();
    this.#dirtyWells.clear();
    this.#everything = false;
  }

  // Every tile's word and age; the rows (ages, sparklines) of the tiles on screen. A tile
  // scrolled into view gets its rows then (#seen): a thousand wells cost what a screenful does.
  #markEverything() {
    for (const [well, tile] of this.#tiles) {
      if (tile.visible) this.#markWell(well);
      else this.#dirtyWells.add(well);
    }
  }

  /** @param {Well} well */
  #markWell(well) {
    for (const tag of well.tags.values()) this.#dirtyTags.set(tag, well);
    this.#dirtyWells.add(well);
  }

  #syncTiles() {
    this.#wellsVersion = this.#model.wellsVersion;
    for (const [well, tile] of this.#tiles) {
      if (this.#model.wells.get(well.name) === well) continue;
      this.#visibility.unobserve(tile.element);
      tile.element.remove();
      this.#tiles.delete(well);
    }
    for (const well of this.#model.wells.values()) {
      if (this.#tiles.has(well)) continue;
      const tile = buildTile(well.name);
      tile.element.hidden = !shows(this.#view, well.name);
      this.#dom.wells.append(tile.element); // #order() puts it in its place
      this.#tiles.set(well, tile);
      this.#byElement.set(tile.element, [well, tile]);
      this.#visibility.observe(tile.element);
      this.#markWell(well);
    }
    this.#orderDue = true;
  }

  #applyView() {
    this.#viewChanged = false;
    const view = this.#view;
    this.#dom.wells.classList.toggle("compact", view.compact);
    for (const tile of this.#tiles.values()) tile.element.hidden = !shows(view, tile.name);
    // Leaving the compact size: sparklines not drawn meanwhile are due now.
    if (!view.compact) this.#markEverything();
    this.#orderDue = true;
  }

  /** @param {IntersectionObserverEntry[]} entries */
  #seen(entries) {
    for (const entry of entries) {
      const found = this.#byElement.get(entry.target);
      if (!found) continue;
      const [well, tile] = found;
      tile.visible = entry.isIntersecting;
      if (tile.visible) this.#markWell(well);
    }
    this.schedule();
  }

  /** The tiles in the view's order; only the ones out of place are moved. */
  #order() {
    this.#orderDue = false;
    const byState = this.#view.sort === "state";
    const ranks = new Map([...this.#tiles].map(([well, tile]) => [tile, byState ? tileRank(well) : 0]));
    const sorted = [...ranks.keys()].sort((a, b) => /** @type {number} */ (ranks.get(b)) -
      /** @type {number} */ (ranks.get(a)) || byName(a.name, b.name));
    const wells = this.#dom.wells;
    const focused = document.activeElement;
    let cursor = wells.firstElementChild;
    for (const tile of sorted) {
      if (tile.element === cursor) cursor = cursor.nextElementSibling;
      else wells.insertBefore(tile.element, cursor);
    }
    // Moving a focused tile takes the focus away from it; keyboard users keep their place.
    if (focused instanceof HTMLElement && focused !== document.activeElement) focused.focus({ preventScroll: true });
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
    else if (state === "Offline" && model.stream === "unavailable" && model.refusal) {
      text = `Offline (${model.refusal.status})`;
    }
    setText(indicator, text);
    setText(summary, this.#summary());
  }

  #summary() {
    const model = this.#model;
    const all = model.wells.size;
    let wells = `${all} wells`;
    if (this.#view.filter) {
      const shown = [...this.#tiles.values()].filter((tile) => !tile.element.hidden).length;
      wells = `${shown} of ${all} wells`;
    }
    const problems = Object.entries(model.counts).filter(([, n]) => n).map(([word, n]) => `${n} ${word}`);
    return [wells, ...problems].join(" \u00b7 ");
  }

  /** Why the stream is not live, while it is not: the server's own reason, and when the page tries again. @param {number} now */
  #renderStreamStatus(now) {
    const { refusal, stream } = this.#model;
    const element = this.#dom.streamStatus;
    const shown = Boolean(refusal) && stream !== "live" && stream !== "idle";
    if (element.hidden !== !shown) element.hidden = !shown;
    if (!refusal || !shown) return;
    const cause = refusal.status ? `The gateway refused the stream (${refusal.status}): ${refusal.reason}.`
      : `No stream: ${refusal.reason}.`;
    let next = "";
    if (stream === "connecting") next = " Trying again.";
    else if (refusal.retryAt !== null) next = ` Next try in ${formatAge(Math.max(0, refusal.retryAt - now))}.`;
    setText(element, cause + next);
  }
}
