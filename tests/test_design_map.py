"""docs/design.md opens with a map of every module: it must match `ls app/`."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^\| `(app/[^`]+)` \| [^|]+ \| [^|]+ \|$", re.MULTILINE)


def mapped() -> set[str]:
    return set(ROW.findall((ROOT / "docs" / "design.md").read_text(encoding="utf-8")))


def modules() -> set[str]:
    """Every source file under app/, but the empty `__init__.py` files that only mark packages."""
    found = set()
    for path in (ROOT / "app").rglob("*"):
        if path.suffix not in (".py", ".lua") or "__pycache__" in path.parts:
            continue
        if path.name == "__init__.py" and not path.read_text(encoding="utf-8").strip():
            continue
        found.add(path.relative_to(ROOT).as_posix())
    return found


def test_the_map_in_the_design_page_lists_every_module_and_no_other() -> None:
    listed, present = mapped(), modules()

    assert listed, "the map's rows were not found"
    assert sorted(present - listed) == [], "modules missing from the map in docs/design.md"
    assert sorted(listed - present) == [], "the map in docs/design.md names modules that do not exist"
