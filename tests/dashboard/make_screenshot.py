"""Screenshot of the dashboard under `wellstream demo`, for the README: docs/dashboard.png.

Run by hand (not a test): `.venv/bin/python -m tests.dashboard.make_screenshot [--seconds 60]`.
It starts the demo on a free port, opens the link its banner prints in Debian's Chromium at
1440x900, lets the sparklines fill for a while, and saves the page.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

from tests.conftest import ROOT, free_port, stop_process
from tests.dashboard.conftest import CHROMIUM, CHROMIUM_FLAGS, VIEWPORT


def dashboard_url(demo: subprocess.Popen[str]) -> str:
    assert demo.stdout is not None
    for line in demo.stdout:
        found = re.search(r"dashboard: (\S+)", line)
        if found:
            return found[1]
    raise RuntimeError("the demo exited before printing its banner")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60, help="how long the sparklines fill before the shot")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    args = parser.parse_args()
    command = [sys.executable, "-m", "app", "demo", "--port", str(free_port()), "--log-level", "WARNING"]
    demo = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        url = dashboard_url(demo)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport=VIEWPORT)  # type: ignore[arg-type]
            page.goto(url)
            page.wait_for_selector('#indicator[data-state="Live"]', timeout=10_000)
            time.sleep(args.seconds)
            page.screenshot(path=str(args.out))
            browser.close()
        print(f"wrote {args.out}")
    finally:
        stop_process(demo)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
