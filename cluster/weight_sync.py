"""Weight sync: learner -> engines, stamped with a policy version: a sender plus a strategy, streamed in buckets.

The sender is the learner group. ``troupe.core.weights`` cuts the model into buckets of whole
decoder layers of at most ``sync.bucket_mb`` (vLLM reloads a fused layer only from all of its
tensors at once); for each bucket in turn every rank gathers just that bucket's parameters
(collective under ZeRO-3: ``deepspeed.zero.GatheredParameters`` on those parameters only) and
rank 0 hands them to the strategy's sink, so no rank ever holds more than one bucket of gathered
weights (``ZeroRank.send_weight_bucket``). A sink every rank can write (``partitioned``: the shm
file) skips the gather under ZeRO-3: each rank writes its own partition of each parameter at its
place in the file, and the engines read whole tensors.

A strategy (:class:`SyncStrategy`, one class per transport, chosen by ``sync.strategy``) moves a
bucket from rank 0 into every engine:

- ``shm`` (one node): the bucket's raw bytes go into a whole-model file under /dev/shm by
  ``pwrite``, straight from the parameters (one copy): under ZeRO-3 every rank writes its own
  partitions (no gather), under ZeRO-0/1/2 rank 0 writes the bucket. Each engine's vLLM worker
  maps the bucket's pages and reloads from views of them (no copy before vLLM's own). Two files
  take turns, so the last good version stays whole while the next one is written; the pages are
  reused from sync to sync.
- ``object_store`` (any node): rank 0 ``ray.put``s the bucket (one uint8 array per tensor, one
  copy into its node's object store); each engine gets it through Ray (zero-copy on its node, a
  transfer from another node), writes it into its own memory file and reloads from there.
- ``vllm_nccl`` (GPU engines): vLLM's own weight-transfer API: ``init_weight_transfer_engine``
  once (an NCCL group of learner rank 0 and every engine worker), then per bucket rank 0
  broadcasts with vLLM's packed producer while each engine runs ``update_weights`` with the
  bucket's names/dtypes/shapes, inside one ``start_weight_update``/``finish_weight_update``
  session. Written against vLLM 0.32's API; untested here (no GPU). It keeps no copy of the
  weights, so an engine replaced between syncs cannot be brought to the current version.

``auto`` picks ``shm`` when every actor is on one node and /dev/shm has room for two model-sized
files (+10%), else ``object_store`` (``resolve_auto_strategy``; the choice and its reason are logged). Adding a transport
is one :class:`SyncStrategy` subclass with a ``name``; ``sync.strategy: "package.module:Class"``
loads one from outside troupe.

Streaming: all bucket sends are queued on the ranks at once; as soon as every rank has finished
bucket i, every engine is asked to load it (``EngineGroup.load_weight_stream``), so the engines
reload bucket i while the ranks gather bucket i+1. Each engine reloads one bucket per call through
vLLM's in-place ``reload_weights`` (``RolloutEngine.load_weight_bucket``), bracketed by
``begin_weights``/``finish_weights`` (the version is taken, and the prefix cache reset, only once
every bucket has arrived). The training loop checks engine/learner log-probs after every sync.

The current version's data stay (the shm file, the object refs) until the next successful sync
replaces them: an engine that dies and is replaced in between loads them whole before it samples
again (``EngineGroup.set_weights_source``). The shm strategy thus keeps two model-sized files in
/dev/shm, the object store one model (two during a sync).

Measured (bench/results/weight_sync.md, 2 CPU cores, 122M-parameter Qwen2 in float32, one CPU
engine): see the table there; the engine's vLLM reload (oneDNN repacking of every linear layer)
bounds the CPU sync, not the transport.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Iterator, Optional

from troupe.cluster.learners import LearnerGroup
from troupe.core.weights import WeightBucket, layout_bytes, tensor_views, write_bucket, write_partitions
from troupe.rollout.engine_group import EngineGroup

logger = logging.getLogger(__name__)


class SyncStrategy(ABC):
    """A transport for weight buckets: from learner rank 0 (the sink) into the engines (a load call).

    Subclass it with a class attribute ``name`` (the ``sync.strategy`` value) and three methods;
    :class:`WeightSync` drives it, once per sync:

    1. :meth:`begin` (driver): give the learner ranks the sink that rank 0 will ``put(bucket,
       tensors) -> descriptor`` every gathered bucket into (the default opens ``self.sink(...)`` on
       the ranks); a sink with ``partitioned = True`` is instead called ``put_partitions(bucket,
       {name: (flat tensor, first element)}, rank)`` on every rank under ZeRO-3, with each rank's
       own partitions and no gather (``ZeroRank.send_weight_bucket``);
    2. per bucket, once rank 0 has put it (or at once when ``needs_descriptor`` is False, e.g.
       when the engines receive by collective), :meth:`load` (driver): the Ray call that makes one
       engine load that bucket;
    3. :meth:`keep` after every engine has the new version (its data become the replacement
       source, the previous version's are dropped) or :meth:`discard` after a failure.

    :meth:`restore` brings one fresh engine to the kept version (begin, every bucket, finish).
    A strategy instance lives as long as its :class:`WeightSync` (one run).

    Args:
        scratch_dir: a private folder the strategy may use (removed by ``WeightSync.close``).
        learners, engines: the groups the sync connects.
    """

    name: ClassVar[str] = ""
    transfer: ClassVar[str] = "file"
    """The engines' ``begin_weights(transfer=...)``: "file" (``load_weight_bucket``) or "vllm_nccl"."""
    needs_descriptor: ClassVar[bool] = True
    """Whether an engine needs rank 0's descriptor of a bucket before it can load it."""

    def __init__(self, scratch_dir: str, learners: LearnerGroup, engines: EngineGroup) -> None:
        self.dir, self.learners, self.engines = scratch_dir, learners, engines
        self._kept: Optional[tuple[int, list[WeightBucket], list[Any]]] = None
        self.timeout_s: float = learners.rpc_timeout_s
        """Deadline of the strategy's own waits (``sync.timeout_s``; set by ``WeightSync``)."""

    def begin(self, version: int, buckets: list[WeightBucket]) -> None:
        """Before the buckets of ``version`` are sent: open this sync's sink on the learner ranks."""
        self.learners.open_weight_sink(self.sink(version, buckets))

    @abstractmethod
    def sink(self, version: int, buckets: list[WeightBucket]) -> Any:
        """The picklable object learner rank 0 calls ``put(bucket, {name: tensor}) -> descriptor`` on,
        once per bucket, inside the gather (the tensors are valid during the call only)."""

    @abstractmethod
    def load(self, handle: Any, bucket: WeightBucket, descriptor: Any) -> Any:
        """``ObjectRef`` of engine ``handle`` loading ``bucket`` (``descriptor``: rank 0's ``put`` result,
        None when ``needs_descriptor`` is False)."""

    def keep(self, version: int, buckets: list[WeightBucket], descriptors: list[Any]) -> None:
        """``version`` is in every engine: keep what :meth:`restore` needs, drop the previous version's."""
        self._kept = (version, buckets, descriptors)

    def discard(self, version: int, buckets: list[WeightBucket], descriptors: list[Any]) -> None:
        """The sync of ``version`` failed: release its partial data (the kept version stays)."""

    def restore(self, handle: Any) -> Any:
        """``ObjectRef`` (the last of the calls) that brings a fresh engine to the kept version.

        Raises ``RuntimeError`` when nothing is kept.
        """
        if self._kept is None:
            raise RuntimeError(f"sync.strategy {self.name}: no weights kept for a replacement engine")
        version, buckets, descriptors = self._kept
        handle.begin_weights.remote(version, len(buckets), self.transfer)
        for b, d in zip(buckets, descriptors):
            self.load(handle, b, d)
        return handle.finish_weights.remote(version)

    def kept_tensors(self) -> dict:
        """A copy of the kept version's tensors as the engines received them ({name: CPU tensor}), to check
        a sync against the learner's weights. Raises ``RuntimeError`` when nothing is kept,
        ``NotImplementedError`` for a strategy that cannot read its data back."""
        raise NotImplementedError(f"sync.strategy {self.name}: cannot read its weights back")

    def _kept_or_raise(self) -> tuple[int, list[WeightBucket], list[Any]]:
        if self._kept is None:
            raise RuntimeError(f"sync.strategy {self.name}: no weights kept")
        return self._kept

    def close(self) -> None:
        """Release everything (end of the run); safe to call twice."""
        self._kept = None


class _FileSink:
    """shm sink (runs in the learner ranks): raw bytes of each bucket into one whole-model file, by ``pwrite``.

    ``partitioned``: under ZeRO-3 every rank writes its own partition of each parameter
    (``put_partitions``, no gather); else rank 0 writes the gathered bucket (``put``).
    """

    def __init__(self, path: str, size: int, partitioned: bool = True) -> None:
        self.path, self.size, self.partitioned = path, size, partitioned

    def _open(self) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(fd).st_size != self.size:
            os.ftruncate(fd, self.size)  # the same size on every rank: a race is harmless
        return fd

    def put(self, bucket: WeightBucket, tensors: dict) -> dict:
        fd = self._open()
        try:
            write_bucket(fd, bucket, tensors, bucket.start)
        finally:
            os.close(fd)
        return {"path": self.path}

    def put_partitions(self, bucket: WeightBucket, parts: dict, rank: int) -> dict:
        fd = self._open()
        try:
            write_partitions(fd, bucket, parts, bucket.start)
        finally:
            os.close(fd)
        return {"path": self.path}


class ShmStrategy(SyncStrategy):
    """``sync.strategy: shm``: one node; whole-model files in /dev/shm, two taking turns (module docs).

    The sink is partitioned: under ZeRO-3 every rank writes its own partitions into the file, no
    gather. Engines reload each bucket from a mapping of the file's pages.
    """

    name = "shm"

    def __init__(self, scratch_dir: str, learners: LearnerGroup, engines: EngineGroup) -> None:
        super().__init__(scratch_dir, learners, engines)
        self._slots = [os.path.join(scratch_dir, "weights-a.bin"), os.path.join(scratch_dir, "weights-b.bin")]

    def sink(self, version: int, buckets: list[WeightBucket]) -> _FileSink:
        kept = self._kept[2][0]["path"] if self._kept else None
        path = self._slots[1] if kept == self._slots[0] else self._slots[0]
        return _FileSink(path, layout_bytes(buckets))

    def load(self, handle: Any, bucket: WeightBucket, descriptor: Any) -> Any:
        return handle.load_weight_bucket.remote(bucket, descriptor["path"])

    def kept_tensors(self) -> dict:
        _, buckets, descriptors = self._kept_or_raise()
        out = {}
        with open(descriptors[0]["path"], "rb") as f:
            for b in buckets:
                f.seek(b.start)
                out.update((n, t.clone()) for n, t in tensor_views(bytearray(f.read(b.nbytes)), b.entries))
        return out


class _StoreSink:
    """object_store sink (runs in learner rank 0): one ``ray.put`` per bucket, a uint8 array per tensor."""

    def put(self, bucket: WeightBucket, tensors: dict) -> dict:
        import ray

        from troupe.core.weights import byte_array

        arrays = [byte_array(tensors[e.name]) for e in bucket.entries]  # views of the parameters: no copy yet
        return {"ref": ray.put(arrays)}  # a nested ref: the driver passes it on without fetching it


class ObjectStoreStrategy(SyncStrategy):
    """``sync.strategy: object_store``: any node; each bucket through the Ray object store (module docs).

    The buckets' refs of the current version are kept (rank 0 owns the objects) until the next
    sync succeeds.
    """

    name = "object_store"

    def sink(self, version: int, buckets: list[WeightBucket]) -> _StoreSink:
        return _StoreSink()

    def load(self, handle: Any, bucket: WeightBucket, descriptor: Any) -> Any:
        return handle.load_weight_bucket.remote(bucket, descriptor["ref"])  # a top-level ref: Ray resolves it

    def kept_tensors(self) -> dict:
        import ray

        _, buckets, descriptors = self._kept_or_raise()
        out = {}
        for b, d in zip(buckets, descriptors):
            for e, a in zip(b.entries, ray.get(d["ref"])):
                [(n, t)] = tensor_views(bytearray(memoryview(a).cast("B")), [dataclasses.replace(e, offset=0)])
                out[n] = t.clone()
        return out


class _NcclSink:
    """vllm_nccl sink (runs in learner rank 0): vLLM's trainer-side NCCL endpoint and packed broadcast."""

    def __init__(self, world_size: int, buffer_bytes: int) -> None:
        self.world_size, self.buffer_bytes = world_size, buffer_bytes
        self._group: Any = None
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def __getstate__(self) -> dict:
        return {"world_size": self.world_size, "buffer_bytes": self.buffer_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["world_size"], state["buffer_bytes"])

    def open(self, rank: int) -> Optional[dict]:
        """Rank 0: start vLLM's trainer endpoint (NCCL rank 0) on a side thread, return its address.

        The engine workers join with ``init_weight_transfer``; the first ``put`` waits for the group.
        """
        if rank != 0:
            return None
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        addr = os.environ.get("MASTER_ADDR", "127.0.0.1")  # rank 0's node (the learner rendezvous)
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        info = {"master_address": addr, "master_port": port, "world_size": self.world_size}

        def connect() -> None:
            try:
                self._group = trainer_init(info, rank=0)
            except BaseException as e:  # surfaced by the next put
                self._error = e

        self._thread = threading.Thread(target=connect, name="troupe-vllm-nccl-init", daemon=True)
        self._thread.start()
        return {"master_address": addr, "master_port": port}

    def put(self, bucket: WeightBucket, tensors: dict) -> None:
        import torch
        from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None or self._group is None:
            raise RuntimeError(f"vllm_nccl: the NCCL group with the engines did not form: {self._error}")
        packed_nccl_broadcast_producer(iterator=iter([(e.name, tensors[e.name]) for e in bucket.entries]),
                                       group=self._group, src=0, post_iter_func=lambda item: item[1],
                                       buffer_size_bytes=self.buffer_bytes, num_buffers=2)
        torch.cuda.current_stream().synchronize()  # the gathered parameters are released after put returns
        return None

    def close(self) -> None:
        if self._group is not None:
            self._group.destroy()
            self._group = None


class VllmNcclStrategy(SyncStrategy):
    """``sync.strategy: vllm_nccl``: GPU engines, vLLM's NCCL weight-transfer API (module docs).

    Untested in this repository (no GPU here); written against vLLM 0.32's
    ``vllm/distributed/weight_transfer/nccl_engine.py`` (packed broadcast, buffers of one bucket
    up to 1 GiB, two of them on each side). The engines must run on GPUs (``RolloutEngine`` starts
    them with ``weight_transfer_config`` backend "nccl" there). Keeps no copy of the weights:
    :meth:`restore` raises, so an engine death stops the run.
    """

    name = "vllm_nccl"
    transfer = "vllm_nccl"
    needs_descriptor = False

    def __init__(self, scratch_dir: str, learners: LearnerGroup, engines: EngineGroup) -> None:
        super().__init__(scratch_dir, learners, engines)
        self._ready = False

    def begin(self, version: int, buckets: list[WeightBucket]) -> None:
        if self._ready:
            return
        from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo, worker_init_payload

        from troupe.core.rpc import wait_all

        t = self.timeout_s  # the group forms within the sync's deadline (an NCCL rendezvous has none of its own)
        handles = self.engines.handles
        names = [f"engine {i}" for i in range(len(handles))]
        workers = [int(r.get("workers", 1)) for r in wait_all([h.ready.remote() for h in handles], names, "ready", t)]
        buffer_bytes = min(max(b.nbytes for b in buckets), 1 << 30)
        endpoint = self.learners.open_weight_sink(_NcclSink(1 + sum(workers), buffer_bytes))[0]
        refs, offset = [], 1
        for h, w in zip(handles, workers):
            info = NCCLWeightTransferInitInfo(master_address=endpoint["master_address"],
                                              master_port=endpoint["master_port"], rank_offset=offset,
                                              world_size=1 + sum(workers), packed=True,
                                              packed_buffer_size_bytes=buffer_bytes, packed_num_buffers=2)
            refs.append(h.init_weight_transfer.remote(worker_init_payload(info)))
            offset += w
        wait_all(refs, names, "init_weight_transfer (vllm_nccl)", t, key="sync.timeout_s")
        self._ready = True

    def sink(self, version: int, buckets: list[WeightBucket]) -> Any:
        raise NotImplementedError("vllm_nccl opens its sink once, in begin()")

    def load(self, handle: Any, bucket: WeightBucket, descriptor: Any) -> Any:
        return handle.receive_weight_bucket.remote(bucket)

    def keep(self, version: int, buckets: list[WeightBucket], descriptors: list[Any]) -> None:
        self._kept = None

    def restore(self, handle: Any) -> Any:
        raise RuntimeError("sync.strategy vllm_nccl keeps no copy of the weights: a replaced engine cannot be "
                           "brought to the current version (use shm or object_store to survive engine deaths)")

    def close(self) -> None:
        """Tear down the NCCL group on learner rank 0 (``close_weight_sink``), if it was set up."""
        super().close()
        if self._ready:
            self._ready = False
            try:
                self.learners.close_weight_sink()
            except Exception:  # the ranks may be gone already (a failed run)
                pass


def strategy_class(name: str) -> type[SyncStrategy]:
    """The :class:`SyncStrategy` subclass for ``sync.strategy`` ``name``: a subclass's ``name``, or
    "package.module:Class" (imported here).

    Raises ``ValueError`` naming ``sync.strategy`` for an unknown name or a class that is not a
    ``SyncStrategy``.
    """
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"sync.strategy {name!r}: cannot load it ({e})") from e
        if not (isinstance(cls, type) and issubclass(cls, SyncStrategy)):
            raise ValueError(f"sync.strategy {name!r} is not a troupe.cluster.weight_sync.SyncStrategy subclass")
        return cls
    found, todo = {}, list(SyncStrategy.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.name:
            found[cls.name] = cls
    if name not in found:
        raise ValueError(f"sync.strategy {name!r}: unknown (known: auto, {', '.join(sorted(found))}, or "
                         "'package.module:Class')")
    return found[name]


SHM_DIR = "/dev/shm"


def resolve_auto_strategy(single_node: bool, model_bytes: int, shm_free_bytes: Optional[int]) -> tuple[str, str]:
    """``sync.strategy: auto`` -> (strategy, reason). ``shm`` needs one node and room in /dev/shm for the two
    whole-model files it alternates between, plus 10% (a Docker container's default /dev/shm is 64 MB: the
    first sync would fail with ENOSPC); otherwise ``object_store``. ``shm_free_bytes`` None: no /dev/shm.
    Pure (tests/test_gpu_path_cpu.py)."""
    if not single_node:
        return "object_store", "actors on more than one node"
    need = int(2.2 * model_bytes)
    if shm_free_bytes is None:
        return "object_store", "no /dev/shm on this node"
    if shm_free_bytes < need:
        return "object_store", (f"/dev/shm has {shm_free_bytes / 2**20:.0f} MiB free, the shm strategy needs "
                                f"{need / 2**20:.0f} MiB (two model-sized files + 10%)")
    return "shm", "one node, room in /dev/shm"


def sweep_orphan_sync_dirs(base: str) -> list[str]:
    """Remove the ``troupe-sync-<pid>-*`` folders under ``base`` whose driver process is gone; returns them.

    A driver killed with SIGKILL (the OOM killer does that) cannot remove its sync folder, which holds two
    model-sized weight files in /dev/shm. The folder name carries the driver's pid; a folder whose pid no
    longer exists on this host is an orphan. (A pid reused by another process keeps its folder: the sweep
    only ever removes too little.) Folders of the older ``troupe-sync-<random>`` form are left alone."""
    removed = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        parts = name.split("-")
        if len(parts) < 4 or parts[:2] != ["troupe", "sync"] or not parts[2].isdigit():
            continue
        try:
            os.kill(int(parts[2]), 0)
            continue  # alive (or another user's: PermissionError below)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(os.path.join(base, name), ignore_errors=True)
        removed.append(name)
    return removed


class WeightSync:
    """Moves the learner's weights into every engine bucket by bucket, and keeps them for engine replacements.

    Args:
        learners: the ``LearnerGroup`` (the sender).
        engines: the ``EngineGroup`` (the receivers).
        strategy: a ``sync.strategy`` value: "auto" ("shm" on one node, else "object_store"), "shm",
            "object_store", "vllm_nccl", another :class:`SyncStrategy` subclass's ``name`` or
            "package.module:Class".
        single_node: whether all actors share a node (decides "auto").
        bucket_mb: ``sync.bucket_mb``, the bucket size in MiB (a decoder layer larger than that
            is a bucket of its own).
        timeout_s: ``sync.timeout_s``, the deadline of every wait inside a sync (learner sends, engine
            loads, the vllm_nccl group forming); None: the groups' ``rpc_timeout_s``.
    Raises:
        ValueError: unknown strategy, ``bucket_mb`` or ``timeout_s`` <= 0, naming the config key.
    """

    def __init__(self, learners: LearnerGroup, engines: EngineGroup, strategy: str, single_node: bool,
                 bucket_mb: float = 256.0, timeout_s: Optional[float] = None) -> None:
        if not bucket_mb > 0:
            raise ValueError(f"sync.bucket_mb must be > 0, got {bucket_mb}")
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"sync.timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.bucket_bytes = max(1, int(bucket_mb * 2**20))
        self.learners, self.engines = learners, engines
        self._buckets: Optional[list[WeightBucket]] = None
        if strategy == "auto":
            free = shutil.disk_usage(SHM_DIR).free if os.path.isdir(SHM_DIR) else None
            strategy, why = resolve_auto_strategy(single_node, layout_bytes(self.buckets()), free)
            logger.info("sync.strategy auto -> %s (%s)", strategy, why)
        cls = strategy_class(strategy)
        self.strategy_name = cls.name or strategy
        base = SHM_DIR if os.path.isdir(SHM_DIR) else None
        if base is not None:
            for name in sweep_orphan_sync_dirs(base):
                logger.info("removed %s/%s: the sync folder of a driver that is gone (killed?)", base, name)
        self.dir = tempfile.mkdtemp(prefix=f"troupe-sync-{os.getpid()}-", dir=base)
        self.strategy = cls(self.dir, learners, engines)
        self.strategy.timeout_s = timeout_s if timeout_s is not None else learners.rpc_timeout_s

    def buckets(self) -> list[WeightBucket]:
        """The bucket layout (asked of learner rank 0 once, then cached)."""
        if self._buckets is None:
            self._buckets = self.learners.weight_buckets(self.bucket_bytes)
        return self._buckets

    def sync(self, version: int) -> dict:
        """Push the current policy as ``version`` to all engines, bucket by bucket.

        Returns {"sync_seconds", "sync_send_seconds" (until rank 0 had put the last bucket),
        "sync_rank0_seconds" (rank 0 inside its bucket calls: gather + put + release),
        "sync_put_seconds" (rank 0 inside the sink's put),
        "sync_engine_load_seconds" (the slowest engine's time inside its bucket loads),
        "sync_buckets", "sync_bytes", "sync_held_mb" (most whole-parameter MiB a rank held during
        a gather), "policy_version", "sync_strategy"}.

        Raises ``RuntimeError`` if an engine reports a different version afterwards, and the groups'
        errors (``ActorFailed``, ``RemoteTimeout``); on failure the previous version's data stay the
        engines' replacement source.
        """
        t0 = time.time()
        buckets = self.buckets()
        st = self.strategy
        descriptors: list[Any] = []
        facts = {"send": 0.0, "held": 0, "rank0": 0.0, "put": 0.0}

        def calls() -> Iterator[Callable[[Any], Any]]:
            yield lambda h: h.begin_weights.remote(version, len(buckets), st.transfer)
            if not st.needs_descriptor:  # the engines receive by collective: they must be waiting already
                for b in buckets:
                    yield lambda h, b=b: st.load(h, b, None)
            for b, out in zip(buckets, self.learners.send_weight_buckets(len(buckets), self.bucket_bytes, self.timeout_s)):
                descriptors.append(out["descriptor"])
                facts["held"] = max(facts["held"], out["held_bytes"])
                facts["rank0"] += out["seconds"]
                facts["put"] += out["put_seconds"]
                if st.needs_descriptor:
                    yield lambda h, b=b, d=out["descriptor"]: st.load(h, b, d)
            facts["send"] = time.time() - t0
            yield lambda h: h.finish_weights.remote(version)

        try:
            st.begin(version, buckets)
            results = self.engines.load_weight_stream(version, calls(), _restore_new(st, version, buckets, descriptors),
                                                      self.timeout_s)
        except BaseException:
            st.discard(version, buckets, descriptors)
            raise
        st.keep(version, buckets, descriptors)
        self.engines.set_weights_source(version, st.restore)
        return {"sync_seconds": time.time() - t0, "sync_send_seconds": facts["send"],
                "sync_rank0_seconds": facts["rank0"], "sync_put_seconds": facts["put"],
                "sync_engine_load_seconds": max(r.get("load_seconds", 0.0) for r in results),
                "sync_buckets": len(buckets), "sync_bytes": layout_bytes(buckets),
                "sync_held_mb": facts["held"] / 2**20, "policy_version": version, "sync_strategy": self.strategy_name}

    def close(self) -> None:
        """Drop the kept weights (the strategy's ``close``) and the scratch folder; safe to call twice.
        Waits on no actor (the shm and object-store sinks left on the ranks hold nothing)."""
        self.strategy.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _restore_new(st: SyncStrategy, version: int, buckets: list[WeightBucket], descriptors: list[Any]):
    """The reload of an engine replaced during the sync of ``version``: every bucket of the new version
    (complete by the time the engine group calls it)."""

    def reload(handle: Any) -> Any:
        if not st.needs_descriptor:
            return st.restore(handle)  # raises: such a strategy keeps nothing
        handle.begin_weights.remote(version, len(buckets), st.transfer)
        for b, d in zip(buckets, descriptors):
            st.load(handle, b, d)
        return handle.finish_weights.remote(version)

    return reload
