#!/usr/bin/env bash
# The reward-model demo (docs/results.md, "GRPO on a learned reward model only"): GRPO whose only reward is a learned reward model.
#   1. cold-start SFT policy (the demo's, no GRPO steps)
#   2. preference pairs from its own samples: verifier-correct chosen, incorrect rejected, same prompt
#   3. a Bradley-Terry reward model on those pairs (held-out pairwise accuracy per epoch)
#   4. GRPO with the reward model as the only reward; the verifier is logged with weight 0
set -euo pipefail
cd "$(dirname "$0")/.."
T=.venv/bin/troupe
PROMPTS=${PROMPTS:-2048}
[ -f runs/arith_sft/checkpoints/sft/config.json ] || $T train configs/arith_cpu.yaml name=arith_sft steps=0
[ -f runs/rm_arith_pairs.jsonl ] || $T rm pairs configs/arith_cpu.yaml --model runs/arith_sft/checkpoints/sft \
    --out runs/rm_arith_pairs.jsonl --prompts "$PROMPTS" --n 8 --pairs-per-prompt 2
[ -f runs/rm_arith/model/config.json ] || $T rm train configs/rm_arith_cpu.yaml
$T train configs/arith_rm_cpu.yaml "$@"
