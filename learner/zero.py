"""One DeepSpeed ZeRO learner rank: log-probs, the GRPO update, full-weight export.

``LearnerRank`` is a plain class; cluster/ runs ``learner.num_ranks`` of them as Ray actors
that form one torch.distributed group (gloo on CPU, NCCL on GPU). The maths lives in
``troupe.learner.grpo``; this file only moves tensors through the model.

Loss scaling: ``grpo.policy_loss`` returns, for each micro-batch, its share of the
mini-batch loss (global denominators from ``troupe.learner.step.minibatch_norms``, computed on
every rank from the whole batch), so the mini-batch loss is the
SUM over micro-batches and ranks. DeepSpeed divides by gradient_accumulation_steps in
``backward`` and averages gradients over ranks, so each micro-batch loss is multiplied by
``gas * world_size`` before ``backward``: the gradient is then exactly that of the full
mini-batch, whatever the micro-batch size and number of ranks. (``gas`` is the nominal count
DeepSpeed was started with; the scale undoes DeepSpeed's own division, so it holds whatever the
actual number of micro-batches.)

Micro-batches (``troupe.learner.batch.micro_batch_plan``): ``learner.micro_batch_size`` rows at
a time, or with ``learner.micro_batch_tokens`` > 0 each rank's rows sorted by length and packed
into micro-batches of at most that many padded tokens (OpenRLHF/veRL), every rank running as many
micro-batches as the rank that needs the most (each forward and backward is collective under
ZeRO-2/3). Each micro-batch is trimmed to its own longest prompt and response
(``trim_padding``). As the count varies, the optimizer step is marked with DeepSpeed's
``set_gradient_accumulation_boundary`` (True on a mini-batch's last micro-batch) instead of its
fixed micro-step counter. The old and reference log-probs are computed on the same micro-batches.

Old log-probs: with one epoch and one mini-batch (and the KL not in the reward, which needs them
before the advantages) the weights do not change before the batch's only optimizer step, so the
old log-probs equal the training forward's, detached (TRL's convention: ratio exactly 1). The
separate no-grad forward over the batch is then skipped and each micro-step uses its own
detached log-probs; "logprob_mismatch" and the TIS weights min(exp(old - sampling), cap) come
from those. ``learner.skip_old_forward: false`` runs the separate forward anyway (same update).
With ``algo.old_logp: sampling`` the ratio's old policy is the engines' (the behaviour policy of a
possibly stale group): no separate forward is needed at all, ``old`` then only feeds the metrics.
"""

from __future__ import annotations

import math
import os
import time
from typing import Optional

import torch

from troupe.configs.schema import AlgoConfig, RunConfig
from troupe.core.ds_ops import clear_stale_locks, use_venv_extensions_dir
from troupe.core.types import TrainBatch
from troupe.core.weights import WeightBucket, peak_rss, peak_rss_reset, plan_buckets, rss_bytes, trim_heap
from troupe.learner import grpo
from troupe.learner.batch import chunked_response_logprobs, micro_batch_plan, token_logprobs, trim_padding
from troupe.learner.losses import LossNorm, sequence_kl, token_kl
from troupe.learner.registry import LossInputs
from troupe.learner.step import minibatch_norms, step_advantages, step_returns


def replay_adam_step_product(optimizer) -> int:
    """Bring DeepSpeed's CPU Adam bias-correction state to where an uninterrupted run has it.

    DeepSpeed's fused/CPU Adam kernel (``csrc/includes/cpu_adam.h``, ``IncrementStep``) keeps
    beta1^t and beta2^t in one process-wide C++ object per mode: each step multiplies the previous
    product by beta (float32), but a step number that is not the previous one plus one (the first
    step of a fresh process after a resume) recomputes ``pow(beta, t)``. The two differ in the last
    bits, so a resumed run's first update (and every later number) drifted by ~1e-7 relative. This
    calls the kernel once per past step 1..t on empty tensors (no parameter changes), so the
    product is built exactly as the uninterrupted run built it. ``optimizer`` is the engine's
    optimizer (ZeRO wrappers are unwrapped via ``.optimizer``); t is the largest ``step`` in its
    state. Returns t, or 0 when the optimizer is not DeepSpeed's FusedAdam on CPU parameters (torch's
    AdamW and DeepSpeed's CUDA kernel compute beta**t from the step on every call: nothing to rebuild).
    """
    inner = optimizer
    while not hasattr(inner, "multi_tensor_adam") and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    kernel = getattr(inner, "multi_tensor_adam", None)
    if kernel is None:
        return 0
    params = [p for g in inner.param_groups for p in g["params"]]
    if params and params[0].device.type != "cpu":  # the CUDA kernel computes beta**t from the step on each call
        return 0
    steps = [int(st["step"]) for st in inner.state.values() if "step" in st]
    steps += [int(g["step"]) for g in inner.param_groups if "step" in g]
    last = max(steps, default=0)
    if last == 0:
        return 0
    from deepspeed.ops.adam.multi_tensor_apply import MultiTensorApply

    group = inner.param_groups[0]
    empty = torch.empty(0, dtype=torch.float32)
    apply = MultiTensorApply(2048 * 32)
    for t in range(1, last + 1):
        apply(kernel, inner._dummy_overflow_buf, [[empty], [empty], [empty], [empty]], group["lr"],
              group["betas"][0], group["betas"][1], group["eps"], t, inner.adam_w_mode,
              1 if group.get("bias_correction", True) else 0, group["weight_decay"])
    return last


