"""One DeepSpeed ZeRO rank of PPO's critic (the value model): values of a batch's response tokens, the
clipped value-loss update.

The same machinery as the policy's ranks (``troupe.learner.zero.ZeroRank``: process group, ZeRO engine,
AdamW, checkpoints, micro-batch plans); the model is a causal-LM backbone with a scalar head, the reward
model's class (``troupe.reward.model.load_reward_model``), so a critic can start from a reward-model folder
as OpenRLHF's does, read on every response token instead of the last.

Values: V_t of response token t is the head at the position before it (the state prompt + response[:t]),
OpenRLHF's ``values[:, :-1]`` cut to the last ``num_actions``; position ids from the attention mask
(cumsum - 1), as the reward model's, so left padding does not move them.

Split invariance, as the policy's: the value loss of a mini-batch is the mean over every valid response
token of that mini-batch on every rank (the token count taken from the whole batch); each micro-batch
contributes its token sum / that count, multiplied by ``gas * world`` before ``backward`` (DeepSpeed divides
by the accumulation steps and averages over ranks), so the gradient is the mini-batch's whatever the
number of ranks and micro-batches.
"""

from __future__ import annotations

import math
import time

import torch

from troupe.configs.schema import RunConfig
from troupe.core.types import TrainBatch
from troupe.learner.gae import value_loss
from troupe.learner.zero import ZeroRank
from troupe.reward.model import load_reward_model

__all__ = ["CriticRank", "token_values"]


def token_values(model, b: TrainBatch) -> torch.Tensor:
    """[B, T] float32 values of ``b``'s response tokens under ``model`` (a ``*ForSequenceClassification`` with a
    ``score`` head, num_labels 1): the head at position P-1+t for response token t; 0 where the response
    mask is 0 (module docstring). With grad when the model has it."""
    backbone = getattr(model, model.base_model_prefix)
    dev = next(model.parameters()).device
    mask = b.attention_mask.to(dev).long()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = backbone(input_ids=b.input_ids.to(dev), attention_mask=mask, position_ids=position_ids).last_hidden_state
    P, T = b.prompt_len, b.response_len
    values = model.score(hidden[:, P - 1:P + T - 1]).squeeze(-1).float()
    return values * b.response_mask.to(dev, values.dtype)


