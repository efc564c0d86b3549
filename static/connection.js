// One well's stream: an EventSource wrapped in an explicit state machine. The moves:
//
//   idle, unavailable ─start()──▶ connecting   the requests before a stream: GET /latest on a fresh
//                                               page, then a ticket, or a HEAD probe on a reconnect
//   connecting ─passed──▶ opening               EventSource created, not yet open
//              ─403, 404─▶ unavailable
//              ─5xx, 429, no answer─▶ backoff   (a 401 signs the page out, which stops every connection)
//   opening, retrying ─open──▶ live
//   opening, live, retrying ─error──▶ retrying  cookie mode: the browser reconnects with Last-Event-ID
//   opening, live, retrying ─error──▶ backoff   closed for good (a proxy's 502), or a used ticket
//   live ─auth-expired──▶ connecting
//   backoff ─timer, or back online──▶ connecting
//   any ─stop()──▶ idle (signed out)             any ─close()──▶ closed (the well left the wall)
//
// Every move goes through #to(), which keeps two invariants: an EventSource exists exactly in
// opening, live and retrying; a timer exactly in backoff.

import { Backoff, jitter } from "./backoff.js";
import { countOwnReconnect, recordReceived } from "./diagnostics.js";
import { advanceTo, applyLatest, applyReading, applyReset, applySnapshot, setLink } from "./model.js";

// The first reconnect after a live stream ended is spread over this window, like the server's
// jittered retry hint on shutdown: every dashboard on the wall comes back, but not at once.
const RECONNECT_SPREAD_MS = 2500;

/** @typedef {"idle" | "connecting" | "opening" | "live" | "retrying" | "backoff" | "unavailable" | "closed"} State */

/** @type {Record<State, State[]>} the states each state may move to; any other move is a bug */
const NEXT = {
  idle: ["connecting", "idle", "closed"],
  connecting: ["opening", "backoff", "unavailable", "idle", "closed"],
  opening: ["live", "retrying", "backoff", "idle", "closed"],
  live: ["connecting", "retrying", "backoff", "idle", "closed"],
  retrying: ["live", "retrying", "backoff", "idle", "closed"],
  backoff: ["connecting", "idle", "closed"],
  unavailable: ["connecting", "idle", "closed"],
  closed: [],
};
const WITH_SOURCE = new Set(["opening", "live", "retrying"]);

/**
 * @typedef {import("./model.js").Model} Model
 * @typedef {import("./model.js").Well} Well
 * @typedef {import("./model.js").Tag} Tag
 * @typedef {import("./model.js").Link} Link
 * @typedef {object} Context  what a connection needs from the page
 * @property {Model} model
 * @property {import("./session.js").Session} session
 * @property {import("./diagnostics.js").Diagnostics} diagnostics
 * @property {(well: Well, tags: Tag[]) => void} changed  the model changed: show it
 * @property {() => void} unauthorized  a 401: the page signs out, which stops every connection
 */

/**
 * The word a well's tile shows after a move, or null to keep the one it has: a first attempt
 * keeps "connecting", and a well stopped while signed out keeps its word until it connects again.
 * @param {State} from @param {State} to @param {Link} shown @returns {Link | null}
 */
function linkAfter(from, to, shown) {
  switch (to) {
    case "live": return "live";
    case "retrying": return "reconnecting";
    case "unavailable": return "unavailable";
    case "backoff": return shown === "offline" ? "offline" : "reconnecting";
    case "connecting": return from === "live" ? "reconnecting" : null; // auth-expired
    default: return null;
  }
}

/** @param {string} text @returns {any} the JSON value, or undefined if it is not JSON */
function parseJson(text) {
  try { return JSON.parse(text); } catch { return undefined; }
}

export class Connection {
  /** @type {State} */
  state = "idle";
  /** @type {Well} */
  #well;
  /** @type {Context} */
  #context;
  /** @type {EventSource | null} */
  #source = null;
  #timer = 0;
  #backoff = new Backoff();
  // Bumped by every connect: an attempt overtaken (stopped, or started again) gives up after its awaits.
  #attempt = 0;
  // EventSources opened so far: after the first, a HEAD probe comes before each, and each counts as our own reconnect.
  #opened = 0;

  /** @param {Well} well @param {Context} context */
  constructor(well, context) {
    this.#well = well;
    this.#context = context;
    Object.seal(this);
  }

  /** Connect unless something is under way: a new well, signed in again, or another try after a 403/404. */
  start() {
    if (this.state === "idle" || this.state === "unavailable") this.#connect();
  }

  /** Back on the network: a well waiting out a backoff tries now instead of at the end of it. */
  resumeNow() {
    if (this.state !== "backoff") return;
    this.#backoff.reset();
    this.#connect();
  }

  /** Signed out: no stream, nothing pending. start() resumes from the last id, with a fresh backoff. */
  stop() {
    if (this.state === "closed") return;
    this.#backoff.reset();
    this.#to("idle");
  }

  /** The well left the wall, for good. */
  close() {
    if (this.state !== "closed") this.#to("closed");
  }

