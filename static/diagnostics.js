// What the page exposes as `window.wellstream`: read by the browser tests and handy in the
// console. Every list is bounded, because the page runs all day on a wall.

const RECEIVED_KEEP = 50000;
const TRANSITIONS_KEEP = 1000;

/**
 * @typedef {object} Diagnostics
 * @property {Array<{well: string, event: string, id: string}>} received  every snapshot, reading and reset, in arrival order
 * @property {Array<{state: string, at: number}>} indicator  every change of the page's connection indicator
 * @property {number} ownReconnects  EventSources re-created by the page (closed for good, ticket mode, auth-expired)
 * @property {number} flushes  frames that wrote the DOM
 * @property {number[]} flushMs  how long the last flushes took, to check for jank
 * @property {string} mode  "cookie" or "ticket"
 * @property {string} protocol  what the page itself came over ("h2", "http/1.1")
 */

/**
 * @param {() => string} mode @param {() => string} protocol
 * @param {string} indicator  the state the page starts with
 * @returns {Diagnostics}
 */
export function createDiagnostics(mode, protocol, indicator) {
  return {
    received: [],
    indicator: [{ state: indicator, at: Date.now() }],
    ownReconnects: 0,
    flushes: 0,
    flushMs: [],
    get mode() { return mode(); },
    get protocol() { return protocol(); },
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

/** @param {Diagnostics} diagnostics @param {number} ms */
export function recordFlush(diagnostics, ms) {
  diagnostics.flushes += 1;
  diagnostics.flushMs.push(ms);
  trim(diagnostics.flushMs, TRANSITIONS_KEEP);
}

/** @param {Diagnostics} diagnostics */
export function countOwnReconnect(diagnostics) {
  diagnostics.ownReconnects += 1;
}

/** @param {unknown[]} list @param {number} keep */
function trim(list, keep) {
  // In chunks: one splice per keep/4 pushes, not a shift of the whole list on every event.
  if (list.length > keep * 1.25) list.splice(0, list.length - keep);
}
