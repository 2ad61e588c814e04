"""The weight-sync layout (troupe.core.weights): buckets of whole decoder layers, byte offsets, and the
round trip of tensors through a file and through per-tensor byte arrays; the strategy registry and
the sync config keys. No Ray, no vLLM."""

from __future__ import annotations

import os

import pytest
import torch

from troupe.core.weights import (
    BUCKET_ALIGN,
    TENSOR_ALIGN,
    array_bytes,
    byte_array,
    entries_from_wire,
    layer_groups,
    layout_bytes,
    plan_buckets,
    tensor_views,
    write_bucket,
)

QWEN2 = ["model.embed_tokens.weight"] + [f"model.layers.{i}.{p}" for i in range(3) for p in (
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight")] + \
    ["model.norm.weight", "lm_head.weight"]


def test_layer_groups_keep_each_decoder_layer_whole():
    groups = layer_groups(QWEN2)
    assert groups[0] == ["model.embed_tokens.weight"]
    assert groups[-1] == ["model.norm.weight", "lm_head.weight"]
    assert [len(g) for g in groups[1:-1]] == [8, 8, 8]
    assert all(n.startswith(f"model.layers.{i}.") for i, g in enumerate(groups[1:-1]) for n in g)
    # the outermost index decides (a MoE layer's experts stay with their layer), numeric order, not text order
    moe = ["m.layers.10.mlp.experts.0.w", "m.layers.2.mlp.experts.1.w", "m.layers.2.mlp.experts.0.w", "head"]
    assert layer_groups(moe) == [["m.layers.2.mlp.experts.1.w", "m.layers.2.mlp.experts.0.w"],
                                 ["m.layers.10.mlp.experts.0.w"], ["head"]]


def _params(layer_bytes: int) -> list[tuple]:
    per = layer_bytes // 8 // 4  # float32 elements per tensor of a layer
    return [(n, "float32", (per,), per * 4) for n in QWEN2]


def test_buckets_fill_whole_layers_up_to_the_bucket_size():
    params = _params(8000)  # every tensor 1000 bytes, a layer 8 tensors
    size = lambda names: sum(-(-1000 // TENSOR_ALIGN) * TENSOR_ALIGN for _ in names)  # noqa: E731
    layer = size(range(8))
    buckets = plan_buckets(params, 2 * layer + 10)  # two layers fit, not three
    names = [[e.name for e in b.entries] for b in buckets]
    assert [n for b in names for n in b] == [p[0] for p in params]  # every tensor once, in order
    assert all(len({n.split(".")[2] for n in b if n.startswith("model.layers.")}) <= 2 for b in names)
    for b in buckets:  # no layer split across buckets
        for i in range(3):
            inside = [n for n in b.entries if n.name.startswith(f"model.layers.{i}.")]
            assert len(inside) in (0, 8)
        assert b.start % BUCKET_ALIGN == 0 and all(e.offset % TENSOR_ALIGN == 0 for e in b.entries)
        assert b.nbytes == b.entries[-1].offset + b.entries[-1].nbytes
    starts = [b.start for b in buckets]
    assert starts == sorted(starts) and all(a.start + a.nbytes <= c.start for a, c in zip(buckets, buckets[1:]))
    assert layout_bytes(buckets) == buckets[-1].start + buckets[-1].nbytes
    # a bucket smaller than a layer: one layer per bucket, never split
    small = plan_buckets(params, 100)
    assert len(small) == len(layer_groups(QWEN2)) and max(b.nbytes for b in small) <= layer
    # one bucket when everything fits
    assert len(plan_buckets(params, 10**9)) == 1


def test_bad_bucket_size_names_the_config_key():
    with pytest.raises(ValueError, match="sync.bucket_mb"):
        plan_buckets(_params(8000), 0)
    with pytest.raises(ValueError, match="twice"):
        plan_buckets(_params(8000) + [("lm_head.weight", "float32", (1,), 4)], 100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensors_round_trip_through_a_file_and_through_arrays(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (7, 5), "model.layers.0.a.weight": (3,), "model.layers.0.b.weight": (2, 2, 3),
              "model.layers.1.a.weight": (1,), "lm_head.weight": (7, 5), "model.norm.weight": ()}
    state = {n: torch.randn(s, generator=g).to(dtype) for n, s in shapes.items()}
    params = [(n, str(dtype).split(".")[-1], tuple(t.shape), t.numel() * t.element_size()) for n, t in state.items()]
    buckets = plan_buckets(params, 40)
    assert len(buckets) > 1
    path = tmp_path / "w.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, layout_bytes(buckets))
        for b in reversed(buckets):  # any order: each bucket has its own bytes
            write_bucket(fd, b, state, b.start)
    finally:
        os.close(fd)
    buf = bytearray(path.read_bytes())
    got = dict(v for b in buckets for v in tensor_views(buf, entries_from_wire(b.wire()), b.start))
    assert got.keys() == state.keys()
    assert all(torch.equal(got[n], state[n]) and got[n].dtype == dtype for n in state)
    # per-tensor byte arrays (the object-store strategy) into a one-bucket file
    for b in buckets:
        one = tmp_path / f"b{b.index}.bin"
        fd = os.open(one, os.O_RDWR | os.O_CREAT)
        try:
            assert array_bytes([byte_array(state[e.name]) for e in b.entries], b, fd) == sum(e.nbytes for e in b.entries)
        finally:
            os.close(fd)
        views = dict(tensor_views(bytearray(one.read_bytes()), b.entries))
        assert all(torch.equal(views[e.name], state[e.name]) for e in b.entries)


def test_write_checks_the_layout(tmp_path):
    t = torch.zeros(4)
    [b] = plan_buckets([("w", "float32", (4,), 16)], 100)
    fd = os.open(tmp_path / "x", os.O_RDWR | os.O_CREAT)
    try:
        with pytest.raises(ValueError, match="missing"):
            write_bucket(fd, b, {}, 0)
        with pytest.raises(ValueError, match="layout says"):
            write_bucket(fd, b, {"w": torch.zeros(5)}, 0)
        with pytest.raises(ValueError, match="arrays for"):
            array_bytes([], b, fd)
    finally:
        os.close(fd)
    with pytest.raises(ValueError, match="runs past"):
        tensor_views(bytearray(8), b.entries)
    assert torch.equal(dict(tensor_views(bytearray(byte_array(t).tobytes()), b.entries))["w"], t)


def test_strategy_registry_and_config():
    from troupe.cluster.weight_sync import (
        ObjectStoreStrategy,
        ShmStrategy,
        SyncStrategy,
        VllmNcclStrategy,
        strategy_class,
    )
    from troupe.configs.schema import SyncConfig

    assert strategy_class("shm") is ShmStrategy and strategy_class("object_store") is ObjectStoreStrategy
    assert strategy_class("vllm_nccl") is VllmNcclStrategy
    assert strategy_class("troupe.cluster.weight_sync:ShmStrategy") is ShmStrategy
    with pytest.raises(ValueError, match="sync.strategy"):
        strategy_class("carrier_pigeon")
    with pytest.raises(ValueError, match="not a troupe.cluster.weight_sync.SyncStrategy"):
        strategy_class("troupe.core.weights:plan_buckets")

    class Pigeon(SyncStrategy):  # adding a transport is one class
        name = "pigeon"

        def sink(self, version, buckets):
            return None

        def load(self, handle, bucket, descriptor):
            return None

    assert strategy_class("pigeon") is Pigeon
    assert SyncConfig().bucket_mb == 256.0 and SyncConfig(strategy="pkg.mod:Cls").strategy == "pkg.mod:Cls"
    for bad in ({"strategy": "pigeon_post"}, {"bucket_mb": 0}, {"strategy": "mod:"}):
        with pytest.raises(ValueError, match="strategy|bucket_mb"):
            SyncConfig(**bad)


def test_vllm_nccl_needs_gpu():
    from pathlib import Path

    from troupe.configs.schema import ConfigError, load_config

    cfg = Path(__file__).resolve().parents[1] / "configs" / "arith_cpu.yaml"
    with pytest.raises((ConfigError, ValueError), match="vllm_nccl"):
        load_config(cfg, ["sync.strategy=vllm_nccl"])


def test_partitions_of_every_rank_make_the_whole_tensors(tmp_path):
    """ZeRO-3's layout: rank r holds elements [r*s, (r+1)*s) of each flattened parameter (the last padded);
    each rank writing its own slice gives the whole tensors."""
    from troupe.core.weights import write_partitions

    g = torch.Generator().manual_seed(1)
    state = {"model.layers.0.w": torch.randn(5, 3, generator=g), "model.layers.0.b": torch.randn(7, generator=g),
             "lm_head.weight": torch.randn(2, generator=g)}
    [b] = plan_buckets([(n, "float32", tuple(t.shape), t.numel() * 4) for n, t in state.items()], 10**6)
    world = 3
    fd = os.open(tmp_path / "w.bin", os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, layout_bytes([b]))
        for rank in reversed(range(world)):
            parts = {}
            for n, t in state.items():
                s = -(-t.numel() // world)
                start = s * rank
                parts[n] = (t.reshape(-1)[start:start + max(0, min(s, t.numel() - start))], start)
            write_partitions(fd, b, parts)
        with pytest.raises(ValueError, match="runs past"):
            write_partitions(fd, b, {**parts, "lm_head.weight": (torch.zeros(2), 1)})
    finally:
        os.close(fd)
    got = dict(tensor_views(bytearray((tmp_path / "w.bin").read_bytes()), b.entries))
    assert all(torch.equal(got[n], state[n]) for n in state)
