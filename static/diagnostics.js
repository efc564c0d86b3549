// What the page exposes as `window.wellstream`: read by the browser tests and handy in the
// console. Every list is bounded, because the page runs all day on a wall.

const RECEIVED_KEEP = 50000;
const TRANSITIONS_KEEP = 1000;

/**
 * One well, as the tests see it.
 * @typedef {object} WellDiagnostics
 * @property {string} conn  its stream word: "live" once its snapshot or readings came on a live stream; else connecting, reconnecting, offline, unavailable
 * @property {string | null} lastId  the id of the newest event applied to it
 * @property {number} readings  reading events received for it (snapshots not counted)
 */

/**
 * @typedef {object} Diagnostics
 * @property {Array<{well: string, event: string, id: string}>} received  every snapshot, reading and reset, in arrival order
 * @property {Array<{state: string, at: number}>} indicator  every change of the page's connection indicator
 * @property {Array<{status: number, reason: string, at: number}>} refusals  every attempt that gave no stream, and why
 * @property {number} connects  stream requests made (each with a fresh ticket in ticket mode)
 * @property {number} ownReconnects  connects after the first: the page reopens its stream itself, always
 * @property {number} heartbeats  heartbeat events received
 * @property {number} flushes  frames that wrote the DOM
 * @property {number[]} flushMs  how long the last flushes took, to check for jank
 * @property {string} mode  "cookie" or "ticket"
 * @property {string} protocol  what the page itself came over ("h2", "http/1.1")
 * @property {string} stream  the stream's state (connection.js)
 * @property {string | null} lastId  the stream's position: where a reconnect resumes
 * @property {Record<string, WellDiagnostics>} wells  by well id, made when read
 */

/**
 * @param {import("./model.js").Model} model  read, never changed
 * @param {() => string} mode @param {() => string} protocol
 * @param {string} indicator  the state the page starts with
 * @returns {Diagnostics}
 */
export function createDiagnostics(model, mode, protocol, indicator) {
  return {
    received: [],
    indicator: [{ state: indicator, at: Date.now() }],
    refusals: [],
    connects: 0,
    ownReconnects: 0,
    heartbeats: 0,
    flushes: 0,
    flushMs: [],
    get mode() { return mode(); },
    get protocol() { return protocol(); },
    get stream() { return model.stream; },
    get lastId() { return model.lastId; },
    get wells() {
      /** @type {Record<string, WellDiagnostics>} */
      const wells = {};
      for (const well of model.wells.values()) {
        wells[well.name] = { conn: well.link, lastId: well.lastId, readings: well.readings };
      }
      return wells;
    },
  };
}

/** @param {Diagnostics} diagnostics @param {string} well @param {string} event @param {string} id */
export function recordReceived(diagnostics, well, event, id) {
  diagnostics.received.push({ well, event, id });
  trim(diagnostics.received, RECEIVED_KEEP);
}

/** @param {Diagnostics} diagnostics @param {string} state @param {number} at */
export function recordIndicator(diagnostics, state, at) {
  diagnostics.indicator.push({ state, at });
  trim(diagnostics.indicator, TRANSITIONS_KEEP);
}

/** @param {Diagnostics} diagnostics @param {{status: number, reason: string}} refusal @param {number} at */
export function recordRefusal(diagnostics, { status, reason }, at) {
  diagnostics.refusals.push({ status, reason, at });
  trim(diagnostics.refusals, TRANSITIONS_KEEP);
}

/** @param {Diagnostics} diagnostics @param {number} ms */
export function recordFlush(diagnostics, ms) {
  diagnostics.flushes += 1;
  diagnostics.flushMs.push(ms);
  trim(diagnostics.flushMs, TRANSITIONS_KEEP);
}

/** @param {Diagnostics} diagnostics */
export function countConnect(diagnostics) {
  if (diagnostics.connects > 0) diagnostics.ownReconnects += 1;
  diagnostics.connects += 1;
}

/** @param {Diagnostics} diagnostics */
export function countHeartbeat(diagnostics) {
  diagnostics.heartbeats += 1;
}

/** @param {unknown[]} list @param {number} keep */
function trim(list, keep) {
  // In chunks: one splice per keep/4 pushes, not a shift of the whole list on every event.
  if (list.length > keep * 1.25) list.splice(0, list.length - keep);
}