  /** @param {State} next */
  #to(next) {
    const from = this.state;
    if (!NEXT[from].includes(next)) throw new Error(`well ${this.#well.name}: no move from ${from} to ${next}`);
    this.state = next;
    clearTimeout(this.#timer);
    this.#timer = 0;
    if (!WITH_SOURCE.has(next) && this.#source) {
      this.#source.close();
      this.#source = null;
    }
    const link = linkAfter(from, next, this.#well.link);
    if (link) {
      const shown = this.#well.link;
      setLink(this.#well, link, Date.now());
      if (link !== shown) this.#context.changed(this.#well, []);
    }
  }

  async #connect() {
    this.#to("connecting");
    const attempt = ++this.#attempt;
    const overtaken = () => this.#attempt !== attempt || this.state !== "connecting";
    // Until a first snapshot or replay gave the well a position, so a failed backfill is tried again.
    if (!this.#well.lastId) await this.#backfill(overtaken);
    if (overtaken()) return;
    const { session } = this.#context;
    const path = session.streamPath(this.#well.name);
    const params = new URLSearchParams();
    if (this.#well.lastId) params.set("lastEventId", this.#well.lastId);
    const { status, retryAfterS, ticket } = await this.#preflight(`${path}?${params}`);
    if (overtaken()) return;
    if (status === 401) this.#context.unauthorized();
    else if (status === 403 || status === 404) this.#to("unavailable");
    else if (status < 200 || status > 299) this.#backOff(retryAfterS, false);
    else {
      if (ticket) params.set("ticket", ticket);
      this.#open(`${path}?${params}`);
    }
  }

  /** @param {() => boolean} overtaken */
  async #backfill(overtaken) {
    const latest = await this.#context.session.fetchLatest(this.#well.name);
    if (!latest || overtaken()) return; // without it, the stream's snapshot will do
    const { model, changed } = this.#context;
    changed(this.#well, applyLatest(model, this.#well, latest, Date.now()));
  }

  /**
   * What an EventSource would hide: why it is refused. Ticket mode buys the ticket; a cookie
   * reconnect first asks HEAD on the stream (answered without streaming), which tells an expired
   * session (401: sign in again) from a proxy's 502 (wait, retry). A first open just opens.
   * @param {string} url  the stream, for the probe
   * @returns {Promise<{status: number, retryAfterS: number, ticket: string | null}>}
   */
  async #preflight(url) {
    const { session } = this.#context;
    try {
      let response = null;
      let ticket = null;
      if (session.mode === "ticket") {
        response = await session.buyTicket(this.#well.name);
        if (response.ok) ticket = (await response.json()).ticket;
      } else if (this.#opened > 0) {
        response = await fetch(url, { method: "HEAD", credentials: "same-origin" });
      }
      if (!response) return { status: 200, retryAfterS: 0, ticket };
      return { status: response.status, retryAfterS: Number(response.headers.get("Retry-After")) || 0, ticket };
    } catch {
      return { status: 0, retryAfterS: 0, ticket: null }; // no answer: the gateway or the proxy is down
    }
  }

  /** @param {number} retryAfterS  what the server asked for; never sooner @param {boolean} afterLive */
  #backOff(retryAfterS, afterLive) {
    const step = jitter(this.#backoff.step()); // taken either way, so the failures after this one wait longer
    const wait = afterLive ? Math.random() * RECONNECT_SPREAD_MS : step;
    this.#to("backoff");
    this.#timer = setTimeout(() => this.#connect(), Math.max(retryAfterS * 1000, wait));
  }

  /** @param {string} url */
  #open(url) {
    if (this.#opened > 0) countOwnReconnect(this.#context.diagnostics);
    this.#opened += 1;
    const source = new EventSource(url, { withCredentials: true });
    this.#source = source;
    this.#to("opening");
    /** @param {string} type @param {(event: MessageEvent) => void} handle */
    const on = (type, handle) => {
      source.addEventListener(type, (event) => {
        if (this.#source === source) handle(/** @type {MessageEvent} */ (event));
      });
    };
    on("open", () => {
      this.#backoff.reset();
      this.#to("live");
    });
    on("snapshot", (event) => this.#onSnapshot(event));
    on("reading", (event) => this.#onReading(event));
    on("reset", (event) => this.#onReset(event));
    // The token behind this stream expired: a fresh ticket (or the cookie, if renewed) resumes
    // from the last id; a 401 on the way means the operator has to sign in again.
    on("auth-expired", () => this.#connect());
    on("error", () => this.#onError(source));
  }

  /** @param {EventSource} source */
  #onError(source) {
    if (this.#context.session.mode === "ticket" || source.readyState === EventSource.CLOSED) {
      // A used ticket cannot reconnect, and a CLOSED EventSource (a 502/503 from a proxy, a 401)
      // never retries: reconnect ourselves, from the last id we have.
      this.#backOff(0, this.state === "live");
    } else {
      this.#to("retrying");
    }
  }

  /** @param {MessageEvent} event */
  #onSnapshot(event) {
    recordReceived(this.#context.diagnostics, this.#well.name, "snapshot", event.lastEventId);
    const data = parseJson(event.data);
    if (data === undefined) return;
    const { model, changed } = this.#context;
    changed(this.#well, applySnapshot(model, this.#well, event.lastEventId, data, Date.now()));
  }

  /** @param {MessageEvent} event */
  #onReading(event) {
    recordReceived(this.#context.diagnostics, this.#well.name, "reading", event.lastEventId);
    if (!advanceTo(this.#well, event.lastEventId)) return;
    const reading = parseJson(event.data);
    if (reading === undefined) return;
    const { model, changed } = this.#context;
    const tag = applyReading(model, this.#well, reading, Date.now());
    if (tag) changed(this.#well, [tag]);
  }

  /** @param {MessageEvent} event */
  #onReset(event) {
    recordReceived(this.#context.diagnostics, this.#well.name, "reset", event.lastEventId);
    applyReset(this.#well);
  }
}
