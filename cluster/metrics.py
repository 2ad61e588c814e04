"""Run directory, metrics.jsonl (+ TensorBoard) and per-step metric assembly (no Ray; torch only
for TensorBoard's writer, imported when one is asked for)."""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from troupe.core.types import Group
from troupe.reward.passk import ACCURACY_REWARDS, accuracy_function  # noqa: F401  (re-exported: reward names reported as accuracy)


class MetricsWriter:
    """Appends one JSON object per line to ``run_dir/metrics.jsonl`` (flushed every write) and,
    with ``tensorboard=True``, every finite number of the record as a TensorBoard scalar at the
    record's ``step`` under ``run_dir/tensorboard`` (``tensorboard --logdir runs``), as
    veRL's and OpenRLHF's tensorboard loggers do. Keys keep their slashes (``reward/accuracy_mean``),
    which TensorBoard shows as sections. Each of ``sinks`` is called with every record too
    (``troupe.cluster.ray_metrics.RayMetrics.export``: Ray dashboard / Prometheus gauges).

    With ``wandb`` (a ``troupe.configs.schema.WandbConfig`` whose mode is not ``"disabled"``) the same
    records also go to Weights & Biases, as veRL's ``verl/utils/tracking.py`` (``Tracking``) and
    OpenRLHF's trainers (``openrlhf/trainer/sft_trainer.py``, ``ppo_trainer.py``) do:
    ``wandb.init(project, entity, mode, tags, name=run_name or run_dir's name, dir=run_dir,
    config=config)`` (``config``: the resolved run config as a plain dict, shown as the run's
    config), then per record every finite int/float value (not bools, strings, NaN/inf, nor
    ``step``/``time``/``final``), keys unchanged except SFT records (``"stage": "sft"``) whose keys
    get an ``sft/`` prefix (``sft/loss``: SFT's loss is not GRPO's ``loss``). Units are those of
    metrics.jsonl (seconds for ``time/*``, tokens for lengths, rewards as scored). The x-axis is
    ``train/step`` (the record's ``step``; ``sft/step`` for SFT records), see ``_wandb_log``.
    ``mode="offline"`` writes ``run_dir/wandb/offline-run-*`` for a later ``wandb sync``, no
    network needed. wandb is imported only when configured, prints nothing (``silent``) and does
    not capture stdout/stderr (``console="off"``); ``close()`` calls ``finish()``.

    Raises:
        WandbInitError: (before anything is trained) ``mode="online"`` without W&B credentials
            (``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE`` or ``wandb login``'s netrc entry), or
            ``wandb.init`` failed (no network, bad key, unknown entity...); the message names
            ``wandb.mode`` and suggests ``wandb.mode: offline``.
    """

    def __init__(self, run_dir: str | Path, tensorboard: bool = False, wandb=None,
                 config: dict | None = None, run_name: str | None = None,
                 sinks: Sequence[Callable[[dict], Any]] = ()) -> None:
        self._sinks = list(sinks)  # more consumers of every record (e.g. RayMetrics.export)
        self.path = Path(run_dir) / "metrics.jsonl"
        self._f = open(self.path, "a")
        self._tb = None
        self._wb = None  # the wandb Run
        self._wb_defined: set[str] = set()  # keys already given their step metric
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        if wandb is not None and wandb.mode != "disabled":
            try:
                self._wb = _wandb_init(wandb, Path(run_dir), config, run_name)
            except BaseException:
                self.close()
                raise

    def write(self, record: dict) -> None:
        """Write one record (non-finite floats become null, so the file stays valid JSON)."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._f.write(json.dumps({"time": time.time(), **clean}) + "\n")
        self._f.flush()
        if self._tb is not None and isinstance(record.get("step"), int):
            for k, v in clean.items():
                if k not in ("step", "time", "final") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, record["step"])
            self._tb.flush()
        if self._wb is not None:
            self._wandb_log(record)
        for sink in self._sinks:
            sink(record)

    def _wandb_log(self, record: dict) -> None:
        # Steps: each record is one wandb.log() call WITHOUT step=, its step a field ("train/step",
        # or "sft/step" for SFT records) that define_metric makes the x-axis of every key (step_sync
        # fills it in when a record has none), as OpenRLHF does with "train/global_step" and W&B's
        # "Customize log axes" guide recommends. wandb.log(step=N) (veRL's way) would silently drop
        # any record whose step is below the run's last one (SFT's own counter before/after GRPO
        # steps, a resumed run) and merge two records of one step (eval after train, the final
        # record) into one row; here every record is its own row at its own x, nothing is lost.
        sft = record.get("stage") == "sft"
        step_key, prefix = ("sft/step", "sft/") if sft else ("train/step", "")
        data = {}
        for k, v in record.items():
            if k in ("step", "time", "final") or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if math.isfinite(v):
                data[k if not sft or k.startswith(prefix) else prefix + k] = v
        if isinstance(record.get("step"), (int, float)) and not isinstance(record["step"], bool):
            data[step_key] = record["step"]
        for k in data:
            if k not in self._wb_defined:
                if k in ("train/step", "sft/step"):
                    self._wb.define_metric(k)
                else:
                    self._wb.define_metric(k, step_metric=step_key)
                self._wb_defined.add(k)
        if data:
            self._wb.log(data)

    def close(self) -> None:
        """Close the file (and the TensorBoard writer; ``finish()`` the W&B run, which in online
        mode waits for the upload)."""
        self._f.close()
        if self._tb is not None:
            self._tb.close()
        if self._wb is not None:
            run, self._wb = self._wb, None
            run.finish()


class WandbInitError(RuntimeError):
    """Weights & Biases could not be started with the run's ``wandb`` config (see ``MetricsWriter``)."""


