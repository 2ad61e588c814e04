"""The run configuration: one YAML file per run, validated before any actor starts.

Every field has bounds and a description; unknown keys are rejected (``extra="forbid"``);
cross-field rules (batch divisible by group size, micro-batches dividing the per-rank
batch, ...) are checked in ``RunConfig``. This module imports pydantic and yaml only: it
must never import torch, vllm, ray or deepspeed (a test checks ``sys.modules``), so that a
config can be checked on a laptop before a cluster is paid for.

Errors: ``load_config`` raises ``ConfigError`` whose message names the file and the dotted
key of every bad value; the command line turns it into exit status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

from troupe.configs.algos import (
    ADVANTAGE_CONFIGS,
    POLICY_LOSS_CONFIGS,
    AdvantageConfig,
    GRPOAdvantage,
    PolicyLossConfig,
    PPOClipLoss,
)


class ConfigError(ValueError):
    """A run configuration that cannot be used; the message names the file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """The policy (and reference) model."""

    path: str = Field(
        description="HF model directory (config.json, safetensors, tokenizer), or "
        "'builtin:<name>' for a model troupe builds locally (learner/tiny_model.py; its tokenizer is trained "
        "on the task's prompts and answers, see cluster/prepare.py)."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Learner and engine dtype. float32 on CPU; bfloat16 on GPU."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward.")
    hidden_size: int = Field(128, ge=16, le=65536, description="builtin models only: hidden size.")
    num_layers: int = Field(2, ge=1, le=512, description="builtin models only: decoder layers.")
    num_heads: int = Field(4, ge=1, le=512, description="builtin models only: attention heads (head_dim 32..256 on vLLM CPU).")
    intermediate_size: int = Field(512, ge=16, le=262144, description="builtin models only: MLP width.")

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.path.startswith("builtin:") and self.path != "builtin:qwen2-tiny":
            raise ValueError("model.path: the only builtin model is 'builtin:qwen2-tiny'")
        if self.hidden_size % self.num_heads:
            raise ValueError("model.hidden_size must be divisible by model.num_heads")
        return self


FILE_SOURCES = ("jsonl", "parquet", "hf")
"""data.source values that read rows (files, or a Hugging Face data set through ``datasets``); any other
value is a plugin spec 'package.module:object'."""


class DataConfig(_Strict):
    """Prompt data set and how rows become prompts."""

    source: str = Field(
        "jsonl",
        description="'jsonl' or 'parquet' (rows read from data.path), 'hf' (a Hugging Face data set: data.path is "
        "its hub name or local folder, loaded with datasets.load_dataset(path, hf_config, split=...), which honours "
        "the offline cache), or a data-source plugin "
        "'package.module:object' that generates its rows (interface: troupe.rollout.data.DataSource; "
        "e.g. the arithmetic demo 'troupe.demo.arith:ArithTask').",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="A data-source plugin's own settings, validated by its Options model when the data "
        "is loaded (`troupe check` too); errors name data.options.<key>. Empty for 'jsonl'/'parquet'.",
    )
    path: Optional[str] = Field(None, description="Training file (jsonl/parquet), relative to the config file or absolute; "
                                "source 'hf': the data set's hub name (e.g. openai/gsm8k) or local folder.")
    eval_path: Optional[str] = Field(None, description="Held-out file; defaults to a held-out slice of `path`.")
    hf_config: Optional[str] = Field(None, description="source 'hf': the data set's configuration (e.g. 'main').")
    split: str = Field("train", min_length=1, description="source 'hf': the training split.")
    eval_split: Optional[str] = Field(None, description="source 'hf': the held-out split (None: a held-out slice of "
                                      "the training split, as for files).")
    fallback_path: Optional[str] = Field(None, description="source 'hf': a local jsonl/parquet file read instead when "
                                         "the data set cannot be loaded (no network and not cached); logged.")
    fallback_eval_path: Optional[str] = Field(None, description="source 'hf': the held-out file of the fallback.")
    prompt_field: str = Field("question", description="Column holding the question text.")
    answer_field: str = Field("answer", description="Column holding the reference answer.")
    system_prompt: Optional[str] = Field(None, description="System message (chat template) or prefix (raw).")
    template: Literal["chat", "raw"] = Field(
        "raw", description="'chat': tokenizer.apply_chat_template; 'raw': prompt_format.format(question=...)."
    )
    prompt_format: str = Field("{question}", description="Format string for raw prompts; must contain {question}.")
    max_prompt_tokens: int = Field(256, ge=8, le=32768, description="Longer prompts are dropped at load (counted).")
    num_eval: int = Field(256, ge=0, le=100000, description="Held-out prompts for the final greedy evaluation.")
    max_train_rows: Optional[int] = Field(None, ge=1, description="Read at most this many training rows.")

    @property
    def is_plugin(self) -> bool:
        """True when ``source`` names a data-source plugin rather than a file format."""
        return self.source not in FILE_SOURCES

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.is_plugin:
            module, _, obj = self.source.partition(":")
            if not module or not obj:
                raise ValueError(f"data.source must be one of {FILE_SOURCES} or a data-source plugin "
                                 f"'package.module:object', got {self.source!r}")
        else:
            if not self.path:
                raise ValueError(f"data.path is required when data.source is {self.source!r}")
            if self.source != "hf" and (self.hf_config or self.eval_split or self.fallback_path or self.fallback_eval_path):
                raise ValueError("data.hf_config, eval_split, fallback_path, fallback_eval_path: only for data.source 'hf'")
            if self.options:
                raise ValueError(f"data.options: only a data-source plugin takes options (data.source is {self.source!r})")
        if "{question}" not in self.prompt_format:
            raise ValueError("data.prompt_format must contain '{question}'")
        return self


