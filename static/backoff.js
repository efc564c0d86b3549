// The one backoff for everything the page retries by itself: a stream's own reconnects and the
// list of wells. A gateway or proxy that is down is asked again ever more slowly, up to a cap.

const FIRST_MS = 500;
const MAX_MS = 30000;

/** The waits of one thing that retries: each step twice the last, up to the cap, until reset. */
export class Backoff {
  #stepMs = FIRST_MS;

  /** @returns {number} the wait before the next attempt, in ms; the step after it is twice as long */
  step() {
    const step = this.#stepMs;
    this.#stepMs = Math.min(step * 2, MAX_MS);
    return step;
  }

  /** After a success: the next failure starts from the first step again. */
  reset() {
    this.#stepMs = FIRST_MS;
  }
}

/**
 * A wait somewhere in the upper half of `ms`: a hundred wells (or wall screens) that failed
 * together do not come back as one storm.
 * @param {number} ms
 * @returns {number}
 */
export function jitter(ms) {
  return ms / 2 + Math.random() * (ms / 2);
}

/** @param {number} ms @returns {Promise<void>} */
export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
