"""troupe's live run page: a small FastAPI app over one run folder's ``metrics.jsonl``.

``troupe dashboard RUN_DIR [--host H] [--port P]`` (or ``troupe train ... --dashboard`` while it
trains) serves one page at ``/`` that plots the run as it goes, with Plotly's own
``plotly.min.js`` served from the installed ``plotly`` package (``/static/plotly.min.js``: no CDN,
works offline).

What the page shows (one chart per ``div``, ids in brackets; a trace appears once its key does):

* GRPO steps (records with an int ``step`` >= 1 and no ``stage``), x = step:
  reward (``chart-reward``: ``reward_mean``, every ``reward/<fn>_mean``, ``accuracy``), KL
  (``chart-kl``: ``kl_ref``, ``approx_kl_old``, ``sampling_kl``), entropy (``chart-entropy``:
  ``entropy``), response length (``chart-length``: ``response_len_mean``, ``response_len_max``),
  clip fractions (``chart-clip``: ``clip_frac_low``, ``clip_frac_high``, ``dual_clip_frac``),
  zero-variance groups (``chart-zerovar``: ``zero_variance_frac``, the share of groups whose
  rewards are all equal, i.e. no gradient), reward failures (``chart-failures``:
  ``reward/failures``), and a per-step stacked bar timeline of where the time went
  (``chart-timeline``): per step a "work" bar stacking ``time/generate``, ``time/reward`` (reward
  wait), ``time/learn``, ``time/sync`` and beside it an "idle" bar stacking ``time/learner_idle``
  (learner waiting for groups) and ``time/engine_idle`` (engines waiting for the learner) when
  present, with ``time/step`` (the step's wall clock) as a dotted line. Synchronous loop: the work
  bar reaches the line and the idle bar equals it (each side waits for the other). Pipelined:
  generation overlaps learning, so the work bar may pass the line, and the idle bar is the bubble.
* per actor (``chart-actors``, shown when present): ``time/generate/engine_<i>`` (s from the step's
  generation start until engine i's last chunk came back: a short line is an engine that sat idle)
  and ``time/learn/rank_<r>`` (each learner rank's own learn time).
* held-out eval (any record with ``eval/...`` keys: the step-0 eval, periodic ones, the
  ``"final": true`` one), x = step: ``chart-eval`` with ``eval/accuracy`` and ``eval/reward_mean``.
* SFT stages (``"stage": "sft"``): ``chart-sft`` with ``loss`` per SFT step (hidden if none).

A later record for a step already seen (a resumed run rewrites steps) replaces the earlier one.
Every chart ``div`` is a Plotly graph div, so ``document.getElementById('chart-reward').data[0].x``
holds the plotted steps, and it carries ``data-points`` (points of its first trace) for tests.

Polling design: the page keeps ``next`` (the number of complete lines it has) and asks
``GET /api/metrics?since=next`` every 2 s; the server answers ``{"records": [...], "next": M}``
with the records of lines ``since..M-1``. The server reads the file incrementally (it remembers
the byte offset after the last complete line), so a poll costs only the new bytes; a last line
without its ``\\n`` is being written and is left for a later poll. Blank or unparsable complete
lines count as lines but give no record; non-finite numbers become null. If the file shrinks
(replaced), the server starts over and answers ``"reset": true`` with the records from line 0,
and the page clears its data. ``GET /api/run`` gives ``{"name", "path", "config"}`` (the text of
``run_dir/config.yaml`` or null). A missing ``metrics.jsonl`` is an empty run (the page waits).

Python API: :func:`make_app` (the FastAPI app), :func:`serve` (uvicorn in a background thread,
returns ``Served(server, thread, url)`` with ``.stop()``), :func:`main` (``troupe dashboard``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional

__all__ = ["MetricsTail", "make_app", "serve", "Served", "main", "plotly_js_path", "DEFAULT_PORT"]

DEFAULT_PORT = 8266
POLL_MS = 2000


def plotly_js_path() -> Path:
    """Path of ``plotly.min.js`` inside the installed ``plotly`` package (ImportError with the fix if absent)."""
    try:
        import plotly
    except ImportError as e:  # pragma: no cover - plotly is a dependency
        raise ImportError("troupe dashboard needs the 'plotly' package (pip install plotly)") from e
    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.is_file():  # pragma: no cover
        raise FileNotFoundError(f"plotly is installed but {path} is missing")
    return path


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


class MetricsTail:
    """Incremental, thread-safe reader of a JSONL file that only ever returns complete lines.

    ``read(since)`` -> (records of lines ``since..`` that parsed to JSON objects, number of complete
    lines, reset flag). Parsed records are cached; each call reads only the bytes appended since
    the previous one.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._records: list[Optional[dict]] = []  # one per complete line (None: blank/invalid)
        self._offset = 0  # byte offset just past the last complete line
        self._ident: Optional[tuple] = None  # (st_dev, st_ino) of the file read so far

    def _refresh(self) -> bool:
        """Read new complete lines; returns True when the file was replaced or shrank (cache reset)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            reset = bool(self._records) or self._offset > 0
            self._records, self._offset, self._ident = [], 0, None
            return reset
        reset = False
        ident = (st.st_dev, st.st_ino)
        if (self._ident is not None and ident != self._ident) or st.st_size < self._offset:
            self._records, self._offset, reset = [], 0, True
        self._ident = ident
        if st.st_size == self._offset:
            return reset
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read(st.st_size - self._offset)
        end = chunk.rfind(b"\n")
        if end < 0:
            return reset  # only a partial line so far
        for line in chunk[: end + 1].split(b"\n")[:-1]:
            rec = None
            if line.strip():
                try:
                    obj = json.loads(line)
                    rec = _clean(obj) if isinstance(obj, dict) else None
                except ValueError:
                    rec = None
            self._records.append(rec)
        self._offset += end + 1
        return reset

    def read(self, since: int = 0) -> tuple[list[dict], int, bool]:
        with self._lock:
            reset = self._refresh()
            n = len(self._records)
            if since > n:  # the client knows more lines than the file has: it was replaced
                reset, since = True, 0
            if reset:
                since = 0
            return [r for r in self._records[max(0, since):] if r is not None], n, reset


def make_app(run_dir: str | Path):
    """The dashboard's FastAPI app for ``run_dir`` (``metrics.jsonl`` may not exist yet)."""
    from fastapi import FastAPI, HTTPException, Query
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
    from starlette.middleware.gzip import GZipMiddleware

    run_dir = Path(run_dir)
    js = plotly_js_path()
    tail = MetricsTail(run_dir / "metrics.jsonl")
    app = FastAPI(title=f"troupe dashboard: {run_dir.name}", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(GZipMiddleware, minimum_size=4096)
    app.state.run_dir = run_dir
    app.state.tail = tail

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse(_PAGE.replace("__TITLE__", _html_escape(run_dir.name)).replace("__POLL_MS__", str(POLL_MS)),
                            headers={"Cache-Control": "no-cache"})

    @app.get("/api/metrics")
    def metrics(since: int = Query(0, ge=0)) -> JSONResponse:
        records, n, reset = tail.read(since)
        body: dict[str, Any] = {"records": records, "next": n}
        if reset:
            body["reset"] = True
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    @app.get("/api/run")
    def run() -> JSONResponse:
        cfg = run_dir / "config.yaml"
        text = cfg.read_text(errors="replace") if cfg.is_file() else None
        return JSONResponse({"name": run_dir.name, "path": str(run_dir.resolve()), "config": text},
                            headers={"Cache-Control": "no-store"})

    @app.get("/static/{name}")
    def static(name: str) -> FileResponse:
        if name != js.name:
            raise HTTPException(status_code=404)
        return FileResponse(js, media_type="application/javascript", headers={"Cache-Control": "max-age=86400"})

    return app


def _html_escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


class Served(NamedTuple):
    """A dashboard serving in a background thread (unpacks as ``server, thread, url``)."""

    server: Any  # uvicorn.Server
    thread: threading.Thread
    url: str

    def stop(self, timeout: float = 10.0) -> None:
        """Ask uvicorn to exit and join its thread."""
        stop(self.server, self.thread, timeout)


def stop(server, thread: threading.Thread, timeout: float = 10.0) -> None:
    """Stop a server started by :func:`serve` (idempotent)."""
    server.should_exit = True
    thread.join(timeout)


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *,
          log_level: str = "warning", startup_timeout: float = 30.0) -> Served:
    """Serve the dashboard for ``run_dir`` with uvicorn in a daemon thread; returns once it listens.

    ``port=0`` binds any free port; the returned ``url`` has the real one. Raises RuntimeError if
    uvicorn could not bind (e.g. port in use) within ``startup_timeout`` s.
    """
    import uvicorn

    # log_config=None: leave the host process's logging (a training run's) as it is
    config = uvicorn.Config(make_app(run_dir), host=host, port=port, log_level=log_level, log_config=None,
                            access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    errors: list[BaseException] = []

    def _run() -> None:
        try:
            server.run()
        except BaseException as e:  # SystemExit(1) from a failed bind, among others
            errors.append(e)

    thread = threading.Thread(target=_run, name=f"troupe-dashboard-{Path(run_dir).name}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            stop(server, thread, 1.0)
            raise RuntimeError(f"troupe dashboard could not listen on {host}:{port}"
                               + (f" ({errors[0]!r})" if errors else ""))
        time.sleep(0.02)
    bound = port
    for s in getattr(server, "servers", []):
        for sock in s.sockets:
            bound = sock.getsockname()[1]
            break
        break
    shown = host
    if host in ("0.0.0.0", ""):
        shown = "127.0.0.1"
    elif host == "::":
        shown = "[::1]"
    elif ":" in host:
        shown = f"[{host}]"
    return Served(server, thread, f"http://{shown}:{bound}/")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="troupe dashboard",
                                description="Serve a live page of a run's metrics.jsonl (reward, eval, KL, "
                                            "entropy, lengths, clipping, timing) until Ctrl-C.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder holding metrics.jsonl (e.g. runs/NAME)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"port (default {DEFAULT_PORT}; 0: any free port)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """``troupe dashboard RUN_DIR [--host H] [--port P]``: serve in the foreground until Ctrl-C."""
    p = _parser()
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        p.error(f"{run_dir / 'metrics.jsonl'} not found (RUN_DIR must be a run folder, e.g. runs/NAME)")
    try:
        served = serve(run_dir, args.host, args.port)
    except RuntimeError as e:
        print(f"troupe dashboard: error: {e}", file=sys.stderr)
        return 1
    print(f"troupe dashboard: {run_dir} at {served.url} (Ctrl-C to stop)", flush=True)
    try:
        while served.thread.is_alive():
            served.thread.join(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        served.stop()
    return 0


_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>troupe: __TITLE__</title>
<link rel="icon" href="data:,">
<script src="/static/plotly.min.js"></script>
<style>
 body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 0; background: #f6f7f9; color: #222; }
 header { padding: 10px 18px; background: #1f2937; color: #f9fafb; display: flex; gap: 24px; align-items: baseline; flex-wrap: wrap; }
 header h1 { font-size: 18px; margin: 0; }
 header span { font-size: 13px; color: #d1d5db; }
 #status.live { color: #86efac; } #status.final { color: #93c5fd; } #status.err { color: #fca5a5; }
 main { display: grid; grid-template-columns: repeat(auto-fill, minmax(460px, 1fr)); gap: 10px; padding: 10px; }
 .card { background: #fff; border: 1px solid #e5e7eb; border-radius: 6px; padding: 4px; }
 .card.wide { grid-column: 1 / -1; }
 .chart { height: 290px; }
 .wide .chart { height: 340px; }
 .hidden { display: none; }
 details { margin: 0 10px 10px; background: #fff; border: 1px solid #e5e7eb; border-radius: 6px; padding: 6px 10px; }
 pre { font-size: 12px; max-height: 420px; overflow: auto; }
</style></head>
<body>
<header><h1 id="run-name">__TITLE__</h1>
 <span id="status">loading...</span><span id="summary"></span><span id="updated"></span></header>
<main>
 <div class="card"><div id="chart-reward" class="chart" data-points="0"></div></div>
 <div class="card"><div id="chart-eval" class="chart" data-points="0"></div></div>
 <div class="card wide"><div id="chart-timeline" class="chart" data-points="0"></div></div>
 <div class="card wide hidden" id="card-actors"><div id="chart-actors" class="chart" data-points="0"></div></div>
 <div class="card"><div id="chart-kl" class="chart" data-points="0"></div></div>
 <div class="card"><div id="chart-entropy" class="chart" data-points="0"></div></div>
 <div class="card"><div id="chart-length" class="chart" data-points="0"></div></div>
 <div class="card"><div id="chart-clip" class="chart" data-points="0"></div></div>
 <div class="card"><div id="chart-zerovar" class="chart" data-points="0"></div></div>
 <div class="card"><div id="chart-failures" class="chart" data-points="0"></div></div>
 <div class="card hidden" id="card-sft"><div id="chart-sft" class="chart" data-points="0"></div></div>
</main>
<details id="config-box" class="hidden"><summary>config.yaml</summary><pre id="config"></pre></details>
<script>
"use strict";
const POLL_MS = __POLL_MS__;
const state = { next: 0, steps: new Map(), evals: [], sft: [], final: false, lastTime: null, polls: 0 };
window.troupeDashboard = state;

function isNum(v) { return typeof v === "number" && isFinite(v); }
function ingest(r) {
  if (r === null || typeof r !== "object") return;
  if (isNum(r.time)) state.lastTime = r.time;
  if (r.stage !== undefined) {
    if (r.stage === "sft" && isNum(r.step)) state.sft.push(r);
    return;
  }
  if (!Number.isInteger(r.step)) return;
  const keys = Object.keys(r);
  if (keys.some(k => k.startsWith("eval/"))) {
    const e = state.evals.findIndex(x => x.step === r.step && !!x.final === !!r.final);
    if (e >= 0) state.evals[e] = r; else state.evals.push(r);
    if (r.final) state.final = true;
  }
  if (r.step >= 1 && !r.final && keys.some(k => k === "reward_mean" || k.startsWith("time/") || k === "loss"))
    state.steps.set(r.step, r);
}

function series(recs, key) {
  const x = [], y = [];
  for (const r of recs) if (isNum(r[key])) { x.push(r.step); y.push(r[key]); }
  return { x, y };
}
function lines(recs, keys, names) {
  const out = [];
  keys.forEach((k, i) => {
    const s = series(recs, k);
    if (s.x.length) out.push({ x: s.x, y: s.y, name: names ? names[i] : k, type: "scatter", mode: s.x.length > 60 ? "lines" : "lines+markers" });
  });
  return out;
}
let X_DTICK = null;  // 1 while few steps (integer ticks), else Plotly's choice
function layout(title, ytitle, extra) {
  const base = { title: { text: title, font: { size: 14 } }, margin: { l: 60, r: 12, t: 32, b: 30 },
    xaxis: { rangemode: "tozero", automargin: true, dtick: X_DTICK, hoverformat: "d" },
    yaxis: { title: { text: ytitle || "" }, automargin: true },
    legend: { orientation: "h", y: -0.12, yanchor: "top", traceorder: "normal", font: { size: 11 } },
    hovermode: "x unified", uirevision: "keep" };
  for (const [k, v] of Object.entries(extra || {}))
    base[k] = (v && typeof v === "object" && !Array.isArray(v) && base[k]) ? Object.assign({}, base[k], v) : v;
  return base;
}
function draw(id, traces, lay) {
  const div = document.getElementById(id);
  if (!traces.length) {
    traces = [{ x: [], y: [], name: "(no data yet)", type: "scatter" }];
    lay.annotations = [{ text: "no data yet", showarrow: false, xref: "paper", yref: "paper", x: 0.5, y: 0.5,
                         font: { size: 14, color: "#9ca3af" } }];
    lay.showlegend = false;
  }
  Plotly.react(div, traces, lay, { responsive: true, displaylogo: false });
  div.dataset.points = String(traces[0].x.length);
  div.dataset.traces = String(traces.filter(t => t.x.length).length);
}

// [key, label, color, bar]: per step a "work" bar (stacked phases) and, beside it, an "idle" bar.
const TIMING = [["time/generate", "generate", "#4c78a8", "work"], ["time/reward", "reward wait", "#f58518", "work"],
  ["time/learn", "learn", "#54a24b", "work"], ["time/sync", "sync", "#b279a2", "work"],
  ["time/learner_idle", "learner idle", "#e45756", "idle"], ["time/engine_idle", "engine idle", "#bab0ac", "idle"]];

function render() {
  const recs = Array.from(state.steps.keys()).sort((a, b) => a - b).map(s => state.steps.get(s));
  const maxStep = Math.max(0, ...state.steps.keys(), ...state.evals.map(r => r.step));
  X_DTICK = maxStep <= 12 ? 1 : null;
  const fnKeys = [];
  for (const r of recs) for (const k of Object.keys(r))
    if (k.startsWith("reward/") && k.endsWith("_mean") && !fnKeys.includes(k)) fnKeys.push(k);
  draw("chart-reward", lines(recs, ["reward_mean", ...fnKeys, "accuracy"],
        ["reward_mean", ...fnKeys.map(k => k.slice(7, -5) + " (mean)"), "accuracy"]), layout("Reward (train batches)", "reward"));
  const evals = state.evals.slice().sort((a, b) => a.step - b.step || (!!a.final - !!b.final));
  const ev = lines(evals, ["eval/accuracy", "eval/reward_mean"]);
  const EVAL_COLORS = { "eval/accuracy": "#1f77b4", "eval/reward_mean": "#ff7f0e" };
  for (const t of ev) { t.mode = "lines+markers"; t.line = { color: EVAL_COLORS[t.name] }; t.marker = { color: EVAL_COLORS[t.name] }; }
  const fin = evals.filter(r => r.final);
  if (fin.length) for (const t of ev) {
    const k = t.name, f = fin.filter(r => isNum(r[k]));
    if (f.length) ev.push({ x: f.map(r => r.step), y: f.map(r => r[k]), name: k + " (final)", type: "scatter", mode: "markers",
                             marker: { symbol: "star", size: 14, color: EVAL_COLORS[k] } });
  }
  draw("chart-eval", ev, layout("Held-out eval", ""));
  draw("chart-kl", lines(recs, ["kl_ref", "approx_kl_old", "sampling_kl"]), layout("KL", "nats"));
  draw("chart-entropy", lines(recs, ["entropy"]), layout("Policy entropy", "nats / token"));
  draw("chart-length", lines(recs, ["response_len_mean", "response_len_max"]), layout("Response length", "tokens"));
  draw("chart-clip", lines(recs, ["clip_frac_low", "clip_frac_high", "dual_clip_frac"]), layout("Clip fractions", "share of tokens"));
  draw("chart-zerovar", lines(recs, ["zero_variance_frac"], ["zero-variance groups"]),
       layout("Zero-variance groups (no gradient)", "share of groups", { yaxis: { range: [0, 1.02], title: { text: "share of groups" } } }));
  draw("chart-failures", lines(recs, ["reward/failures"]), layout("Reward failures", "count per step"));

  const timed = recs.filter(r => Object.keys(r).some(k => k.startsWith("time/")));
  const bars = [], base = { work: timed.map(() => 0), idle: timed.map(() => 0) };
  for (const [k, name, color, group] of TIMING) {
    if (!timed.some(r => isNum(r[k]))) continue;
    const y = timed.map(r => isNum(r[k]) ? r[k] : 0);
    bars.push({ x: timed.map(r => r.step), y, base: base[group].slice(), name, type: "bar", marker: { color },
                offsetgroup: group, legendgroup: group });
    base[group] = base[group].map((b, i) => b + y[i]);
  }
  const wall = series(timed, "time/step");
  if (wall.x.length && bars.length)
    bars.push({ x: wall.x, y: wall.y, name: "step wall time", type: "scatter", mode: "lines+markers",
                line: { color: "#111", width: 1.5, dash: "dot" } });
  draw("chart-timeline", bars, layout("Where the time went, per step (s): work | idle", "seconds",
       { barmode: "group", bargap: 0.2, bargroupgap: 0.05, xaxis: { rangemode: "normal", title: { text: "step", standoff: 4 } }, legend: { y: -0.2 } }));

  // per actor: each engine's busy time in the step's generation, each learner rank's learn time
  const actorKeys = [];
  for (const r of recs) for (const k of Object.keys(r))
    if ((/^time\/generate\/engine_\d+$/.test(k) || /^time\/learn\/rank_\d+$/.test(k)) && !actorKeys.includes(k)) actorKeys.push(k);
  if (actorKeys.length) {
    actorKeys.sort();
    document.getElementById("card-actors").classList.remove("hidden");
    draw("chart-actors", lines(recs, actorKeys, actorKeys.map(k => k.replace("time/generate/", "generate ").replace("time/learn/", "learn "))),
         layout("Per actor, per step (s): engines' generation, ranks' learning", "seconds"));
  }

  if (state.sft.length) {
    document.getElementById("card-sft").classList.remove("hidden");
    const s = state.sft.map((r, i) => ({ ...r, step: i + 1 }));
    draw("chart-sft", lines(s, ["loss"], ["SFT loss"]), layout("SFT loss (every SFT step, in order)", "loss", { xaxis: { dtick: s.length <= 12 ? 1 : null } }));
  }

  const last = recs.length ? recs[recs.length - 1] : null;
  const parts = [];
  if (last) parts.push("step " + last.step);
  if (last && isNum(last.reward_mean)) parts.push("reward " + last.reward_mean.toFixed(3));
  const le = evals.length ? evals[evals.length - 1] : null;
  if (le && isNum(le["eval/accuracy"])) parts.push("eval acc " + le["eval/accuracy"].toFixed(3) + " @" + le.step);
  if (state.sft.length) parts.push(state.sft.length + " SFT steps");
  document.getElementById("summary").textContent = parts.join(" \u00b7 ");
}

function setStatus(text, cls) { const s = document.getElementById("status"); s.textContent = text; s.className = cls || ""; }

async function poll() {
  try {
    const resp = await fetch("/api/metrics?since=" + state.next, { cache: "no-store" });
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    const body = await resp.json();
    if (body.reset) { state.steps.clear(); state.evals = []; state.sft = []; state.final = false; }
    for (const r of body.records) ingest(r);
    const changed = body.records.length > 0 || body.reset || state.polls === 0;
    state.next = body.next;
    state.polls += 1;
    if (changed) render();
    const age = state.lastTime ? Math.max(0, Date.now() / 1000 - state.lastTime) : null;
    if (state.final) setStatus("finished", "final");
    else if (state.next === 0) setStatus("waiting for metrics.jsonl ...", "");
    else setStatus("live (" + state.next + " lines)", "live");
    document.getElementById("updated").textContent = (age === null || state.final) ? "" : "last record " + Math.round(age) + " s ago";
  } catch (e) {
    setStatus("server unreachable: " + e.message, "err");
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

async function loadRun() {
  try {
    const r = await (await fetch("/api/run", { cache: "no-store" })).json();
    document.getElementById("run-name").textContent = "troupe \u00b7 " + r.name;
    document.title = "troupe: " + r.name;
    if (r.config) { document.getElementById("config").textContent = r.config; document.getElementById("config-box").classList.remove("hidden"); }
  } catch (e) { /* the metrics poll reports connectivity */ }
}

loadRun();
poll();
</script>
</body></html>
"""


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
