// The wellstream operator dashboard: a tile per well, one EventSource per well, the DOM written
// once per animation frame. ES modules served as they are by the gateway: no build step.
//
//   main.js         this file: the app's state and the page's events, wired to the modules below
//   session.js      who is signed in (cookie or ticket mode) and the requests that depend on it
//   model.js        wells, tags, quality, STALE, counts: plain data, changed only by its functions
//   connection.js   one per well: the stream's state machine (EventSource, backoff, probe, tickets)
//   backoff.js      the one backoff, for the streams and the list of wells
//   render.js       draws the model once per animation frame, only what changed
//   page.js         the sign-in form, the sign-out button, the notice
//   keyboard.js     arrow keys, Home and End between the tiles
//   diagnostics.js  window.wellstream, for the tests and the console

import { Backoff, sleep } from "./backoff.js";
import { Connection } from "./connection.js";
import { createDiagnostics } from "./diagnostics.js";
import { enableTileNavigation } from "./keyboard.js";
import { addWell, advanceClock, createModel, resetWells } from "./model.js";
import {
  clearEnteredToken, enteredToken, findElements, navigationProtocol, showNotice, showSignIn, showSignInReason,
  showSignedIn,
} from "./page.js";
import { Renderer } from "./render.js";
import { Session } from "./session.js";

// Wells registered later (a new site, ingestion publishing for a new well) get a tile without a reload.
const WELLS_REFRESH_MS = 60000;
// Ages and STALE move with the clock, not only with readings.
const CLOCK_MS = 1000;
const HTTP1_NOTICE = "This page came over HTTP/1.1, where a browser keeps at most 6 connections per server: only " +
  "about 5 wells can stream at once. Serve the dashboard over HTTPS with HTTP/2 to see them all live.";

const dom = findElements(document);
/** The one state the page has; this module owns it, the others get what they need from it. */
const app = createApp();
window.wellstream = app.diagnostics;

function createApp() {
  const session = new Session();
  const model = createModel(navigator.onLine);
  const diagnostics = createDiagnostics(() => session.mode, navigationProtocol, dom.indicator.dataset.state ?? "");
  const renderer = new Renderer(model, dom, diagnostics);
  /** @type {import("./connection.js").Context} */
  const context = {
    model, session, diagnostics,
    changed: (well, tags) => renderer.changed(well, tags),
    unauthorized: () => signOut("Your session has ended. Sign in again."),
  };
  return Object.seal({
    session, model, diagnostics, renderer, context,
    /** @type {Map<string, Connection>} by well name, as model.wells */
    connections: new Map(),
    wellsTimer: 0,
  });
}

// ---- signing in and out ----

/** @param {string} reason  shown on the sign-in form */
function signOut(reason) {
  app.model.signedOut = true;
  app.session.forget();
  for (const connection of app.connections.values()) connection.stop();
  showSignIn(dom, reason);
  app.renderer.schedule();
}

/**
 * Nothing of the wells shown so far stays (another tenant, or signed out on purpose). Their tiles
 * go with the next frame; this asks for none, because in start() a frame drawn before the list
 * of wells has answered would say Connecting before the header can say whether it came.
 * @param {string | null} tenant
 */
function clearWall(tenant) {
  for (const connection of app.connections.values()) connection.close();
  app.connections.clear();
  resetWells(app.model, tenant);
}

async function start() {
  if (app.model.tenant !== app.session.tenant) clearWall(app.session.tenant);
  app.model.signedOut = false;
  showSignedIn(dom, app.session.tenant);
  const names = await loadWells();
  if (!names) return;
  if (!names.length) showNotice(dom, "This token may not see any well of this tenant.");
  else if (names.length > 5 && navigationProtocol() === "http/1.1") showNotice(dom, HTTP1_NOTICE);
  addWells(names);
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
  if (names && !app.model.signedOut) addWells(names);
}

/** New wells get a tile and a connection; every well not streaming (new, stopped, unavailable) connects. @param {string[]} names */
function addWells(names) {
  for (const name of names) {
    if (!app.model.wells.has(name)) app.connections.set(name, new Connection(addWell(app.model, name), app.context));
  }
  for (const connection of app.connections.values()) connection.start();
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

// ---- the clock and the network ----

setInterval(() => {
  const now = Date.now();
  app.model.online = navigator.onLine; // the events below make it prompt; this makes it certain
  advanceClock(app.model, now);
  app.renderer.everythingChanged();
}, CLOCK_MS);

window.addEventListener("offline", () => {
  app.model.online = navigator.onLine;
  app.renderer.schedule();
});

window.addEventListener("online", () => {
  app.model.online = navigator.onLine;
  for (const connection of app.connections.values()) connection.resumeNow();
  app.renderer.schedule();
});

enableTileNavigation(dom.wells);

// ---- start: a token in the URL (the demo's link), else the session cookie ----

async function main() {
  const hash = new URLSearchParams(location.hash.slice(1));
  const token = hash.get("token");
  if (token) {
    // Keep the token out of the address bar, bookmarks and screenshots.
    history.replaceState(null, "", location.pathname + location.search);
    try {
      await app.session.signIn(token, hash.get("auth") === "ticket");
    } catch (error) {
      signOut(/** @type {Error} */ (error).message);
      return;
    }
  } else if (!app.session.restore()) {
    signOut("");
    return;
  }
  await start();
}

main();
