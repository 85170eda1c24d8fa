r"""Render a `vlkit compare` report in headless Chromium: check that every embedded figure loads
and take a screenshot.

    python scripts/check_report.py runs/compare/report.html [--screenshot OUT.png]

A copy of the page with a small script added is opened with `chromium --headless --dump-dom`;
once the page has loaded, the script writes into the page title how many of its images decoded
(natural width > 0). The check fails unless all did. Needs Debian's `chromium` package (or
CHROMIUM=/path/to/chrome).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = ("<script>window.addEventListener('load', () => { const i = [...document.images]; "
         "document.title = 'loaded ' + i.filter(x => x.complete && x.naturalWidth > 0).length + "
         "' of ' + i.length; });</script>")


def chromium() -> str:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise SystemExit("check_report: no chromium on PATH (apt install chromium, or set CHROMIUM)")
    return found


def run(browser: str, *args: str) -> str:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--screenshot", type=Path)
    args = parser.parse_args(argv)
    page = args.report.read_text(encoding="utf-8")
    browser = chromium()
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "report.html"
        probe.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
        dom = run(browser, "--dump-dom", probe.as_uri())
    found = re.search(r"<title>loaded (\d+) of (\d+)</title>", dom)
    if not found:
        print(f"check_report: {args.report}: the page did not finish loading", file=sys.stderr)
        return 1
    loaded, total = map(int, found.groups())
    print(f"{args.report}: {loaded} of {total} figures loaded in {Path(browser).name}")
    if args.screenshot:
        run(browser, f"--screenshot={args.screenshot.resolve()}", "--window-size=1280,2400",
            args.report.resolve().as_uri())
        print(f"screenshot: {args.screenshot}")
    return 0 if total and loaded == total else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
