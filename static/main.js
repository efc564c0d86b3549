// The wellstream operator dashboard: a tile per well, ONE stream for every well of the tenant
// (GET /tenants/{tenant}/stream: one connection for 5 wells or 2,000, over HTTP/1.1 and HTTP/2
// alike), the DOM written once per animation frame. ES modules served as they are by the
// gateway: no build step.
//
//   main.js         this file: the app's state and the page's events, wired to the modules below
//   session.js      who is signed in (cookie or ticket mode), a token's tenant, and the requests that depend on it
//   model.js        wells, tags, quality and the server's reasons (STALE among them), the stream's position and
//                   state: plain data, changed only by its functions
//   connection.js   the stream's state machine: fetch(), tickets, backoff, the silence watchdog
//   sse.js          the event-stream parser connection.js reads the body with
//   feed.js         what the stream's events and moves do to the model
//   backoff.js      the one backoff, for the stream and the list of wells
//   render.js       draws the model once per animation frame, only what changed, in the view's order
//   tile.js         one well's tile in the DOM
//   toolbar.js      the view: filter by name, sort by name or state (worst first), compact tiles
//   page.js         the sign-in form, switching sessions from a link, the sign-out button, the notice
//   keyboard.js     arrow keys, Home and End between the tiles
//   diagnostics.js  window.wellstream, for the tests and the console

import { Backoff, sleep } from "./backoff.js";
import { Connection, HEARTBEAT_MS } from "./connection.js";
import { createDiagnostics } from "./diagnostics.js";
import { Feed } from "./feed.js";
import { enableTileNavigation } from "./keyboard.js";
import { addWell, advanceClock, createModel, resetWells } from "./model.js";
import {
  clearEnteredToken, enteredToken, findElements, hideSwitchSession, navigationProtocol, showNotice, showSignIn,
  showSignInReason, showSignedIn, showSwitchSession,
} from "./page.js";
import { Renderer } from "./render.js";
import { Session, rememberedTenant, tokenTenant } from "./session.js";
import { createView, enableToolbar } from "./toolbar.js";

// Wells registered without a reading yet get a tile without a reload (a reading brings its well by itself).
const WELLS_REFRESH_MS = 60000;
// Ages, a reconnecting well turning offline and the order by state move with the clock, not only with
// events. STALE does not: it is the server's verdict, carried by a reading (model.js).
const CLOCK_MS = 1000;

/** @typedef {{token: string, preferTickets: boolean}} Link  a token from the address bar (`#token=…&auth=ticket`) */

const dom = findElements(document);
/** The one state the page has; this module owns it, the others get what they need from it. */
const app = createApp();
window.wellstream = app.diagnostics;

function createApp() {
  const session = new Session();
  const model = createModel(navigator.onLine);
  const view = createView();
  const diagnostics = createDiagnostics(model, () => session.mode, navigationProtocol,
    dom.indicator.dataset.state ?? "");
  const renderer = new Renderer(model, view, dom, diagnostics);
  const feed = new Feed(model, diagnostics, renderer);
  const connection = new Connection({
    session,
    position: () => feed.position(),
    received: (event) => feed.received(event),
    moved: (from, to, refusal) => feed.moved(from, to, refusal),
    unauthorized: () => signOut("Your session has ended. Sign in again."),
  }, { heartbeatMs: heartbeatMs() });
  /** @type {Link | null} a link's token while the operator decides whether to switch to it; never stored */
  const offered = null;
  return Object.seal({ session, model, view, diagnostics, renderer, connection, wellsTimer: 0, offered });
}

/**
 * The gateway's heartbeat interval, when it is not the default 15 s (stream.heartbeat_s):
 * `?heartbeatS=` on the page's address. The stream counts as silent after 2.5 of them.
 */
function heartbeatMs() {
  const seconds = Number(new URLSearchParams(location.search).get("heartbeatS"));
  return seconds > 0 ? seconds * 1000 : HEARTBEAT_MS;
}

// ---- signing in and out ----

/** @param {string} reason  shown on the sign-in form */
function signOut(reason) {
  app.model.signedOut = true;
  app.session.forget();
  app.connection.stop();
  showSignIn(dom, reason);
  app.renderer.schedule();
}

/**
 * Nothing of the wells shown so far stays (another tenant, or signed out on purpose), nor the
 * stream's position. Their tiles go with the next frame; this asks for none, because in start()
 * a frame drawn before the list of wells has answered would say Connecting before the header can
 * say whether it came.
 * @param {string | null} tenant
 */
function clearWall(tenant) {
  app.connection.stop();
  resetWells(app.model, tenant);
}

