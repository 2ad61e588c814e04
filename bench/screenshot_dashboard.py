"""Full-page screenshot of troupe's run dashboard for a run folder (e.g. for docs/watching.md).

    python bench/screenshot_dashboard.py runs/arith_cpu docs/dashboard.png [--width 1400] [--chromium PATH]

Serves RUN_DIR on a free local port (troupe.cluster.dashboard.serve), opens the page in headless
Chromium (the system's ``chromium``, driven by Playwright), waits until the reward chart shows
every GRPO step of the file (or the timeout), then saves OUT.png. Needs ``apt-get install chromium``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

try:
    from troupe.cluster.dashboard import serve
except ImportError:  # run from a checkout without the package installed: the repo root is `troupe`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from troupe.cluster.dashboard import serve  # type: ignore[no-redef]


def _grpo_steps(path: Path) -> int:
    steps = set()
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and "stage" not in r and not r.get("final") and isinstance(r.get("step"), int) \
                and r["step"] >= 1 and ("reward_mean" in r or "loss" in r or any(k.startswith("time/") for k in r)):
            steps.add(r["step"])
    return len(steps)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=900)
    p.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args(argv)
    metrics = args.run_dir / "metrics.jsonl"
    if not metrics.is_file():
        p.error(f"{metrics} not found")
    if not args.chromium:
        p.error("no chromium found: apt-get install chromium (or pass --chromium PATH)")
    from playwright.sync_api import sync_playwright

    want = _grpo_steps(metrics)
    served = serve(args.run_dir, port=0)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, headless=True,
                                         args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            try:
                page = browser.new_page(viewport={"width": args.width, "height": args.height})
                page.goto(served.url)
                deadline = time.monotonic() + args.timeout
                while time.monotonic() < deadline:
                    n = page.evaluate("() => { const d = document.getElementById('chart-reward');"
                                      " return d && d.data && d.data.length ? d.data[0].x.length : -1; }")
                    if n >= want and page.evaluate("window.troupeDashboard && window.troupeDashboard.polls > 0"):
                        break
                    time.sleep(0.2)
                time.sleep(0.5)  # let Plotly finish its layout pass
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out), full_page=True)
            finally:
                browser.close()
    finally:
        served.stop()
    print(f"{args.out} ({want} GRPO steps of {args.run_dir})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
