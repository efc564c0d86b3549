// Who the page is signed in as, and the requests whose credentials depend on it.
//
// mode "cookie": the HttpOnly session cookie authenticates everything, the stream included.
// mode "ticket": a Bearer token held in memory (never stored) authenticates the page's requests
// and buys a single-use ticket for every (re)connect of the stream, so no token is in its URL.

const TENANT_KEY = "wellstream.tenant";

/** @typedef {"cookie" | "ticket"} Mode */

/** @param {string} jwt */
function claims(jwt) {
  const part = jwt.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
  return JSON.parse(atob(part));
}

/**
 * The tenant a token says it is for, unverified: enough to name it to the operator, who decides; the
 * gateway checks the signature when the token is used.
 * @param {string} token @returns {string | null} null: not a wellstream token
 */
export function tokenTenant(token) {
  try {
    const { tenant_id: snake, tenantId: camel } = claims(token);
    const tenant = snake || camel;
    return typeof tenant === "string" && tenant ? tenant : null;
  } catch {
    return null;
  }
}

/**
 * The tenant this browser last signed in to with the cookie, if it did not sign out since. The cookie
 * is HttpOnly, so this is the page's only sign of a session before it asks the gateway.
 * @returns {string | null}
 */
export function rememberedTenant() {
  return localStorage.getItem(TENANT_KEY);
}

export class Session {
  /** @type {Mode} */
  #mode = "cookie";
  /** @type {string | null} only in ticket mode */
  #bearer = null;
  /** @type {string | null} */
  #tenant = null;

  get mode() { return this.#mode; }
  get tenant() { return this.#tenant; }

  /**
   * Trade a token for the session cookie, or keep it in memory when tickets are preferred or the
   * cookie cannot be had.
   * @param {string} token @param {boolean} preferTickets
   * @throws {Error} with a message for the operator when the token is not one or is refused
   */
  async signIn(token, preferTickets) {
    const tenant = tokenTenant(token);
    if (!tenant) throw new Error("That is not a wellstream token.");
    if (!preferTickets) {
      // The cookie is HttpOnly: after this the token is not kept anywhere the page's scripts can read.
      const response = await fetch("/auth/session", {
        method: "POST", credentials: "same-origin", headers: { Authorization: `Bearer ${token}` },
      });
      if (response.status === 401 || response.status === 403) throw new Error("The token was refused (expired or invalid).");
      if (response.ok) {
        this.#mode = "cookie";
        this.#bearer = null;
        const named = (await response.json()).tenantId || tenant;
        this.#tenant = named;
        localStorage.setItem(TENANT_KEY, named);
        return;
      }
    }
    this.#mode = "ticket";
    this.#bearer = token;
    this.#tenant = tenant;
  }

  /** A page opened without a token: the cookie may still be valid for the tenant remembered. @returns {boolean} */
  restore() {
    this.#tenant = new URLSearchParams(location.search).get("tenant") || rememberedTenant();
    return Boolean(this.#tenant);
  }

  /** The session is over (refused, or signed out): the token goes; the operator signs in again. */
  forget() {
    this.#bearer = null;
  }

  /** Signing out on purpose: the cookie is cleared on the server and the tenant forgotten here. */
  async end() {
    await fetch("/auth/session", { method: "DELETE", credentials: "same-origin" }).catch(() => null);
    localStorage.removeItem(TENANT_KEY);
  }

  /** @param {string} suffix @returns {string} a path under the tenant */
  path(suffix) {
    return `/tenants/${encodeURIComponent(this.#tenant ?? "")}${suffix}`;
  }

  /** The one stream of every well the token may see. @returns {string} */
  streamPath() {
    return this.path("/stream");
  }

  /** @param {Record<string, string>} [extra] @returns {Record<string, string>} */
  headers(extra = {}) {
    return this.#bearer ? { ...extra, Authorization: `Bearer ${this.#bearer}` } : extra;
  }

  /**
   * The tenant's wells: `names` when they came, else the status that refused them (0: no answer).
   * @returns {Promise<{status: number, names: string[] | null}>}
   */
  async fetchWells() {
    try {
      const response = await fetch(this.path("/wells"), { credentials: "same-origin", headers: this.headers() });
      return { status: response.status, names: response.ok ? (await response.json()).wells : null };
    } catch {
      return { status: 0, names: null };
    }
  }

  /**
   * A single-use ticket for a stream of every well the token may see (ticket mode).
   * @param {AbortSignal} signal @returns {Promise<Response>}
   */
  buyTicket(signal) {
    return fetch(this.path("/stream-tickets"), {
      method: "POST", credentials: "same-origin", headers: this.headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({ wells: null }), signal,
    });
  }
}
