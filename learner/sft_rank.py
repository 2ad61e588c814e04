"""One DeepSpeed ZeRO rank of supervised fine-tuning (``troupe.cluster.sft_train.train_sft``).

The same machinery as the GRPO learner and the reward-model trainer
(``troupe.learner.zero.ZeroRank``: process group, ZeRO engine, AdamW from ``learner``,
checkpoints, gathered weight export); the model is the causal LM itself and the loss is
cross-entropy on the completion tokens (and their EOS) only: the SFT stages of DeepSeek-R1
(arXiv 2501.12948, sec. 2.3.1 cold start and 2.3.3 rejection sampling + SFT), with OpenRLHF's
SFT loss mask (prompt and padding labelled -100).

Split invariance, as in the GRPO learner: a step's loss is the TOKEN MEAN over all the step's
completion tokens (every rank, every micro-batch). Each micro-batch contributes ``sum of its
token losses / completion tokens of the step`` (``troupe.learner.sft.completion_loss_share``);
DeepSpeed divides by ``gradient_accumulation_steps`` in ``backward`` and averages gradients over
ranks, so each micro-batch loss is multiplied by ``gas * world`` first: the gradient is that of the
whole step's token-mean loss whatever the micro-batch size and number of ranks (tested: 2 ranks
= 1 rank).
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import torch

from troupe.configs.schema import RunConfig
from troupe.learner.sft import collate_examples, completion_loss_share, target_tokens
from troupe.learner.zero import LearnerRank, ZeroRank

__all__ = ["SFTRank"]

Example = tuple[list[int], list[int]]
"""(prompt token ids, completion token ids ending with EOS): ``troupe.learner.sft.encode_examples``."""


class SFTRank(ZeroRank):
    """A data-parallel rank fine-tuning a causal LM on (prompt, completion) token pairs.

    Protocol (every call on every rank; collective under ZeRO-3):

    * ``train_step(examples, lr) -> metrics``: one optimizer step at learning rate ``lr`` on this
      rank's rows of the step's B examples (rows [r*B/R, (r+1)*B/R)).
    * ``save_hf(out_dir, tokenizer_dir)``: rank 0 writes an HF causal-LM folder (config,
      safetensors, tokenizer) that transformers and vLLM load.
    * ``save_checkpoint`` / ``load_checkpoint`` / ``full_state_dict`` / ``save_weights``: as ``ZeroRank``.

    Args:
        rank, world_size, master_addr, master_port: the torch.distributed group.
        model_path: HF causal-LM folder (model + tokenizer) to start from.
        cfg: the run config: ``learner`` (ZeRO stage, AdamW betas / weight decay, gradient clip,
            micro-batch size = sequences per forward per rank, torch threads), ``sft.batch_size``
            (sequences per step, all ranks), ``model.dtype``, ``model.gradient_checkpointing``,
            ``seed``, ``device``. ``learner.lr`` / ``warmup_steps`` are not used: the caller
            gives each step's learning rate.

    Raises:
        ValueError: ``sft.batch_size`` not a positive multiple of ``world_size`` (names both keys).
        RuntimeError: if DeepSpeed cannot initialise (message from DeepSpeed).
    """

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, model_path: str,
                 cfg: RunConfig) -> None:
        per_rank, rem = divmod(cfg.sft.batch_size, world_size)
        if rem or not per_rank:
            raise ValueError(f"sft.batch_size = {cfg.sft.batch_size} must be a positive multiple of "
                             f"learner.num_ranks = {world_size}")
        super().__init__(rank, world_size, master_addr, master_port, device=cfg.device,
                         torch_threads=cfg.learner.torch_threads, seed=cfg.seed)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.lc = cfg.learner
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, cfg.model.dtype))
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        tok = AutoTokenizer.from_pretrained(model_path)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.micro = min(self.lc.micro_batch_size, per_rank)
        self.gas = max(1, math.ceil(per_rank / self.micro))
        self._start_engine(model, self.lc, micro=self.micro, gas=self.gas, dtype=cfg.model.dtype)

    def train_step(self, examples: Sequence[Example], lr: float) -> dict:
        """One optimizer step on this rank's rows of the step's examples; every rank must call it.

        Args:
            examples: the whole step's B encoded (prompt ids, completion ids) pairs, B divisible
                by the world size (the step's batch: ``sft.batch_size``).
            lr: this step's learning rate (the caller's schedule, ``troupe.learner.sft.lr_schedule``).
        Returns:
            Metrics: "loss" (this rank's share of the step's token-mean loss: the caller sums over
            ranks), "tokens" (this rank's completion tokens; summed over ranks: the step's),
            "grad_norm" (global, before clipping; the same on every rank), "lr", "learn_seconds".
        Raises:
            ValueError: B not divisible by the world size, or a step with no completion token.
        """
        t0 = time.time()
        B = len(examples)
        per, rem = divmod(B, self.world)
        if rem or not per:
            raise ValueError(f"train_step: {B} examples is not a positive multiple of the {self.world} ranks")
        step_tokens = target_tokens(examples)
        if step_tokens < 1:
            raise ValueError("train_step: the step's examples have no completion token to learn")
        mine = list(examples[self.rank * per:(self.rank + 1) * per])
        self.engine.train()
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        loss_sum, grad_norm = 0.0, float("nan")
        dev = self.engine.device
        for i in range(0, per, self.micro):
            ids, attn, labels = collate_examples(mine[i:i + self.micro], self.pad_id)
            # through the engine, not engine.module: DeepSpeed's forward starts a new micro-step (ZeRO-3
            # otherwise overwrites, not adds, each micro-batch's gradient partition)
            logits = self.engine(input_ids=ids.to(dev), attention_mask=attn.to(dev)).logits
            loss = completion_loss_share(logits, labels, step_tokens)
            self.engine.backward(loss * self.gas * self.world)
            if self.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary():
                grad_norm = self._grad_norm()  # ZeRO-0 has no ZeRO optimizer to report it
            self.engine.step()
            loss_sum += float(loss.detach())
        self.optimizer_steps += 1
        if self.zero_stage:
            gn = self.engine.get_global_grad_norm()
            grad_norm = float(gn) if gn is not None else float("nan")
        return {"loss": loss_sum, "tokens": float(target_tokens(mine)), "grad_norm": grad_norm,
                "lr": self.engine.optimizer.param_groups[0]["lr"], "learn_seconds": time.time() - t0}

    def _grad_norm(self) -> float:
        """Global L2 norm of the (rank-averaged) gradients: ZeRO-0, after the step's last backward."""
        grads = [torch.linalg.vector_norm(p.grad.detach().float()) for p in self.engine.module.parameters()
                 if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0

    # the GRPO learner's export: full weights (gathered under ZeRO-3) + config + tokenizer, by rank 0
    save_hf = LearnerRank.save_hf
