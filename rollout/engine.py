"""The vLLM engine actor: samples groups, returns token ids and sampling logprobs, reloads weights.

``RolloutEngine`` is a plain class; cluster/ wraps it with ``ray.remote`` (Ray stays at the
edge). One engine = one ``vllm.LLM``. Sampling asks vLLM for ``n = G`` samples per prompt with
``logprobs=0`` (the sampled token's logprob) in ``processed_logprobs`` mode, so the logprobs are
those of the distribution actually sampled from (after temperature), which is what the learner
compares against (learner logits are divided by the same temperature).

Weight reload goes through a vLLM worker extension (``WeightReloadExtension``): the worker
reads the weights from a file and calls vLLM's in-place ``reload_weights`` (plain
``model.load_weights`` fails on the CPU backend after the first load, see docs/design.md), then
the prefix cache is reset so no KV computed by old weights is reused. The weight sync
(``troupe.cluster.weight_sync``) streams buckets of whole decoder layers (``troupe.core.weights``):
``begin_weights``, one ``load_weight_bucket`` per bucket (the worker maps the bucket's bytes and
reloads from zero-copy views; one ``reload_weights`` call per bucket, which vLLM handles as long as
no layer is split), ``finish_weights``; or, for GPU engines, vLLM's own NCCL weight transfer
(``init_weight_transfer``, ``receive_weight_bucket``). ``load_weights`` reloads one safetensors file.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Union

from troupe.configs.schema import RolloutConfig
from troupe.core.steps import decoded_prefix_lengths, split_steps, step_token_ends
from troupe.core.threads import THREAD_VARS
from troupe.core.types import Group, Prompt, Sample, Sampling
from troupe.core.weights import WeightBucket, array_bytes


class WeightReloadExtension:
    """vLLM worker extension (``worker_extension_cls``): in-place weight reload from a file.

    Method names must not collide with vLLM worker methods (``update_weights`` exists).
    """

    def troupe_reload_weights(self, path: str) -> int:
        """Load every tensor of the safetensors file at ``path`` into the running model.

        Returns the number of tensors read. Raises whatever vLLM raises for unknown names.
        """
        from safetensors.torch import load_file
        from vllm.model_executor.model_loader.reload.inplace import reload_weights

        state = load_file(path)
        runner = self.model_runner  # type: ignore[attr-defined]
        reload_weights(
            self.vllm_config,  # type: ignore[attr-defined]
            runner.get_model(),
            weights_iterator=iter(state.items()),
            weights_path=None,
            is_checkpoint_format=True,
        )
        return len(state)

    def troupe_load_bucket(self, path: str, base: int, nbytes: int, wire: list) -> int:
        """Reload one weight bucket (``troupe.core.weights``) straight from the file at ``path``.

        The bytes ``[base, base + nbytes)`` of the file (``base`` page aligned) are mapped
        copy-on-write and each tensor is a zero-copy view into them, handed to vLLM's in-place
        ``reload_weights`` (which copies it into the layer and repacks the layer). The bucket must
        hold whole decoder layers (see the module doc of ``troupe.core.weights``): layers it does
        not name keep their weights. Returns the number of tensors loaded.
        """
        import mmap
        import warnings

        from vllm.model_executor.model_loader.reload.inplace import reload_weights

        from troupe.core.weights import entries_from_wire, tensor_views

        entries = entries_from_wire(wire)
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), nbytes, offset=base, access=mmap.ACCESS_COPY)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                views = tensor_views(mm, entries)
            reload_weights(
                self.vllm_config,  # type: ignore[attr-defined]
                self.model_runner.get_model(),  # type: ignore[attr-defined]
                weights_iterator=iter(views),
                weights_path=None,
                is_checkpoint_format=True,
            )
            return len(views)
        finally:
            views = None
            try:
                mm.close()
            except BufferError:  # a view still referenced somewhere: the mapping goes with it
                pass

    def troupe_thread_env(self) -> dict:
        """This worker process's thread variables (``troupe.core.threads.THREAD_VARS``, None when unset)
        and ``torch_threads``: ``torch.get_num_threads()`` here, where the model runs."""
        import torch

        return {**{k: os.environ.get(k) for k in THREAD_VARS}, "torch_threads": torch.get_num_threads()}


def shm_segments_of(pid: int) -> list[str]:
    """The vLLM shared-memory segments (``/dev/shm/psm_*``) mapped by process ``pid`` and its descendants.

    vLLM's message queues (``shm_broadcast.MessageQueue``) unlink their segment only when their creator
    exits cleanly; an engine stopped with ``ray.kill`` (or killed by a fault) leaves them behind (160 and
    240 MiB logical each, issue 26). The engine reports its segments when it is ready, so the driver can
    unlink what a dead or stopped engine left. Linux only (reads /proc); [] elsewhere."""
    seen, todo, out = set(), [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/maps") as f:  # address perms offset dev inode [path]
                fields = (line.split(None, 5) for line in f if "/dev/shm/psm_" in line)
                out.update(x[5].strip() for x in fields if len(x) == 6)
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return sorted(x.replace(" (deleted)", "") for x in out)


def engine_core_in_process(rollout: RolloutConfig, device: str) -> bool:
    """Whether vLLM's engine core runs inside the engine actor (``VLLM_ENABLE_V1_MULTIPROCESSING=0``).

    ``rollout.engine_core``: "in_process" or "subprocess" as said; "auto" is in-process on the CPU and
    vLLM's own processes on GPUs. On the CPU, vLLM's default starts an EngineCore and a worker process that
    each import torch and vLLM again: the demo's engine starts in 6.5 s in-process and 20.5 s in
    subprocesses on 2 cores, and samples the demo's step batch ~10% slower in-process (2.0 vs 1.8 s: the
    separate engine core overlaps output processing with the forward on another core); vLLM 0.32,
    ``bench/bench_engine_start.py``. Short CPU runs and tests start engines often; a long CPU run may
    prefer "subprocess".
    """
    if rollout.engine_core == "auto":
        return device == "cpu"
    return rollout.engine_core == "in_process"


def engine_kwargs(model_path: str, rollout: RolloutConfig, *, dtype: str, seed: int, device: str) -> dict:
    """The keyword arguments of ``vllm.LLM`` for one engine (pure: a CPU test checks the GPU ones).

    On GPU, ``tensor_parallel_size`` = ``rollout.num_gpus_per_engine`` (a whole number, checked by the
    schema). With TP > 1 the engine uses vLLM's multiprocessing executor inside its actor, as OpenRLHF and
    veRL do: left to choose, vLLM picks its Ray executor inside troupe's placement group, which refuses a
    bundle with more than one GPU (vllm/v1/executor/ray_utils.py), and with 1-GPU bundles its workers would
    wait for GPUs the engine actor already holds. The actor holds TP GPUs (its bundle), so the worker
    processes see them through CUDA_VISIBLE_DEVICES. Not yet run on a GPU (docs/gpu.md).
    """
    kw = dict(
        model=model_path,
        dtype=dtype,
        max_model_len=rollout.max_model_len,
        seed=seed,
        enforce_eager=rollout.enforce_eager,
        logprobs_mode="processed_logprobs",
        worker_extension_cls="troupe.rollout.engine.WeightReloadExtension",
        enable_prefix_caching=True,
    )
    if device == "cpu":
        # per-prompt seeds give each request a torch.Generator; when a prompt's prefill is split
        # (chunked prefill), vLLM 0.32 rewinds that generator with set_offset, which CPU generators
        # lack ("CPU Generator does not use offset"): prefill every prompt whole on CPU
        kw.update(enable_chunked_prefill=False)
    if device == "gpu":
        tp = max(1, int(rollout.num_gpus_per_engine))
        # vLLM's NCCL weight-transfer engine (the vllm_nccl sync strategy); inert until
        # init_weight_transfer is called
        kw.update(gpu_memory_utilization=rollout.gpu_memory_utilization, tensor_parallel_size=tp,
                  weight_transfer_config={"backend": "nccl"})
        if tp > 1:
            kw.update(distributed_executor_backend="mp")
    return kw


class RolloutEngine:
    """One vLLM engine (an actor under Ray): sampling, greedy evaluation, weight reload.

    Args:
        model_path: HF model directory.
        rollout: the run's rollout section (max_model_len, KV cache / GPU memory, eager mode, GPUs
            per engine = tensor parallel size).
        dtype: "float32" | "bfloat16" | "float16" (model.dtype).
        seed: the engine's sampling seed (each engine gets a different one).
        device: "cpu" or "gpu".
    """

    def __init__(self, model_path: str, rollout: RolloutConfig, *, dtype: str = "float32", seed: int = 0,
                 device: str = "cpu") -> None:
        if device == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(rollout.kv_cache_gib)))))
        # read by vLLM when the LLM is built (vllm.envs is evaluated lazily); the actor has its own process
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if engine_core_in_process(rollout, device) else "1"
        from vllm import LLM

        kw = engine_kwargs(model_path, rollout, dtype=dtype, seed=seed, device=device)
        t0 = time.time()
        self.llm = LLM(**kw)
        self.start_seconds = time.time() - t0
        self.tokenizer = self.llm.get_tokenizer()
        self.version = 0
        self.model_path = model_path
        self.workers = max(1, int(rollout.num_gpus_per_engine)) if device == "gpu" else 1
        self._incoming: dict | None = None  # the weight update between begin_weights and finish_weights
        self._bucket_fd: int | None = None  # memfd the object-store buckets are written into

    def ready(self) -> dict:
        """Engine facts once started: start time (s), policy version, eos id, vLLM worker processes
        ("workers": the tensor-parallel size on GPUs, 1 on the CPU), and the host and /dev/shm segments
        of its vLLM processes ("host", "shm_segments": ``shm_segments_of``; the driver unlinks them once
        the engine is gone)."""
        return {"start_seconds": self.start_seconds, "version": self.version, "eos_token_id": self.tokenizer.eos_token_id,
                "workers": self.workers, "host": socket.gethostname(), "shm_segments": shm_segments_of(os.getpid())}

    def generate(self, prompts: list[Prompt], sampling: Sampling, seeds: list[int] | None = None) -> list[Group]:
        """Sample ``sampling.n`` responses per prompt (greedy when temperature == 0 and n == 1).

        Args:
            prompts: the prompts.
            sampling: sampling settings; ``sampling.seed`` seeds the whole call when ``seeds`` is None
                (None: the engine's own RNG stream).
            seeds: one sampling seed per prompt, or None. Prompt i is then sampled with its own
                ``SamplingParams(seed=seeds[i])`` (``sampling.seed`` is ignored), so its samples depend
                only on the prompt, the seed and the weights, not on which engine or batch it lands in.
                With ``n > 1``, vLLM v1 parallel sampling (``vllm/v1/engine/parallel_sampling.py``,
                vLLM 0.32) splits the request into n children and child k gets seed ``seeds[i] + k``:
                callers should space the seeds of different prompts at least ``n`` apart.
        Returns:
            One unscored ``Group`` per prompt, in prompt order; each sample carries [R] token ids,
            [R] sampling logprobs (nats), the decoded text, whether it was truncated at
            ``max_new_tokens``, and the engine's policy version. With ``sampling.step_delimiter``
            (process supervision) each sample also gets ``step_ends``: the last response token of
            each step of ``troupe.core.steps.split_steps(text)``.
        Raises:
            ValueError: ``seeds`` is given but its length differs from ``prompts``.
        """
        from vllm import SamplingParams

        kw = dict(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                  max_tokens=sampling.max_new_tokens, logprobs=0)
        if seeds is None:
            sp = SamplingParams(**kw, seed=sampling.seed)
        elif len(seeds) != len(prompts):
            raise ValueError(f"generate: {len(seeds)} seeds for {len(prompts)} prompts")
        else:
            sp = [SamplingParams(**kw, seed=int(s)) for s in seeds]
        outs = self.llm.generate([{"prompt_token_ids": p.token_ids} for p in prompts], sp, use_tqdm=False)
        delim = sampling.step_delimiter
        groups = []
        for p, out in zip(prompts, outs):
            samples = []
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = [float(d[t].logprob) for t, d in zip(ids, c.logprobs)] if c.logprobs else [0.0] * len(ids)
                ends = self._step_ends(ids, c.text, delim) if delim and ids else []
                samples.append(Sample(ids, lps, c.text, c.finish_reason == "length", self.version, ends))
            groups.append(Group(prompt=p, samples=samples))
        return groups

    def _step_ends(self, ids: list[int], text: str, delimiter: str) -> list[int]:
        lengths = decoded_prefix_lengths(self.llm.get_tokenizer(), ids)
        return step_token_ends(lengths.__getitem__, len(ids), [end for _, end in split_steps(text, delimiter)])

    def sequence_logprobs(self, token_ids: list[int], start: int) -> list[float]:
        """Engine log-probs of ``token_ids[start:]`` given their prefix (prompt_logprobs), [len - start].

        Used to check that after a weight sync the engine and learner agree on a fixed sequence.
        """
        from vllm import SamplingParams

        sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        out = self.llm.generate([{"prompt_token_ids": token_ids}], sp, use_tqdm=False)[0]
        lps = out.prompt_logprobs  # [len] of dicts; first is None
        return [float(lps[i][token_ids[i]].logprob) for i in range(start, len(token_ids))]

    def load_weights(self, path: str, version: int) -> dict:
        """Reload weights from a safetensors file in place and reset the prefix cache.

        Returns {"version", "seconds", "tensors"}.
        """
        t0 = time.time()
        n = self.llm.collective_rpc("troupe_reload_weights", args=(path,))
        self.llm.reset_prefix_cache()
        self.version = version
        return {"version": version, "seconds": time.time() - t0, "tensors": int(n[0]) if n else 0}

    # ---------------------------------------------- streamed weight sync (troupe.cluster.weight_sync)

    def begin_weights(self, version: int, num_buckets: int, transfer: str = "file") -> None:
        """Start receiving ``version`` as ``num_buckets`` buckets (``troupe.core.weights``).

        Then one :meth:`load_weight_bucket` ("file") or :meth:`receive_weight_bucket` ("vllm_nccl":
        opens vLLM's weight-update session, ``LLM.start_weight_update``) per bucket, in order, then
        :meth:`finish_weights`. In between the weights are part old, part new: nothing may sample
        (the engine group sends nothing else meanwhile). Raises ``ValueError`` for another ``transfer``.
        """
        if transfer not in ("file", "vllm_nccl"):
            raise ValueError(f"begin_weights: transfer must be 'file' or 'vllm_nccl', got {transfer!r}")
        if transfer == "vllm_nccl":
            self.llm.start_weight_update()
        self._incoming = {"version": version, "expected": num_buckets, "loaded": 0, "tensors": 0, "load": 0.0,
                          "transfer": transfer, "t0": time.time()}

    def _bucket_started(self, bucket: WeightBucket, transfer: str) -> dict:
        inc = self._incoming
        if inc is None or inc["transfer"] != transfer:
            raise RuntimeError(f"weight bucket {bucket.index} without begin_weights(..., transfer={transfer!r})")
        if bucket.index != inc["loaded"]:
            raise RuntimeError(f"weight bucket {bucket.index} arrived, expected bucket {inc['loaded']}")
        return inc

    def load_weight_bucket(self, bucket: WeightBucket, data: Union[str, list]) -> dict:
        """Reload one bucket of the version announced by :meth:`begin_weights` into the running model.

        Args:
            bucket: the bucket (its tensors' names, dtypes, shapes, offsets).
            data: a path (str) of a whole-model file that holds the bucket at ``bucket.start`` (shm
                strategy: the worker maps the file, no copy before vLLM's own), or the bucket's
                tensors as one uint8 array per entry (object-store strategy: Ray hands them over from
                the object store, zero-copy on this node). The arrays are written into this engine's
                own anonymous memory file (``memfd``, reused, one bucket large; it goes with the
                process) because the model runs in vLLM's worker process, which reads it by path.
        Returns:
            {"bucket", "tensors", "seconds"}.
        Raises:
            RuntimeError: no ``begin_weights`` ("file"), or buckets out of order.
            ValueError: arrays that do not match the bucket.
        """
        inc = self._bucket_started(bucket, "file")
        t0 = time.time()
        if isinstance(data, str):
            path, base = data, bucket.start
        else:
            if self._bucket_fd is None:
                self._bucket_fd = os.memfd_create("troupe-weight-bucket")
            array_bytes(data, bucket, self._bucket_fd)
            path, base = f"/proc/{os.getpid()}/fd/{self._bucket_fd}", 0
        n = int(self.llm.collective_rpc("troupe_load_bucket", args=(path, base, bucket.nbytes, bucket.wire()))[0])
        dt = time.time() - t0
        inc["loaded"] += 1
        inc["tensors"] += n
        inc["load"] += dt
        return {"bucket": bucket.index, "tensors": n, "seconds": dt}

    def init_weight_transfer(self, init_info: dict) -> None:
        """vLLM's weight-transfer rendezvous (``LLM.init_weight_transfer_engine``, GPU workers; the engine
        was started with ``weight_transfer_config`` backend "nccl"). Blocks until the trainer joins."""
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def receive_weight_bucket(self, bucket: WeightBucket) -> dict:
        """vllm_nccl strategy: receive one bucket by NCCL broadcast from learner rank 0 into the model
        (``LLM.update_weights`` with the bucket's names, dtypes and shapes; blocks until rank 0 sends it).
        Returns {"bucket", "tensors", "seconds"}. Raises ``RuntimeError`` as :meth:`load_weight_bucket`."""
        inc = self._bucket_started(bucket, "vllm_nccl")
        t0 = time.time()
        self.llm.update_weights({"update_info": {"names": [e.name for e in bucket.entries],
                                                 "dtype_names": [e.dtype for e in bucket.entries],
                                                 "shapes": [list(e.shape) for e in bucket.entries]}})
        dt = time.time() - t0
        inc["loaded"] += 1
        inc["tensors"] += len(bucket.entries)
        inc["load"] += dt
        return {"bucket": bucket.index, "tensors": len(bucket.entries), "seconds": dt}

    def finish_weights(self, version: int) -> dict:
        """Close the update begun by :meth:`begin_weights`: check every bucket arrived, reset the prefix
        cache (no KV of old weights is reused), take ``version``.

        Returns {"version", "seconds" (since begin_weights), "load_seconds" (inside the bucket loads),
        "tensors", "buckets"}. Raises ``RuntimeError`` when the update is not the one begun or a
        bucket is missing (the engine then keeps its old version number: its weights are mixed).
        """
        inc, self._incoming = self._incoming, None
        if inc is None or inc["version"] != version:
            raise RuntimeError(f"finish_weights v{version} without begin_weights v{version}")
        if inc["loaded"] != inc["expected"]:
            raise RuntimeError(f"weights v{version}: {inc['loaded']} of {inc['expected']} buckets loaded")
        if inc["transfer"] == "vllm_nccl":
            self.llm.finish_weight_update()
        self.llm.reset_prefix_cache()
        self.version = version
        return {"version": version, "seconds": time.time() - inc["t0"], "load_seconds": inc["load"],
                "tensors": inc["tensors"], "buckets": inc["loaded"]}

    def get_version(self) -> int:
        """The policy version the engine currently samples with."""
        return self.version

    def thread_env(self) -> dict:
        """The thread environment the engine runs with, to check what the actor was started with.

        Returns ``{"actor": {...}, "worker": {...}}``: for this actor process and for vLLM's worker
        process (where the model runs; vLLM may rewrite its variables at spawn), each variable of
        ``troupe.core.threads.THREAD_VARS`` (None when unset) and ``torch_threads`` (``torch.get_num_threads()``).
        """
        import torch

        actor = {**{k: os.environ.get(k) for k in THREAD_VARS}, "torch_threads": torch.get_num_threads()}
        return {"actor": actor, "worker": self.llm.collective_rpc("troupe_thread_env")[0]}
