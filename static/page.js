// The page around the wells: its elements, the sign-in form, the sign-out button, the toolbar
// and the notice.
// Written directly when the session changes (rare, and the operator is waiting for it), unlike
// the wells and the header, which render.js draws once per frame.

/**
 * @typedef {object} Elements
 * @property {HTMLElement} tenant
 * @property {HTMLElement} summary
 * @property {HTMLElement} indicator
 * @property {HTMLElement} notice
 * @property {HTMLElement} streamStatus  why the stream is not live (render.js writes it)
 * @property {HTMLElement} toolbar
 * @property {HTMLInputElement} filter
 * @property {HTMLSelectElement} sort
 * @property {HTMLInputElement} compact
 * @property {HTMLFormElement} signIn
 * @property {HTMLElement} signInReason
 * @property {HTMLTextAreaElement} signInToken
 * @property {HTMLButtonElement} signOut
 * @property {HTMLElement} wells
 */

/** @param {Document} document @returns {Elements} */
export function findElements(document) {
  const byId = (/** @type {string} */ id) => /** @type {any} */ (document.getElementById(id));
  return Object.freeze({
    tenant: byId("tenant"),
    summary: byId("summary"),
    indicator: byId("indicator"),
    notice: byId("notice"),
    streamStatus: byId("stream-status"),
    toolbar: byId("toolbar"),
    filter: byId("filter"),
    sort: byId("sort"),
    compact: byId("compact"),
    signIn: byId("sign-in"),
    signInReason: byId("sign-in-reason"),
    signInToken: byId("sign-in-token"),
    signOut: byId("sign-out"),
    wells: byId("wells"),
  });
}

/** Signed out: the form, with why. @param {Elements} dom @param {string} reason */
export function showSignIn(dom, reason) {
  dom.signOut.hidden = true;
  dom.toolbar.hidden = true;
  dom.signInReason.textContent = reason;
  dom.signIn.hidden = false;
}

/** @param {Elements} dom @param {string | null} tenant */
export function showSignedIn(dom, tenant) {
  dom.signIn.hidden = true;
  dom.tenant.textContent = tenant;
  dom.signOut.hidden = false;
  dom.toolbar.hidden = false;
}

/** Why the token in the form was not taken; the form stays. @param {Elements} dom @param {string} reason */
export function showSignInReason(dom, reason) {
  dom.signInReason.textContent = reason;
}

/** @param {Elements} dom @returns {string} */
export function enteredToken(dom) {
  return dom.signInToken.value.trim();
}

/** Taken: the token does not stay in the form. @param {Elements} dom */
export function clearEnteredToken(dom) {
  dom.signInToken.value = "";
}

/** @param {Elements} dom @param {string} text */
export function showNotice(dom, text) {
  dom.notice.hidden = !text;
  dom.notice.textContent = text || "";
}

/** What the page itself came over: "h2", "http/1.1", or "" if the browser does not say. */
export function navigationProtocol() {
  const [entry] = /** @type {PerformanceNavigationTiming[]} */ (performance.getEntriesByType("navigation"));
  return entry ? entry.nextHopProtocol : "";
}
