"""Training-curve PNGs from a run folder's metrics.jsonl (cluster/plots.py): which panels, bad lines."""

from __future__ import annotations

import json
import math
import re

import pytest

from troupe.cluster import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _step(step: int) -> dict:
    return {"time": 1000.0 + step, "step": step, "time/generate": 1.0, "time/reward": 0.1, "time/learn": 2.0,
            "time/sync": 0.05, "reward_mean": 0.1 * step, "reward_std": 0.3, "reward/accuracy_mean": 0.1 * step,
            "reward/format_mean": 0.9, "accuracy": 0.1 * step, "reward/failures": 0, "approx_kl_old": 0.001 * step,
            "clip_frac_low": 0.0, "clip_frac_high": 0.01, "entropy": 0.5 - 0.01 * step,
            "response_len_mean": 20.0 + step, "response_len_max": 30, "zero_variance_frac": 0.25,
            "grad_norm": 0.3, "policy_version": step, "sync_strategy": "shm"}


def _records() -> list[dict]:
    sft = [{"stage": "sft", "step": i, "loss": 2.0 / i, "grad_norm": 1.0, "lr": 1e-4} for i in (1, 2, 3)]
    start = {"time": 999.0, "step": 0, "eval/accuracy": 0.4, "eval/reward_mean": 0.5, "eval/num_samples": 16}
    steps = [_step(s) for s in range(1, 6)]
    steps[2]["accuracy"] = None  # missing / null / NaN values are skipped, not plotted as 0
    del steps[3]["accuracy"]
    steps[4]["entropy"] = float("nan")
    final = {"time": 1006.0, "step": 5, "final": True, "eval/accuracy": 0.8, "eval/reward_mean": 0.9}
    return [*sft, start, *steps, final]


def _write(path, records, tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)  # NaN is written as the NaN token


def _check_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 200


def test_plot_run_writes_a_png_with_the_panels_that_have_data(tmp_path):
    run = tmp_path / "my_run"
    run.mkdir()
    _write(run / "metrics.jsonl", _records())
    out = plots.plot_run(run)
    assert out == run / "curves.png" and out.is_file()
    _check_png(out)
    # no record has kl_ref, but approx_kl_old is there: the KL panel stays
    assert plots.panels(plots.read_metrics(run / "metrics.jsonl")) == [
        "reward", "heldout", "kl", "entropy", "response_len", "clip", "zero_variance", "failures", "time",
        "sft_loss"]


def test_panels_omit_keys_absent_or_never_finite():
    recs = _records()
    for r in recs:
        for k in ("approx_kl_old", "kl_ref", "clip_frac_low", "clip_frac_high", "reward/failures"):
            r.pop(k, None)
        if "entropy" in r:
            r["entropy"] = None if r["step"] % 2 else math.nan  # present but never a number
    names = plots.panels(recs)
    assert "kl" not in names and "clip" not in names and "failures" not in names and "entropy" not in names
    assert names == ["reward", "heldout", "response_len", "zero_variance", "time", "sft_loss"]
    # SFT records only: just the SFT loss; eval records only: just the held-out panel
    assert plots.panels([r for r in recs if r.get("stage") == "sft"]) == ["sft_loss"]
    assert plots.panels([{"step": 0, "eval/accuracy": 0.5}, {"step": 0, "final": True, "eval/accuracy": 0.5}]) \
        == ["heldout"]
    assert plots.panels([]) == []


def test_sft_loss_does_not_leak_into_grpo_panels():
    recs = [{"stage": "sft", "step": 1, "loss": 1.0, "reward_mean": 3.0, "entropy": 1.0}]
    assert plots.panels(recs) == ["sft_loss"]


def test_plot_run_out_path_and_empty_file(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")  # a run that has not logged yet still gives a PNG
    out = plots.plot_run(tmp_path, tmp_path / "sub" / "x.png")
    assert out == tmp_path / "sub" / "x.png"
    _check_png(out)


def test_truncated_last_line_is_tolerated(tmp_path):
    _write(tmp_path / "metrics.jsonl", _records(), tail='{"time": 1007.0, "step": 6, "reward_me')
    recs = plots.read_metrics(tmp_path / "metrics.jsonl")
    assert len(recs) == len(_records()) and recs[-1].get("final") is True


def test_bad_line_names_file_and_line(tmp_path):
    recs = _records()
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs[:4]) + "{not json\n"
                    + "".join(json.dumps(r) + "\n" for r in recs[4:]))
    with pytest.raises(ValueError, match=re.escape(f"{path}:5:")):
        plots.plot_run(tmp_path)
    path.write_text(json.dumps(recs[0]) + "\n[1, 2]\n")  # JSON but not an object
    with pytest.raises(ValueError, match=re.escape(f"{path}:2:")):
        plots.read_metrics(path)
    path.write_text(json.dumps(recs[0]) + "\n{broken\n")  # a complete (newline-ended) bad last line is an error
    with pytest.raises(ValueError, match=re.escape(f"{path}:2:")):
        plots.read_metrics(path)


def test_missing_metrics_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plots.plot_run(tmp_path)


def test_main(tmp_path, capsys):
    assert plots.main([str(tmp_path / "nope")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    assert plots.main([str(tmp_path)]) == 2  # folder without metrics.jsonl
    assert "metrics.jsonl" in capsys.readouterr().err
    _write(tmp_path / "metrics.jsonl", _records())
    out = tmp_path / "c.png"
    assert plots.main([str(tmp_path), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    _check_png(out)
