"""learner/zero.py ``replay_adam_step_product``: a resumed DeepSpeed Adam continues bit for bit.

DeepSpeed's CPU Adam kernel keeps beta^t in a process-wide C++ object, built by multiplication
step after step; a fresh process resumed at step t+1 recomputes it with ``pow`` instead, and the
update differs in the last bits. Each phase runs in its own process (the kernel state is
process-wide, so a same-process test could not see the difference).
"""

from __future__ import annotations

import subprocess
import sys

PHASE = r'''
import hashlib, sys, torch
from troupe.core.ds_ops import use_venv_extensions_dir
use_venv_extensions_dir()
from deepspeed.ops.adam import FusedAdam
from troupe.learner.zero import replay_adam_step_product
mode, ck, k, total = sys.argv[1], sys.argv[2], 5, 9
torch.manual_seed(0)
grads = [torch.randn(4096) for _ in range(total)]
p = torch.nn.Parameter(torch.randn(4096))
opt = FusedAdam([p], lr=1e-3, betas=(0.9, 0.98), adam_w_mode=True, weight_decay=0.01)
replayed = None
if mode in ("resume", "replay"):
    state = torch.load(ck)
    p.data.copy_(state["p"])
    opt.load_state_dict(state["opt"])
    replayed = replay_adam_step_product(opt) if mode == "replay" else 0
for i in range(k if mode in ("resume", "replay") else 0, k if mode == "first" else total):
    p.grad = grads[i].clone()
    opt.step()
if mode == "first":
    torch.save({"p": p.data, "opt": opt.state_dict()}, ck)
print("RESULT", replayed, hashlib.sha256(p.data.numpy().tobytes()).hexdigest())
'''


def _phase(mode: str, ck) -> tuple[str, str]:
    out = subprocess.run([sys.executable, "-c", PHASE, mode, str(ck)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")][-1]
    _, replayed, digest = line.split()
    return replayed, digest


def test_resumed_fused_adam_repeats_the_uninterrupted_updates_bit_for_bit(tmp_path):
    ck = tmp_path / "adam.pt"
    _, whole = _phase("whole", ck)  # 9 steps in one process
    _phase("first", ck)  # 5 steps, then the state is saved
    replayed, resumed = _phase("replay", ck)  # a fresh process: load, replay, 4 more steps
    assert replayed == "5"
    assert resumed == whole
    # Without the replay the same resume differs (the cause this guards against): if a DeepSpeed
    # upgrade makes this equal, the kernel no longer keeps the product and the replay can go.
    _, plain = _phase("resume", ck)
    assert plain != whole


def test_replay_is_a_no_op_for_torch_adamw():
    import torch

    from troupe.learner.zero import replay_adam_step_product

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones(3)
    opt.step()
    assert replay_adam_step_product(opt) == 0