class CriticRank(ZeroRank):
    """A data-parallel rank of PPO's critic.

    Protocol (every call on every rank; collective under ZeRO-3):

    * ``values(batch) -> [B/R, T]``: this rank's rows (rows [r*B/R, (r+1)*B/R)) of the batch's token values
      (no grad, float32, CPU); the caller concatenates the ranks' in rank order.
    * ``train_step(batch, returns) -> metrics``: ``algo.ppo_epochs`` x ``algo.mini_batches`` optimizer steps of
      the clipped value loss (``troupe.learner.gae.value_loss`` with ``critic.value_clip``) on this rank's rows;
      ``batch.values`` are the values at sampling time (the clip's centre), ``returns`` [B, T] the targets.
    * ``save_checkpoint`` / ``load_checkpoint`` / ``full_state_dict``: as ``ZeroRank``.

    Args:
        rank, world_size, master_addr, master_port: the critic's own torch.distributed group.
        model_path: the policy's initial model folder (the critic starts there unless ``critic.model_path``).
        cfg: the run config (reads ``critic``, ``algo``, ``model``, ``seed``, ``device``, ``batch_size``).
    Raises:
        ValueError: the critic's model folder cannot be loaded (names the path).
    """

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, model_path: str,
                 cfg: RunConfig) -> None:
        cc = cfg.critic
        super().__init__(rank, world_size, master_addr, master_port, device=cfg.device,
                         torch_threads=cc.torch_threads, seed=cfg.seed)
        self.cc, self.algo = cc, cfg.algo
        model = load_reward_model(cc.model_path or model_path, getattr(torch, cfg.model.dtype), seed=cfg.seed)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        rows = cfg.batch_size // world_size // cfg.algo.mini_batches
        self.micro = min(cc.micro_batch_size, rows)
        self.gas = max(1, math.ceil(rows / self.micro))
        self._start_engine(model, cc, micro=self.micro, gas=self.gas, dtype=cfg.model.dtype)

    @torch.no_grad()
    def values(self, batch: TrainBatch) -> torch.Tensor:
        """This rank's rows of the batch's token values, [B/R, T] float32 on CPU (class docstring)."""
        self.engine.eval()
        shard = batch.select(self._rows(batch.size))
        out = torch.zeros(shard.size, shard.response_len)
        for mb in self._micro_batches(batch, shard, self.cc, 1):
            for idx, part in mb:
                out[idx, :part.response_len] = token_values(self.engine.module, part).cpu()
        return out

    def train_step(self, batch: TrainBatch, returns: torch.Tensor) -> dict:
        """The critic's update on this rank's rows (class docstring); every rank must call it.

        Args:
            batch: the whole step batch with ``values`` (at sampling time).
            returns: [B, T] targets of the whole batch (``troupe.learner.step.step_returns``).
        Returns:
            "critic/value_loss" (the mini-batch loss, mean over epochs and mini-batches; every rank reports the
            whole loss, so the group's mean is it), "critic/grad_norm" (the last optimizer step's), "critic/lr",
            "critic/clip_frac" (share of this rank's tokens where the clipped branch of the loss is the larger),
            "critic/learn_seconds".
        Raises:
            ValueError: ``batch.values`` is None, or ``returns`` is not [B, T].
        """
        if batch.values is None or tuple(returns.shape) != (batch.size, batch.response_len):
            raise ValueError(f"critic train_step: needs batch.values and returns [B, T] = "
                             f"{(batch.size, batch.response_len)}, got values {batch.values is not None} and "
                             f"returns {tuple(returns.shape)}")
        t0 = time.time()
        rows = self._rows(batch.size)
        batch = batch.with_(values=batch.values.float())
        shard, ret = batch.select(rows), returns.float()[rows]
        micros = self._micro_batches(batch, shard, self.cc, self.algo.mini_batches)
        mask = batch.response_mask.reshape(self.world, self.algo.mini_batches, -1, batch.response_len)
        counts = [max(1.0, float(mask[:, m].sum())) for m in range(self.algo.mini_batches)]
        clip = self.cc.value_clip
        self.engine.train()
        loss_sum, clipped, tokens, grad_norm = 0.0, 0.0, 0.0, float("nan")
        for _epoch in range(self.algo.ppo_epochs):
            for mb, count in zip(micros, counts):
                self._set_lr(self.cc.lr, self.cc.warmup_steps)
                for j, (idx, part) in enumerate(mb):
                    t = part.response_len
                    self.engine.set_gradient_accumulation_boundary(j == len(mb) - 1)
                    self._begin_micro_step()
                    v = token_values(self.engine.module, part)
                    dev, m = v.device, part.response_mask.to(v.device)
                    old, target = part.values.to(dev), ret[idx, :t].to(dev)
                    loss = value_loss(v, old, target, m, clip).sum() / count
                    self.engine.backward(loss * self.gas * self.world)
                    self.engine.step()
                    loss_sum += float(loss.detach())
                    if clip is not None:
                        with torch.no_grad():
                            far = (old + (v - old).clamp(-clip, clip) - target) ** 2 > (v - target) ** 2
                            clipped += float((far.float() * m).sum())
                    tokens += float(m.sum())
                gn = self.engine.get_global_grad_norm()
                grad_norm = float(gn) if gn is not None else float("nan")
                self.optimizer_steps += 1
        steps = max(1, self.algo.ppo_epochs * len(counts))
        return {"critic/value_loss": loss_sum * self.world / steps, "critic/grad_norm": grad_norm,
                "critic/lr": self.engine.optimizer.param_groups[0]["lr"],
                "critic/clip_frac": clipped / max(tokens, 1.0), "critic/learn_seconds": time.time() - t0}