def _ds_config(*, zero_stage: int, micro: int, gas: int, world: int, lr: float, weight_decay: float,
               betas: tuple[float, float], grad_clip: float, dtype: str, device: str = "cpu") -> dict:
    """The DeepSpeed config of a rank. On GPU the optimizer is torch's AdamW (``torch_adam``): DeepSpeed's
    wheel ships no prebuilt CUDA ops, so its FusedAdam would be JIT-built with nvcc by every rank at start-up
    (CUDA_HOME and an nvcc matching torch's CUDA needed, all ranks building at once); torch's AdamW needs no
    build and keeps beta**t per step (nothing to replay on resume). On CPU DeepSpeed's CPU Adam, built once by
    ``make setup`` (core/ds_ops.py); ``replay_adam_step_product`` keeps its resume bit-exact."""
    params = {"lr": lr, "weight_decay": weight_decay, "betas": list(betas)}
    if device == "gpu":
        params["torch_adam"] = True
    cfg = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * world,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "optimizer": {"type": "AdamW", "params": params},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if dtype == "bfloat16":
        cfg["bf16"] = {"enabled": True}
    elif dtype == "float16":
        cfg["fp16"] = {"enabled": True}
    return cfg


class ZeroRank:
    """What every DeepSpeed ZeRO rank actor shares: the process group, the engine, checkpoints, weight export.

    Subclasses build their model and call :meth:`_start_engine`: the GRPO learner
    (:class:`LearnerRank`), the Bradley-Terry reward-model trainer
    (``troupe.learner.rm_rank.RewardModelRank``) and the SFT rank (``troupe.learner.sft_rank.SFTRank``).

    Weight export: whole (:meth:`full_state_dict`, :meth:`save_weights`), or bucket by bucket for
    the weight sync (:meth:`weight_buckets`, :meth:`open_weight_sink`, :meth:`send_weight_bucket`:
    never the whole model gathered at once; ``troupe.cluster.weight_sync`` supplies the sink).

    Args:
        rank, world_size: position in the torch.distributed group.
        master_addr, master_port: rendezvous of the group (rank 0's node).
        device: ``"cpu"`` (gloo) or ``"gpu"`` (NCCL).
        torch_threads: CPU only: torch intra-op threads.
        seed: ``torch.manual_seed`` of this rank.
    """

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, *, device: str,
                 torch_threads: int, seed: int) -> None:
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        if device == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            torch.set_num_threads(torch_threads)
        use_venv_extensions_dir()  # this venv's builds (made by `make setup`), not ~/.cache's shared ones
        import deepspeed

        for lock in clear_stale_locks():  # left by a build killed mid-way: torch would wait on it forever
            print(f"learner rank {rank}: removed a stale DeepSpeed build lock {lock}", flush=True)
        self.rank, self.world, self.device = rank, world_size, device
        deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl")
        torch.manual_seed(seed)
        self.zero_stage = 0
        self.optimizer_steps = 0
        self._weight_sink = None  # the weight-sync sink of open_weight_sink (rank 0 uses it)
        self._weight_plans: dict[int, list[WeightBucket]] = {}  # weight_buckets() per bucket size

    def _start_engine(self, model, lc, *, micro: int, gas: int, dtype: str) -> None:
        """``self.engine``: DeepSpeed around ``model`` with AdamW and ZeRO from ``lc`` (a LearnerConfig)."""
        import deepspeed

        self.zero_stage = lc.zero_stage
        ds_cfg = _ds_config(zero_stage=lc.zero_stage, micro=micro, gas=gas, world=self.world, lr=lc.lr,
                            weight_decay=lc.weight_decay, betas=tuple(lc.betas), grad_clip=lc.grad_clip, dtype=dtype,
                            device=self.device)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_cfg)

    def _begin_micro_step(self) -> None:
        """What ``DeepSpeedEngine.forward`` does first, for a training forward that goes around it (on
        ``engine.module``): a ZeRO optimizer closes the previous backward's micro-step. Without it ZeRO-3
        copies, not adds, the next micro-batch's gradient partition (only the last micro-batch counts)."""
        clear = getattr(self.engine.optimizer, "clear_backward_seen_flag", None)
        if clear is not None:
            clear()

    def ready(self) -> dict:
        """Rank facts: rank, world size, parameter count, ZeRO stage."""
        n = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in self.engine.module.parameters())
        return {"rank": self.rank, "world": self.world, "params": n, "zero_stage": self.zero_stage}

    def _all_gather(self, local: torch.Tensor) -> torch.Tensor:
        """Concatenation over ranks (rank order) of an equal-size 1-D tensor."""
        import torch.distributed as dist

        x = local.to(self.engine.device)
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x)
        return torch.cat(parts).cpu()

    def save_checkpoint(self, save_dir: str) -> str:
        """DeepSpeed's full training state of this rank under ``save_dir/state`` (collective: every rank calls it).

        Weights, optimizer moments (this rank's ZeRO partition), DeepSpeed's step counters, plus
        troupe's own: the optimizer-step count (the warm-up position) and this rank's torch RNG
        state. A reference model is not saved: it is the frozen initial policy, rebuilt from
        ``model_path``. Returns ``save_dir``.
        """
        client = {"optimizer_steps": self.optimizer_steps, "torch_rng": torch.get_rng_state()}
        self.engine.save_checkpoint(save_dir, tag="state", client_state=client, save_latest=False)
        return save_dir

    def load_checkpoint(self, save_dir: str) -> dict:
        """Restore what ``save_checkpoint`` wrote (collective). Returns {"optimizer_steps"}.

        Raises ``RuntimeError`` naming the folder when DeepSpeed finds no state there.
        """
        path, client = self.engine.load_checkpoint(save_dir, tag="state", load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"rank {self.rank}: no DeepSpeed state under {save_dir}/state")
        self.optimizer_steps = int(client["optimizer_steps"])
        replay_adam_step_product(self.engine.optimizer)
        torch.set_rng_state(client["torch_rng"])
        return {"optimizer_steps": self.optimizer_steps}

    def full_state_dict(self) -> Optional[dict]:
        """Full (un-sharded) weights, gathered under ZeRO-3; returned on rank 0, None elsewhere.

        Every rank must call it (the ZeRO-3 gather is collective). Tensors are contiguous CPU
        clones in the model's dtype, keyed like the HF checkpoint. Tied weights appear under both
        names (``lm_head.weight`` and ``model.embed_tokens.weight``): vLLM's in-place reload does
        not refresh a tied LM head from the embedding alone (measured: 1.1 nats of engine/learner
        disagreement without it, 1e-6 with it).
        """
        import deepspeed

        module = self.engine.module
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None,
                                               enabled=self.zero_stage == 3):
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

    # ------------------------------------------------ bucketed weight export: the weight sync's sender

    def weight_buckets(self, bucket_bytes: int) -> list[WeightBucket]:
        """The weight-sync layout: the parameters cut into buckets of whole decoder layers of at most
        ``bucket_bytes`` each (``troupe.core.weights.plan_buckets``; the same on every rank; cached).

        Full shapes (``ds_shape`` under ZeRO-3) in the model's dtype, keyed like the HF checkpoint;
        tied weights under both names (see :meth:`full_state_dict`). Raises ``ValueError`` for
        ``bucket_bytes`` < 1 (naming ``sync.bucket_mb``).
        """
        if bucket_bytes not in self._weight_plans:
            params = [(n, str(p.dtype).split(".")[-1], tuple(getattr(p, "ds_shape", p.shape)),
                       getattr(p, "ds_numel", p.numel()) * p.element_size())
                      for n, p in self.engine.module.named_parameters(remove_duplicate=False)]
            self._weight_plans[bucket_bytes] = plan_buckets(params, bucket_bytes)
        return self._weight_plans[bucket_bytes]

    def open_weight_sink(self, sink) -> object:
        """Keep ``sink`` for the following :meth:`send_weight_bucket` calls (replacing any earlier one).

        A sink is any object with ``put(bucket, tensors) -> descriptor``, called on rank 0 once per
        bucket (``troupe.cluster.weight_sync`` defines one per transport; this module never sees
        the transport). Returns ``sink.open(rank)`` when the sink has an ``open`` method, else None.
        """
        self.close_weight_sink()
        self._weight_sink = sink
        opener = getattr(sink, "open", None)
        return opener(self.rank) if callable(opener) else None

    def close_weight_sink(self) -> None:
        """Drop the open sink (calling its ``close()`` if it has one); safe without one."""
        sink, self._weight_sink = self._weight_sink, None
        closer = getattr(sink, "close", None)
        if callable(closer):
            closer()

    def send_weight_bucket(self, index: int, bucket_bytes: int) -> dict:
        """Send bucket ``index`` of ``weight_buckets(bucket_bytes)`` into the open sink.

        Every rank must call it, with the same arguments and the buckets in the same order. Two ways:

        * gathered (any ZeRO stage): under ZeRO-3 every rank gathers this bucket's parameters
          collectively (``deepspeed.zero.GatheredParameters`` on those parameters only), so no rank
          ever holds more gathered parameters than one bucket's, beyond its own partition and the
          small parameters DeepSpeed keeps whole on every rank (``stage3_param_persistence_threshold``);
          rank 0 calls ``sink.put(bucket, {name: full tensor})`` inside the gather (the gathered
          parameters themselves, no copy, valid during the call only). After the gather the freed
          heap memory is handed back to the kernel (``troupe.core.weights.trim_heap``): glibc
          otherwise kept it resident bucket after bucket. Under ZeRO-0/1/2 the parameters are whole
          on every rank already.
        * partitioned (ZeRO-3, a sink with ``partitioned = True``, e.g. a file every rank can write):
          no gather at all; every rank calls ``sink.put_partitions(bucket, {name: (flat tensor,
          first element)}, rank)`` with its own ZeRO-3 partition of each parameter (DeepSpeed's
          layout: rank r holds elements [r*s, (r+1)*s) of the flattened parameter, s =
          ``ds_tensor.ds_numel``, the last partition padded), the valid elements only.

        Returns:
            {"descriptor": what ``put``/``put_partitions`` returned (rank 0; None on the other ranks
             when gathered), "held_bytes": bytes of whole (un-partitioned) parameters this rank held
             meanwhile, measured on the module (the whole model under ZeRO-0/1/2), "seconds": the
             whole call, "put_seconds": the sink's share}.
        Raises:
            RuntimeError: no open sink (:meth:`open_weight_sink`) where one is needed.
            IndexError: ``index`` is not a bucket of the layout.
        """
        import deepspeed

        t0 = time.time()
        buckets = self.weight_buckets(bucket_bytes)
        if not 0 <= index < len(buckets):
            raise IndexError(f"weight bucket {index} of a {len(buckets)}-bucket layout")
        sink = self._weight_sink
        partitioned = self.zero_stage == 3 and bool(getattr(sink, "partitioned", False))
        if sink is None and (self.rank == 0 or partitioned):
            raise RuntimeError(f"send_weight_bucket: no weight sink open on rank {self.rank} (open_weight_sink)")
        bucket = buckets[index]
        module = self.engine.module
        if index == 0 and self.zero_stage == 3 and any(
                p.data.numel() and not getattr(p, "ds_persist", True) for p in module.parameters()):
            # a no-grad forward (sequence_logprobs, the old log-probs) leaves ZeRO-3 parameters gathered
            # (DeepSpeed's partition_all_parameters docstring; measured: the whole model held after the
            # sync check's forward): release them (a local operation) so the sync holds one bucket. The
            # optimizer's method, not the engine's, which adds a gc.collect() (0.4-0.7 s measured here)
            self.engine.optimizer.empty_partition_cache()
        named = dict(module.named_parameters(remove_duplicate=False))
        if partitioned:
            import torch.distributed as dist

            parts = {}
            for e in bucket.entries:
                p = named[e.name]
                size = p.ds_tensor.ds_numel
                start = size * dist.get_rank(group=p.ds_process_group)
                parts[e.name] = (p.ds_tensor.narrow(0, 0, max(0, min(size, p.ds_numel - start))), start)
            held = sum(p.data.numel() * p.element_size() for p in module.parameters())
            t1 = time.time()
            descriptor = sink.put_partitions(bucket, parts, self.rank)
            t_put = time.time() - t1
            return {"descriptor": descriptor, "held_bytes": held, "seconds": time.time() - t0, "put_seconds": t_put}
        params = list({id(named[e.name]): named[e.name] for e in bucket.entries}.values())
        descriptor, t_put = None, 0.0
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.zero_stage == 3):
            held = sum(p.data.numel() * p.element_size() for p in module.parameters())
            t1 = time.time()
            if self.rank == 0:
                descriptor = sink.put(bucket, {e.name: named[e.name].data for e in bucket.entries})
                t_put = time.time() - t1
        if self.zero_stage == 3:
            trim_heap()  # the gather's freed buffers would stay resident, bucket after bucket (trim_heap docs)
        return {"descriptor": descriptor, "held_bytes": held, "seconds": time.time() - t0, "put_seconds": t_put}

    def peak_memory(self, reset: bool = False) -> dict:
        """This rank process's resident memory (Linux): {"rss", "peak"} in bytes.

        ``reset=True`` first resets the kernel's peak (``troupe.core.weights.peak_rss_reset``), so the
        ``peak`` of a later call is the highest resident size since this one: the weight sync's
        tests and benchmark measure the sender's memory with it. Raises ``OSError`` off Linux.
        """
        if reset:
            peak_rss_reset()
        return {"rss": rss_bytes(), "peak": peak_rss()}

    def _micro_batches(self, batch: TrainBatch, shard: TrainBatch, lc, mini_batches: int
                       ) -> list[list[tuple[torch.Tensor, TrainBatch]]]:
        """Per mini-batch, this rank's micro-batches: (row indices into ``shard``, those rows with their padding
        trimmed). Fixed ``lc.micro_batch_size`` rows, or ``lc.micro_batch_tokens`` token budgets
        (``troupe.learner.batch.micro_batch_plan``: the same number of micro-batches on every rank)."""
        plan = micro_batch_plan(batch.attention_mask[:, :batch.prompt_len].sum(1).tolist(),
                                batch.response_lengths.tolist(), num_ranks=self.world,
                                mini_batches=mini_batches, micro_batch_size=lc.micro_batch_size,
                                micro_batch_tokens=lc.micro_batch_tokens)[self.rank]
        out = []
        for mb in plan:
            parts = []
            for rows in mb:
                idx = torch.tensor(rows, dtype=torch.long)
                sel = slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1)) else idx
                parts.append((idx, trim_padding(shard.select(sel))))
            out.append(parts)
        return out

    def _rows(self, batch_size: int) -> slice:
        """This rank's rows of a step batch: [r*B/R, (r+1)*B/R)."""
        per = batch_size // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def _set_lr(self, base_lr: float, warmup_steps: int) -> None:
        """Linear warm-up: optimizer step k (0-based) uses lr * min(1, (k + 1) / warmup_steps).

        Done here rather than with DeepSpeed's WarmupLR, whose schedule steps after the optimizer
        and so runs the first two optimizer steps at lr = 0 when warming up from 0.
        """
        w = warmup_steps
        lr = base_lr * (min(1.0, (self.optimizer_steps + 1) / w) if w else 1.0)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr


