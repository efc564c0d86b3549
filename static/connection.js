// The page's one stream, GET /tenants/{tenant}/stream (every well the token may see), read with
// fetch() and sse.js, in an explicit state machine. The moves:
//
//   idle, unavailable ─start()──▶ connecting   a ticket first (ticket mode), then the GET, with
//                                               Last-Event-ID once the page has a position
//   connecting ─200──▶ live                     the body streams; every event goes to the page
//              ─401──▶ (the page signs out, which stops this: idle)
//              ─400, 403, 404──▶ unavailable    until start() again (the page's next look at its wells)
//              ─429, 503, 5xx, no answer──▶ backoff
//   live ─end of the body, a broken one──▶ backoff
//   live ─auth-expired──▶ connecting            at once: a fresh ticket, or the cookie if it was renewed
//   connecting, live ─silent, or the network went away──▶ backoff
//   backoff ─timer, or back online──▶ connecting
//   any ─stop()──▶ idle                         signed out, or another tenant signed in
//
// Every move goes through #to(), which keeps the invariants: a request (its AbortController
// and the silence watchdog) exists exactly in connecting and live; a timer exactly in backoff.

import { Backoff, jitter } from "./backoff.js";
import { SseParser } from "./sse.js";

// The first reconnect after a live stream broke is spread over this window, like the server's
// jittered retry hint on shutdown: every dashboard on the wall comes back, but not at once.
const RECONNECT_SPREAD_MS = 2500;
// When a stream ended cleanly without a `retry:` of its own (a proxy ended it, say).
const DEFAULT_RETRY_MS = 2000;
// A stream of many wells sends `event: heartbeat` after this much silence (stream.heartbeat_s).
export const HEARTBEAT_MS = 15000;
// Nothing at all, not even a heartbeat, for this many heartbeat intervals: the stream is open but
// dead (a proxy or a network path that stopped passing bytes). It is not live; reconnect.
const SILENT_AFTER_HEARTBEATS = 2.5;

/** @typedef {"idle" | "connecting" | "live" | "backoff" | "unavailable"} State */

/**
 * Why the last attempt did not give a stream, for the page to show.
 * @typedef {object} Refusal
 * @property {number} status  the HTTP status; 0: no answer (the gateway or the network is down, or the stream fell silent)
 * @property {string} reason  the server's JSON `error`, else the status text
 * @property {number | null} retryAt  when the next attempt is due (ms since the epoch); null: not by itself
 */

/**
 * What the connection needs from the page.
 * @typedef {object} Context
 * @property {import("./session.js").Session} session
 * @property {() => string | null} position  the id to resume after (sent as Last-Event-ID); null: a fresh stream, which starts with snapshots
 * @property {(event: import("./sse.js").SseEvent) => void} received  every event, in the order sent
 * @property {(from: State, to: State, refusal: Refusal | null) => void} moved  every move, with the refusal that caused it
 * @property {() => void} unauthorized  a 401: the page signs out, which stops the connection
 */

/** @type {Record<State, State[]>} the states each state may move to; any other move is a bug */
const NEXT = {
  idle: ["connecting"],
  connecting: ["live", "backoff", "unavailable", "idle"],
  live: ["connecting", "backoff", "idle"],
  backoff: ["connecting", "idle"],
  unavailable: ["connecting", "idle"],
};
const WITH_REQUEST = new Set(["connecting", "live"]);
// Refusals the page cannot wait out: asking again only helps once something else changed.
const FINAL = new Set([400, 403, 404]);

export class Connection {
  /** @type {State} */
  state = "idle";
  /** @type {Context} */
  #context;
  #silentAfterMs;
  /** @type {AbortController | null} the request under way; a new one per attempt, so a stale attempt knows it is stale */
  #request = null;
  #watchdog = 0;
  #heardAt = 0;
  #timer = 0;
  #backoff = new Backoff();

  /** @param {Context} context @param {{heartbeatMs?: number}} [options] */
  constructor(context, { heartbeatMs = HEARTBEAT_MS } = {}) {
    this.#context = context;
    this.#silentAfterMs = SILENT_AFTER_HEARTBEATS * heartbeatMs;
    Object.seal(this);
  }

  /** Connect unless something is under way: signed in, or another try after a 400/403/404. */
  start() {
    if (this.state === "idle" || this.state === "unavailable") this.#connect();
  }

  /** Back on the network: a stream waiting out a backoff tries now instead of at the end of it. */
  resumeNow() {
    if (this.state !== "backoff") return;
    this.#backoff.reset();
    this.#connect();
  }

  /** The browser lost the network: what is open will not last, so it is not shown as live. */
  networkLost() {
    if (WITH_REQUEST.has(this.state)) this.#retryAfter(jitter(this.#backoff.step()), null);
  }

  /** Signed out: no stream, nothing pending. start() resumes from the page's position, with a fresh backoff. */
  stop() {
    this.#backoff.reset();
    if (this.state !== "idle") this.#to("idle");
  }

  /** @param {State} next @param {Refusal | null} [refusal] */
  #to(next, refusal = null) {
    const from = this.state;
    if (!NEXT[from].includes(next)) throw new Error(`stream: no move from ${from} to ${next}`);
    this.state = next;
    clearTimeout(this.#timer);
    this.#timer = 0;
    if (next === "connecting" || !WITH_REQUEST.has(next)) this.#endRequest();
    if (next === "connecting") this.#beginRequest();
    this.#context.moved(from, next, refusal);
  }

