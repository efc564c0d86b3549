// The page around the wells: its elements, the sign-in form, the question whether to switch
// sessions, the sign-out button, the toolbar and the notice.
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
 * @property {HTMLFormElement} switchSession  a link's token over a session: switch or stay
 * @property {HTMLElement} switchTo
 * @property {HTMLElement} switchFrom
 * @property {HTMLButtonElement} switchConfirm
 * @property {HTMLButtonElement} switchStay
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
    switchSession: byId("switch-session"),
    switchTo: byId("switch-to"),
    switchFrom: byId("switch-from"),
    switchConfirm: byId("switch-confirm"),
    switchStay: byId("switch-stay"),
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

/**
 * A link brought a token while a session exists: which tenant it is for and which one is open, as
 * text (the token's claims are anyone's to write). Staying is the default: it has the focus, and a
 * token that names no tenant can only be declined.
 * @param {Elements} dom @param {string | null} to  the link's tenant @param {string} from  the session's
 */
export function showSwitchSession(dom, to, from) {
  dom.signIn.hidden = true;
  dom.switchTo.textContent = to ?? "(none: its token is not a wellstream token)";
  dom.switchFrom.textContent = from;
  dom.switchConfirm.disabled = !to;
  dom.switchSession.hidden = false;
  dom.switchStay.focus();
}

/** Answered. @param {Elements} dom */
export function hideSwitchSession(dom) {
  dom.switchSession.hidden = true;
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
