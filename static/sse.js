// Server-Sent Events, parsed from a fetch() body as the HTML standard's EventSource parses them
// (https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation).
// The page reads its stream with fetch() rather than EventSource, because fetch can send
// Last-Event-ID as a header on every connect, shows a refusal's status and JSON reason, and
// lets the page see every byte (so a stream that is open but silent can be told from a live one).

/**
 * One dispatched event.
 * @typedef {object} SseEvent
 * @property {string} type  the `event:` field, "message" without one
 * @property {string} data  the `data:` lines, joined with "\n"
 * @property {string} id  the stream's last event id after this event (as EventSource's lastEventId: an event without `id:` keeps the one before)
 */

const LINE_END = /\r\n|\r|\n/g;

/** Text in, events out; keeps what a chunk leaves unfinished (half a line, half an event) for the next one. */
export class SseParser {
  #rest = "";
  #started = false;
  // A chunk that ended in "\r" ended a line; a "\n" starting the next chunk is that same line end.
  #skipLf = false;
  /** @type {string[]} */
  #data = [];
  #type = "";
  #lastId = "";
  /** @type {number | null} */
  #retryMs = null;

  /** The last `retry:` the server sent, in ms; null until it sent one. */
  get retryMs() { return this.#retryMs; }

  /**
   * @param {string} chunk  decoded text, as it arrived
   * @returns {SseEvent[]} the events it completed, in order
   */
  push(chunk) {
    let text = chunk;
    if (!this.#started && text) {
      this.#started = true;
      if (text.charCodeAt(0) === 0xfeff) text = text.slice(1); // a leading BOM is not content
    }
    if (this.#skipLf && text) {
      if (text[0] === "\n") text = text.slice(1);
      this.#skipLf = false;
    }
    text = this.#rest + text;
    /** @type {SseEvent[]} */
    const events = [];
    let start = 0;
    LINE_END.lastIndex = 0;
    for (let match = LINE_END.exec(text); match; match = LINE_END.exec(text)) {
      this.#line(text.slice(start, match.index), events);
      start = LINE_END.lastIndex;
    }
    this.#rest = text.slice(start);
    this.#skipLf = text.endsWith("\r");
    return events;
  }

  /** @param {string} line @param {SseEvent[]} events */
  #line(line, events) {
    if (line === "") {
      this.#dispatch(events);
      return;
    }
    if (line[0] === ":") return; // a comment (the per-well streams' heartbeat)
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value[0] === " ") value = value.slice(1);
    if (field === "data") this.#data.push(value);
    else if (field === "event") this.#type = value;
    else if (field === "id" && !value.includes("\0")) this.#lastId = value;
    else if (field === "retry" && /^\d+$/.test(value)) this.#retryMs = Number(value);
  }

  /** @param {SseEvent[]} events */
  #dispatch(events) {
    // An event without data is not dispatched; its `event:` name goes with it, its `id:` stays.
    if (this.#data.length) {
      events.push({ type: this.#type || "message", data: this.#data.join("\n"), id: this.#lastId });
    }
    this.#data = [];
    this.#type = "";
  }
}
