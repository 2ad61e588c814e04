"""Iterative RL (DeepSeekMath, arXiv 2402.03300, 4.2 and Algorithm 1): the reward model keeps training on
the policy's own samples during the run (``reward.iterative``, ``IterativeRMConfig``).

After every step's groups are scored, and before the learner step (``troupe.cluster.train.run_step``):

1. **Fresh pairs** (:func:`fresh_pairs`). From each group, ``troupe rm pairs``' rule
   (``troupe.cluster.rm_pairs.choose_pairs``) on the per-sample score of the label function
   (``label``, a ``reward.functions`` name, usually weight 0 such as the verifier ``accuracy``): a
   sample with the highest label chosen against one with the lowest, when they differ; at most
   ``pairs_per_prompt`` per group, picked by a RNG seeded with (seed, step, group index). The texts
   are what the reward model scores: ``reward_text(prompt.text, sample.text, eos)``. Pairs wait
   until the next round; a round takes the most recent ``pairs_per_round`` of them.
2. Every ``every`` steps a **round** (:meth:`IterativeRewardModel.round`):

   * *before*: the trainer's pairwise accuracy and mean margin (raw head units) on the fresh pairs,
     with the weights that scored the policy's samples (out of sample: how well the current reward
     model judges the current policy; a low value is the reward model being exploited);
   * *train*: ``epochs`` passes over the fresh pairs plus :func:`replay_count` pairs drawn without
     replacement from the replay pool (the ``data`` file's pairs, then every earlier round's fresh
     pairs; RNG seeded with (seed, version)), reshuffled each epoch, one optimizer step per
     ``batch_size`` pairs (the last one of an epoch may be smaller; the loss is the batch's mean);
   * *after*: accuracy and margin on the same fresh pairs (in sample: how much of the fresh
     contrast the round fitted);
   * *save*: ``<run dir>/reward_models/<name>/v<k>`` (an HF reward-model folder, written as
     ``.tmp-v<k>`` and renamed, with ``fresh_pairs.jsonl``, the round's fresh pairs);
   * *refresh*: every actor of the model's lane loads it as version k
     (``troupe.reward.router.RewardRouter.refresh_model``), so the next step's samples are scored
     by the new weights. Version 0 is the configured folder.

   Metrics: ``rm/version``, ``rm/fresh_pairs``, ``rm/replay_pairs``, ``rm/acc_before``,
   ``rm/acc_after``, ``rm/margin_before``, ``rm/margin_after``, ``rm/loss`` (mean training loss),
   ``rm/train_steps``, ``rm/stats_mean``, ``rm/stats_std``, ``time/rm_round``; every step also
   ``rm/version`` and ``rm/pending_pairs``. A round without fresh pairs (no group had two labels)
   trains nothing and keeps the version.

**The trainer** is one ``troupe.learner.rm_rank.RewardModelRank`` (DeepSpeed ZeRO-2, the machinery of
``troupe rm train``), started at the first round from the lane's current folder and kept for the
run: its AdamW moments carry from round to round. ``batch_size`` is also its micro-batch (one forward
per step), so a smaller last batch is still a correct mean. It runs where the reward model's actors
run (a GPU when the model has ``num_gpus``), with ``num_cpus``.

**Normalisation** (``reward_stats.json``): recomputed for every version on a fixed reference set, the
first :data:`STATS_PAIRS` pairs of the pool (those of ``data`` when it is given, else the first round's
fresh pairs). The Bradley-Terry loss does not see a shift of all rewards, so the raw mean drifts
from round to round; stats kept from version 0 would let the normalised scale drift with it, while
stats on a fixed set keep "normalised 0 = the reference texts' mean, 1 = their spread" for every
version. (With the reward model as the only reward GRPO's group normalisation makes the advantages
insensitive to either choice; it matters next to rule functions and for reading ``reward/<name>_mean``
across versions.)

**Resume**: :meth:`IterativeRewardModel.state_dict` (version, folder, pending pairs) goes into the
run's checkpoints (``RunState.iterative``); the rounds' fresh pairs are read back from the version
folders. The trainer's AdamW moments are not checkpointed: after a resume it starts again from the
latest folder with fresh moments, so from the next round on a resumed run's reward model differs
slightly from an uninterrupted one's. On several nodes ``<run dir>`` must be storage that the trainer,
the reward-model actors and the driver share (as ``checkpoint.dir``).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from troupe.configs.schema import (
    ClusterConfig,
    LearnerConfig,
    ModelConfig,
    PreferenceDataConfig,
    RewardModelConfig,
    RewardModelTrainConfig,
    RewardModelTrainSettings,
    RunConfig,
)
from troupe.core.rpc import start_named
from troupe.core.types import Group

__all__ = ["STATS_PAIRS", "IterativeRewardModel", "fresh_pairs", "replay_count", "replay_indices"]

Pair = tuple[str, str, Optional[float]]
"""(chosen text, rejected text, margin): full texts ``reward_text(prompt, response, eos)``; margin None."""

STATS_PAIRS = 512
"""Reference pairs (their chosen and rejected texts) on which each version's reward mean/std is computed."""


