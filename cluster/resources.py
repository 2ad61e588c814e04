"""What a run asks of a cluster, for ``troupe check``: CPUs and GPUs per actor kind and in total, compared
with the machine or the cluster it would join, and an estimate of one learner rank's peak memory.

Placement (``troupe.cluster.runtime``): the engines and the learner ranks are one placement group of one
bundle each, strategy PACK (on one node when one node can hold every bundle, else spread over as few
as possible; a bundle never spans nodes); reward workers and reward-model actors are plain actors
outside it. So a run can start only if the cluster has the group's total and every bundle fits some
node, and the rest fits beside it.

The memory estimate follows the ZeRO paper's accounting (Rajbhandari et al. 2020, section 3: with
mixed precision and Adam, 2 bytes of weights, 2 of gradients and K = 12 of optimizer state per
parameter; stage 1 partitions the optimizer state over the N ranks, stage 2 the gradients too, stage
3 the weights too), in float32 4 + 4 + 8 (no master copy), plus the reference model (replicated, or
partitioned under ZeRO-3), the micro-batch's logits in the model's dtype, the float32 chunk of the
log-softmax (``learner.logits_chunk_tokens``) and the layers' activations (Korthikanti et al. 2022,
eq. 2: s*b*h*(34 + 5*a*s/h) bytes per layer in 16-bit without recomputation; s*b*h*2 per layer with
gradient checkpointing). It is an estimate, not a measurement: DeepSpeed's buckets, the CUDA
context and fragmentation come on top.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from troupe.configs.schema import RunConfig

__all__ = ["ActorDemand", "ModelShape", "capacity_of_this_machine", "demands", "learner_memory", "report"]

GIB = 2**30


@dataclass(frozen=True)
class ActorDemand:
    """``count`` actors of ``kind``, each reserving ``cpus`` and ``gpus``; ``in_group``: inside the run's
    placement group (one bundle each) or a plain actor beside it."""

    kind: str
    count: int
    cpus: float
    gpus: float
    in_group: bool


@dataclass(frozen=True)
class ModelShape:
    """The policy's size: parameters, vocabulary, hidden size, decoder layers, attention heads."""

    params: int
    vocab: int
    hidden: int
    layers: int
    heads: int


def demands(cfg: RunConfig) -> list[ActorDemand]:
    """Every kind of actor a run of ``cfg`` starts, with its Ray resources (as ``troupe.cluster.runtime``
    reserves them)."""
    gpu = cfg.device == "gpu"
    ro, lc, rw = cfg.rollout, cfg.learner, cfg.reward
    out = [ActorDemand("engine", ro.num_engines, ro.num_cpus_per_engine, ro.num_gpus_per_engine if gpu else 0.0, True),
           ActorDemand("learner rank", lc.num_ranks, lc.num_cpus_per_rank, lc.num_gpus_per_rank if gpu else 0.0, True)]
    if cfg.critic is not None:
        c = cfg.critic
        out.append(ActorDemand("critic rank", c.num_ranks, c.num_cpus_per_rank, c.num_gpus_per_rank if gpu else 0.0, True))
    if rw.functions:
        out.append(ActorDemand("reward worker", rw.num_workers, rw.num_cpus_per_worker, 0.0, False))
    out += [ActorDemand(f"reward model {m.name}", m.num_workers, m.num_cpus, m.num_gpus, False) for m in rw.models]
    if rw.iterative is not None:
        out.append(ActorDemand("reward-model trainer", 1, rw.iterative.num_cpus, 0.0, False))
    return out


def capacity_of_this_machine() -> dict:
    """{"cpus", "gpus", "memory_bytes", "embedded": True} of this machine (GPUs: CUDA devices torch sees; 0
    without CUDA). The embedded local cluster (``troupe.cluster.runtime.init_ray``) advertises max(cores, the
    CPUs the run reserves), so CPU reservations never block there: actors share the cores."""
    import psutil

    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        pass
    return {"cpus": float(os.cpu_count() or 1), "gpus": float(gpus), "memory_bytes": psutil.virtual_memory().total,
            "embedded": True}


