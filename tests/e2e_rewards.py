"""A graded reward for end-to-end tests: every group has reward variance, so every variant trains."""


def length_reward(prompts, completions, **kwargs):
    """Reward = response length in characters / 100 (TRL reward-function signature)."""
    return [len(c) / 100.0 for c in completions]
