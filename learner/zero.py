"""One DeepSpeed ZeRO learner rank: log-probs, the GRPO update, full-weight export.

``LearnerRank`` is a plain class; cluster/ runs ``learner.num_ranks`` of them as Ray actors
that form one torch.distributed group (gloo on CPU, NCCL on GPU). The maths lives in
``troupe.learner.grpo``; this file only moves tensors through the model.

Loss scaling: ``grpo.aggregate_loss`` returns, for each micro-batch, its share of the
mini-batch loss (global denominators computed by the driver), so the mini-batch loss is the
SUM over micro-batches and ranks. DeepSpeed divides by gradient_accumulation_steps in
``backward`` and averages gradients over ranks, so each micro-batch loss is multiplied by
``gas * world_size`` before ``backward``: the gradient is then exactly that of the full
mini-batch, whatever the micro-batch size and number of ranks.
"""

from __future__ import annotations

import math
import os
import time
from typing import Optional

import torch

from troupe.learner import grpo
from troupe.learner.batch import TrainBatch, response_logprobs


def _ds_config(*, zero_stage: int, micro: int, gas: int, world: int, lr: float, weight_decay: float,
               betas: tuple[float, float], grad_clip: float, dtype: str) -> dict:
    cfg = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * world,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay, "betas": list(betas)}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if dtype == "bfloat16":
        cfg["bf16"] = {"enabled": True}
    elif dtype == "float16":
        cfg["fp16"] = {"enabled": True}
    return cfg


