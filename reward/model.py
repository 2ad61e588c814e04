"""A trained reward model as a reward function: load once, score prompt + response texts in batches.

:class:`RewardModelScorer` has the reward-function signature (``troupe.reward.registry``), so the
reward workers run it like any rule function (same timeouts, failure counts, ``on_failure`` and
worker replacement: ``troupe.reward.pool``); ``troupe rm serve`` (``troupe.reward.server``) and
``troupe score`` use the same class. The text scored is
``troupe.core.reward_model.reward_text(prompt_text, completion, eos)``: the templated prompt the
policy saw (the ``prompt_texts`` keyword the reward workers pass), not the raw question.
"""

from __future__ import annotations

import threading
from typing import Any, Optional, Sequence

__all__ = ["RewardModelScorer"]


class RewardModelScorer:
    """Scores texts with a reward-model folder (``troupe rm train`` output, or any HF
    ``*ForSequenceClassification`` with num_labels=1).

    Args:
        path: the model folder (config, weights, tokenizer; optional ``reward_stats.json``).
        batch_size: sequences per forward.
        normalize: return ``(r - mean) / std`` with the folder's stats (no stats file: raw values,
            and ``normalized`` is False).
        max_length: texts keep their last this many tokens.
        device: ``"cpu"``, ``"cuda"`` or a torch device string.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
    Attributes:
        stats: the folder's ``{"mean", "std", "count"}`` or None; normalized: whether scores are.
    Raises:
        ValueError: the folder cannot be loaded as a reward model (names it).
    """

    def __init__(self, path: str, *, batch_size: int = 16, normalize: bool = True, max_length: int = 1024,
                 device: str = "cpu", dtype: str = "float32") -> None:
        import torch
        from transformers import AutoTokenizer

        from troupe.core.reward_model import load_reward_model, read_stats

        self.path, self.batch_size, self.max_length = path, int(batch_size), int(max_length)
        self.device = torch.device(device)
        self.model = load_reward_model(path, getattr(torch, dtype)).to(self.device).eval()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"reward model {path!r}: cannot load its tokenizer: {e}") from e
        self.stats = read_stats(path)
        self.normalized = bool(normalize and self.stats)
        self._lock = threading.Lock()  # a timed-out call may still run in its thread: one forward at a time

    def score_texts(self, texts: Sequence[str]) -> list[float]:
        """Rewards of full texts (prompt + response + EOS, ``reward_text``), [N] floats.

        Raises:
            ValueError: an empty text.
        """
        import torch

        from troupe.core.reward_model import encode_texts, sequence_rewards

        out: list[float] = []
        with self._lock, torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                ids, mask = encode_texts(self.tokenizer, texts[i:i + self.batch_size], self.max_length)
                out += sequence_rewards(self.model, ids.to(self.device), mask.to(self.device)).cpu().tolist()
        if self.normalized:
            mean, std = self.stats["mean"], max(self.stats["std"], 1e-6)
            out = [(r - mean) / std for r in out]
        return out

    def texts(self, prompt_texts: Sequence[str], completions: Sequence[Any]) -> list[str]:
        """``reward_text`` of each (prompt text, completion); a TRL conversational completion
        (list of messages) contributes its last message's content."""
        from troupe.core.reward_model import reward_text
        from troupe.reward.registry import completion_text

        eos = self.tokenizer.eos_token
        return [reward_text(str(p), completion_text(c), eos) for p, c in zip(prompt_texts, completions)]

    def __call__(self, prompts: Sequence[str], completions: Sequence[Any], *,
                 prompt_texts: Optional[Sequence[str]] = None, **columns: Any) -> list[float]:
        """Reward-function form: one score per completion.

        Args:
            prompts: [N] raw questions (used only when ``prompt_texts`` is not given).
            completions: [N] generated texts.
            prompt_texts: [N] the templated prompts the policy saw (the reward workers pass them).
        Returns:
            [N] rewards (normalised when ``normalized``).
        """
        return self.score_texts(self.texts(prompt_texts if prompt_texts is not None else prompts, completions))

    def __repr__(self) -> str:
        return f"RewardModelScorer({self.path!r}, normalized={self.normalized})"
