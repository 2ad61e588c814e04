"""Reward models: the scalar head at the last real token, the text scored, the folder format.

The model is shared by the trainer (``troupe.learner.rm_rank``) and the scorers (:class:`RewardModelScorer`,
the reward server), so both read a sequence the same way.

Choices, stated once (every peer differs a little; this is what troupe does and why):

* **Model.** An HF ``AutoModelForSequenceClassification`` with ``num_labels=1`` on a causal-LM
  backbone (OpenRLHF's and TRL's convention), so transformers and vLLM load the folder as is.
  A causal-LM folder is turned into one by loading it with that class: the backbone weights are
  kept, the head ``score`` (hidden -> 1, no bias) is new, initialised N(0, 1/(hidden+1)) as
  OpenRLHF does, seeded.
* **Where the head reads.** The head's value at the last non-padding token of each row, found from
  the attention mask (not from ``pad_token_id``, which equals EOS in many tokenizers), with position
  ids from the mask (cumsum - 1), so a row's reward does not depend on left or right padding
  (:func:`sequence_rewards`).
* **Text.** What the policy saw and said: ``prompt_text + response + eos_token``
  (:func:`reward_text`): the templated prompt (chat template or raw format applied), not the raw
  question; EOS appended as OpenRLHF does, so the last token is the same kind of token for every
  row. Longer texts keep their last ``max_length`` tokens (the end of the response matters most).
* **Loss.** ``-log sigmoid(r_chosen - r_rejected - margin)`` averaged over pairs
  (``troupe.learner.reward_model.bradley_terry_loss``).
* **Normalisation.** The folder stores the mean and std of the rewards of the training texts
  (chosen and rejected) in ``reward_stats.json``; a scorer with ``normalize`` returns
  ``(r - mean) / std`` (OpenRLHF's ``normalize_reward``).

**Scoring.** :class:`RewardModelScorer` is a trained reward model as a reward function (load once, score
prompt + response texts in batches). It has the reward-function signature (``troupe.reward.registry``), so the
reward workers run it like any rule function (same timeouts, failure counts, ``on_failure`` and
worker replacement: ``troupe.reward.pool``); ``troupe rm serve`` (``troupe.reward.server``) and
``troupe score`` use the same class. The text scored is
:func:`reward_text` ``(prompt_text, completion, eos)``: the templated prompt the
policy saw (the ``prompt_texts`` keyword the reward workers pass), not the raw question.

This module imports torch (and transformers when loading), not Ray.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

__all__ = [
    "STATS_FILE",
    "RewardModelScorer",
    "encode_texts",
    "last_token_index",
    "load_reward_model",
    "read_stats",
    "reward_text",
    "save_reward_model",
    "sequence_rewards",
]

STATS_FILE = "reward_stats.json"
"""File in a reward-model folder with ``{"mean", "std", "count"}`` of its training rewards."""


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding position of each row.

    Args:
        attention_mask: [B, T] 0/1, left or right padded (or neither); every row has a 1.
    Returns:
        [B] long: ``T - 1 - argmax(flip(mask))``.
    Raises:
        ValueError: a row has no 1.
    """
    mask = attention_mask.long()
    if bool((mask.sum(-1) == 0).any()):
        raise ValueError("last_token_index: a row of the attention mask has no token")
    T = mask.shape[-1]
    return T - 1 - mask.flip(-1).argmax(-1)