def learner_memory(shape: ModelShape, cfg: RunConfig, seq_len: Optional[int] = None) -> dict[str, float]:
    """Estimated peak bytes of one learner rank (module docstring), by part and "total".

    Args:
        shape: the policy's size.
        cfg: the run config (dtype, ZeRO stage, ranks, micro-batch, KL to the reference, chunk size,
            gradient checkpointing).
        seq_len: tokens per sequence (default: the longest prompt + response, ``data.max_prompt_tokens``
            + ``rollout.max_new_tokens``).
    """
    lc, n, P = cfg.learner, cfg.learner.num_ranks, shape.params
    half = cfg.model.dtype != "float32"
    w, g, k = (2, 2, 12) if half else (4, 4, 8)
    stage = lc.zero_stage
    s = seq_len or (cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens)
    b = lc.micro_batch_size if not lc.micro_batch_tokens else max(1, lc.micro_batch_tokens // s)
    h, a, layers = shape.hidden, shape.heads, shape.layers
    per_layer = s * b * h * 2 if cfg.model.gradient_checkpointing else s * b * h * (34 + 5 * a * s / h)
    if not half:
        per_layer *= 2
    chunk = min(lc.logits_chunk_tokens or s * b, s * b)
    parts = {
        "weights": w * P / (n if stage == 3 else 1),
        "gradients": g * P / (n if stage >= 2 else 1),
        "optimizer": k * P / (n if stage >= 1 else 1),
        "reference": (w * P / (n if stage == 3 else 1)) if cfg.algo.kl_coef > 0 else 0.0,
        "logits": b * s * shape.vocab * w + 3 * chunk * shape.vocab * 4,
        "activations": layers * per_layer,
    }
    parts["total"] = sum(parts.values())
    return parts


def _fmt(x: float) -> str:
    return f"{x:g}"


def report(cfg: RunConfig, capacity: dict, shape: Optional[ModelShape] = None,
           where: str = "this machine") -> tuple[list[str], list[str]]:
    """The resource table ``troupe check`` prints, and its warnings (a run that could never be placed on
    ``capacity``, ``{"cpus", "gpus", "memory_bytes"?, "largest_node": {"cpus", "gpus"}?}``, named ``where``).

    Returns:
        (lines of the table, warnings); no warnings when it fits.
    """
    ds = demands(cfg)
    lines = [f"{'actors':<28}{'count':>6}{'CPU each':>10}{'GPU each':>10}  placement"]
    for d in ds:
        lines.append(f"{d.kind:<28}{d.count:>6}{_fmt(d.cpus):>10}{_fmt(d.gpus):>10}  "
                     + ("placement group (PACK)" if d.in_group else "beside it"))
    cpus = sum(d.count * d.cpus for d in ds)
    gpus = sum(d.count * d.gpus for d in ds)
    group_cpus = sum(d.count * d.cpus for d in ds if d.in_group)
    group_gpus = sum(d.count * d.gpus for d in ds if d.in_group)
    lines.append(f"total: {_fmt(cpus)} CPUs (placement group {_fmt(group_cpus)}) and {_fmt(gpus)} GPUs (placement "
                 f"group {_fmt(group_gpus)}); {where}: {_fmt(capacity['cpus'])} CPUs, {_fmt(capacity['gpus'])} GPUs")
    warnings = []
    embedded = capacity.get("embedded", False)
    if embedded and cpus > capacity["cpus"]:
        lines.append(f"the embedded local cluster advertises {_fmt(cpus)} CPUs on {_fmt(capacity['cpus'])} cores: "
                     "the actors share them (it runs, more slowly)")
    if gpus > capacity["gpus"] or (cpus > capacity["cpus"] and not embedded):
        warnings.append(f"this run needs {_fmt(cpus)} CPUs and {_fmt(gpus)} GPUs; {where} has {_fmt(capacity['cpus'])} "
                        f"and {_fmt(capacity['gpus'])}: it could never be placed there (its actors would wait for "
                        "cluster.rpc_timeout_s)")
    node = capacity.get("largest_node")
    if node is not None:
        big = max(ds, key=lambda d: (d.gpus, d.cpus))
        if big.gpus > node["gpus"] or big.cpus > node["cpus"]:
            warnings.append(f"one {big.kind} asks for {_fmt(big.cpus)} CPUs and {_fmt(big.gpus)} GPUs; the largest "
                            f"node of {where} has {_fmt(node['cpus'])} and {_fmt(node['gpus'])}")
    if shape is not None:
        mem = learner_memory(shape, cfg)
        lines.append(f"learner rank peak memory, estimated ({shape.params / 1e6:.1f}M parameters, ZeRO-"
                     f"{cfg.learner.zero_stage} over {cfg.learner.num_ranks}, {cfg.model.dtype}): "
                     f"{mem['total'] / GIB:.2f} GiB = " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in mem.items()
                                                                   if k != "total"))
        if cfg.device == "cpu" and "memory_bytes" in capacity:
            need = mem["total"] * cfg.learner.num_ranks
            if need > capacity["memory_bytes"]:
                warnings.append(f"the learner ranks alone need about {need / GIB:.1f} GiB; {where} has "
                                f"{capacity['memory_bytes'] / GIB:.1f} GiB")
    return lines, warnings