class LearnerRank(ZeroRank):
    """One data-parallel rank of the DeepSpeed ZeRO learner.

    Protocol (every call is made on every rank; each is collective under ZeRO-3):

    * ``train_step(batch) -> metrics``: the whole step on this rank's rows of ``batch``
      (rows [r*B/R, (r+1)*B/R)): old (unless skipped, module docstring) and reference log-probs,
      advantages of the whole batch
      (``troupe.learner.step``; KL sums all-gathered when the KL is in the reward), the clipped
      update over ``algo.ppo_epochs`` x ``algo.mini_batches``. Nothing is kept between calls.
    * ``sequence_logprobs(token_ids, start)``: the sync check's learner side.
    * ``full_state_dict()`` / ``save_weights(path)`` / ``save_hf(dir, tokenizer_dir)``: weight export.
    * ``save_checkpoint(dir)`` / ``load_checkpoint(dir)``: the full training state, for resume.

    NaN guard: an optimizer step whose loss or gradient norm is not finite changes nothing (no
    weight, no optimizer moment); ``train_step`` counts it in ``faults/nonfinite_steps``.

    Args:
        rank, world_size: position in the torch.distributed group.
        master_addr, master_port: rendezvous of the group (rank 0's node).
        model_path: HF model directory of the initial policy (also the frozen reference).
        cfg: the run config (reads ``learner``, ``algo``, ``model``, ``rollout`` sampling settings,
            ``seed``, ``device``).

    The reference model (``algo.kl_coef`` > 0) is sharded like the policy under ZeRO-3 (a DeepSpeed
    inference engine, no optimizer; OpenRLHF's way) and replicated under ZeRO-0/1/2.

    Raises:
        RuntimeError: if DeepSpeed cannot initialise (message from DeepSpeed).
    """

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, model_path: str,
                 cfg: RunConfig) -> None:
        super().__init__(rank, world_size, master_addr, master_port, device=cfg.device,
                         torch_threads=cfg.learner.torch_threads, seed=cfg.seed)
        from transformers import AutoModelForCausalLM

        self.lc, self.algo, self.rollout = cfg.learner, cfg.algo, cfg.rollout
        self.dtype = getattr(torch, cfg.model.dtype)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        rows = cfg.batch_size // world_size // cfg.algo.mini_batches  # rows of a mini-batch on this rank
        self.micro = min(self.lc.micro_batch_size, rows)
        self.gas = max(1, math.ceil(rows / self.micro))
        self._start_engine(model, self.lc, micro=self.micro, gas=self.gas, dtype=cfg.model.dtype)
        self.ref = self._reference(model_path, cfg.model.dtype) if self.algo.kl_coef > 0 else None
        self._dtype_name = cfg.model.dtype
        self.teacher, self._teacher_path = None, None  # on-policy distillation's frozen teacher (_load_teacher)
        self._load_teacher()
        self._grads_dropped = False  # the ZeRO-0 NaN guard skipped the current optimizer step
        self._stage0_norm = float("nan")  # ZeRO-0: the last optimizer step's gradient norm

    def _load_teacher(self) -> None:
        """Load ``algo.advantage.teacher`` (frozen, like the reference) when the estimator reads a teacher and it is
        not loaded yet; drop a teacher the estimator no longer reads."""
        path = getattr(self.algo.advantage, "teacher", None) if self.algo.advantage.uses_teacher else None
        if path != self._teacher_path:
            self.teacher, self._teacher_path = (self._reference(path, self._dtype_name), path) if path else (None, None)

    def _reference(self, model_path: str, dtype: str):
        """A frozen copy of a model (the reference policy; a distillation teacher): a ZeRO-3 inference engine
        (sharded) or a replicated module."""
        import deepspeed
        from transformers import AutoModelForCausalLM

        ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.dtype).eval().requires_grad_(False)
        if self.lc.zero_stage != 3:
            return ref.to(self.engine.device)
        ds_cfg = {k: v for k, v in _ds_config(zero_stage=3, micro=self.micro, gas=1, world=self.world, lr=0.0,
                                               weight_decay=0.0, betas=(0.9, 0.999), grad_clip=0.0, dtype=dtype).items()
                  if k not in ("optimizer", "gradient_clipping")}
        engine, *_ = deepspeed.initialize(model=ref, config=ds_cfg)
        engine.eval()  # DeepSpeedEngine.eval() returns None, unlike Module.eval()
        return engine

    def ready(self) -> dict:
        """Rank facts: rank, world size, parameter count, ZeRO stage, whether the reference is sharded."""
        return {**super().ready(),
                "reference": None if self.ref is None else ("zero3" if self.lc.zero_stage == 3 else "replicated")}

    def _forward_logprobs(self, model, b: TrainBatch, with_entropy: bool = False):
        out = model(input_ids=b.input_ids.to(self.engine.device), attention_mask=b.attention_mask.to(self.engine.device))
        return chunked_response_logprobs(out.logits, b.input_ids, b.prompt_len, self.rollout.temperature,
                                         self.lc.logits_chunk_tokens, with_entropy)

    @torch.no_grad()
    def _logprobs(self, model, micros: list[list[tuple[torch.Tensor, TrainBatch]]], shard: TrainBatch) -> torch.Tensor:
        """[B_shard, T] float32 log-probs of the shard's response tokens under ``model``, one no-grad forward per
        micro-batch of ``micros`` (0 beyond a micro-batch's trimmed width, where the response mask is 0)."""
        out = torch.zeros(shard.size, shard.response_len)
        for mb in micros:
            for idx, part in mb:
                out[idx, :part.response_len] = self._forward_logprobs(model, part)[0].cpu()
        return out

    def skips_old_forward(self) -> bool:
        """Whether this step skips the separate old log-prob forward (module docstring): KL not in the reward, no
        distillation teacher (both need the old log-probs before the advantages), and either ``algo.old_logp: sampling`` (the ratio's old policy is the engines') or one epoch, one
        mini-batch and ``learner.skip_old_forward`` on. Then ``old`` holds the training forward's own
        detached log-probs (for the metrics, and as the ratio's old policy unless it is the sampling one)."""
        a = self.algo
        if (a.kl_in == "reward" and a.kl_coef > 0) or a.advantage.uses_teacher:
            return False
        return bool(a.old_logp == "sampling" or (self.lc.skip_old_forward and a.ppo_epochs == 1 and a.mini_batches == 1))

    def sequence_logprobs(self, token_ids: list[int], start: int) -> list[float]:
        """Learner log-probs (temperature 1) of ``token_ids[start:]`` given their prefix, for the sync check.

        Every rank must call it under ZeRO-3 (the forward gathers parameters collectively).
        """
        ids = torch.tensor([token_ids], device=self.engine.device)
        with torch.no_grad():
            logits = self.engine.module(input_ids=ids).logits
        return token_logprobs(logits[0, :-1], ids[0, 1:])[start - 1:].cpu().tolist()

    def set_algo(self, algo: AlgoConfig) -> None:
        """Switch the algorithm section between steps (estimator, loss, shaping, KL strength).

        Raises ``ValueError`` when asking for a KL term on a rank started without a reference model.
        """
        if algo.kl_coef > 0 and self.ref is None:
            raise ValueError("algo.kl_coef > 0 needs a reference model: start the learner with kl_coef > 0")
        self.algo = algo
        self._load_teacher()  # collective under ZeRO-3: every rank calls set_algo

    def train_step(self, batch: TrainBatch, update: bool = True) -> dict:
        """One GRPO step on this rank's rows of the whole step batch; every rank must call it.

        Args:
            batch: the whole step batch (B rows, B divisible by world size x mini-batches); with a critic
                estimator (``algo.advantage: gae``) it carries the critic's ``values``.
            update: False: everything but the update (the policy keeps its weights: ``critic.freeze_policy_steps``).
        Returns:
            Metrics (floats): the loss's (averaged over micro-batches; "loss" is the mini-batch
            loss), "grad_norm", "lr", "entropy", "logprob_mismatch" (mean |old - sampling| over this
            rank's response tokens), "faults/nonfinite_steps" (optimizer steps skipped as not
            finite; their "grad_norm" is inf or nan), the advantage statistics of ``troupe.learner.step.step_advantages``,
            "learn_seconds" and its parts "learn/old_logprob_seconds" (0 when the old forward is skipped),
            "learn/ref_logprob_seconds", "learn/update_seconds"; "learn/micro_batches" (this rank's forward/backward
            passes) and "learn/padding_frac" (padded share of the tokens those passes ran on). With a critic
            estimator, rank 0 also returns "critic/returns": the critic's targets, a [B, T] float32 tensor of
            the whole batch (``troupe.learner.step.step_returns``).
        """
        t0 = time.perf_counter()
        rows = self._rows(batch.size)
        shard = batch.select(rows)
        micros = self._micro_batches(batch, shard, self.lc, self.algo.mini_batches)
        skip = self.skips_old_forward() and update
        t_plan = time.perf_counter()
        old = None if skip else self._logprobs(self.engine.module, micros, shard)
        t_old = time.perf_counter()
        ref = self._logprobs(self.ref, micros, shard) if self.ref is not None else None
        t_ref = time.perf_counter()
        kl, critic = None, self.algo.advantage.uses_critic
        if self.algo.kl_in == "reward" and self.algo.kl_coef > 0:
            if critic:  # per token, all-gathered as one flat tensor (every rank's shard has the same shape)
                kl = self._all_gather(token_kl(old, ref, shard.response_mask, self.algo.kl_estimator).reshape(-1))
                kl = kl.reshape(batch.size, batch.response_len)
            else:
                kl = self._all_gather(sequence_kl(old, ref, shard.response_mask, self.algo.kl_estimator))
        gap = None
        if self.teacher is not None:  # the teacher's log-probs minus the old policy's, every rank's rows
            gap = (self._logprobs(self.teacher, micros, shard) - old) * shard.response_mask
            gap = self._all_gather(gap.reshape(-1)).reshape(batch.size, batch.response_len)
        G, cap = self.rollout.group_size, self.rollout.max_new_tokens
        adv, stats = step_advantages(batch, self.algo, G, cap, kl, gap)
        if gap is not None:
            stats["distill/reverse_kl"] = float(-(gap * batch.response_mask).sum() / batch.response_mask.sum().clamp(min=1))
        norms = minibatch_norms(batch.response_mask, self.world, self.algo.mini_batches, self.algo.loss_agg, cap)
        if skip:  # filled by the micro-steps with the detached training log-probs
            old = torch.zeros(shard.size, shard.response_len)
        t_upd = time.perf_counter()
        out = self._update(micros, old, ref, adv[rows], norms, fill_old=skip) if update else {"policy_frozen": 1.0}
        if critic and self.rank == 0:
            out["critic/returns"] = step_returns(batch, self.algo, G, cap, kl)
        t_end = time.perf_counter()
        mask = shard.response_mask
        out["logprob_mismatch"] = float(((old - shard.sampling_logprobs).abs() * mask).sum() / mask.sum().clamp(min=1))
        parts = [part for mb in micros for _, part in mb]
        real = float(sum(part.attention_mask.sum() for part in parts))
        out["learn/padding_frac"] = 1.0 - real / max(1, sum(part.input_ids.numel() for part in parts))
        out["learn/micro_batches"] = float(len(parts))
        out.update(stats, learn_seconds=t_end - t0, **{"learn/old_logprob_seconds": t_old - t_plan,
                                                         "learn/ref_logprob_seconds": t_ref - t_old,
                                                         "learn/update_seconds": t_end - t_upd})
        return out

    def _update(self, micros: list[list[tuple[torch.Tensor, TrainBatch]]], old: torch.Tensor,
                ref: Optional[torch.Tensor], adv: torch.Tensor, norms: list[LossNorm], fill_old: bool = False) -> dict:
        """``algo.ppo_epochs`` passes of ``len(norms)`` optimizer steps, mini-batch m over the micro-batches
        ``micros[m]``; ``old``, ``ref``, ``adv`` are [B_shard, T]. ``fill_old``: ``old`` is written, not read
        (one epoch, one mini-batch: each micro-step takes its own detached log-probs as the old ones)."""
        self.engine.train()
        sums: dict[str, float] = {}
        count, grad_norm, skipped = 0, 0.0, 0
        for _epoch in range(self.algo.ppo_epochs):
            for mb, norm in zip(micros, norms):
                self._set_lr(self.lc.lr, self.lc.warmup_steps)
                self._grads_dropped = False
                for j, (idx, part) in enumerate(mb):
                    t = part.response_len
                    # the number of micro-batches varies with a token budget: mark the optimizer step ourselves
                    self.engine.set_gradient_accumulation_boundary(j == len(mb) - 1)
                    met, used = self._micro_step(part, None if fill_old else old[idx, :t],
                                                 None if ref is None else ref[idx, :t], adv[idx, :t], norm)
                    if fill_old:
                        old[idx, :t] = used.cpu()
                    for k, v in met.items():
                        sums[k] = sums.get(k, 0.0) + v
                    count += 1
                gn = self._stage0_norm if self.lc.zero_stage == 0 else self.engine.get_global_grad_norm()
                grad_norm = float(gn) if gn is not None else float("nan")
                if self._grads_dropped or not self.engine.was_step_applied():
                    skipped, grad_norm = skipped + 1, float("inf") if math.isfinite(grad_norm) else grad_norm
                self.optimizer_steps += 1
        out = {k: v / max(count, 1) for k, v in sums.items()}
        # each micro-batch loss is its share of the mini-batch loss: report the mini-batch loss
        out["loss"] = sums.get("loss", 0.0) / max(self.algo.ppo_epochs * len(norms), 1)
        out["grad_norm"] = grad_norm
        out["lr"] = self.engine.optimizer.param_groups[0]["lr"]
        out["faults/nonfinite_steps"] = float(skipped)
        return out

    def _micro_step(self, micro: TrainBatch, old: Optional[torch.Tensor], ref: Optional[torch.Tensor],
                    adv: torch.Tensor, norm: LossNorm) -> tuple[dict, torch.Tensor]:
        """Forward, loss, backward and ``engine.step`` of one micro-batch (all [n, T'] over its trimmed width);
        ``old`` None: the detached log-probs of this forward. Returns (metrics, the old log-probs used)."""
        # through the engine, not engine.module: DeepSpeed's forward starts a new micro-step of gradient
        # accumulation (ZeRO-3 otherwise overwrites, not adds, each micro-batch's gradient partition)
        lp, ent = self._forward_logprobs(self.engine, micro, with_entropy=True)
        dev = lp.device
        a = self.algo
        old = lp.detach() if old is None else old.to(dev)
        sampling = micro.sampling_logprobs.to(dev)
        inp = LossInputs(lp, sampling if a.old_logp == "sampling" else old, adv.to(dev), micro.response_mask.to(dev),
                         sampling, None if ref is None else ref.to(dev))
        loss, met = grpo.policy_loss(inp, a.policy_loss, norm, tis_cap=a.tis_cap,
                                     kl_coef=a.kl_coef if a.kl_in == "loss" else 0.0, kl_estimator=a.kl_estimator)
        scaled = loss * self.gas * self.world
        if not torch.isfinite(loss.detach()):  # NaN guard: a non-finite loss poisons every gradient (NaN * g),
            scaled = scaled * float("nan")     # so the whole optimizer step is skipped, on every rank
        self.engine.backward(scaled)
        if self.lc.zero_stage == 0 and self.engine.is_gradient_accumulation_boundary() and \
                not math.isfinite(self._stage0_grad_norm()):
            self._grads_dropped = True
            opt = self.engine.optimizer
            opt.step = lambda *args, **kwargs: None  # this one optimizer step does nothing (instance attribute)
            try:
                self.engine.step()
            finally:
                del opt.step
        else:
            self.engine.step()
        mask = inp.response_mask
        out = {k: float(v) for k, v in met.items()}
        out["entropy"] = float((ent * mask).sum() / mask.sum().clamp(min=1))
        out["loss"] = float(loss.detach())
        return out, old

    def _stage0_grad_norm(self) -> float:
        """ZeRO-0's global gradient norm (DeepSpeed reports none without a ZeRO optimizer), and its NaN guard.

        Called after the mini-batch's last backward, when the gradients are already averaged over
        ranks (so every rank computes the same norm). A non-finite norm makes the caller run
        DeepSpeed's step with the optimizer's ``step`` made a no-op: no parameter or AdamW moment
        changes. ZeRO-1/2/3 skip such a step themselves (a non-finite global norm is an overflow;
        bf16 with ``check_grad_overflow``, DeepSpeed's default), seen through ``engine.was_step_applied()``.
        """
        grads = [p.grad.detach().float() for p in self.engine.module.parameters() if p.grad is not None]
        self._stage0_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) \
            if grads else 0.0
        return self._stage0_norm

    def save_hf(self, out_dir: str, tokenizer_dir: str) -> Optional[str]:
        """Write an HF checkpoint (config, safetensors, tokenizer) that transformers and vLLM load."""
        state = self.full_state_dict()
        if state is None:
            return None
        from transformers import AutoTokenizer

        self.engine.module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
        return out_dir
