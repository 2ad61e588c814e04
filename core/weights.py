"""The weight-sync wire layout: whole-model weights cut into buckets of whole decoder layers.

Both ends of a weight sync use this module: the learner ranks (``ZeroRank.send_weight_bucket``
gathers one bucket at a time) and the engines (``RolloutEngine.load_weight_bucket`` reloads one
bucket at a time). ``troupe.cluster.weight_sync`` moves the buckets between them.

Layout: every parameter of the model, in ``named_parameters(remove_duplicate=False)`` order (a
tied LM head appears under both of its names, see ``ZeroRank.full_state_dict``), is one
:class:`TensorEntry` at a byte offset inside its :class:`WeightBucket`; a bucket's bytes start at
``bucket.start`` in a buffer that holds the whole model (page aligned, so one bucket can be
``mmap``-ed alone), tensors inside a bucket at 64-byte aligned offsets.

Why buckets hold whole decoder layers: vLLM's in-place reload
(``vllm/model_executor/model_loader/reload``, vLLM 0.32) materialises a layer empty, loads the
tensors it is given and repacks the layer at once; a fused module (``qkv_proj`` from
q/k/v_proj, ``gate_up_proj``, a MoE layer's experts) reloaded from only part of its checkpoint
tensors keeps garbage in the rest (measured on a 2-layer Qwen2: one reload call per tensor left
1.8 nats of engine/reference disagreement; one call per decoder layer 1.4e-6, the same as one
call for the whole model). The grouping rule is vLLM's own (``layerwise_groups`` in
``vllm/distributed/weight_transfer/base.py``): a name's group is its outermost integer path
segment (``model.layers.3.*``, also a MoE layer's experts); names without one form a "pre"
group (embedding) before the first layer and a "post" group (final norm, LM head) after it.
A layer bigger than the bucket size is a bucket of its own.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

BUCKET_ALIGN = 4096
"""Byte alignment of a bucket's start in the whole-model buffer (the page size: ``mmap`` offsets)."""