def sequence_rewards(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The scalar head's value at each row's last real token.

    Runs the backbone (``model.base_model_prefix``) with position ids ``cumsum(mask) - 1`` (so left
    padding does not shift positions), applies ``model.score`` to every position and reads
    :func:`last_token_index`.

    Args:
        model: an HF ``*ForSequenceClassification`` with a ``score`` head (num_labels=1).
        input_ids: [B, T] token ids.
        attention_mask: [B, T] 0/1.
    Returns:
        [B] float32 rewards (with grad when the model has it).
    Raises:
        ValueError: the model has no ``score`` head or more than one label.
    """
    head = getattr(model, "score", None)
    if head is None or getattr(model.config, "num_labels", 1) != 1:
        raise ValueError(f"{type(model).__name__}: expected a sequence-classification model with a `score` head "
                         "and num_labels=1")
    backbone = getattr(model, model.base_model_prefix)
    mask = attention_mask.long()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    hidden = backbone(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).last_hidden_state
    values = head(hidden).squeeze(-1)  # [B, T]
    idx = last_token_index(mask).to(values.device)
    return values.gather(1, idx[:, None]).squeeze(1).float()


def reward_text(prompt_text: str, response: str, eos_token: Optional[str]) -> str:
    """The text a reward model scores: templated prompt + response + EOS (module docstring)."""
    return f"{prompt_text}{response}{eos_token or ''}"


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize texts (no special tokens added: :func:`reward_text` has them) and right-pad.

    Texts longer than ``max_length`` tokens keep their last ``max_length`` tokens.

    Returns:
        (input_ids [B, T] long, attention_mask [B, T] long), T = the longest kept length.
    Raises:
        ValueError: the tokenizer has no pad token and no EOS token, or a text is empty.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("encode_texts: the tokenizer has neither a pad nor an EOS token")
    rows = [ids[-max_length:] for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    if any(not r for r in rows):
        raise ValueError("encode_texts: an empty text has no token to score")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def load_reward_model(path: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> Any:
    """An ``AutoModelForSequenceClassification`` (num_labels=1) from a reward-model or causal-LM folder.

    A causal-LM folder gets a new head (module docstring: N(0, 1/(hidden+1)), seeded by ``seed``);
    ``config.pad_token_id`` is set from the tokenizer's config when missing.

    Raises:
        ValueError: naming ``path`` when transformers cannot load it, or a reward-model folder has
            ``num_labels`` other than 1.
    """
    import transformers
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError/ValueError/KeyError variously
        raise ValueError(f"reward model {path!r}: cannot read its config: {e}") from e
    is_rm = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    if is_rm and config.num_labels != 1:
        raise ValueError(f"reward model {path!r}: num_labels = {config.num_labels}, expected 1")
    config.num_labels = 1
    if config.pad_token_id is None:
        config.pad_token_id = config.eos_token_id if isinstance(config.eos_token_id, int) else 0
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "some weights newly initialized": expected for a new head
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, config=config, dtype=dtype)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"reward model {path!r}: cannot load it as AutoModelForSequenceClassification: {e}") from e
    finally:
        transformers.logging.set_verbosity(verbosity)
    if not is_rm:
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(model.score.weight.shape, generator=gen) / math.sqrt(config.hidden_size + 1)
        with torch.no_grad():
            model.score.weight.copy_(w.to(model.score.weight.dtype))
    return model


def save_reward_model(model: Any, out_dir: str, tokenizer_dir: str, stats: Optional[dict] = None,
                      state_dict: Optional[dict] = None) -> str:
    """Write an HF reward-model folder: config (num_labels=1), safetensors, tokenizer, ``reward_stats.json``.

    Args:
        model: the (un-sharded) sequence-classification module (its config is written).
        out_dir: target folder (created).
        tokenizer_dir: folder whose tokenizer is copied.
        stats: ``{"mean", "std", "count"}`` of the training rewards, or None.
        state_dict: full weights when ``model``'s own are sharded (ZeRO-3).
    Returns:
        ``out_dir``.
    """
    from transformers import AutoTokenizer

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    if stats is not None:
        (Path(out_dir) / STATS_FILE).write_text(json.dumps(stats, indent=1) + "\n")
    return out_dir


def read_stats(path: str) -> Optional[dict]:
    """``{"mean", "std", "count"}`` from a reward-model folder, or None when it has no stats file.

    Raises:
        ValueError: the stats file is not valid JSON or lacks mean/std (names the file).
    """
    f = Path(path) / STATS_FILE
    if not f.exists():
        return None
    try:
        stats = json.loads(f.read_text())
        return {"mean": float(stats["mean"]), "std": float(stats["std"]), "count": int(stats.get("count", 0))}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{f}: not a reward-stats file ({e})") from e


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
