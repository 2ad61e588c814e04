"""Supervised fine-tuning on DeepSpeed ZeRO ranks (Ray actors): the SFT stages of a multi-stage run.

DeepSeek-R1 (arXiv 2501.12948) fine-tunes between its RL stages: a cold start on a few thousand
long worked solutions (sec. 2.3.1), then, after reasoning RL, rejection sampling from the RL
checkpoint and SFT on the kept samples (sec. 2.3.3: ~800k samples, two epochs). ``train_sft``
is that SFT step on the same kind of ranks as the GRPO learner (``learner`` section: ranks, ZeRO
stage, AdamW, micro-batch, gradient clip), so it scales like the learner does; the
single-process ``troupe.learner.sft.run_sft`` stays the demo's cold start.

The loop: tokenize the (prompt, completion) pairs (``troupe.learner.sft.encode_examples``: the
prompt alone, then the completion + EOS), start ``learner.num_ranks`` ``SFTRank`` actors in one
placement group, then ``sft.steps`` optimizer steps of ``sft.batch_size`` examples drawn from
seeded shuffled epochs (``batch_indices``: a batch may span two epochs), each at the learning
rate of ``lr_schedule`` (linear warm-up over 5% of the steps, then cosine decay to 10% of
``sft.lr``, as ``run_sft``); the loss is the token mean of the completion cross-entropy over the
whole step (OpenRLHF's SFT loss mask; split-invariant, ``troupe.learner.sft_rank``). At the end
the model is written as an HF causal-LM folder that the engines load.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from troupe.configs.schema import RunConfig

__all__ = ["train_sft"]

MIN_LR_RATIO = 0.1
"""The cosine decays to this fraction of ``sft.lr`` (``run_sft``'s default)."""


def _check(cfg: RunConfig, examples: Sequence[tuple[str, str]]) -> None:
    """Errors naming the config key before anything starts."""
    B, R = cfg.sft.batch_size, cfg.learner.num_ranks
    if B % R:
        raise ValueError(f"sft.batch_size = {B} must be a multiple of learner.num_ranks = {R} "
                         "(every rank trains the same number of examples per step)")
    if not examples:
        raise ValueError("train_sft: no examples")


def _check_lengths(data: list[tuple[list[int], list[int]]], model_path: str) -> None:
    """ValueError naming the first example longer than the model's ``max_position_embeddings``."""
    from transformers import AutoConfig

    limit = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", None)
    if not limit:
        return
    for i, (p, c) in enumerate(data):
        if len(p) + len(c) > limit:
            raise ValueError(f"SFT example {i}: {len(p)} prompt + {len(c)} completion tokens (EOS included) exceed "
                             f"the model's max_position_embeddings = {limit} ({model_path}/config.json)")


def train_sft(cfg: RunConfig, model_path: str, examples: Sequence[tuple[str, str]], out_dir: str,
              log: Callable[[str], None] = print, metrics_path: Optional[str] = None,
              log_every: int = 25) -> dict:
    """Fine-tune ``model_path`` on (prompt, completion) pairs on DeepSpeed ZeRO ranks; save to ``out_dir``.

    Reads ``cfg.sft`` (``steps``, ``batch_size`` = examples per step over all ranks, ``lr`` = peak
    learning rate), ``cfg.seed`` (shuffling; the ranks' torch seed), ``cfg.learner``
    (``num_ranks``, ``zero_stage``, ``micro_batch_size`` = sequences per forward per rank,
    ``num_cpus_per_rank``, ``num_gpus_per_rank``, ``torch_threads``, ``betas``, ``weight_decay``,
    ``grad_clip``; not ``lr`` / ``warmup_steps``), ``cfg.model`` (``dtype``,
    ``gradient_checkpointing``), ``cfg.device`` and ``cfg.cluster`` (``address``, ``rpc_timeout_s``).
    Joins Ray with ``troupe.cluster.runtime.join_ray`` (nothing to do when Ray is already up);
    the ranks and their placement group are always released before it returns or raises.

    Args:
        cfg: the run config.
        model_path: HF causal-LM folder (model + tokenizer) to start from.
        examples: (prompt text, completion text) pairs: the prompt exactly as the engines get it
            (template applied), the completion without EOS (it is appended). Loss on the
            completion tokens and the EOS only.
        out_dir: the HF folder written (config, safetensors, tokenizer of ``model_path``).
        log: gets progress lines (every ``log_every`` steps and the last).
        metrics_path: JSONL file that gets one line per step ({"stage": "sft", "step", "loss",
            "grad_norm", "lr", "tokens", "learn_seconds", "seconds"}; appended to). Default:
            ``metrics.jsonl`` in the parent of ``out_dir``.
        log_every: steps between progress lines (0: only the last).

    Returns:
        ``{"loss_first", "loss_last", "steps", "seconds", "model"}``: the first step's loss, the
        mean loss of the last ``min(10, steps)`` steps (token means, nats), the steps run, the wall
        time of the training loop in seconds (rank start and the final save not included), ``out_dir``.

    Raises:
        ValueError: ``sft.batch_size`` not a multiple of ``learner.num_ranks`` (names both), no
            examples, or an example longer than the model's ``max_position_embeddings`` (names it).
        FloatingPointError: a step's loss is not finite (nothing is saved).
        TimeoutError: the ranks' placement group cannot be reserved (lists what was asked for).
        troupe.core.rpc.ActorFailed / RemoteTimeout: a rank died or hung (names it).
    """
    _check(cfg, examples)
    from transformers import AutoTokenizer

    from troupe.learner.sft import batch_indices, default_warmup, encode_examples, lr_schedule

    s, lc = cfg.sft, cfg.learner
    data = encode_examples(AutoTokenizer.from_pretrained(model_path), examples)
    _check_lengths(data, model_path)

    from ray.util.placement_group import remove_placement_group

    from troupe.cluster.runtime import join_ray, start_zero_ranks
    from troupe.learner.sft_rank import SFTRank

    lr_at = lr_schedule(s.lr, s.steps, default_warmup(s.steps), MIN_LR_RATIO)
    batches = batch_indices(len(data), s.batch_size, random.Random(cfg.seed))
    metrics_file = Path(metrics_path) if metrics_path else Path(out_dir).resolve().parent / "metrics.jsonl"
    metrics_file.parent.mkdir(parents=True, exist_ok=True)

    join_ray(cfg.cluster.address, lc.num_ranks * lc.num_cpus_per_rank)
    log(f"sft: {len(data)} examples, {s.steps} steps of {s.batch_size} on {lc.num_ranks} rank(s), "
        f"ZeRO-{lc.zero_stage}, micro-batch {lc.micro_batch_size}")
    group, pg, losses = None, None, []
    try:
        group, pg = start_zero_ranks(SFTRank, lc, cfg.device, cfg.cluster.rpc_timeout_s, model_path, cfg)
        t0 = time.time()
        with open(metrics_file, "a") as mf:
            for step in range(s.steps):
                per_rank = group.call("train_step", [data[i] for i in next(batches)], lr_at(step))
                loss = sum(m["loss"] for m in per_rank)
                rec = {"stage": "sft", "step": step + 1, "loss": loss, "grad_norm": per_rank[0]["grad_norm"],
                       "lr": per_rank[0]["lr"], "tokens": sum(m["tokens"] for m in per_rank),
                       "learn_seconds": max(m["learn_seconds"] for m in per_rank), "seconds": time.time() - t0}
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
                if not math.isfinite(loss):
                    raise FloatingPointError(f"sft step {step + 1}: loss {loss} at lr {rec['lr']:.2e}; nothing saved "
                                             "(lower sft.lr or learner.grad_clip)")
                losses.append(loss)
                if (log_every and step % log_every == 0) or step == s.steps - 1:
                    log(f"sft step {step + 1}/{s.steps} loss {loss:.4f} lr {rec['lr']:.2e} "
                        f"grad_norm {rec['grad_norm']:.3f}")
        seconds = time.time() - t0
        group.call("save_hf", out_dir, model_path)
        log(f"sft: model written to {out_dir}")
    finally:
        if group is not None:
            group.shutdown()
        if pg is not None:
            remove_placement_group(pg)
    tail = losses[-min(10, len(losses)):]
    return {"loss_first": losses[0], "loss_last": sum(tail) / len(tail), "steps": s.steps, "seconds": seconds,
            "model": out_dir}