async function start() {
  if (app.model.tenant !== app.session.tenant) clearWall(app.session.tenant);
  app.model.signedOut = false;
  showSignedIn(dom, app.session.tenant);
  const names = await loadWells();
  if (!names) return;
  showNotice(dom, names.length ? "" : "This token may not see any well of this tenant.");
  addWells(names);
  app.connection.start();
  clearInterval(app.wellsTimer);
  app.wellsTimer = setInterval(refreshWells, WELLS_REFRESH_MS);
}

/** The tenant's wells, asked again (with backoff) until they come. @returns {Promise<string[] | null>} null: signed out */
async function loadWells() {
  const backoff = new Backoff();
  for (;;) {
    const { status, names } = await app.session.fetchWells();
    app.model.wellsRefused = names || status === 401 ? null : status;
    app.renderer.schedule();
    if (status === 401) {
      signOut("Sign in to see your wells.");
      return null;
    }
    if (names) return names;
    await sleep(backoff.step());
  }
}

async function refreshWells() {
  if (app.model.signedOut) return;
  const { names } = await app.session.fetchWells();
  if (!names || app.model.signedOut) return;
  addWells(names);
  app.connection.start(); // a stream refused for good (400, 403, 404) tries again now
}

/** New wells get a tile; the one stream already carries them. @param {string[]} names */
function addWells(names) {
  const now = Date.now();
  for (const name of names) {
    if (!app.model.wells.has(name)) addWell(app.model, name, now);
  }
  app.renderer.schedule();
}

dom.signIn.addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    await app.session.signIn(enteredToken(dom), false);
  } catch (error) {
    showSignInReason(dom, /** @type {Error} */ (error).message);
    return;
  }
  clearEnteredToken(dom);
  await start();
});

dom.signOut.addEventListener("click", async () => {
  await app.session.end();
  signOut("Signed out.");
  clearWall(null); // signed out on purpose: nothing of this tenant stays on the screen
});

enableToolbar(dom, app.view, () => app.renderer.viewChanged());

// ---- the clock and the network ----

setInterval(() => {
  const now = Date.now();
  app.model.online = navigator.onLine; // the events below make it prompt; this makes it certain
  advanceClock(app.model, now);
  app.renderer.everythingChanged();
}, CLOCK_MS);

window.addEventListener("offline", () => {
  app.model.online = navigator.onLine;
  app.connection.networkLost();
  app.renderer.schedule();
});

window.addEventListener("online", () => {
  app.model.online = navigator.onLine;
  app.connection.resumeNow();
  app.renderer.schedule();
});

enableTileNavigation(dom.wells);

// ---- a link with a token: the demo's, or someone else's ----

/**
 * The token after `#token=`, taken out of the address bar, bookmarks and screenshots.
 * @returns {Link | null}
 */
function takeLinkFromAddress() {
  const hash = new URLSearchParams(location.hash.slice(1));
  const token = hash.get("token");
  if (!token) return null;
  history.replaceState(null, "", location.pathname + location.search);
  return { token, preferTickets: hash.get("auth") === "ticket" };
}

/** The tenant whose session this browser has: this tab's, else the one remembered. @returns {string | null} */
function currentTenant() {
  return (!app.model.signedOut && app.session.tenant) || rememberedTenant();
}

/**
 * Without a session a link signs in at once (the demo's). Over one it only asks, naming both
 * tenants: anyone can send a link, and one that silently replaced the session would have the
 * operator watching the sender's wells for their own (login CSRF).
 * @param {Link} link
 */
async function followLink(link) {
  const current = currentTenant();
  if (!current) {
    await signInWith(link);
    return;
  }
  app.offered = link;
  showSwitchSession(dom, tokenTenant(link.token), current);
}

/** @param {Link} link */
async function signInWith(link) {
  try {
    await app.session.signIn(link.token, link.preferTickets);
  } catch (error) {
    signOut(/** @type {Error} */ (error).message);
    return;
  }
  await start();
}

/** The link's token is dropped; a wall already live goes on untouched, else the session is resumed. */
async function stay() {
  if (app.session.tenant && !app.model.signedOut) return;
  if (app.session.restore()) await start();
  else signOut("");
}

dom.switchSession.addEventListener("submit", async (event) => {
  event.preventDefault();
  const link = app.offered;
  app.offered = null;
  hideSwitchSession(dom);
  if (link) await signInWith(link);
});

dom.switchStay.addEventListener("click", async () => {
  app.offered = null;
  hideSwitchSession(dom);
  await stay();
});

// A link opened in a tab that is already on the dashboard changes only the fragment: no reload.
window.addEventListener("hashchange", () => {
  const link = takeLinkFromAddress();
  if (link) followLink(link);
});

// ---- start: a token in the URL (the demo's link), else the session cookie ----

async function main() {
  const link = takeLinkFromAddress();
  if (link) await followLink(link);
  else if (app.session.restore()) await start();
  else signOut("");
}

main();
