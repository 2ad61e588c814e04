"""troupe dashboard (troupe.cluster.dashboard): the JSON API over a growing metrics.jsonl and the
page itself in a real headless Chromium (Debian's ``chromium`` driven by Playwright).

No Chromium (or no Playwright): the browser tests skip locally and fail when CI is set (CI must
``apt-get install chromium``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from troupe.cluster import dashboard


def _chromium() -> str:
    exe = os.environ.get("TROUPE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    why = None
    if exe is None:
        why = "no chromium on PATH: apt-get install chromium (Debian's package; Playwright cannot download its own here)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            why = "the 'playwright' Python package is missing (pip install playwright; browser: apt-get install chromium)"
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but the dashboard browser test cannot run: {why}")
        pytest.skip(why)
    return exe


def _step(step: int, pipelined: bool = False) -> dict:
    r = {"time": 1.0e9 + step, "time/generate": 1.0 + 0.1 * step, "time/reward": 0.2, "reward_mean": 0.1 * step,
         "reward/accuracy_mean": 0.1 * step, "reward/format_mean": 1.0, "accuracy": 0.1 * step,
         "reward/failures": step % 2, "approx_kl_old": 0.001 * step, "kl_ref": 0.002 * step, "entropy": 0.5 - 0.01 * step,
         "response_len_mean": 20.0 + step, "response_len_max": 30, "clip_frac_low": 0.01, "clip_frac_high": 0.02,
         "zero_variance_frac": 0.25, "time/learn": 2.0, "time/sync": 0.05, "time/learner_idle": 1.2 + 0.1 * step,
         "policy_version": step, "step": step, "time/step": 3.3 + 0.1 * step,
         "time/generate/engine_0": 1.0 + 0.1 * step, "time/generate/engine_1": 0.8, "time/learn/rank_0": 2.0,
         "time/learn/rank_1": 1.9}
    r["time/engine_idle"] = r["time/step"] - r["time/learner_idle"]
    return r


def _eval(step: int, final: bool = False) -> dict:
    r = {"time": 1.0e9 + step, "step": step, "eval/reward_mean": 0.5 + 0.01 * step, "eval/accuracy": 0.4 + 0.01 * step}
    if final:
        r["final"] = True
    return r


def _lines(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _initial(run: Path) -> None:
    sft = [{"stage": "sft", "step": i, "loss": 1.0 / i, "grad_norm": 0.5, "lr": 1e-4} for i in (1, 2)]
    (run / "metrics.jsonl").write_text(_lines(sft + [_eval(0)] + [_step(s) for s in (1, 2, 3)]))
    (run / "config.yaml").write_text("name: dash\nsteps: 5\n")


@pytest.fixture
def served(tmp_path):
    run = tmp_path / "dash"
    run.mkdir()
    _initial(run)
    s = dashboard.serve(run, port=0)
    try:
        yield run, s
    finally:
        s.stop()
    assert not s.thread.is_alive()


def test_api_metrics_slices_and_holds_back_partial_line(served):
    run, s = served
    server, thread, url = s  # unpacks like a tuple
    assert url.startswith("http://127.0.0.1:") and not url.endswith(":0/")
    with httpx.Client(base_url=url, timeout=10) as c:
        body = c.get("/api/metrics").json()
        assert body["next"] == 6 and len(body["records"]) == 6 and "reset" not in body
        assert [r.get("stage") for r in body["records"][:2]] == ["sft", "sft"]
        assert [r["step"] for r in body["records"][2:]] == [0, 1, 2, 3]
        body = c.get("/api/metrics", params={"since": 4}).json()
        assert [r["step"] for r in body["records"]] == [2, 3] and body["next"] == 6
        assert c.get("/api/metrics", params={"since": 6}).json() == {"records": [], "next": 6}
        assert c.get("/api/metrics", params={"since": -1}).status_code == 422

        line = json.dumps(_step(4))
        with open(run / "metrics.jsonl", "a") as f:  # a half-written line: not served until its newline lands
            f.write(line[:25])
        assert c.get("/api/metrics", params={"since": 6}).json() == {"records": [], "next": 6}
        with open(run / "metrics.jsonl", "a") as f:
            f.write(line[25:] + "\n" + "\n" + "{not json\n" + json.dumps({"step": 5, "reward_mean": float("nan")}) + "\n")
        body = c.get("/api/metrics", params={"since": 6}).json()
        # blank and broken lines count as lines but give no record; NaN (Python's json) becomes null
        assert body["next"] == 10 and [r["step"] for r in body["records"]] == [4, 5]
        assert body["records"][1]["reward_mean"] is None
        assert len(c.get("/api/metrics").json()["records"]) == 8

        # the file replaced by a shorter one: the client's `since` is past its end -> reset, from line 0
        (run / "metrics.jsonl").write_text(_lines([_eval(0)]))
        body = c.get("/api/metrics", params={"since": 10}).json()
        assert body == {"records": [_eval(0)], "next": 1, "reset": True}

        run_info = c.get("/api/run").json()
        assert run_info["name"] == "dash" and run_info["config"] == "name: dash\nsteps: 5\n"
        js = c.get("/static/plotly.min.js")
        assert js.status_code == 200 and "javascript" in js.headers["content-type"] and len(js.content) > 1_000_000
        assert c.get("/static/nope.js").status_code == 404
        page = c.get("/")
        assert page.status_code == 200 and 'src="/static/plotly.min.js"' in page.text and "cdn" not in page.text.lower()


def test_api_missing_metrics_file_is_an_empty_run(tmp_path):
    from fastapi.testclient import TestClient

    c = TestClient(dashboard.make_app(tmp_path))
    assert c.get("/api/metrics").json() == {"records": [], "next": 0}
    assert c.get("/api/run").json()["config"] is None


def test_main_needs_metrics_jsonl(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        dashboard.main([str(tmp_path)])
    assert e.value.code == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err


def test_serve_reports_a_busy_port(served):
    _, s = served
    port = int(s.url.rsplit(":", 1)[1].strip("/"))
    with pytest.raises(RuntimeError, match="could not listen"):
        dashboard.serve(served[0], port=port)


def _points(page, chart_id: str) -> int:
    return page.evaluate("id => { const d = document.getElementById(id); return d && d.data && d.data.length ? d.data[0].x.length : -1; }",
                         chart_id)


def _wait_points(page, chart_id: str, n: int, timeout: float = 10.0) -> float:
    t0 = time.monotonic()
    while True:
        got = _points(page, chart_id)
        if got == n:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{chart_id}: {got} points after {timeout} s, wanted {n}")
        time.sleep(0.1)


def test_page_in_headless_chromium(served, tmp_path):
    exe = _chromium()
    from playwright.sync_api import sync_playwright

    run, s = served
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("request", lambda r: errors.append("off-host request " + r.url)
                    if r.url.startswith("http") and not r.url.startswith(s.url) else None)
            page.goto(s.url)
            _wait_points(page, "chart-reward", 3)
            assert page.evaluate("typeof Plotly") == "object"
            assert _points(page, "chart-timeline") == 3  # first trace: time/generate bars
            timeline = page.evaluate("document.getElementById('chart-timeline').data.map(t => [t.name, t.type, t.x.length])")
            assert [t[0] for t in timeline] == ["generate", "reward wait", "learn", "sync", "learner idle", "engine idle",
                                                "step wall time"]
            assert all(t[2] == 3 for t in timeline)
            reward = page.evaluate("document.getElementById('chart-reward').data.map(t => t.name)")
            assert reward == ["reward_mean", "accuracy (mean)", "format (mean)", "accuracy"]
            assert _points(page, "chart-eval") == 1
            for cid in ("chart-kl", "chart-entropy", "chart-length", "chart-clip", "chart-zerovar", "chart-failures"):
                assert _points(page, cid) == 3, cid
            assert _points(page, "chart-sft") == 2 and page.is_visible("#chart-sft")
            actors = page.evaluate("document.getElementById('chart-actors').data.map(t => [t.name, t.y])")
            assert [a[0] for a in actors] == ["generate engine_0", "generate engine_1", "learn rank_0", "learn rank_1"]
            assert actors[0][1] == pytest.approx([1.1, 1.2, 1.3]) and page.is_visible("#chart-actors")
            assert page.get_attribute("#chart-reward", "data-points") == "3"
            assert "dash" in page.inner_text("#run-name")
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            assert (tmp_path / "dashboard.png").stat().st_size > 10_000

            # the run goes on: steps 4-5, the final eval, then a half-written line completed later
            with open(run / "metrics.jsonl", "a") as f:
                f.write(_lines([_step(4), _step(5), _eval(5, final=True)]))
            line = json.dumps(_step(6))
            with open(run / "metrics.jsonl", "a") as f:
                f.write(line[:40])
            waited = _wait_points(page, "chart-reward", 5)
            assert _points(page, "chart-timeline") == 5
            _wait_points(page, "chart-eval", 2)  # step-0 and final evals; the final one also starred
            assert page.evaluate("document.getElementById('chart-eval').data.map(t => t.x.length)") == [2, 2, 1, 1]
            assert "finished" in page.inner_text("#status")
            with open(run / "metrics.jsonl", "a") as f:
                f.write(line[40:] + "\n")
            _wait_points(page, "chart-reward", 6)
            assert waited < 10
        finally:
            browser.close()
    assert not errors, errors