  #beginRequest() {
    this.#request = new AbortController();
    this.#heardAt = performance.now();
    const every = Math.min(Math.max(this.#silentAfterMs / 5, 200), 5000);
    this.#watchdog = setInterval(() => this.#checkSilence(), every);
  }

  #endRequest() {
    this.#request?.abort();
    this.#request = null;
    clearInterval(this.#watchdog);
    this.#watchdog = 0;
  }

  #checkSilence() {
    if (performance.now() - this.#heardAt <= this.#silentAfterMs) return;
    // Aborting (in #to) breaks the read under way, which then finds itself overtaken.
    const refusal = { status: 0, reason: "the stream fell silent", retryAt: null };
    if (this.state === "live") this.#retryAfter(Math.random() * RECONNECT_SPREAD_MS, refusal);
    else this.#retryAfter(jitter(this.#backoff.step()), refusal);
  }

  async #connect() {
    this.#to("connecting");
    const request = /** @type {AbortController} */ (this.#request);
    const overtaken = () => this.#request !== request;
    let response;
    try {
      response = await this.#open(request.signal);
    } catch {
      if (!overtaken()) this.#retryAfter(jitter(this.#backoff.step()), { status: 0, reason: "no answer", retryAt: null });
      return;
    }
    if (overtaken()) return;
    if (!isEventStream(response)) {
      await this.#refused(response, overtaken);
      return;
    }
    this.#backoff.reset();
    this.#to("live");
    try {
      await this.#read(response, overtaken);
    } catch {
      // The body broke off (the gateway or a proxy died, the network went): soon, but spread out.
      if (!overtaken()) this.#retryAfter(Math.random() * RECONNECT_SPREAD_MS, null);
    }
  }

  /**
   * The stream's response: with a ticket bought first in ticket mode (a refused purchase is
   * answered as the stream's refusal), resuming after the page's position if it has one.
   * @param {AbortSignal} signal @returns {Promise<Response>}
   */
  async #open(signal) {
    const { session, position } = this.#context;
    let query = "";
    if (session.mode === "ticket") {
      const bought = await session.buyTicket(signal);
      if (!bought.ok) return bought;
      query = `?${new URLSearchParams({ ticket: (await bought.json()).ticket })}`;
    }
    // JSON too: a refusal then keeps its status (429, 503) and Retry-After, which this page reads;
    // a client that takes only event streams (EventSource) gets it as a `refused` event instead.
    /** @type {Record<string, string>} */
    const headers = { Accept: "text/event-stream, application/json" };
    const lastId = position();
    if (lastId) headers["Last-Event-ID"] = lastId;
    return fetch(session.streamPath() + query, { headers, signal, credentials: "same-origin", cache: "no-store" });
  }

  /**
   * Reads events until the body ends; throws if it breaks. A clean end (the server's goodbye on
   * shutdown, or its end at auth expiry) reconnects after the server's `retry:`.
   * @param {Response} response @param {() => boolean} overtaken
   */
  async #read(response, overtaken) {
    const body = /** @type {ReadableStream<BufferSource>} */ (response.body);
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    const parser = new SseParser();
    for (;;) {
      const { done, value } = await reader.read();
      if (overtaken()) return;
      if (done) break;
      this.#heardAt = performance.now();
      for (const event of parser.push(value)) {
        this.#context.received(event);
        // The token behind this stream expired: a fresh ticket (or the cookie, if renewed) resumes
        // from the position; a 401 on the way means the operator has to sign in again.
        if (event.type === "auth-expired") this.#connect();
        if (overtaken()) return; // the event moved the page on (a new attempt, a sign-out)
      }
    }
    this.#backoff.step(); // taken, so that failures right after this one wait longer
    this.#retryAfter(parser.retryMs ?? DEFAULT_RETRY_MS, null);
  }

  /** @param {Response} response @param {() => boolean} overtaken */
  async #refused(response, overtaken) {
    const { status } = response;
    const wait = Math.max(retryAfterMs(response), jitter(this.#backoff.step()));
    const reason = await reasonOf(response);
    if (overtaken()) return;
    if (status === 401) this.#context.unauthorized();
    else if (FINAL.has(status)) this.#to("unavailable", { status, reason, retryAt: null });
    else this.#retryAfter(wait, { status, reason, retryAt: null });
  }

  /** @param {number} waitMs @param {Refusal | null} refusal */
  #retryAfter(waitMs, refusal) {
    this.#to("backoff", refusal && { ...refusal, retryAt: Date.now() + waitMs });
    this.#timer = setTimeout(() => this.#connect(), waitMs);
  }
}

/** @param {Response} response */
function isEventStream(response) {
  return response.status === 200 && (response.headers.get("Content-Type") ?? "").startsWith("text/event-stream");
}

/** What the server asked for, in ms: never sooner. Seconds or an HTTP date. @param {Response} response */
function retryAfterMs(response) {
  const raw = response.headers.get("Retry-After");
  if (!raw) return 0;
  const seconds = Number(raw);
  const ms = Number.isFinite(seconds) ? seconds * 1000 : Date.parse(raw) - Date.now();
  return Number.isFinite(ms) ? Math.max(0, ms) : 0;
}

/** The gateway's JSON `{"error": reason}`, else the status text. @param {Response} response @returns {Promise<string>} */
async function reasonOf(response) {
  try {
    const body = await response.json();
    if (body && typeof body.error === "string") return body.error;
  } catch {
    // not JSON: a proxy's page
  }
  return response.statusText || `HTTP ${response.status}`;
}