def fresh_pairs(groups: Sequence[Group], label: str, eos: Optional[str], per_group: int, seed: int,
                step: int) -> list[Pair]:
    """Pairs from one step's scored groups (module docstring, 1.), group by group in order.

    Args:
        groups: the step's groups, scored (``reward_parts[label]`` per sample; a group without that
            part, e.g. not routed to the label function, gives none).
        label: the label function's part name (``troupe.reward.scoring.config_parts``).
        eos: the reward model's EOS token (``reward_text``).
        per_group: at most this many pairs per group.
        seed, step: the RNG of group k is seeded with (seed, step, k).
    Returns:
        [(chosen text, rejected text, None)].
    """
    from troupe.cluster.rm_pairs import choose_pairs
    from troupe.reward.model import reward_text

    out: list[Pair] = []
    for k, g in enumerate(groups):
        labels = g.reward_parts.get(label)
        if not labels:
            continue
        texts = [s.text for s in g.samples]
        for c, r in choose_pairs(texts, labels, per_group, random.Random(f"{seed}:iterative:{step}:{k}")):
            out.append((reward_text(g.prompt.text, texts[c], eos), reward_text(g.prompt.text, texts[r], eos), None))
    return out


def replay_count(n_fresh: int, replay: float, available: int) -> int:
    """Replay pairs next to ``n_fresh`` fresh ones so that they are a ``replay`` share of the round:
    ``floor(replay / (1 - replay) * n_fresh + 0.5)``, at most ``available``.

    Raises:
        ValueError: ``replay`` outside [0, 1).
    """
    if not 0.0 <= replay < 1.0:
        raise ValueError(f"replay share must be in [0, 1), got {replay}")
    return min(available, math.floor(replay / (1.0 - replay) * n_fresh + 0.5))


def replay_indices(pool_size: int, n: int, seed: int, version: int) -> list[int]:
    """``n`` distinct pool indices (sorted) for the round that makes ``version``; the same for the same
    (seed, version), whatever happened before (a resumed run draws what the uninterrupted one drew)."""
    return sorted(random.Random(f"{seed}:iterative-replay:{version}").sample(range(pool_size), n))


def _read_pairs(path: Path) -> list[Pair]:
    with path.open(encoding="utf-8") as f:
        return [(row["chosen"], row["rejected"], None) for row in map(json.loads, f) if row]


