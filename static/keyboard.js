// Tab reaches the tiles; the arrow keys, Home and End move between them, following the grid as it
// is shown (sorted, filtered).

/** @param {HTMLElement} wells  the grid of tiles */
export function enableTileNavigation(wells) {
  wells.addEventListener("keydown", (event) => {
    const tile = /** @type {HTMLElement} */ (event.target).closest(".well");
    if (!tile) return;
    // The tiles as shown: in the view's order, without those the filter hides.
    const tiles = [...wells.children].filter((element) => !(/** @type {HTMLElement} */ (element).hidden));
    const index = tiles.indexOf(tile);
    // The grid's column count is whatever the layout made of the window's width right now.
    const columns = getComputedStyle(wells).gridTemplateColumns.split(" ").length || 1;
    const moves = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: columns, ArrowUp: -columns, Home: -index,
                    End: tiles.length - 1 - index };
    if (!Object.hasOwn(moves, event.key)) return;
    const move = moves[/** @type {keyof typeof moves} */ (event.key)];
    const target = /** @type {HTMLElement | undefined} */ (tiles[index + move]);
    event.preventDefault();
    if (target) target.focus();
  });
}