class LearnerRank:
    """One data-parallel rank of the DeepSpeed ZeRO learner.

    Args:
        rank, world_size: position in the torch.distributed group.
        master_addr, master_port: rendezvous of the group (rank 0's node).
        model_path: HF model directory of the initial policy (also the frozen reference).
        cfg: ``RunConfig.model_dump()`` (plain dict; the learner reads learner/algo/model/rollout).
        mini_batch_rows: rows of this rank's shard per optimizer step.

    Raises:
        RuntimeError: if DeepSpeed cannot initialise (message from DeepSpeed).
    """

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, model_path: str,
                 cfg: dict, mini_batch_rows: int) -> None:
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        self.device_kind = cfg["device"]
        if self.device_kind == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            torch.set_num_threads(cfg["learner"]["torch_threads"])
        import deepspeed
        from transformers import AutoModelForCausalLM

        self.rank, self.world = rank, world_size
        self.lc, self.algo, self.rollout = cfg["learner"], cfg["algo"], cfg["rollout"]
        deepspeed.init_distributed(dist_backend="gloo" if self.device_kind == "cpu" else "nccl")
        torch.manual_seed(cfg["seed"])
        dtype = getattr(torch, cfg["model"]["dtype"])
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
        if cfg["model"]["gradient_checkpointing"]:
            model.gradient_checkpointing_enable()
        self.micro = min(self.lc["micro_batch_size"], mini_batch_rows)
        self.gas = max(1, math.ceil(mini_batch_rows / self.micro))
        ds_cfg = _ds_config(zero_stage=self.lc["zero_stage"], micro=self.micro, gas=self.gas, world=world_size,
                            lr=self.lc["lr"], weight_decay=self.lc["weight_decay"], betas=tuple(self.lc["betas"]),
                            grad_clip=self.lc["grad_clip"], dtype=cfg["model"]["dtype"])
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_cfg)
        self.ref = None
        if self.algo["kl_coef"] > 0:
            self.ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.engine.device)
            self.ref.eval().requires_grad_(False)
        self.temperature = self.rollout["temperature"]
        self.optimizer_steps = 0

    def ready(self) -> dict:
        """Rank facts: rank, world size, parameter count, ZeRO stage."""
        n = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in self.engine.module.parameters())
        return {"rank": self.rank, "world": self.world, "params": n, "zero_stage": self.lc["zero_stage"]}

    def _forward_logprobs(self, model, b: TrainBatch, with_entropy: bool = False):
        out = model(input_ids=b.input_ids.to(self.engine.device), attention_mask=b.attention_mask.to(self.engine.device))
        logits = out.logits
        lp = response_logprobs(logits, b.input_ids.to(logits.device), b.prompt_len, self.temperature)
        if not with_entropy:
            return lp, None
        T = b.response_len
        ent = grpo.entropy_from_logits(logits[:, b.prompt_len - 1: b.prompt_len - 1 + T].float().detach() / self.temperature)
        return lp, ent

    @torch.no_grad()
    def _logprobs(self, model, b: TrainBatch) -> torch.Tensor:
        chunks = [self._forward_logprobs(model, b.select(slice(i, i + self.micro)))[0].cpu()
                  for i in range(0, b.size, self.micro)]
        return torch.cat(chunks)

    def sequence_logprobs(self, token_ids: list[int], start: int) -> list[float]:
        """Learner log-probs (temperature 1) of ``token_ids[start:]`` given their prefix, for the sync check.

        Every rank must call it under ZeRO-3 (the forward gathers parameters collectively).
        """
        ids = torch.tensor([token_ids], device=self.engine.device)
        with torch.no_grad():
            logits = self.engine.module(input_ids=ids).logits.float()
        lp = logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None]).squeeze(1)
        return lp[start - 1:].cpu().tolist()

    def prepare(self, shard: TrainBatch) -> dict:
        """Phase 1 of a step: old (and reference) log-probs of this rank's shard, before any update.

        Keeps the shard on the rank and returns {"old_logprobs": [B_r, T], "ref_logprobs": [B_r, T]
        or None} for reward shaping in the driver (KL in the reward).
        """
        old = self._logprobs(self.engine.module, shard)
        ref = self._logprobs(self.ref, shard) if self.ref is not None else None
        self._shard = shard.with_(old_logprobs=old, ref_logprobs=ref)
        return {"old_logprobs": old, "ref_logprobs": ref}

    def set_algo(self, algo: dict) -> None:
        """Switch the algorithm section (estimator-independent parts of the loss) between steps.

        Raises ``ValueError`` when asking for a KL term on a rank started without a reference model.
        """
        if algo["kl_coef"] > 0 and self.ref is None:
            raise ValueError("algo.kl_coef > 0 needs a reference model: start the learner with kl_coef > 0")
        self.algo = dict(algo)

    def update(self, advantages: "torch.Tensor", mini_denoms: list[dict]) -> dict:
        """Phase 2 of a step: the GRPO update on the shard kept by ``prepare``.

        Args:
            advantages: [B_r, T] for this rank's rows (0 where response_mask is 0).
            mini_denoms: per mini-batch ``{"num_tokens", "num_seqs"}`` over ALL ranks.

        Returns:
            Metrics averaged over micro-batches (floats), "grad_norm", "logprob_mismatch"
            (mean |old - sampling| logprob over response tokens) and "learn_seconds".
        """
        t0 = time.time()
        self.engine.train()
        shard = self._shard.with_(advantages=advantages)
        n_mini = len(mini_denoms)
        rows = shard.size // n_mini
        sums: dict[str, float] = {}
        count = 0
        grad_norm = 0.0
        for _epoch in range(self.algo["ppo_epochs"]):
            for m in range(n_mini):
                mb = shard.select(slice(m * rows, (m + 1) * rows))
                self._set_lr()
                for i in range(0, mb.size, self.micro):
                    met = self._micro_step(mb.select(slice(i, i + self.micro)), mini_denoms[m])
                    for k, v in met.items():
                        sums[k] = sums.get(k, 0.0) + v
                    count += 1
                gn = self.engine.get_global_grad_norm()
                grad_norm = float(gn) if gn is not None else float("nan")
                self.optimizer_steps += 1
        out = {k: v / max(count, 1) for k, v in sums.items()}
        # each micro-batch loss is its share of the mini-batch loss: report the mini-batch loss
        out["loss"] = sums.get("loss", 0.0) / max(self.algo["ppo_epochs"] * n_mini, 1)
        out["grad_norm"] = grad_norm
        out["lr"] = self.engine.optimizer.param_groups[0]["lr"]
        mask = shard.response_mask
        diff = (shard.old_logprobs - shard.sampling_logprobs).abs() * mask
        out["logprob_mismatch"] = float(diff.sum() / mask.sum().clamp(min=1))
        out["learn_seconds"] = time.time() - t0
        self._shard = None
        return out

    def _set_lr(self) -> None:
        """Linear warm-up: optimizer step k (0-based) uses lr * min(1, (k + 1) / warmup_steps).

        Done here rather than with DeepSpeed's WarmupLR, whose schedule steps after the optimizer
        and so runs the first two optimizer steps at lr = 0 when warming up from 0.
        """
        w = self.lc["warmup_steps"]
        lr = self.lc["lr"] * (min(1.0, (self.optimizer_steps + 1) / w) if w else 1.0)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def _micro_step(self, micro: TrainBatch, denoms: dict) -> dict:
        lp, ent = self._forward_logprobs(self.engine.module, micro, with_entropy=True)
        dev = lp.device
        loss, met = grpo.policy_loss(
            lp, micro.old_logprobs.to(dev), micro.advantages.to(dev), micro.response_mask.to(dev),
            clip_low=self.algo["clip_low"], clip_high=self.algo["clip_high"],
            dual_clip=self.algo["dual_clip"], ratio_level=self.algo["ratio_level"],
            sampling_logp=micro.sampling_logprobs.to(dev), tis_cap=self.algo["tis_cap"],
            ref_logp=None if micro.ref_logprobs is None else micro.ref_logprobs.to(dev),
            kl_coef=self.algo["kl_coef"] if self.algo["kl_in"] == "loss" else 0.0,
            kl_estimator=self.algo["kl_estimator"], loss_agg=self.algo["loss_agg"],
            num_tokens=denoms["num_tokens"], num_seqs=denoms["num_seqs"],
            max_len=self.rollout["max_new_tokens"],
        )
        self.engine.backward(loss * self.gas * self.world)
        self.engine.step()
        mask = micro.response_mask.to(dev)
        out = {k: float(v) for k, v in met.items()}
        out["entropy"] = float((ent * mask).sum() / mask.sum().clamp(min=1))
        out["loss"] = float(loss.detach())
        return out

    def full_state_dict(self) -> Optional[dict]:
        """Full (un-sharded) policy weights, gathered under ZeRO-3; returned on rank 0, None elsewhere.

        Every rank must call it (the ZeRO-3 gather is collective). Tensors are contiguous CPU
        clones in the model's dtype, keyed like the HF checkpoint. Tied weights appear under both
        names (``lm_head.weight`` and ``model.embed_tokens.weight``): vLLM's in-place reload does
        not refresh a tied LM head from the embedding alone (measured: 1.1 nats of engine/learner
        disagreement without it, 1e-6 with it).
        """
        import deepspeed

        module = self.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None,
                                               enabled=self.lc["zero_stage"] == 3):
            if self.rank != 0:
                return None
            names = {n for n, _ in module.named_parameters(remove_duplicate=False)}
            return {k: v.detach().to("cpu").clone().contiguous() for k, v in module.state_dict().items() if k in names}

    def save_weights(self, path: str) -> Optional[str]:
        """Write the full weights to a safetensors file (rank 0); collective under ZeRO-3."""
        from safetensors.torch import save_file

        state = self.full_state_dict()
        if state is None:
            return None
        tmp = path + ".tmp"
        save_file(state, tmp)
        os.replace(tmp, path)
        return path

    def save_hf(self, out_dir: str, tokenizer_dir: str) -> Optional[str]:
        """Write an HF checkpoint (config, safetensors, tokenizer) that transformers and vLLM load."""
        state = self.full_state_dict()
        if state is None:
            return None
        from transformers import AutoTokenizer

        self.engine.module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
        return out_dir