def model_shape(cfg: RunConfig) -> Optional[ModelShape]:
    """The policy's ``ModelShape``: for a ``builtin:`` model from ``cfg.model`` (vocabulary ~576: a 512-token
    BPE plus its special tokens, padded to 64); for a folder or hub id from its config, counting parameters
    on the meta device (nothing allocated, nothing downloaded). None when the config cannot be read."""
    m = cfg.model
    if m.path.startswith("builtin:"):  # as troupe.cluster.prepare builds it
        from transformers import Qwen2Config

        conf = Qwen2Config(vocab_size=576, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                           num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                           num_key_value_heads=max(1, m.num_heads // 2), tie_word_embeddings=True)
    else:
        from troupe.cluster.models import ModelPathError, resolve_model

        try:
            from transformers import AutoConfig

            conf = AutoConfig.from_pretrained(resolve_model(m.path))
        except (ModelPathError, OSError, ValueError):
            return None
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(conf)
    params = sum(p.numel() for p in model.parameters())
    return ModelShape(params=params, vocab=conf.vocab_size, hidden=conf.hidden_size, layers=conf.num_hidden_layers,
                      heads=conf.num_attention_heads)


def capacity_of_cluster(address: str) -> dict:
    """{"cpus", "gpus", "memory_bytes", "largest_node": {"cpus", "gpus"}} of the live nodes of the Ray cluster
    at ``address`` (joined as a driver that starts nothing, then left). Raises ConnectionError if it cannot join."""
    import ray

    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    try:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    finally:
        ray.shutdown()
    largest = max(nodes, key=lambda r: (r.get("GPU", 0.0), r.get("CPU", 0.0)), default={})
    return {"cpus": sum(r.get("CPU", 0.0) for r in nodes), "gpus": sum(r.get("GPU", 0.0) for r in nodes),
            "memory_bytes": sum(r.get("memory", 0.0) for r in nodes),
            "largest_node": {"cpus": largest.get("CPU", 0.0), "gpus": largest.get("GPU", 0.0)}}


def print_report(cfg: RunConfig, address: Optional[str]) -> None:
    """``troupe check``'s resource table and warnings on stdout, against the cluster at ``address`` (or
    ``cluster.address``, or RAY_ADDRESS) when one is given and reachable, else this machine."""
    address = address or cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    capacity, where = None, "this machine"
    if address and address != "local":
        try:
            capacity, where = capacity_of_cluster(address), f"the Ray cluster at {address}"
        except (ConnectionError, RuntimeError) as e:
            print(f"warning: cannot join the Ray cluster at {address} ({e}); comparing with this machine")
    lines, warnings = report(cfg, capacity or capacity_of_this_machine(), model_shape(cfg), where)
    print("\n".join(lines))
    for w in warnings:
        print(f"warning: {w}")