TENSOR_ALIGN = 64
"""Byte alignment of a tensor inside its bucket."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a bucket: HF name, torch dtype name ("float32", "bfloat16", ...), full shape,
    byte offset from the bucket's start, byte size."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class WeightBucket:
    """Bucket ``index`` of a layout: its tensors, and where its bytes sit in a whole-model buffer.

    Attributes:
        index: position in the layout (0-based); buckets are sent and loaded in this order.
        start: byte offset of the bucket in the whole-model buffer (multiple of ``BUCKET_ALIGN``).
        nbytes: bytes the bucket spans (its last tensor's end).
        entries: the tensors, offsets relative to ``start``.
    """

    index: int
    start: int
    nbytes: int
    entries: tuple[TensorEntry, ...]

    def wire(self) -> list:
        """Plain lists ``[[name, dtype, shape, offset, nbytes], ...]`` (vLLM's ``collective_rpc`` arguments
        are msgspec-encoded: dataclasses do not survive, lists do)."""
        return [[e.name, e.dtype, list(e.shape), e.offset, e.nbytes] for e in self.entries]


def layout_bytes(buckets: Sequence[WeightBucket]) -> int:
    """Size in bytes of the whole-model buffer that holds ``buckets`` (0 for none)."""
    return max((b.start + b.nbytes for b in buckets), default=0)


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def layer_groups(names: Sequence[str]) -> list[list[str]]:
    """Partition parameter names into one group per decoder layer (vLLM's ``layerwise_groups`` rule).

    The key of a name is its outermost all-digit path segment with the prefix before it
    (``model.layers.3.mlp.experts.7.w1`` -> ("model.layers", 3)); names without one go to a "pre"
    group when they come before the first indexed name, else to a "post" group. Groups come out as
    pre, the indexed groups (prefixes in order of first appearance, ascending index), post; names
    keep their order inside a group. Returns no empty group.
    """
    pre: list[str] = []
    post: list[str] = []
    stacks: dict[tuple[str, int], list[str]] = {}
    for name in names:
        parts = name.split(".")
        key = next(((".".join(parts[:i]), int(p)) for i, p in enumerate(parts) if p.isdigit()), None)
        if key is None:
            (post if stacks else pre).append(name)
        else:
            stacks.setdefault(key, []).append(name)
    prefixes: dict[str, int] = {}
    for prefix, _ in stacks:
        prefixes.setdefault(prefix, len(prefixes))
    order = sorted(stacks, key=lambda k: (prefixes[k[0]], k[1]))
    return [g for g in [pre, *(stacks[k] for k in order), post] if g]


def plan_buckets(params: Sequence[tuple[str, str, Sequence[int], int]], bucket_bytes: int) -> list[WeightBucket]:
    """Cut a model's parameters into buckets of whole decoder layers of at most ``bucket_bytes`` each.

    Args:
        params: ``(name, dtype name, full shape, bytes)`` per parameter, in the model's order
            (tied parameters once per name).
        bucket_bytes: the bucket size (``sync.bucket_mb`` x 2**20); a layer larger than it is a
            bucket alone.
    Returns:
        The buckets in send order (groups in :func:`layer_groups` order, consecutive groups filled
        into a bucket while they fit).
    Raises:
        ValueError: ``bucket_bytes`` < 1 (names ``sync.bucket_mb``), a name given twice, or no parameters.
    """
    if bucket_bytes < 1:
        raise ValueError(f"sync.bucket_mb must be > 0 (got a bucket of {bucket_bytes} bytes)")
    info = {}
    for name, dtype, shape, nbytes in params:
        if name in info:
            raise ValueError(f"plan_buckets: parameter {name!r} given twice")
        info[name] = (str(dtype), tuple(int(s) for s in shape), int(nbytes))
    if not info:
        raise ValueError("plan_buckets: the model has no parameters")
    groups = layer_groups(list(info))
    plans: list[list[str]] = []
    size = 0
    for group in groups:
        gbytes = sum(_align(info[n][2], TENSOR_ALIGN) for n in group)
        if plans and size and size + gbytes <= bucket_bytes:
            plans[-1].extend(group)
            size += gbytes
        else:
            plans.append(list(group))
            size = gbytes
    buckets, start = [], 0
    for i, names in enumerate(plans):
        entries, off = [], 0
        for n in names:
            dtype, shape, nbytes = info[n]
            entries.append(TensorEntry(n, dtype, shape, off, nbytes))
            off = _align(off + nbytes, TENSOR_ALIGN)
        span = entries[-1].offset + entries[-1].nbytes
        buckets.append(WeightBucket(i, start, span, tuple(entries)))
        start = _align(start + span, BUCKET_ALIGN)
    return buckets


def entries_from_wire(wire: Iterable[Sequence[Any]]) -> list[TensorEntry]:
    """The inverse of :meth:`WeightBucket.wire`."""
    return [TensorEntry(str(n), str(d), tuple(int(s) for s in shape), int(o), int(b)) for n, d, shape, o, b in wire]


def tensor_views(buffer: Any, entries: Sequence[TensorEntry], base: int = 0) -> list[tuple[str, Any]]:
    """``(name, tensor)`` per entry: zero-copy views into ``buffer`` (any writable buffer: an ``mmap``,
    a numpy array) at ``base + entry.offset``; the tensors share the buffer's memory.

    Raises ``ValueError`` when an entry runs past the end of the buffer.
    """
    import torch

    mv = memoryview(buffer).cast("B")
    out = []
    for e in entries:
        dt = getattr(torch, e.dtype)
        if base + e.offset + e.nbytes > len(mv):
            raise ValueError(f"tensor {e.name!r} ({e.nbytes} bytes at {base + e.offset}) runs past the end of a "
                             f"{len(mv)}-byte weight buffer")
        if e.nbytes == 0:
            out.append((e.name, torch.empty(e.shape, dtype=dt)))
            continue
        flat = torch.frombuffer(mv, dtype=torch.uint8, count=e.nbytes, offset=base + e.offset)
        out.append((e.name, flat.view(dt).view(e.shape)))
    return out


def byte_array(tensor: Any) -> Any:
    """The bytes of a tensor as a 1-D numpy uint8 array: a view of the tensor's memory (no copy) when it is a
    contiguous CPU tensor, else of a contiguous CPU copy. Any dtype, bfloat16 included."""
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else torch.empty(0, dtype=torch.uint8).numpy()


def write_bucket(fd: int, bucket: WeightBucket, tensors: Mapping[str, Any], base: int = 0) -> int:
    """Write the tensors of ``bucket`` into the open file ``fd`` at ``base + entry.offset`` (``os.pwrite``:
    the bytes are copied once, into the file's pages; nothing is mapped into this process).

    ``base`` is usually ``bucket.start`` (a whole-model file) or 0 (a one-bucket file). Tensors on
    another device are copied to the CPU one at a time. Returns the bytes written. Raises
    ``ValueError`` when a tensor is missing or its dtype/shape differ from the entry.
    """
    written = 0
    for e in bucket.entries:
        t = tensors.get(e.name)
        if t is None:
            raise ValueError(f"bucket {bucket.index}: tensor {e.name!r} missing")
        if str(t.dtype).split(".")[-1] != e.dtype or tuple(t.shape) != e.shape:
            raise ValueError(f"bucket {bucket.index}: {e.name!r} is {t.dtype} {tuple(t.shape)}, the layout says "
                             f"{e.dtype} {e.shape}")
        view = memoryview(byte_array(t))
        pos, done = base + e.offset, 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], pos + done)
        written += done
    return written


def write_partitions(fd: int, bucket: WeightBucket, parts: Mapping[str, tuple[Any, int]], base: int = 0) -> int:
    """Write one rank's slices of the bucket's tensors into ``fd``: ``parts[name] = (flat tensor, first
    element)`` lands at ``base + entry.offset + first * element size`` (ZeRO-3 partitions: every rank
    writes its own, the file then holds the whole tensors). Returns the bytes written.

    Raises ``ValueError`` when a name is missing, a dtype differs or a slice runs past its tensor.
    """
    written = 0
    for e in bucket.entries:
        if e.name not in parts:
            raise ValueError(f"bucket {bucket.index}: partition of {e.name!r} missing")
        t, first = parts[e.name]
        if str(t.dtype).split(".")[-1] != e.dtype:
            raise ValueError(f"bucket {bucket.index}: {e.name!r} partition is {t.dtype}, the layout says {e.dtype}")
        view = memoryview(byte_array(t))
        pos = first * t.element_size()
        if pos + len(view) > e.nbytes:
            raise ValueError(f"bucket {bucket.index}: {e.name!r} slice [{pos}, {pos + len(view)}) runs past its "
                             f"{e.nbytes} bytes")
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], base + e.offset + pos + done)
        written += done
    return written


def array_bytes(arrays: Sequence[Any], bucket: WeightBucket, fd: int) -> int:
    """Write one bucket's per-tensor byte arrays (as the object-store strategy ships them, one uint8
    array per entry, entry order) into ``fd`` at the entries' offsets (base 0). Returns bytes written.

    Raises ``ValueError`` when the count or a size differs from the bucket's entries.
    """
    if len(arrays) != len(bucket.entries):
        raise ValueError(f"bucket {bucket.index}: {len(arrays)} arrays for {len(bucket.entries)} tensors")
    written = 0
    for a, e in zip(arrays, bucket.entries):
        view = memoryview(a).cast("B")
        if len(view) != e.nbytes:
            raise ValueError(f"bucket {bucket.index}: {e.name!r} has {len(view)} bytes, the layout says {e.nbytes}")
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], e.offset + done)
        written += done
    return written


def peak_rss_reset() -> int:
    """Reset this process's peak resident size (Linux ``/proc/self/clear_refs`` "5") and return the
    current resident size in bytes.

    Freed heap memory is first handed back to the kernel (glibc ``malloc_trim(0)``, where glibc is
    the C library): memory the allocator keeps after a free would otherwise be reused without
    raising the peak, and the peak would miss what later allocations really use. Raises
    ``OSError`` where the kernel does not allow the reset.
    """
    trim_heap()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_bytes()


def trim_heap() -> bool:
    """Hand freed heap memory back to the kernel (glibc ``malloc_trim(0)``); False where there is no glibc.

    Measured on a ZeRO-3 rank: the buffers of one bucket's gather, freed when the gather ends, stayed
    resident and were not reused by the next bucket's, so the resident size grew bucket after bucket
    (+296 MiB over 8 buckets of 62 MiB); trimming after each bucket kept it under one bucket (+59 MiB).
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def rss_bytes() -> int:
    """Resident size of this process in bytes (``VmRSS``)."""
    return _status_kb("VmRSS") * 1024


def peak_rss() -> int:
    """Peak resident size of this process in bytes since the last :func:`peak_rss_reset` (``VmHWM``)."""
    return _status_kb("VmHWM") * 1024


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    if m is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(m.group(1))
