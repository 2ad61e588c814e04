"""Training curves of a run folder as one PNG (``troupe plot RUN_DIR``), from its ``metrics.jsonl``.

Every line of ``runs/NAME/metrics.jsonl`` is one JSON record (see :class:`troupe.cluster.metrics.MetricsWriter`).
Three kinds are told apart:

* SFT records (``"stage": "sft"``, written by :mod:`troupe.cluster.sft_train`): only their ``loss``
  is plotted, on a panel of its own, against the SFT step.
* GRPO step records (int ``"step" >= 1``): plotted against the step.
* Eval records: any record carrying ``eval/...`` keys (the start eval at step 0, periodic evals
  merged into step records, the ``"final": true`` record).

Panels, in order (the name is what :func:`panels` returns), each from these keys:

==================  ======================================================================
``reward``          ``reward_mean``, every ``reward/<fn>_mean`` and the training ``accuracy``
``heldout``         ``eval/accuracy`` and ``eval/reward_mean`` (held-out set, greedy)
``kl``              ``kl_ref`` (vs the reference model) and ``approx_kl_old`` (vs the rollout policy)
``entropy``         ``entropy``
``response_len``    ``response_len_mean`` and ``response_len_max``
``clip``            ``clip_frac_low``, ``clip_frac_high`` and ``dual_clip_frac``
``zero_variance``   ``zero_variance_frac`` (share of groups whose rewards are all equal)
``failures``        ``reward/failures`` (reward-function calls that raised or timed out)
``time``            stacked bars per step of ``time/generate``, ``time/reward``, ``time/learn``,
                    ``time/sync`` (seconds; a missing part counts as 0)
``sft_loss``        ``loss`` of the ``"stage": "sft"`` records
==================  ======================================================================

Missing, ``null``, NaN/inf and non-numeric values are skipped; a panel (or a line in it) with no
point left is not drawn at all. When a step appears twice (a resumed run appends again from its
checkpoint) the later record wins. matplotlib is used through its Agg canvas only (no pyplot, no
display, no global backend switch).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

TIME_PARTS = ("time/generate", "time/reward", "time/learn", "time/sync")
_REWARD_FN = re.compile(r"^reward/(.+)_mean$")


@dataclass(frozen=True)
class _Panel:
    name: str
    title: str
    ylabel: str
    keys: tuple[str, ...]  # fixed keys (reward/<fn>_mean are added at run time)
    source: str = "grpo"  # "grpo" | "eval" | "sft" | "time"


_PANELS = (
    _Panel("reward", "Training reward", "mean reward", ("reward_mean", "accuracy")),
    _Panel("heldout", "Held-out eval", "value", ("eval/accuracy", "eval/reward_mean"), "eval"),
    _Panel("kl", "KL", "KL", ("kl_ref", "approx_kl_old")),
    _Panel("entropy", "Entropy", "nats / token", ("entropy",)),
    _Panel("response_len", "Response length", "tokens", ("response_len_mean", "response_len_max")),
    _Panel("clip", "Clip fractions", "fraction of tokens", ("clip_frac_low", "clip_frac_high", "dual_clip_frac")),
    _Panel("zero_variance", "Zero-variance groups", "share of groups", ("zero_variance_frac",)),
    _Panel("failures", "Reward failures", "count", ("reward/failures",)),
    _Panel("time", "Time per step", "seconds", TIME_PARTS, "time"),
    _Panel("sft_loss", "SFT loss", "loss", ("loss",), "sft"),
)


def read_metrics(path: str | Path) -> list[dict]:
    """Read a ``metrics.jsonl`` file.

    Args:
        path: the JSONL file.

    Returns:
        The records (dicts), in file order; blank lines are skipped. A last line that is not
        valid JSON and has no trailing newline (a running run is writing it) is dropped.

    Raises:
        FileNotFoundError: the file does not exist (the message names the path).
        ValueError: a line other than such a truncated last line is not a JSON object; the message
            names ``file:line``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file: {path}")
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    records = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):  # last piece, no newline after it: still being written
                break
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{i}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    return records


def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _step(rec: dict) -> int | None:
    s = rec.get("step")
    return s if isinstance(s, int) and not isinstance(s, bool) and s >= 0 else None


def _is_sft(rec: dict) -> bool:
    return rec.get("stage") == "sft"


