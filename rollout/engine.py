"""The vLLM engine actor: samples groups, returns token ids and sampling logprobs, reloads weights.

``RolloutEngine`` is a plain class; cluster/ wraps it with ``ray.remote`` (Ray stays at the
edge). One engine = one ``vllm.LLM``. Sampling asks vLLM for ``n = G`` samples per prompt with
``logprobs=0`` (the sampled token's logprob) in ``processed_logprobs`` mode, so the logprobs are
those of the distribution actually sampled from (after temperature), which is what the learner
compares against (learner logits are divided by the same temperature).

Weight reload goes through a vLLM worker extension (``WeightReloadExtension``): the worker
reads a safetensors file and calls vLLM's in-place ``reload_weights`` (plain
``model.load_weights`` fails on the CPU backend after the first load, see docs/design.md), then
the prefix cache is reset so no KV computed by old weights is reused.
"""

from __future__ import annotations

import os
import time

from troupe.configs.schema import RolloutConfig
from troupe.core.steps import decoded_prefix_lengths, split_steps, step_token_ends
from troupe.core.types import Group, Prompt, Sample, Sampling


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
        from vllm import LLM

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
            kw.update(gpu_memory_utilization=rollout.gpu_memory_utilization,
                      tensor_parallel_size=max(1, int(rollout.num_gpus_per_engine)))
        t0 = time.time()
        self.llm = LLM(**kw)
        self.start_seconds = time.time() - t0
        self.tokenizer = self.llm.get_tokenizer()
        self.version = 0
        self.model_path = model_path

    def ready(self) -> dict:
        """Engine facts once started: start time (s), policy version, eos id."""
        return {"start_seconds": self.start_seconds, "version": self.version, "eos_token_id": self.tokenizer.eos_token_id}

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

    def load_weights_from_store(self, state: dict, version: int, scratch_dir: str) -> dict:
        """Object-store strategy: ``state`` arrives through Ray; written locally, then reloaded."""
        from safetensors.torch import save_file

        os.makedirs(scratch_dir, exist_ok=True)
        path = os.path.join(scratch_dir, f"engine-{os.getpid()}-v{version}.safetensors")
        save_file(state, path)
        try:
            return self.load_weights(path, version)
        finally:
            os.remove(path)

    def get_version(self) -> int:
        """The policy version the engine currently samples with."""
        return self.version