class RolloutConfig(_Strict):
    """vLLM engines: how many, where, and how they sample."""

    num_engines: int = Field(1, ge=1, le=1024, description="vLLM engine actors.")
    group_size: int = Field(8, ge=2, le=1024, description="G: samples per prompt (vLLM SamplingParams.n).")
    prompts_per_step: int = Field(32, ge=1, le=100000, description="Prompts per training step (batch = this * G).")
    max_new_tokens: int = Field(64, ge=1, le=131072, description="Response length cap; longer ones are truncated.")
    temperature: float = Field(1.0, gt=0.0, le=10.0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    num_cpus_per_engine: float = Field(1.0, ge=0.0, description="Ray CPUs reserved per engine.")
    num_gpus_per_engine: float = Field(0.0, ge=0.0, description="Ray GPUs per engine: 0 (CPU) or a whole number, "
                                       "the engine's tensor-parallel size (fractions are refused: two vLLM engines "
                                       "on one GPU fail vLLM's memory check).")
    kv_cache_gib: float = Field(1.0, gt=0.0, description="CPU only: VLLM_CPU_KVCACHE_SPACE in GiB.")
    gpu_memory_utilization: float = Field(0.5, gt=0.0, le=1.0, description="GPU only: vLLM memory share.")
    enforce_eager: bool = Field(True, description="Disable CUDA graphs / compilation (faster start).")
    max_model_len: int = Field(512, ge=16, le=1048576, description="vLLM max_model_len (prompt + response).")
    engine_core: Literal["auto", "in_process", "subprocess"] = Field(
        "auto", description="Where vLLM's engine core runs (VLLM_ENABLE_V1_MULTIPROCESSING): 'in_process' in the "
        "engine actor, 'subprocess' in vLLM's own EngineCore + worker processes. auto: in_process on the CPU (the "
        "two extra processes each import torch and vLLM again: the demo's engine starts in 6.5 s instead of 20.5 s "
        "on 2 cores, and samples a step ~10% slower, bench/results/engine_start.md), subprocess on GPUs (vLLM's "
        "default; tensor parallelism needs worker processes).")

    @field_validator("num_gpus_per_engine")
    @classmethod
    def _whole_gpus(cls, v: float) -> float:
        if v != int(v):
            raise ValueError(f"{v} is not a whole number of GPUs: an engine is one vLLM instance over "
                             "tensor_parallel_size = this many GPUs, and two engines sharing a GPU fail vLLM's "
                             "memory check (use 1, or fewer engines)")
        return v

    max_staleness: int = Field(
        0, ge=0, le=64,
        description="Pipelined generation: the engines sample up to this many steps ahead of the learner, so a group "
                    "may lag the policy it is trained against by up to N versions (older ones are dropped, counted "
                    "and resampled; troupe.rollout.staleness). 0: the synchronous loop (generate, learn, sync). "
                    "N > 0 needs sync.every = 1; algo.old_logp (auto: the engines' log-probs) makes the clip bound how far a "
                    "stale group moves the policy.")


RewardName = str


class RewardFunctionConfig(_Strict):
    """One reward function with its weight."""

    name: RewardName = Field(
        description="Built-in name (accuracy, format, gsm8k, math, language) or 'module:function' "
        "or '/path/file.py:function'."
    )
    weight: float = Field(1.0, ge=-1000, le=1000, description="Weight in the combined reward.")
    kind: Literal["outcome", "process"] = Field(
        "outcome",
        description="'outcome': one score per completion; 'process': one score per reasoning step "
        "(completion cut at reward.step_delimiter; the function also gets steps=[[str]]), for "
        "algo.advantage 'process' (DeepSeekMath 4.1.3).",
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword settings of a built-in that takes them (http: url, timeout_s, retries, token_env); "
        "other functions take none.",
    )
    tasks: Optional[list[str]] = Field(
        None, description="Per-row routing: score only rows whose reward.route_by column is one of these "
        "(null: every row).")


class RewardModelConfig(_Strict):
    """One learned reward model (``troupe rm train`` output) scoring prompt + response text in its own actors."""

    path: str = Field(description="HF AutoModelForSequenceClassification folder (num_labels=1), e.g. a "
                      "`troupe rm train` model folder; relative to the working directory (checked at start).")
    name: str = Field("rm", min_length=1, description="Part name in the metrics (reward/<name>_mean).")
    weight: float = Field(1.0, ge=-1000, le=1000, description="Weight in the combined reward.")
    normalize: bool = Field(True, description="Score (r - mean) / std with the mean/std stored with the model "
                            "(its training data); false: the raw head value.")
    batch_size: int = Field(16, ge=1, le=65536, description="Sequences per forward.")
    max_length: int = Field(1024, ge=8, le=1048576, description="Longer prompt + response texts keep their last "
                            "this many tokens.")
    num_workers: int = Field(1, ge=1, le=1024, description="Reward-model actors (each holds a copy).")
    num_cpus: float = Field(1.0, ge=0.0, description="Ray CPUs per reward-model actor.")
    num_gpus: float = Field(0.0, ge=0.0, description="Ray GPUs per reward-model actor (1 on GPU clusters); such "
                            "actors get bundles in the run's placement group, after the engines' and learner ranks'.")
    timeout_s: float = Field(120.0, gt=0.0, le=3600.0, description="Seconds allowed to score one batch.")
    tasks: Optional[list[str]] = Field(
        None, description="Per-row routing: score only rows whose reward.route_by column is one of these.")


class IterativeRMConfig(_Strict):
    """DeepSeekMath's iterative RL (arXiv 2402.03300, 4.2 / Algorithm 1): every ``every`` policy steps the
    reward model is trained further on pairs from the policy's recent samples (label: a reward function's
    per-sample score, highest chosen vs lowest rejected within a group) plus a replay share of its earlier
    data, and its actors load the new weights (``troupe.cluster.iterative``)."""

    every: int = Field(ge=1, le=10**7, description="Retrain the reward model every this many policy steps; the "
                       "new weights score the samples of the steps after it.")
    model: Optional[str] = Field(None, min_length=1, description="The `name` of the reward model in reward.models "
                                 "to retrain (null: the only one).")
    label: str = Field("accuracy", min_length=1, description="The reward.functions `name` whose per-sample score labels "
                       "the pairs (usually weight 0, e.g. the verifier 'accuracy'): in each group a sample with the "
                       "highest score is chosen against one with the lowest, when they differ (troupe rm pairs' rule).")
    pairs_per_round: int = Field(256, ge=1, le=10**7, description="At most this many fresh pairs per round: the most "
                                 "recent ones collected since the last round.")
    pairs_per_prompt: int = Field(1, ge=1, le=1024, description="At most this many pairs from one group.")
    replay: float = Field(0.1, ge=0.0, lt=1.0, description="Share of a round's training pairs drawn (seeded, without "
                          "replacement) from earlier data (`data` and earlier rounds' fresh pairs): "
                          "replay / (1 - replay) * fresh of them, rounded half up, at most the pool's size.")
    epochs: int = Field(1, ge=1, le=1000, description="Passes over a round's fresh + replay pairs.")
    lr: float = Field(1e-4, gt=0.0, le=1.0, description="AdamW learning rate of the reward-model trainer.")
    batch_size: int = Field(32, ge=1, le=65536, description="Pairs per optimizer step (one forward; a round's last "
                            "batch may be smaller).")
    max_length: Optional[int] = Field(None, ge=8, le=1048576, description="Trainer text length in tokens (null: the "
                                      "reward model's own max_length, so that training and scoring cut texts alike).")
    data: Optional[str] = Field(None, description="The reward model's original preference pairs (JSONL/Parquet, "
                                "TRL columns prompt/chosen/rejected; relative to the config file or absolute): the "
                                "first replay pool. Null: replay draws from earlier rounds only.")
    num_cpus: float = Field(0.0, ge=0.0, description="Ray CPUs reserved for the trainer rank (it trains only during "
                            "a round; 0 shares the CPUs of the paused loop).")


class RewardConfig(_Strict):
    """Reward workers and the functions they apply."""

    num_workers: int = Field(1, ge=1, le=1024, description="Reward worker actors.")
    num_cpus_per_worker: float = Field(0.0, ge=0.0, description="Ray CPUs per reward worker.")
    functions: list[RewardFunctionConfig] = Field(
        default_factory=lambda: [RewardFunctionConfig(name="accuracy", weight=1.0)],
        description="Rule functions; combined with the models as sum(weight * score). A function of weight 0 "
        "is reported (reward/<name>_mean) without changing the reward.",
    )
    models: list[RewardModelConfig] = Field(
        default_factory=list, description="Learned reward models, each in its own actors (reward/model.py).")
    route_by: Optional[str] = Field(
        None, description="Data column that routes rows to functions and models by their `tasks` "
        "(DeepSeek-R1's final stage: rule rewards for math rows, the preference model for general rows).")
    timeout_s: float = Field(10.0, gt=0.0, le=3600.0, description="Per-sample scoring timeout in seconds.")
    on_failure: Literal["zero", "exclude"] = Field(
        "zero", description="A failed score (exception, timeout, NaN, wrong type) counts as 0 or is excluded."
    )
    step_delimiter: str = Field(
        "\n", min_length=1,
        description="Process supervision: completions are cut into reasoning steps here (TRL PRMTrainer's "
        "step_separator; the arithmetic demo uses ',').",
    )
    iterative: Optional[IterativeRMConfig] = Field(
        None, description="Iterative RL: retrain a reward model on the policy's own samples during the run "
        "(null: the reward models stay as loaded).")

    @property
    def iterative_model(self) -> Optional["RewardModelConfig"]:
        """The reward model ``iterative`` retrains (None without ``iterative``)."""
        it = self.iterative
        if it is None:
            return None
        return next(m for m in self.models if it.model is None or m.name == it.model)

    @model_validator(mode="after")
    def _check(self) -> "RewardConfig":
        if not self.functions and not self.models:
            raise ValueError("reward: give at least one of reward.functions and reward.models")
        names = [f.name for f in self.functions] + [m.name for m in self.models]
        dup = sorted({m.name for m in self.models if names.count(m.name) > 1})
        if dup:
            raise ValueError(f"reward.models: names {dup} are used twice; give each model its own `name`")
        routed = [f"functions.{i}" for i, f in enumerate(self.functions) if f.tasks is not None] + \
            [f"models.{i}" for i, m in enumerate(self.models) if m.tasks is not None]
        if routed and not self.route_by:
            raise ValueError(f"reward.{routed[0]}.tasks needs reward.route_by (the data column that names a row's task)")
        if any(m.kind == "process" for m in self.functions) and self.models:
            raise ValueError("reward.models with a process function: reward models give one outcome score per "
                             "sample; use them with outcome functions")
        if self.iterative is not None:
            self._check_iterative(self.iterative)
        return self

    def _check_iterative(self, it: IterativeRMConfig) -> None:
        models = [m.name for m in self.models]
        if not models:
            raise ValueError("reward.iterative retrains a reward model: reward.models is empty")
        if it.model is None and len(models) > 1:
            raise ValueError(f"reward.iterative.model: reward.models has {len(models)} models {models}; name the one "
                             "to retrain")
        if it.model is not None and it.model not in models:
            raise ValueError(f"reward.iterative.model: {it.model!r} is not a reward.models name {models}")
        functions = [f.name for f in self.functions]
        if it.label not in functions:
            raise ValueError(f"reward.iterative.label: {it.label!r} is not a reward.functions name {functions}; the "
                             "label is a function's per-sample score (add it with weight 0 to only label)")


class AlgoConfig(_Strict):
    """The RL algorithm: advantage estimator and policy loss (one typed class each, configs/algos.py),
    KL to the reference, importance correction, loss aggregation, DAPO reward shaping."""

    advantage: SerializeAsAny[AdvantageConfig] = Field(
        default_factory=GRPOAdvantage,
        description="Advantage estimator: a name (" + ", ".join(ADVANTAGE_CONFIGS.names()) + ") or a mapping "
        "{name: ..., <its settings>}; 'process' is DeepSeekMath 4.1.3 process supervision and needs a "
        "reward function of kind 'process'.",
    )
    policy_loss: SerializeAsAny[PolicyLossConfig] = Field(
        default_factory=PPOClipLoss,
        description="Policy loss: a name (" + ", ".join(POLICY_LOSS_CONFIGS.names()) + ") or a mapping "
        "{name: ..., <its settings>} (e.g. {name: ppo_clip, clip_high: 0.28, dual_clip: 3.0}).",
    )
    kl_coef: float = Field(0.0, ge=0.0, le=100.0, description="beta. 0 loads no reference model.")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k3", description="Schulman's KL estimators.")
    kl_in: Literal["loss", "reward"] = Field("loss", description="GRPO puts KL in the loss; PPO in the reward.")
    tis_cap: Optional[float] = Field(
        2.0, gt=0.0, description="Truncated importance weight cap for old/sampling mismatch (None: off)."
    )
    old_logp: Literal["auto", "learner", "sampling"] = Field(
        "auto", description="The 'old' policy of the clipped ratio. 'auto': 'sampling' when rollout.max_staleness "
        "> 0, else 'learner' (resolved when the run config is read). 'learner': the learner's own log-probs "
        "before the step's first update (with one epoch and one mini-batch the ratio starts at 1 and "
        "algo.tis_cap weighs the engines' policy against it: AReaL's decoupled PPO with the current policy "
        "as the proximal one). 'sampling': the engines' log-probs of the sampled tokens, the behaviour "
        "policy (slime's use_rollout_logprobs, prime-rl): the clip then also bounds how far a stale "
        "group moves the policy from the one that drew it; tis_cap has nothing left to correct.")
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = Field(
        "token_mean", description="Loss aggregation (DAPO, GRPO paper, Dr.GRPO)."
    )
    ppo_epochs: int = Field(1, ge=1, le=64, description="Passes over each batch.")
    mini_batches: int = Field(1, ge=1, le=1024, description="Optimizer steps per epoch.")
    dynamic_sampling: bool = Field(False, description="DAPO: drop zero-variance groups and refill.")
    max_refill_rounds: int = Field(2, ge=0, le=100, description="Cap on extra generation rounds for refill.")
    mask_truncated: bool = Field(False, description="Exclude truncated completions from the loss.")
    overlong_buffer: int = Field(0, ge=0, description="DAPO soft overlong: buffer length in tokens (0: off).")
    overlong_penalty: float = Field(1.0, ge=0.0, description="DAPO soft overlong: max penalty.")

    @field_validator("advantage", mode="before")
    @classmethod
    def _advantage(cls, v: Any) -> AdvantageConfig:
        return ADVANTAGE_CONFIGS.parse(v, default="grpo")

    @field_validator("policy_loss", mode="before")
    @classmethod
    def _policy_loss(cls, v: Any) -> PolicyLossConfig:
        return POLICY_LOSS_CONFIGS.parse(v, default="ppo_clip")


class ZeroRanksConfig(_Strict):
    """A group of DeepSpeed ZeRO ranks (Ray actors in one process group): what the policy's learner ranks and
    PPO's critic ranks share."""

    num_ranks: int = Field(1, ge=1, le=4096, description="Data-parallel ranks (Ray actors in one process group).")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    lr: float = Field(1e-5, gt=0.0, le=1.0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    grad_clip: float = Field(1.0, gt=0.0, description="Global gradient-norm clip.")
    warmup_steps: int = Field(0, ge=0, description="Linear learning-rate warm-up over this many optimizer steps.")
    micro_batch_size: int = Field(16, ge=1, le=65536, description="Sequences per forward/backward per rank "
                                  "(when micro_batch_tokens is 0).")
    micro_batch_tokens: int = Field(0, ge=0, le=2**31, description="0: micro-batches of "
                                    "micro_batch_size rows. > 0: token-budget micro-batches: each rank's rows sorted "
                                    "by length, longest first, as many per micro-batch as fit this many padded tokens "
                                    "(rows x (longest prompt + longest response) of the micro-batch; a longer row goes "
                                    "alone); every rank runs as many micro-batches as the rank that needs the most "
                                    "(OpenRLHF/veRL dynamic batch size). The update is the same up to float rounding.")
    num_cpus_per_rank: float = Field(0.5, ge=0.0, description="Ray CPUs per rank.")
    num_gpus_per_rank: float = Field(0.0, ge=0.0, le=1.0, description="Ray GPUs per rank: 0 (CPU) or 1 "
                                     "(a rank is one NCCL rank on one device; two ranks on one GPU fail at NCCL init).")

    @field_validator("num_gpus_per_rank")
    @classmethod
    def _one_gpu(cls, v: float) -> float:
        if v not in (0.0, 1.0):
            raise ValueError(f"{v}: a rank takes 0 GPUs (CPU) or 1 (one NCCL rank per device; two ranks "
                             "sharing a GPU fail at NCCL init)")
        return v

    torch_threads: int = Field(1, ge=1, le=256, description="CPU only: torch threads per rank.")


class LearnerConfig(ZeroRanksConfig):
    """The DeepSpeed ZeRO learner ranks (the policy's)."""

    skip_old_forward: bool = Field(True, description="GRPO learner: when each batch is used once on-policy "
                                   "(algo.ppo_epochs 1, algo.mini_batches 1, KL not in the reward) take the old "
                                   "log-probs from the training forward, detached (ratio exactly 1, as TRL), instead "
                                   "of a separate no-grad forward over the batch. false: always run that forward "
                                   "(same update).")
    logits_chunk_tokens: int = Field(
        1024, ge=0, le=2**20,
        description="GRPO learner: response positions whose float32 log-softmax and entropy are computed at once "
        "(troupe.learner.batch.chunked_response_logprobs; recomputed in backward), so a micro-batch never holds "
        "float32 copies of all its logits (8 x 1,024 tokens x 151,936 vocabulary: 5 GB each). 0: one chunk.")


class CriticConfig(ZeroRanksConfig):
    """PPO's value model (``algo.advantage: gae``): its own group of DeepSpeed ZeRO ranks
    (``troupe.learner.critic_rank.CriticRank``), a causal-LM backbone with a scalar value head on every
    token. The keys it shares with ``learner`` (ranks, ZeRO stage, learning rate, micro-batches, gradient
    clip, CPUs/GPUs per rank, threads) mean the same for the critic's ranks; its optimizer steps follow the
    policy's (``algo.ppo_epochs`` x ``algo.mini_batches`` per step)."""

    model_path: Optional[str] = Field(
        None, description="Where the critic starts: None: the policy's initial weights with a new value head "
                          "(seeded); or a reward-model folder (OpenRLHF initialises the critic from the reward model: "
                          "its head becomes the value head) or any causal-LM folder / hub id.")
    value_clip: Optional[float] = Field(
        0.2, gt=0.0, description="PPO value clipping: the new value is kept within this distance of the value at "
                                 "sampling time in the loss's clipped branch (None: plain squared error).")
    freeze_policy_steps: int = Field(
        0, ge=0, description="The first N steps train the critic only (OpenRLHF's freezing_actor_steps): the policy "
                             "keeps its weights while the value head learns the returns.")


class SyncConfig(_Strict):
    """Weight sync from learner to engines."""

    every: int = Field(1, ge=1, description="Sync after every this many steps.")
    strategy: str = Field(
        "auto", description="How weight buckets reach the engines (troupe.cluster.weight_sync): 'shm' (raw bytes in "
        "/dev/shm, one node), 'object_store' (Ray object store, any node), 'vllm_nccl' (vLLM's NCCL weight transfer, "
        "GPU engines only), 'auto' (shm on one node, else object_store), or 'package.module:Class' (a SyncStrategy "
        "subclass).")
    bucket_mb: float = Field(
        256.0, gt=0.0, le=1048576.0, description="Weight-sync bucket size in MiB: the learner gathers (ZeRO-3) and "
        "sends the weights this much at a time, whole decoder layers per bucket (a larger layer is a bucket alone), "
        "and the engines reload bucket i while the learner gathers bucket i+1.")
    timeout_s: float = Field(
        600.0, gt=0.0, le=86400.0, description="Deadline (s) of every wait inside one weight sync (learner sends, "
        "engine loads, the vllm_nccl group forming): an NCCL broadcast has no timeout of its own, so an engine that "
        "dies mid-sync is named after this long rather than after cluster.rpc_timeout_s.")

    @field_validator("strategy")
    @classmethod
    def _strategy_name(cls, v: str) -> str:
        if v in ("auto", "shm", "object_store", "vllm_nccl") or (":" in v and all(v.partition(":")[::2])):
            return v
        raise ValueError(f"unknown strategy {v!r}: 'auto', 'shm', 'object_store', 'vllm_nccl' or 'package.module:Class'")


class CheckpointConfig(_Strict):
    """Resumable checkpoints (``troupe train CONFIG --resume``): learner state, prompt stream, RNGs, metrics."""

    every: int = Field(0, ge=0, description="Write a resumable checkpoint every N steps (0: off; the run still "
                       "writes the final HF weights). Ctrl-C/SIGTERM also writes one when this is on.")
    keep_last: int = Field(2, ge=1, le=10**6, description="Keep only the newest K complete checkpoints.")
    dir: Optional[str] = Field(None, description="Where checkpoints go (default <run dir>/checkpoints). Every "
                               "learner rank writes its own shard here: on several nodes it must be shared storage.")


class ClusterConfig(_Strict):
    """Ray cluster connection and fault handling."""

    address: Optional[str] = Field(None, description="Ray cluster to join (e.g. 'auto' or 'ray://host:10001'); "
                                   "None: RAY_ADDRESS if set (as inside `ray job submit`), else a fresh local cluster.")
    rpc_timeout_s: float = Field(3600.0, gt=0.0, le=7 * 86400.0, description="Longest wait for any one remote call "
                                 "(generation chunk, learner step, weight sync, checkpoint); the error names what was "
                                 "waited for.")
    max_engine_failures: int = Field(3, ge=0, le=1000, description="Engine deaths in a row (no chunk completed "
                                     "between them) after which the run stops; each death before that replaces the "
                                     "engine and resamples its unfinished prompts.")
    engine_stall_s: Optional[float] = Field(None, gt=0.0, le=7 * 86400.0, description="An engine with unfinished "
                                            "generate chunks that finishes none for this long is treated as wedged: "
                                            "killed, replaced and its prompts resampled, counting as one engine "
                                            "failure. None: rpc_timeout_s. Set it above the slowest chunk.")
    max_nonfinite_steps: int = Field(3, ge=1, le=1000, description="Steps in a row whose loss or gradient norm is "
                                     "not finite (their update is skipped) after which the run stops.")


class SFTConfig(_Strict):
    """Cold-start supervised fine-tuning before RL (DeepSeek-R1)."""

    enabled: bool = Field(
        False, description="Run SFT on worked solutions before GRPO; they come from the data-source plugin's "
        "cold_start() (data.source 'package.module:object').")
    steps: int = Field(200, ge=1, description="Optimizer steps.")
    batch_size: int = Field(32, ge=1, description="Sequences per step (all ranks).")
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="SFT learning rate.")
    num_examples: int = Field(2000, ge=1, description="Training rows given to cold_start() (it may add examples).")
    path: Optional[str] = Field(None, description="Pipeline sft stages: a JSONL of {prompt, completion} to fine-tune "
                                "on instead of the data-source plugin's cold_start() (relative to the config file).")


REJECTION_FILTERS = ("correct", "format", "language", "length", "dedup")
"""Names of the rejection-sampling filters (``troupe.reward.rejection.FILTERS``)."""


class GeneralSFTConfig(_Strict):
    """General (non-reasoning) SFT data mixed into the rejection-sampled set (DeepSeek-R1 2.3.3)."""

    path: str = Field(description="JSONL of {\"prompt\", \"completion\"} lines (prompt used verbatim), relative "
                      "to the config file or absolute.")
    fraction: float = Field(0.25, ge=0.0, lt=1.0, description="Share of the final SFT set drawn from this file: "
                            "round(fraction / (1 - fraction) * kept) rows, at most the file's rows, seeded draw "
                            "(R1: ~200k general of ~800k, 0.25).")


class RejectionSamplingConfig(_Strict):
    """DeepSeek-R1's rejection-sampling stage (arXiv 2501.12948, 2.3.3): sample a policy, keep what passes
    the filters, write an SFT data set (``troupe.cluster.rejection``). Read only by that stage."""

    num_prompts: int = Field(512, ge=1, le=10**8, description="Training rows sampled: the first N in load_task order.")
    n: int = Field(8, ge=1, le=1024, description="Samples per prompt.")
    temperature: Optional[float] = Field(None, gt=0.0, le=10.0, description="Sampling temperature "
                                         "(null: rollout.temperature).")
    filters: list[Literal[REJECTION_FILTERS]] = Field(
        default_factory=lambda: ["correct", "format", "dedup"],
        description="Filters applied in this order; a removed sample is counted under the first one it fails. "
        "correct: the verifier; format: <think>/<answer>; language: one language in the CoT; length: not "
        "truncated and at most max_tokens; dedup: no repeated text within a prompt.")
    correct_function: Optional[str] = Field(
        None, min_length=1, description="A reward.functions name whose per-sample score defines verifier-correct "
        "(filter 'correct'); null: 'accuracy', checked when the stage starts (so that configs whose reward has no "
        "'accuracy' stay valid without this section).")
    correct_threshold: float = Field(1.0, ge=-1e6, le=1e6, description="Filter 'correct': the score of "
                                     "correct_function must be >= this (an unscored sample fails).")
    min_language: float = Field(1.0, ge=0.0, le=1.0, description="Filter 'language': language_consistency_reward "
                                "of the completion vs the row's question must be >= this.")
    max_tokens: Optional[int] = Field(None, ge=1, description="Filter 'length': at most this many response tokens "
                                      "(truncated responses always fail it; null: only that).")
    max_per_prompt: int = Field(2, ge=1, le=1024, description="Keep at most this many samples per prompt: the first "
                                "ones that pass, in sample order.")
    general_sft: Optional[GeneralSFTConfig] = Field(None, description="General SFT data to mix in (null: none).")

    @field_validator("filters")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        dup = sorted({f for f in v if v.count(f) > 1})
        if dup:
            raise ValueError(f"filters {dup} are listed twice")
        return v

    @property
    def correct_name(self) -> str:
        """The reward part filter 'correct' reads: ``correct_function``, default 'accuracy'."""
        return self.correct_function or "accuracy"

    def check_reward(self, reward: "RewardConfig", *, default_too: bool = False) -> None:
        """ValueError naming ``rejection.correct_function`` when filter 'correct' is on and the function is
        not a ``reward.functions`` name; an unset one (default 'accuracy') only with ``default_too``."""
        if "correct" not in self.filters or (self.correct_function is None and not default_too):
            return
        names = [f.name for f in reward.functions]
        if self.correct_name not in names:
            raise ValueError(f"rejection.correct_function {self.correct_name!r} is not a reward.functions name "
                             f"({names}); filter 'correct' reads that function's score")


class EvalConfig(_Strict):
    """Held-out evaluation (at the start, every ``eval_every`` steps and at the end) and ``troupe eval``.

    ``n`` = 1: one greedy completion per prompt. ``n`` > 1: ``n`` samples per prompt at
    ``temperature``, with unbiased pass@k (Chen et al. 2021, eq. 1: 1 - C(n-c, k) / C(n, k)) and
    maj@k (the majority answer of k samples is correct; mean over the n // k disjoint chunks of k)
    for every ``k`` <= n. A sample is correct when the ``accuracy`` function scores >= ``correct_at``.
    """

    accuracy: Optional[str] = Field(
        None, description="The reward.functions name that decides 'correct' (a score >= eval.correct_at): held-out "
                          "accuracy is the share of correct samples, and pass@k/maj@k count them. None: the first "
                          "built-in accuracy function present "
                          "(accuracy, gsm8k, math); none present: accuracy is not reported, the reward is.")
    correct_at: float = Field(1.0, description="A sample is correct when the accuracy function scores at least this.")
    n: int = Field(1, ge=1, le=1024, description="Completions per held-out prompt (1: greedy).")
    k: list[int] = Field(default_factory=lambda: [1], min_length=1,
                         description="pass@k / maj@k sizes (each 1 <= k <= n).")
    temperature: float = Field(1.0, gt=0.0, le=10.0, description="Sampling temperature when n > 1.")

    @model_validator(mode="after")
    def _check_k(self) -> "EvalConfig":
        bad = [k for k in self.k if not 1 <= k <= self.n]
        if bad:
            raise ValueError(f"eval.k {bad}: every k must be between 1 and eval.n = {self.n}")
        return self


class WandbConfig(_Strict):
    """Weights & Biases logging of the same metrics as metrics.jsonl plus the resolved config (``wandb.init``)."""

    project: str = Field(..., min_length=1, description="W&B project.")
    entity: Optional[str] = Field(None, description="W&B entity (team or user); None: the account's default.")
    mode: Literal["online", "offline", "disabled"] = Field(
        "online", description="'offline' writes <run dir>/wandb for a later `wandb sync` (no network needed).")
    tags: list[str] = Field(default_factory=list, description="Run tags.")


class DashboardConfig(_Strict):
    """troupe's live run page (``troupe train ... --dashboard``, ``troupe dashboard RUN_DIR``)."""

    host: str = Field("127.0.0.1", description="Address the page is served on (127.0.0.1: this machine only).")
    port: int = Field(8266, ge=0, le=65535, description="Port (0: any free one; 8265 is Ray's dashboard).")


def _check_model_folder(path: Optional[str], key: str) -> None:
    """A local-looking model path (absolute, ./ or ~, or existing) must be a folder with config.json; a hub id is
    checked when it is loaded. Raises ValueError naming ``key``."""
    if path is not None and (path.startswith(("/", ".", "~")) or Path(path).exists()) \
            and not (Path(path).expanduser() / "config.json").is_file():
        raise ValueError(f"{key} {path!r} is not a model folder (no config.json there)")


class RunConfig(_Strict):
    """A whole run: what `troupe train CONFIG` reads."""

    name: str = Field("run", min_length=1, description="Run name; the run directory is output_dir/name.")
    output_dir: str = Field("runs", description="Parent of the run directory (relative to the working directory).")
    seed: int = Field(0, ge=0)
    steps: int = Field(10, ge=0, le=10**7, description="GRPO steps.")
    time_budget_s: Optional[float] = Field(
        None, gt=0.0, description="Wall-clock budget of the GRPO steps (s, from the first step): the run stops after "
                                  "the step that used it up, then evaluates and exports as after the last step. "
                                  "None: run all steps.")
    eval_every: int = Field(0, ge=0, description="Greedy eval every N steps (0: only at start and end).")
    save_every: int = Field(0, ge=0, description="HF checkpoint every N steps (0: only the final one).")
    device: Literal["cpu", "gpu"] = Field("cpu", description="Where engines and learner ranks run.")
    tensorboard: bool = Field(True, description="Also write metrics as TensorBoard scalars to <run dir>/tensorboard.")
    plots: bool = Field(True, description="Write <run dir>/curves.png (the main curves) at the end (`troupe plot`).")
    wandb: Optional[WandbConfig] = Field(None, description="Also log to Weights & Biases (None: off).")
    eval: EvalConfig = Field(default_factory=EvalConfig)
    dashboard: DashboardConfig = Field(default_factory=DashboardConfig)
    model: ModelConfig
    data: DataConfig
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    algo: AlgoConfig = Field(default_factory=AlgoConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    critic: Optional[CriticConfig] = Field(
        None, description="PPO's learned critic (needed by, and only by, algo.advantage: gae); None: no critic.")
    sync: SyncConfig = Field(default_factory=SyncConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    rejection: RejectionSamplingConfig = Field(
        default_factory=RejectionSamplingConfig,
        description="Rejection-sampling stage settings (pipeline stages of kind rejection_sampling only).")

    @model_validator(mode="after")
    def _cross_field(self) -> "RunConfig":
        batch = self.rollout.prompts_per_step * self.rollout.group_size
        per_rank, rem = divmod(batch, self.learner.num_ranks)
        if rem:
            raise ValueError(
                f"rollout.prompts_per_step * rollout.group_size = {batch} must be divisible by "
                f"learner.num_ranks = {self.learner.num_ranks}"
            )
        if per_rank % self.algo.mini_batches:
            raise ValueError(
                f"per-rank batch {per_rank} must be divisible by algo.mini_batches = {self.algo.mini_batches}"
            )
        mb = per_rank // self.algo.mini_batches
        if mb % self.learner.micro_batch_size and self.learner.micro_batch_size < mb:
            raise ValueError(
                f"per-rank mini-batch {mb} must be divisible by learner.micro_batch_size = "
                f"{self.learner.micro_batch_size}"
            )
        if self.device == "gpu" and (self.rollout.num_gpus_per_engine <= 0 or self.learner.num_gpus_per_rank <= 0):
            raise ValueError("device 'gpu' needs rollout.num_gpus_per_engine > 0 and learner.num_gpus_per_rank > 0")
        if self.device == "cpu" and (self.rollout.num_gpus_per_engine or self.learner.num_gpus_per_rank):
            raise ValueError("device 'cpu' cannot ask for GPUs (rollout.num_gpus_per_engine, learner.num_gpus_per_rank)")
        if self.device == "cpu" and any(m.num_gpus for m in self.reward.models):
            raise ValueError("device 'cpu' cannot ask for GPUs (reward.models.N.num_gpus)")
        if self.device == "cpu" and self.sync.strategy == "vllm_nccl":
            raise ValueError("sync.strategy 'vllm_nccl' needs device 'gpu' (vLLM's NCCL weight transfer runs on GPU "
                             "workers); use 'shm', 'object_store' or 'auto' on the CPU")
        if self.sft.enabled and not self.data.is_plugin:
            raise ValueError(
                f"sft.enabled: cold-start SFT examples come from a data-source plugin's cold_start() "
                f"(data.source 'package.module:object'); data.source {self.data.source!r} has none")
        has_process = any(f.kind == "process" for f in self.reward.functions)
        steps = self.algo.advantage.uses_step_rewards
        if steps and not has_process:
            raise ValueError(f"algo.advantage {self.algo.advantage.name!r} reads step rewards: it needs a reward "
                             "function with kind: process in reward.functions")
        if has_process and not steps:
            raise ValueError(
                f"reward.functions has a function of kind 'process' but algo.advantage is {self.algo.advantage.name!r}: "
                "per-step rewards are only used by step-reward estimators (algo.advantage: process)"
            )
        names = [f.name for f in self.reward.functions]
        if self.eval.accuracy is not None and self.eval.accuracy not in names:
            raise ValueError(f"eval.accuracy {self.eval.accuracy!r} is not a reward.functions name ({names})")
        if self.checkpoint.every % self.sync.every:
            raise ValueError(f"checkpoint.every = {self.checkpoint.every} must be a multiple of sync.every = "
                             f"{self.sync.every}: a checkpoint is taken when the engines hold the learner's weights")
        if self.rollout.max_staleness and self.sync.every != 1:
            raise ValueError(f"rollout.max_staleness = {self.rollout.max_staleness} needs sync.every = 1 (got "
                             f"{self.sync.every}): staleness is counted in policy versions, one per step")
        if self.algo.old_logp == "auto":  # measured: bench/results/pipeline_demo.md, README "Speed"
            self.algo.old_logp = "sampling" if self.rollout.max_staleness else "learner"
        if self.rollout.max_staleness and self.reward.iterative is not None:
            raise ValueError("rollout.max_staleness > 0 cannot be combined with reward.iterative (the reward model "
                             "would be retrained while later steps are being scored); use rollout.max_staleness: 0")
        if self.rollout.max_new_tokens >= self.rollout.max_model_len:
            raise ValueError("rollout.max_new_tokens must be smaller than rollout.max_model_len")
        self.rejection.check_reward(self.reward)
        self._check_critic()
        return self

    def _check_critic(self) -> None:  # and a distillation teacher's folder
        if self.algo.advantage.uses_teacher:
            _check_model_folder(self.algo.advantage.teacher, "algo.advantage.teacher")
        uses = self.algo.advantage.uses_critic
        if uses and self.critic is None:
            raise ValueError(f"algo.advantage {self.algo.advantage.name!r} reads a learned critic's values: add a "
                             "critic section (critic: {} takes the defaults)")
        if self.critic is None:
            return
        c = self.critic
        if not uses:
            raise ValueError(f"critic is set but algo.advantage is {self.algo.advantage.name!r}, which does not use "
                             "it: use algo.advantage: gae, or remove the critic section")
        rows, rem = divmod(self.batch_size, c.num_ranks)
        if rem or rows % self.algo.mini_batches:
            raise ValueError(f"the step batch {self.batch_size} must split into critic.num_ranks = {c.num_ranks} "
                             f"ranks x algo.mini_batches = {self.algo.mini_batches} mini-batches")
        if self.device == "gpu" and c.num_gpus_per_rank <= 0:
            raise ValueError("device 'gpu' needs critic.num_gpus_per_rank = 1")
        if self.device == "cpu" and c.num_gpus_per_rank:
            raise ValueError("device 'cpu' cannot ask for GPUs (critic.num_gpus_per_rank)")
        _check_model_folder(c.model_path, "critic.model_path")
        if self.algo.advantage.uses_step_rewards:
            raise ValueError("critic: step-reward estimators do not use a critic")

    @property
    def batch_size(self) -> int:
        """Samples per step: prompts_per_step * group_size."""
        return self.rollout.prompts_per_step * self.rollout.group_size


class PreferenceDataConfig(_Strict):
    """Preference pairs for reward-model training (TRL's preference columns)."""

    path: str = Field(description="JSONL or Parquet of pairs, relative to the config file or absolute.")
    eval_path: Optional[str] = Field(None, description="Held-out pairs; default: the last `num_eval` pairs of "
                                     "`path` after a seeded shuffle.")
    num_eval: int = Field(64, ge=0, le=10**7, description="Held-out pairs taken from `path` when no eval_path.")
    prompt_field: str = Field("prompt", description="Prompt column: a string or a list of chat messages; may be "
                              "absent when chosen/rejected are whole conversations (TRL's implicit prompt).")
    chosen_field: str = Field("chosen", description="Preferred response: a string or a list of messages.")
    rejected_field: str = Field("rejected", description="Dispreferred response: a string or a list of messages.")
    margin_field: Optional[str] = Field(None, description="Optional per-pair margin column (Llama-2's margin loss).")
    max_rows: Optional[int] = Field(None, ge=1, description="Read at most this many pairs from `path`.")


class RewardModelTrainSettings(_Strict):
    """How long and on what the Bradley-Terry reward model trains."""

    epochs: int = Field(1, ge=1, le=1000, description="Passes over the training pairs.")
    batch_size: int = Field(32, ge=1, le=10**6, description="Pairs per optimizer step (all ranks).")
    max_length: int = Field(512, ge=8, le=1048576, description="Longer prompt + response texts keep their last "
                            "this many tokens.")


class RewardModelTrainConfig(_Strict):
    """``troupe rm train CONFIG.yaml``: a Bradley-Terry reward model on DeepSpeed ZeRO ranks (Ray actors).

    ``learner`` is the same section as in a GRPO run (ranks, ZeRO stage, AdamW, micro-batch =
    pairs per forward per rank); the model is ``model.path`` (a causal LM or a reward model folder)
    with a scalar head (AutoModelForSequenceClassification, num_labels=1).
    """

    name: str = Field("rm", min_length=1, description="The run directory is output_dir/name.")
    output_dir: str = Field("runs", description="Parent of the run directory.")
    seed: int = Field(0, ge=0)
    device: Literal["cpu", "gpu"] = Field("cpu", description="Where the ranks run.")
    model: ModelConfig
    data: PreferenceDataConfig
    train: RewardModelTrainSettings = Field(default_factory=RewardModelTrainSettings)
    learner: LearnerConfig = Field(default_factory=lambda: LearnerConfig(lr=1e-4, micro_batch_size=8))
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _cross_field(self) -> "RewardModelTrainConfig":
        per_rank, rem = divmod(self.train.batch_size, self.learner.num_ranks)
        if rem or not per_rank:
            raise ValueError(f"train.batch_size = {self.train.batch_size} must be a positive multiple of "
                             f"learner.num_ranks = {self.learner.num_ranks}")
        if per_rank % self.learner.micro_batch_size and self.learner.micro_batch_size < per_rank:
            raise ValueError(f"per-rank batch {per_rank} must be divisible by learner.micro_batch_size = "
                             f"{self.learner.micro_batch_size}")
        if self.device == "gpu" and self.learner.num_gpus_per_rank <= 0:
            raise ValueError("device 'gpu' needs learner.num_gpus_per_rank > 0")
        if self.device == "cpu" and self.learner.num_gpus_per_rank:
            raise ValueError("device 'cpu' cannot ask for GPUs (learner.num_gpus_per_rank)")
        return self


def _parse_value(text: str) -> Any:
    """Parse a command-line override value as YAML (so 1e-3, true, [1,2] and null work)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply dotted ``key.sub=value`` overrides to a raw config dict (in place, returned).

    Raises ``ConfigError`` naming the override when it has no '=' or walks into a non-mapping.
    """
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.path=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a section")
            node = nxt
        node[parts[-1]] = _parse_value(value)
    return raw


def format_errors(err: ValidationError, source: str) -> str:
    """A pydantic ValidationError as one message: ``source``, then one line per error naming the dotted key."""
    lines = [f"{source}: invalid run config ({err.error_count()} error(s)):"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {loc}: {msg}" + (f" (got {e['input']!r})" if e["type"] != "extra_forbidden" and not isinstance(e.get("input"), dict) else ""))
    return "\n".join(lines)


def read_yaml_mapping(path: Path) -> dict:
    """The top-level mapping of a YAML config file; ConfigError naming the file when it is missing,
    not YAML, or not a mapping."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return raw


def _read(path: Path, overrides: list[str] | None, cls: type[BaseModel]) -> Any:
    """YAML file -> overrides -> ``cls``; ConfigError naming the file and keys."""
    raw = read_yaml_mapping(path)
    apply_overrides(raw, overrides or [])
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_errors(e, str(path))) from None


def resolve_file(path: Path, section: Any, key: str, where: str, must_exist: bool = True) -> None:
    """Make ``section.key`` absolute: relative to the config file's folder, else to the working directory;
    ConfigError naming ``where`` when the file does not exist (unless ``must_exist`` is False: a file an
    earlier command writes, checked when the run starts)."""
    val = getattr(section, key)
    if not val:
        return
    if not Path(val).is_absolute():
        cand = (path.resolve().parent / val).resolve()
        if not cand.exists() and Path(val).exists():
            cand = Path(val).resolve()
        setattr(section, key, str(cand))
    if must_exist and not Path(getattr(section, key)).exists():
        raise ConfigError(f"{path}: {where}: file not found: {getattr(section, key)}")


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a YAML run config.

    Relative ``data.path``/``data.eval_path`` resolve against the config file's folder (else the
    working directory). Model folders (``model.path``, ``reward.models[i].path``) are relative to the
    working directory, like ``output_dir`` (they are often written by an earlier run) and are checked
    when the run starts and by ``troupe check`` (``troupe.reward.scoring.check_reward_config``);
    ``reward.iterative.data`` resolves like ``data.path`` but, as those folders, is checked there.
    Raises ``ConfigError`` (message names the file and each bad dotted key).
    """
    path = Path(path)
    cfg = _read(path, overrides, RunConfig)
    for key in ("path", "eval_path") if cfg.data.source != "hf" else ("eval_path",):
        resolve_file(path, cfg.data, key, f"data.{key}")
    if cfg.data.source == "hf":  # a hub name stays a name; a local data-set folder resolves like a file
        local = (path.resolve().parent / cfg.data.path) if not Path(cfg.data.path).is_absolute() else Path(cfg.data.path)
        if local.exists():
            cfg.data.path = str(local.resolve())
        for key in ("fallback_path", "fallback_eval_path"):  # checked when used
            resolve_file(path, cfg.data, key, f"data.{key}", must_exist=False)
    if cfg.rejection.general_sft is not None:
        resolve_file(path, cfg.rejection.general_sft, "path", "rejection.general_sft.path")
    resolve_file(path, cfg.sft, "path", "sft.path")
    if cfg.reward.iterative is not None:
        resolve_file(path, cfg.reward.iterative, "data", "reward.iterative.data", must_exist=False)
    return cfg


def load_rm_config(path: str | Path, overrides: list[str] | None = None) -> RewardModelTrainConfig:
    """Read, override and validate a ``troupe rm train`` config (paths resolved as in :func:`load_config`).

    Raises ``ConfigError`` naming the file and each bad dotted key.
    """
    path = Path(path)
    cfg = _read(path, overrides, RewardModelTrainConfig)
    for key in ("path", "eval_path"):
        resolve_file(path, cfg.data, key, f"data.{key}")
    return cfg


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (what the run directory keeps as config.yaml)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


__all__ = [
    "AlgoConfig",
    "CheckpointConfig",
    "ClusterConfig",
    "ConfigError",
    "DataConfig",
    "GeneralSFTConfig",
    "IterativeRMConfig",
    "LearnerConfig",
    "ModelConfig",
    "RewardConfig",
    "RewardFunctionConfig",
    "RewardModelConfig",
    "RewardModelTrainConfig",
    "RewardModelTrainSettings",
    "PreferenceDataConfig",
    "REJECTION_FILTERS",
    "RejectionSamplingConfig",
    "RolloutConfig",
    "RunConfig",
    "SFTConfig",
    "SyncConfig",
    "apply_overrides",
    "dump_config",
    "load_config",
    "load_rm_config",
]