def _wandb_init(cfg, run_dir: Path, config, run_name: str | None):
    """``wandb.init`` for ``MetricsWriter``: a run of its own (``reinit="create_new"``: a second
    writer in one process, e.g. SFT then GRPO, gets a new run, never the previous one back)."""
    if cfg.mode == "online" and not _wandb_credentials():
        raise WandbInitError(
            "wandb.mode is 'online' but no W&B credentials were found (WANDB_API_KEY, "
            "WANDB_IDENTITY_TOKEN_FILE or `wandb login`); set WANDB_API_KEY or run `wandb login`, or "
            f"set `wandb.mode: offline` to log to {run_dir / 'wandb'} and `wandb sync` it later")
    import wandb

    if config is not None and hasattr(config, "model_dump"):
        config = config.model_dump(mode="json")
    try:
        return wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, tags=list(cfg.tags),
                          name=run_name or run_dir.name, dir=str(run_dir), config=config,
                          settings=wandb.Settings(console="off", silent=True, reinit="create_new"))
    except Exception as e:
        raise WandbInitError(
            f"wandb.init failed with wandb.mode {cfg.mode!r} (project {cfg.project!r}, entity "
            f"{cfg.entity!r}): {type(e).__name__}: {e}; without network or a W&B account set "
            f"`wandb.mode: offline` (logs to {run_dir / 'wandb'}, `wandb sync` later) or "
            "`wandb.mode: disabled`") from e


def _wandb_credentials() -> bool:
    """Whether online W&B has credentials to use: WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE or a
    netrc entry for the W&B host (what ``wandb login`` writes), checked up front so that a run
    without them fails before training, not at an interactive key prompt (or after minutes)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    try:  # wandb's own netrc reader (honours $NETRC); a private module, so any failure: let init decide
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth

        return read_netrc_auth(host=host) is not None
    except Exception:
        return True


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def _std(xs: list[float]) -> float:
    return statistics.pstdev(xs) if len(xs) > 1 else 0.0


def rollout_metrics(groups: list[Group], prefix: str = "", accuracy: str | None = None) -> dict:
    """Reward mean/std overall and per reward function, accuracy, response length, truncation, failures.

    ``{prefix}accuracy`` is the mean of the ``accuracy`` function's scores (``eval.accuracy``); None:
    the first of :data:`ACCURACY_REWARDS` present; no such function: not reported.
    """
    rewards = [r for g in groups for r in g.rewards if r is not None]
    lengths = [len(s.response_ids) for g in groups for s in g.samples]
    out = {f"{prefix}reward_mean": _mean(rewards), f"{prefix}reward_std": _std(rewards),
           f"{prefix}response_len_mean": _mean(lengths), f"{prefix}response_len_max": max(lengths, default=0),
           f"{prefix}truncated_frac": _mean([float(s.truncated) for g in groups for s in g.samples]),
           f"{prefix}num_samples": len(lengths)}
    names = sorted({n for g in groups for n in g.reward_parts})
    for n in names:
        vals = [v for g in groups for v in g.reward_parts.get(n, []) if v is not None]
        out[f"{prefix}reward/{n}_mean"] = _mean(vals)
        out[f"{prefix}reward/{n}_std"] = _std(vals)
    acc = accuracy_function(names) if accuracy is None else (accuracy if accuracy in names else None)
    if acc is not None:
        out[f"{prefix}accuracy"] = out[f"{prefix}reward/{acc}_mean"]
    fails: dict[str, int] = {}
    for g in groups:
        for k, v in g.failures.items():
            fails[k] = fails.get(k, 0) + v
    for k, v in fails.items():
        out[f"{prefix}reward/failures/{k}"] = v
    out[f"{prefix}reward/failures"] = sum(fails.values())
    return out


def mean_dicts(ds: list[dict]) -> dict:
    """Key-wise mean of numeric values over ranks' metric dicts."""
    keys = {k for d in ds for k, v in d.items() if isinstance(v, (int, float))}
    return {k: _mean([d[k] for d in ds if k in d and d[k] is not None]) for k in sorted(keys)}


def make_run_dir(output_dir: str, name: str) -> Path:
    """``output_dir/name``; an existing one gets a numeric suffix so no run is overwritten."""
    base = Path(output_dir) / name
    path, i = base, 1
    while path.exists():
        path = Path(f"{base}-{i}")
        i += 1
    os.makedirs(path)
    return path
