// What the stream's events and moves do to the page: connection.js knows the wire, model.js the
// data; this turns one into the other, records what diagnostics.js keeps, and tells the renderer
// what changed. Every event names its well (`wellId` in its data), so one stream feeds them all.

import { countConnect, countHeartbeat, recordReceived, recordRefusal } from "./diagnostics.js";
import {
  advanceTo, applyReading, applyReset, applySnapshot, snapshotsDone, streamMoved, wellHeard, wellNamed,
} from "./model.js";

/**
 * @typedef {import("./model.js").Model} Model
 * @typedef {import("./model.js").Well} Well
 * @typedef {import("./model.js").Tag} Tag
 * @typedef {import("./sse.js").SseEvent} SseEvent
 * @typedef {import("./connection.js").State} State
 * @typedef {import("./connection.js").Refusal} Refusal
 * @typedef {{changed(well: Well, tags?: Tag[]): void, schedule(): void}} Drawing  what the renderer offers
 */

/** @param {string} text @returns {any} the JSON value, or undefined if it is not JSON */
function parseJson(text) {
  try { return JSON.parse(text); } catch { return undefined; }
}

/** The stream's side of the page: given to connection.js as most of its Context. */
export class Feed {
  /** @type {Model} */
  #model;
  /** @type {import("./diagnostics.js").Diagnostics} */
  #diagnostics;
  /** @type {Drawing} */
  #drawing;

  /** @param {Model} model @param {import("./diagnostics.js").Diagnostics} diagnostics @param {Drawing} drawing */
  constructor(model, diagnostics, drawing) {
    this.#model = model;
    this.#diagnostics = diagnostics;
    this.#drawing = drawing;
    Object.freeze(this);
  }

  /** Where a reconnect resumes: the newest id applied, one for every well. @returns {string | null} */
  position() {
    return this.#model.lastId;
  }

  /** @param {SseEvent} event */
  received(event) {
    const now = Date.now();
    // Snapshots come first, all of them; anything else means they are all in.
    if (event.type !== "snapshot") this.#redraw(snapshotsDone(this.#model, now));
    if (event.type === "heartbeat") {
      countHeartbeat(this.#diagnostics);
      return;
    }
    const data = parseJson(event.data);
    if (!data || typeof data.wellId !== "string") return; // auth-expired (the connection acts on it), or not ours
    const well = wellNamed(this.#model, data.wellId, now);
    recordReceived(this.#diagnostics, well.name, event.type, event.id);
    if (event.type === "snapshot") this.#snapshot(well, event, data, now);
    else if (event.type === "reading") this.#reading(well, event, data, now);
    else if (event.type === "reset") applyReset(well);
  }

  /** @param {State} from @param {State} to @param {Refusal | null} refusal */
  moved(from, to, refusal) {
    const now = Date.now();
    if (to === "connecting") countConnect(this.#diagnostics);
    if (refusal) recordRefusal(this.#diagnostics, refusal, now);
    this.#redraw(streamMoved(this.#model, to, refusal, now));
    // Stopped (signed out, or another tenant): the page draws once it knows what comes next; a
    // frame now would say Connecting before the list of wells has answered.
    if (to !== "idle") this.#drawing.schedule();
  }

  /** @param {Well} well @param {SseEvent} event @param {any} data @param {number} now */
  #snapshot(well, event, data, now) {
    const tags = applySnapshot(this.#model, well, event.id, data, now);
    wellHeard(this.#model, well, now);
    this.#drawing.changed(well, tags);
  }

  /** @param {Well} well @param {SseEvent} event @param {any} data @param {number} now */
  #reading(well, event, data, now) {
    if (!advanceTo(this.#model, well, event.id)) return;
    const tag = applyReading(this.#model, well, data, now);
    const heard = wellHeard(this.#model, well, now);
    if (tag || heard) this.#drawing.changed(well, tag ? [tag] : []);
  }

  /** @param {Well[]} wells  whose stream word changed */
  #redraw(wells) {
    for (const well of wells) this.#drawing.changed(well);
  }
}
