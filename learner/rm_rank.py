"""One DeepSpeed ZeRO rank of the Bradley-Terry reward-model trainer (``troupe rm train``).

The same machinery as the GRPO learner (``troupe.learner.zero.ZeroRank``: process group, ZeRO
engine, AdamW, checkpoints, gathered weight export); only the model (a scalar head,
``troupe.reward.model``) and the loss differ.

Split invariance, as in the GRPO learner: a step's loss is the MEAN over all the step's pairs
(every rank, every micro-batch). Each micro-batch contributes ``sum of its pair losses / B``; DeepSpeed
divides by ``gradient_accumulation_steps`` in ``backward`` and averages gradients over ranks, so
each micro-batch loss is multiplied by ``gas * world`` first: the gradient is that of the whole
step's mean loss whatever the micro-batch size and number of ranks (tested: 2 ranks = 1 rank).
"""

from __future__ import annotations

import math
import time
from typing import Optional, Sequence

import torch

from troupe.configs.schema import RewardModelTrainConfig
from troupe.learner.reward_model import bradley_terry_loss
from troupe.learner.zero import ZeroRank
from troupe.reward.model import encode_texts, load_reward_model, sequence_rewards

__all__ = ["RewardModelRank"]

Pair = tuple[str, str, Optional[float]]
"""(chosen text, rejected text, margin or None): full texts, ``reward_text(prompt, response, eos)``."""


class RewardModelRank(ZeroRank):
    """A data-parallel rank training a Bradley-Terry reward model.

    Protocol (every call on every rank; collective under ZeRO-3):

    * ``train_step(pairs) -> metrics``: one optimizer step on this rank's rows of the step's B pairs
      (rows [r*B/R, (r+1)*B/R)).
    * ``rewards(texts) -> [N] floats`` for this rank's share of ``texts`` (the caller splits and pads
      so every rank runs the same number of forwards).
    * ``save_hf(out_dir, tokenizer_dir, stats)``: rank 0 writes the reward-model folder.
    * ``save_checkpoint`` / ``load_checkpoint`` / ``full_state_dict``: as ``ZeroRank``.

    Args:
        rank, world_size, master_addr, master_port: the torch.distributed group.
        model_path: a causal-LM folder (a new scalar head is added) or a reward-model folder.
        cfg: the ``troupe rm train`` config (``learner``, ``train``, ``model.dtype``, ``seed``, ``device``).
    """

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, model_path: str,
                 cfg: RewardModelTrainConfig) -> None:
        super().__init__(rank, world_size, master_addr, master_port, device=cfg.device,
                         torch_threads=cfg.learner.torch_threads, seed=cfg.seed)
        from transformers import AutoTokenizer

        self.lc, self.max_length = cfg.learner, cfg.train.max_length
        model = load_reward_model(model_path, getattr(torch, cfg.model.dtype), seed=cfg.seed)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        per_rank = cfg.train.batch_size // world_size
        self.micro = min(self.lc.micro_batch_size, per_rank)
        self.gas = max(1, math.ceil(per_rank / self.micro))
        self._start_engine(model, self.lc, micro=self.micro, gas=self.gas, dtype=cfg.model.dtype)

    def _forward(self, texts: Sequence[str]) -> torch.Tensor:
        ids, mask = encode_texts(self.tokenizer, texts, self.max_length)
        return sequence_rewards(self.engine.module, ids.to(self.engine.device), mask.to(self.engine.device))

    def train_step(self, pairs: Sequence[Pair]) -> dict:
        """One optimizer step on this rank's rows of the step's pairs; every rank must call it.

        Args:
            pairs: the whole step's B pairs (B divisible by the world size).
        Returns:
            Metrics over this rank's rows: "loss" (the step's mean pair loss, this rank's share
            summed: the caller sums over ranks), "accuracy", "margin" (means over this rank's
            pairs), "grad_norm", "lr", "learn_seconds".
        """
        t0 = time.time()
        B = len(pairs)
        per = B // self.world
        mine = list(pairs[self.rank * per:(self.rank + 1) * per])
        self.engine.train()
        self._set_lr(self.lc.lr, self.lc.warmup_steps)
        loss_sum, correct, margin_sum = 0.0, 0.0, 0.0
        for i in range(0, per, self.micro):
            part = mine[i:i + self.micro]
            n = len(part)
            self._begin_micro_step()
            r = self._forward([c for c, _, _ in part] + [rj for _, rj, _ in part])
            margins = [m for _, _, m in part]
            margin = None if all(m is None for m in margins) else \
                torch.tensor([0.0 if m is None else float(m) for m in margins], device=r.device)
            loss, met = bradley_terry_loss(r[:n], r[n:], margin, reduction="sum")
            loss = loss / B  # this micro-batch's share of the step's mean loss
            self.engine.backward(loss * self.gas * self.world)
            self.engine.step()
            loss_sum += float(loss.detach())
            correct += met["accuracy"] * n
            margin_sum += met["margin"] * n
        self.optimizer_steps += 1
        gn = self.engine.get_global_grad_norm()
        return {"loss": loss_sum, "accuracy": correct / max(per, 1), "margin": margin_sum / max(per, 1),
                "grad_norm": float(gn) if gn is not None else float("nan"),
                "lr": self.engine.optimizer.param_groups[0]["lr"], "learn_seconds": time.time() - t0}

    @torch.no_grad()
    def rewards(self, texts: Sequence[str]) -> list[float]:
        """Raw head values of ``texts`` (full texts), in micro-batches; [N] floats."""
        self.engine.eval()
        out: list[float] = []
        for i in range(0, len(texts), self.micro):
            out += self._forward(texts[i:i + self.micro]).cpu().tolist()
        return out

    def save_hf(self, out_dir: str, tokenizer_dir: str, stats: Optional[dict] = None) -> Optional[str]:
        """Rank 0 writes the reward-model folder (``save_reward_model``); collective under ZeRO-3."""
        from troupe.reward.model import save_reward_model

        state = self.full_state_dict()
        if state is None:
            return None
        return save_reward_model(self.engine.module, out_dir, tokenizer_dir, stats, state_dict=state)