def _write_pairs(path: Path, pairs: Sequence[Pair]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for c, r, _ in pairs:
            f.write(json.dumps({"chosen": c, "rejected": r}) + "\n")


class IterativeRewardModel:
    """The driver's side of iterative RL for one reward model (module docstring): fresh pairs, replay
    pool, trainer, versions.

    Args:
        cfg: the run config (``reward.iterative`` set; ``seed``, ``model.dtype``, ``learner.torch_threads``,
            ``cluster.rpc_timeout_s`` are read too).
        run_dir: the run directory; versions go to ``<run_dir>/reward_models/<name>/v<k>``.
        log: gets one line per round.
    Raises:
        ValueError: ``reward.iterative`` is not set, or its label is no function part.
        troupe.rollout.data.DataError: a bad row in ``reward.iterative.data`` (file:line).
        OSError: the reward model's tokenizer cannot be read.

    Usage (``troupe.cluster.train``)::

        it = IterativeRewardModel(cfg, run_dir)
        metrics = it.step(step, groups, router)   # after scoring, before the learner step
        it.shutdown()
    """

    def __init__(self, cfg: RunConfig, run_dir: Path, log: Callable[[str], None] = print) -> None:
        from transformers import AutoTokenizer

        from troupe.reward.scoring import config_parts

        it = cfg.reward.iterative
        if it is None:
            raise ValueError("IterativeRewardModel needs reward.iterative")
        self.cfg, self.it, self.log = cfg, it, log
        self.spec: RewardModelConfig = cfg.reward.iterative_model
        self.name = self.spec.name
        parts = [p for p in config_parts(cfg.reward) if not p.is_model and p.spec.name == it.label]
        if not parts:
            raise ValueError(f"reward.iterative.label: {it.label!r} is not a reward.functions name")
        self.label = parts[0].name
        self.root = Path(run_dir).resolve() / "reward_models" / self.name
        self.original = str(Path(self.spec.path).resolve())
        self.folder, self.version = self.original, 0
        self.eos = AutoTokenizer.from_pretrained(self.original).eos_token
        self.base_pool = self._load_data() if it.data else []
        self.pool: list[Pair] = list(self.base_pool)  # replay pool: data, then each round's fresh pairs
        self.reference: list[Pair] = self.base_pool[:STATS_PAIRS]
        self.pending: list[Pair] = []
        self._trainer: Any = None

    def _load_data(self) -> list[Pair]:
        from transformers import AutoTokenizer

        from troupe.cluster.rm_train import scored_pair_texts
        from troupe.rollout.preferences import load_pairs

        return [(c, r, None) for c, r, _ in scored_pair_texts(load_pairs(self.it.data), AutoTokenizer.from_pretrained(self.original))]

    # ---------------------------------------------------------------- the loop's calls

    def observe(self, step: int, groups: Sequence[Group]) -> int:
        """Add step ``step``'s pairs (:func:`fresh_pairs`) to the pending ones; returns how many it added."""
        new = fresh_pairs(groups, self.label, self.eos, self.it.pairs_per_prompt, self.cfg.seed, step)
        self.pending += new
        return len(new)

    def due(self, step: int) -> bool:
        """Whether a round follows step ``step`` (every ``reward.iterative.every`` steps)."""
        return step % self.it.every == 0

    def step(self, step: int, groups: Sequence[Group], router: Any) -> dict:
        """:meth:`observe`, then :meth:`round` when :meth:`due`; the step's ``rm/`` metrics."""
        self.observe(step, groups)
        out = self.round(step, router) if self.due(step) else {}
        return {"rm/version": self.version, "rm/pending_pairs": len(self.pending), **out}

    def round(self, step: int, router: Any) -> dict:
        """Train on the pending pairs plus replay, save version k+1, refresh the lane (module docstring, 2.).

        Args:
            step: the policy step after which the round runs (for the log line).
            router: the run's ``RewardRouter``.
        Returns:
            The round's metrics; only ``rm/fresh_pairs`` 0 when no pair is pending.
        Raises:
            troupe.core.rpc.ActorFailed / RemoteTimeout: the trainer died or hung.
            RuntimeError: an actor of the lane reports another version after the refresh.
        """
        from troupe.cluster.rm_train import evaluate_pairs

        t0 = time.time()
        fresh, self.pending = self.pending[-self.it.pairs_per_round:], []
        if not fresh:
            self.log(f"reward model {self.name} after step {step}: no fresh pairs (no group had two label values); "
                     f"stays v{self.version}")
            return {"rm/fresh_pairs": 0}
        version = self.version + 1
        n_replay = replay_count(len(fresh), self.it.replay, len(self.pool))
        replay = [self.pool[i] for i in replay_indices(len(self.pool), n_replay, self.cfg.seed, version)]
        trainer = self._start_trainer()
        before = evaluate_pairs(trainer, fresh)
        train = self._train(trainer, fresh + replay, version)
        after = evaluate_pairs(trainer, fresh)
        if not self.reference:
            self.reference = fresh[:STATS_PAIRS]
        stats = self._stats(trainer)
        folder = self._save(trainer, version, fresh, stats)
        self.pool += fresh
        versions = router.refresh_model(self.name, folder, version, timeout=self.cfg.cluster.rpc_timeout_s)
        if any(v != version for v in versions):
            raise RuntimeError(f"reward model {self.name}: after the refresh to v{version} its actors report "
                               f"versions {versions}")
        self.folder, self.version = folder, version
        seconds = time.time() - t0
        self.log(f"reward model {self.name} v{version} (after step {step}): accuracy on {len(fresh)} fresh pairs "
                 f"{before['eval/accuracy']:.3f} -> {after['eval/accuracy']:.3f}, margin {before['eval/margin']:.3f} -> "
                 f"{after['eval/margin']:.3f}, {len(replay)} replay pairs, {train['steps']} steps, {seconds:.1f} s")
        return {"rm/fresh_pairs": len(fresh), "rm/replay_pairs": len(replay),
                "rm/acc_before": before["eval/accuracy"], "rm/acc_after": after["eval/accuracy"],
                "rm/margin_before": before["eval/margin"], "rm/margin_after": after["eval/margin"],
                "rm/loss": train["loss"], "rm/train_steps": train["steps"],
                "rm/stats_mean": stats["mean"], "rm/stats_std": stats["std"], "time/rm_round": seconds}

    # ---------------------------------------------------------------- the trainer

    def trainer_config(self) -> RewardModelTrainConfig:
        """The ``RewardModelTrainConfig`` the trainer rank is built with (module docstring)."""
        it, spec, cfg = self.it, self.spec, self.cfg
        gpu = spec.num_gpus > 0
        return RewardModelTrainConfig(
            name=f"iterative-{self.name}", output_dir=str(self.root), seed=cfg.seed, device="gpu" if gpu else "cpu",
            model=ModelConfig(path=self.folder, dtype=cfg.model.dtype),
            data=PreferenceDataConfig(path=it.data or str(self.root)),
            train=RewardModelTrainSettings(epochs=it.epochs, batch_size=it.batch_size,
                                           max_length=it.max_length or spec.max_length),
            learner=LearnerConfig(num_ranks=1, zero_stage=2, lr=it.lr, micro_batch_size=it.batch_size,
                                  num_cpus_per_rank=it.num_cpus, num_gpus_per_rank=spec.num_gpus,
                                  torch_threads=cfg.learner.torch_threads),
            cluster=ClusterConfig(rpc_timeout_s=cfg.cluster.rpc_timeout_s))

    def _start_trainer(self) -> Any:
        """The trainer's ``LearnerGroup`` of one rank, started from ``self.folder`` on first use.

        One actor asking Ray for ``num_cpus`` (and the model's ``num_gpus``) directly, without a placement
        group: a group cannot hold a bundle of 0 CPUs, and ``num_cpus: 0`` must fit a cluster whose CPUs the
        engines and learner ranks have all reserved. A world of one rank needs no rendezvous across nodes
        (its store is its own, on 127.0.0.1).
        """
        if self._trainer is None:
            import ray

            from troupe.cluster.learners import LearnerGroup
            from troupe.cluster.runtime import free_port
            from troupe.core.threads import cpu_thread_env
            from troupe.learner.rm_rank import RewardModelRank

            tc = self.trainer_config()
            env = {"env_vars": {"DS_ACCELERATOR": "cpu", **cpu_thread_env(tc.learner.torch_threads)}} \
                if tc.device == "cpu" else None
            rank = start_named(ray.remote(RewardModelRank), "rm-trainer-rank-0", (0, 1, "127.0.0.1", free_port(), self.folder, tc),
                               num_cpus=tc.learner.num_cpus_per_rank, num_gpus=tc.learner.num_gpus_per_rank, runtime_env=env)
            group = LearnerGroup([rank], rpc_timeout_s=tc.cluster.rpc_timeout_s)
            try:
                group.ready()
            except BaseException:
                group.shutdown()
                raise
            self._trainer = group
        return self._trainer

    def _train(self, trainer: Any, pairs: list[Pair], version: int) -> dict:
        """``epochs`` shuffled passes, ``batch_size`` pairs a step; {"loss": mean step loss, "steps"}."""
        rng, B = random.Random(f"{self.cfg.seed}:iterative-train:{version}"), self.it.batch_size
        losses = []
        for _ in range(self.it.epochs):
            order = list(range(len(pairs)))
            rng.shuffle(order)
            for s in range(0, len(order), B):
                per_rank = trainer.call("train_step", [pairs[i] for i in order[s:s + B]])
                losses.append(sum(m["loss"] for m in per_rank))
        return {"loss": sum(losses) / len(losses), "steps": len(losses)}

    def _stats(self, trainer: Any) -> dict:
        """Mean/std of the trainer's raw rewards on the reference texts (module docstring)."""
        from troupe.cluster.rm_train import reward_stats

        return reward_stats(trainer, [t for c, rj, _ in self.reference for t in (c, rj)])

    def _save(self, trainer: Any, version: int, fresh: list[Pair], stats: dict) -> str:
        """Write ``v<version>`` (weights, tokenizer, stats, fresh_pairs.jsonl) atomically; its path."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp, final = self.root / f".tmp-v{version}", self.root / f"v{version}"
        shutil.rmtree(tmp, ignore_errors=True)
        trainer.call("save_hf", str(tmp), self.folder, stats)
        _write_pairs(tmp / "fresh_pairs.jsonl", fresh)
        shutil.rmtree(final, ignore_errors=True)  # left by a run resumed from an earlier checkpoint
        tmp.rename(final)
        return str(final)

    # ---------------------------------------------------------------- resume, shutdown

    def state_dict(self) -> dict:
        """What a checkpoint keeps: version, folder, pending pairs (JSON-serialisable)."""
        return {"version": self.version, "folder": self.folder, "pending": [[c, r] for c, r, _ in self.pending]}

    def load_state_dict(self, state: dict, router: Any) -> None:
        """Continue from :meth:`state_dict`: the pool gets back the fresh pairs of v1..v<version> (from their
        folders), the lane loads the folder, the trainer starts from it at the next round.

        Raises:
            FileNotFoundError: a version folder or its fresh_pairs.jsonl is missing (names it).
        """
        version, folder = int(state["version"]), str(state["folder"])
        rounds = []
        for k in range(1, version + 1):
            f = self.root / f"v{k}" / "fresh_pairs.jsonl"
            if not f.exists():
                raise FileNotFoundError(f"reward.iterative resume: {f} is missing (the checkpoint is at v{version})")
            rounds.append(_read_pairs(f))
        self.shutdown()
        self.pool = self.base_pool + [p for r in rounds for p in r]
        self.reference = self.base_pool[:STATS_PAIRS] or (rounds[0][:STATS_PAIRS] if rounds else [])
        self.pending = [(c, r, None) for c, r in state.get("pending", [])]
        self.folder, self.version = folder, version
        if version:
            router.refresh_model(self.name, folder, version, timeout=self.cfg.cluster.rpc_timeout_s)
        self.log(f"reward model {self.name}: continuing from v{version} ({folder}); replay pool {len(self.pool)} "
                 f"pairs, {len(self.pending)} pending")

    def shutdown(self) -> None:
        """Stop the trainer rank (a later round starts it again)."""
        if self._trainer is not None:
            self._trainer.shutdown()
            self._trainer = None

    def __repr__(self) -> str:
        return (f"IterativeRewardModel({self.name!r}, v{self.version}, pool={len(self.pool)}, "
                f"pending={len(self.pending)})")
