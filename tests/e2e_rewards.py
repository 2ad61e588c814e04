"""A graded reward for end-to-end tests: every group has reward variance, so every variant trains.

``E2E_REWARD_DELAY_S`` (seconds, default 0) in the reward workers' environment makes every call wait
that long first: a fault test that kills a process "after step 2" paces the run it kills with it, so the
run cannot finish its remaining steps (0.3 s each on this machine) before the kill lands. The rewards
themselves do not change.
"""

import os
import time


def length_reward(prompts, completions, **kwargs):
    """Reward = response length in characters / 100 (TRL reward-function signature)."""
    time.sleep(float(os.environ.get("E2E_REWARD_DELAY_S", "0")))
    return [len(c) / 100.0 for c in completions]