def _series(records: list[dict], key: str, source: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key``, sorted by step, later records winning on a repeated step."""
    by_step: dict[int, float] = {}
    for rec in records:
        step = _step(rec)
        if step is None or _is_sft(rec) != (source == "sft"):
            continue
        if source in ("grpo", "time") and step < 1:
            continue
        v = _num(rec.get(key))
        if v is not None:
            by_step[step] = v
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _reward_fns(records: list[dict]) -> list[str]:
    keys = {k for rec in records if not _is_sft(rec) for k in rec if _REWARD_FN.match(k)}
    return sorted(keys)


def _panel_lines(panel: _Panel, records: list[dict]) -> list[tuple[str, list[int], list[float]]]:
    keys = list(panel.keys)
    if panel.name == "reward":
        keys = ["reward_mean", *_reward_fns(records), "accuracy"]
    out = []
    for key in keys:
        xs, ys = _series(records, key, panel.source)
        if xs:
            out.append((key, xs, ys))
    return out


def panels(records: list[dict]) -> list[str]:
    """Names of the panels :func:`plot_run` draws for these records, in drawing order.

    Args:
        records: metrics records as returned by :func:`read_metrics`.

    Returns:
        A sub-list of ``reward, heldout, kl, entropy, response_len, clip, zero_variance, failures,
        time, sft_loss``: those with at least one finite point.
    """
    return [p.name for p in _PANELS if _panel_lines(p, records)]


def _draw_time(ax, lines) -> None:
    steps = sorted({s for _, xs, _ in lines for s in xs})
    index = {s: i for i, s in enumerate(steps)}
    bottom = [0.0] * len(steps)
    width = 0.8 if len(steps) < 100 else 1.0
    for key, xs, ys in lines:
        heights = [0.0] * len(steps)
        for x, y in zip(xs, ys):
            heights[index[x]] = y
        ax.bar(steps, heights, bottom=bottom, width=width, label=key.split("/", 1)[1], linewidth=0)
        bottom = [b + h for b, h in zip(bottom, heights)]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Plot a run's ``metrics.jsonl`` as a grid of panels in one PNG (see the module docstring).

    Args:
        run_dir: the run folder (``runs/NAME``), finished or still running.
        out: where to write the PNG; default ``run_dir/curves.png``. Its folder is created.

    Returns:
        The path of the written PNG.

    Raises:
        FileNotFoundError: ``run_dir/metrics.jsonl`` does not exist (the message names it).
        ValueError: a line of it (other than a truncated last one) is not a JSON object; the
            message names ``file:line``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    out = Path(out) if out is not None else run_dir / "curves.png"
    drawn = [(p, lines) for p in _PANELS if (lines := _panel_lines(p, records))]

    ncols = min(3, max(1, len(drawn)))
    nrows = max(1, math.ceil(len(drawn) / ncols))
    fig = Figure(figsize=(5.2 * ncols, 3.4 * nrows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(run_dir.resolve().name or str(run_dir), fontsize=14)
    if not drawn:
        ax = fig.add_subplot(1, 1, 1)
        ax.axis("off")
        ax.text(0.5, 0.5, "no metrics yet", ha="center", va="center", fontsize=12)
    for i, (panel, lines) in enumerate(drawn):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.set_title(panel.title)
        ax.set_xlabel("SFT step" if panel.source == "sft" else "step")
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, alpha=0.3)
        if panel.source == "time":
            _draw_time(ax, lines)
        else:
            for key, xs, ys in lines:
                few = panel.source == "eval" or len(xs) <= 30
                style = "--" if key in ("accuracy", "eval/reward_mean") else "-"
                ax.plot(xs, ys, style, marker=("s" if style == "--" else "o") if few else None, markersize=3,
                        label=key)
        if len(lines) > 1 or len(panel.keys) > 1:  # name the line even when its companion has no data
            ax.legend(fontsize=7)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    return out


def main(argv: list[str] | None = None) -> int:
    """``troupe plot RUN_DIR [--out PATH]``: write the run's curves PNG and print its path.

    Args:
        argv: the arguments after ``plot`` (default ``sys.argv[1:]``).

    Returns:
        0 on success; 2 when the run folder or its metrics.jsonl is missing; 1 when metrics.jsonl
        has a bad line.
    """
    ap = argparse.ArgumentParser(prog="troupe plot", description="Plot a run's metrics.jsonl as a PNG of curves.")
    ap.add_argument("run_dir", metavar="RUN_DIR", help="run folder holding metrics.jsonl (e.g. runs/NAME)")
    ap.add_argument("--out", metavar="PATH", default=None, help="PNG to write (default RUN_DIR/curves.png)")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        print(f"troupe plot: no such run folder: {run_dir}", file=sys.stderr)
        return 2
    try:
        path = plot_run(run_dir, args.out)
    except FileNotFoundError as e:
        print(f"troupe plot: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"troupe plot: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
