// How the operator wants the wall: a filter on the well's name, the order (by name, or by state
// with the worst first) and the tile size. The sort order and the tile size are remembered in
// this browser; the filter is not, so a reload never hides wells without saying so.

const VIEW_KEY = "wellstream.view";

/** @typedef {"name" | "state"} SortOrder */

/**
 * @typedef {object} View
 * @property {string} filter  lower case; a well is shown when its name contains it
 * @property {SortOrder} sort
 * @property {boolean} compact  small tiles: no sparklines, only the tags that need an eye
 */

/**
 * @typedef {object} ToolbarElements
 * @property {HTMLElement} toolbar
 * @property {HTMLInputElement} filter
 * @property {HTMLSelectElement} sort
 * @property {HTMLInputElement} compact
 */

/** @returns {View} the view this browser used last */
export function createView() {
  let saved = {};
  try { saved = JSON.parse(localStorage.getItem(VIEW_KEY) || "{}") ?? {}; } catch { saved = {}; }
  const { sort, compact } = /** @type {{sort?: unknown, compact?: unknown}} */ (saved);
  return Object.seal({ filter: "", sort: sort === "state" ? "state" : "name", compact: compact === true });
}

/** @param {View} view @param {string} name @returns {boolean} */
export function shows(view, name) {
  return !view.filter || name.toLowerCase().includes(view.filter);
}

/**
 * Wires the controls to the view: each change updates it, remembers it, and calls `changed`.
 * @param {ToolbarElements} dom @param {View} view @param {() => void} changed
 */
export function enableToolbar(dom, view, changed) {
  dom.sort.value = view.sort;
  dom.compact.checked = view.compact;
  dom.filter.addEventListener("input", () => {
    view.filter = dom.filter.value.trim().toLowerCase();
    changed();
  });
  dom.sort.addEventListener("change", () => {
    view.sort = dom.sort.value === "state" ? "state" : "name";
    remember(view);
    changed();
  });
  dom.compact.addEventListener("change", () => {
    view.compact = dom.compact.checked;
    remember(view);
    changed();
  });
}

/** @param {View} view */
function remember(view) {
  localStorage.setItem(VIEW_KEY, JSON.stringify({ sort: view.sort, compact: view.compact }));
}
