"""The GPU path's pieces that a CPU can check (issue 26): the vLLM arguments of an engine with tensor
parallelism, the optimizer chosen per device, and the schema's refusal of GPU fractions that cannot work.
What only a GPU can show is listed as untested in docs/gpu.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from troupe.configs.schema import ConfigError, RolloutConfig, load_config
from troupe.learner.zero import _ds_config
from troupe.rollout.engine import engine_core_in_process, engine_kwargs

REPO = Path(__file__).resolve().parents[1]
GPU = ["device=gpu", "learner.num_gpus_per_rank=1"]


def test_engine_kwargs_cpu_prefills_whole_prompts_and_has_no_gpu_arguments():
    kw = engine_kwargs("m", RolloutConfig(), dtype="float32", seed=3, device="cpu")
    assert kw["enable_chunked_prefill"] is False and kw["seed"] == 3
    assert "tensor_parallel_size" not in kw and "distributed_executor_backend" not in kw


@pytest.mark.parametrize("gpus,backend", [(1, None), (2, "mp"), (4, "mp")])
def test_engine_kwargs_gpu_tensor_parallel_uses_the_multiprocessing_executor(gpus, backend):
    """TP > 1: vLLM's mp executor inside the engine actor (its Ray executor refuses a multi-GPU bundle)."""
    kw = engine_kwargs("m", RolloutConfig(num_gpus_per_engine=gpus, gpu_memory_utilization=0.8), dtype="bfloat16",
                       seed=0, device="gpu")
    assert kw["tensor_parallel_size"] == gpus and kw.get("distributed_executor_backend") == backend
    assert kw["weight_transfer_config"] == {"backend": "nccl"} and kw["gpu_memory_utilization"] == 0.8
    assert "enable_chunked_prefill" not in kw


@pytest.mark.parametrize("setting,device,in_process", [
    ("auto", "cpu", True), ("auto", "gpu", False), ("subprocess", "cpu", False), ("in_process", "gpu", True)])
def test_engine_core_runs_in_the_actor_on_cpu_and_in_vllms_processes_on_gpu(setting, device, in_process):
    assert engine_core_in_process(RolloutConfig(engine_core=setting), device) is in_process


def test_optimizer_is_torch_adamw_on_gpu_and_deepspeeds_on_cpu():
    """No nvcc JIT build of FusedAdam on GPU ranks: DeepSpeed's ``torch_adam`` takes torch.optim.AdamW."""
    common = dict(zero_stage=3, micro=2, gas=1, world=2, lr=1e-6, weight_decay=0.0, betas=(0.9, 0.99), grad_clip=1.0,
                  dtype="bfloat16")
    gpu, cpu = _ds_config(**common, device="gpu"), _ds_config(**common, device="cpu")
    assert gpu["optimizer"]["params"]["torch_adam"] is True and gpu["bf16"] == {"enabled": True}
    assert "torch_adam" not in cpu["optimizer"]["params"]
    assert {k: v for k, v in gpu["optimizer"]["params"].items() if k != "torch_adam"} == cpu["optimizer"]["params"]


@pytest.mark.parametrize("override,field", [("rollout.num_gpus_per_engine=0.5", "rollout.num_gpus_per_engine"),
                                            ("rollout.num_gpus_per_engine=1.5", "rollout.num_gpus_per_engine"),
                                            ("learner.num_gpus_per_rank=0.5", "learner.num_gpus_per_rank"),
                                            ("learner.num_gpus_per_rank=2", "learner.num_gpus_per_rank")])
def test_gpu_fractions_that_cannot_work_are_refused_by_name(override, field):
    base = ["rollout.num_gpus_per_engine=1", *GPU]
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs" / "arith_cpu.yaml", [*base, override])
    assert field in str(e.value)


def test_whole_gpus_are_accepted():
    cfg = load_config(REPO / "configs" / "arith_cpu.yaml", ["rollout.num_gpus_per_engine=2", *GPU])
    assert cfg.rollout.num_gpus_per_engine == 2 and cfg.learner.num_gpus_per_rank == 1


def test_auto_sync_strategy_falls_back_to_the_object_store_when_dev_shm_is_small():
    """Docker's default /dev/shm is 64 MB: a 1.5B bf16 model (3 GB) would fail the first shm sync with ENOSPC."""
    from troupe.cluster.weight_sync import resolve_auto_strategy

    model = 3 * 2**30
    assert resolve_auto_strategy(True, model, 64 * 2**20)[0] == "object_store"
    assert "64 MiB free" in resolve_auto_strategy(True, model, 64 * 2**20)[1]
    assert resolve_auto_strategy(True, model, 2 * model)[0] == "object_store"  # two files + 10% do not fit
    assert resolve_auto_strategy(True, model, 3 * model)[0] == "shm"
    assert resolve_auto_strategy(False, model, 100 * model)[0] == "object_store"  # several nodes
    assert resolve_auto_strategy(True, model, None)[0] == "object_store"  # no /dev/shm


def test_sync_folders_of_dead_drivers_are_swept(tmp_path):
    """A driver killed with SIGKILL leaves troupe-sync-<pid>-*: the next run removes it (the pid is gone), and
    keeps a live driver's folder and anything not named like one."""
    import os
    import subprocess
    import sys

    from troupe.cluster.weight_sync import sweep_orphan_sync_dirs

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for name in (f"troupe-sync-{gone.pid}-abc", f"troupe-sync-{os.getpid()}-def", "troupe-sync-xyz12", "other-1-2-3"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "w.bin").write_bytes(b"x" * 16)
    assert sweep_orphan_sync_dirs(str(tmp_path)) == [f"troupe-sync-{gone.pid}-abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"troupe-sync-{os.getpid()}-def", "troupe-sync-xyz12", "other-1-2-3"])
    assert sweep_orphan_sync_dirs(str(tmp_path / "missing")) == []
