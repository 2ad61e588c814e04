"""Reasoning steps of a completion, for process supervision (DeepSeekMath arXiv 2402.03300, 4.1.3).

A completion is cut into steps at ``reward.step_delimiter`` (``"\\n"`` by default, TRL's
``PRMTrainer`` ``step_separator``; the arithmetic demo uses ``","`` between its column sums).
The same cut is made in two places, which is why it lives here, in one function:

* the reward worker hands the step texts to process reward functions (``steps=`` keyword) and
  gets one score per step back;
* the engine maps each step to the index of its last response token, so the learner can give
  token t the sum of the normalised rewards of the steps that end at or after t.

Rules of the cut (``split_steps``):

* ``text.split(delimiter)``; the delimiter belongs to the step it ends (so the token that
  carries it is that step's last token);
* whitespace-only pieces are not steps (``"a\\n\\nb"`` has two steps);
* a completion always has at least one step: an empty or all-whitespace completion is one
  empty step, so every sample with tokens gets a reward;
* the last step ends at the last response token (EOS included), so no token is left without
  credit (``step_token_ends``).

Imports nothing outside the standard library at module level (no torch, ray or vllm);
``decoded_prefix_lengths`` imports ``tokenizers`` when it is called.
"""

from __future__ import annotations

from typing import Callable

__all__ = ["decoded_prefix_lengths", "split_steps", "step_texts", "step_token_ends"]


def split_steps(text: str, delimiter: str) -> list[tuple[str, int]]:
    """Cut ``text`` into reasoning steps.

    Args:
        text: the decoded completion.
        delimiter: non-empty step separator.
    Returns:
        ``[(step_text, char_end), ...]``, at least one entry; ``step_text`` is the piece without
        its delimiter, ``char_end`` the exclusive end offset in ``text`` of the step including
        its delimiter (non-decreasing, the last one may be < len(text) when whitespace trails).
    Raises:
        ValueError: empty delimiter.
    """
    if not isinstance(delimiter, str) or not delimiter:
        raise ValueError("step delimiter must be a non-empty string")
    steps: list[tuple[str, int]] = []
    pos = 0
    pieces = text.split(delimiter)
    for k, piece in enumerate(pieces):
        end = pos + len(piece) + (len(delimiter) if k < len(pieces) - 1 else 0)
        if piece.strip():
            steps.append((piece, end))
        pos = end
    return steps or [(text, len(text))]


def step_texts(text: str, delimiter: str) -> list[str]:
    """The step texts of ``split_steps(text, delimiter)`` (what process reward functions get)."""
    return [t for t, _ in split_steps(text, delimiter)]


def step_token_ends(decoded_len: Callable[[int], int], num_tokens: int, char_ends: list[int]) -> list[int]:
    """Index of the last response token of each step.

    Step j ends at the first token t whose decoded prefix ``ids[:t+1]`` is at least
    ``char_ends[j]`` characters long (the token that completes the step's delimiter); the last
    step always ends at ``num_tokens - 1``. Found by binary search, O(steps * log T) calls of
    ``decoded_len``.

    Args:
        decoded_len: k -> length of the decoded text of the first k response tokens (the
            engine's tokenizer, ``skip_special_tokens=True`` as vLLM decodes), non-decreasing
            in k; ``decoded_prefix_lengths(...).__getitem__``.
        num_tokens: R >= 1, response tokens of the sample.
        char_ends: ``[c for _, c in split_steps(text, delimiter)]``.
    Returns:
        ``[S]`` ints in [0, R), non-decreasing, last = R - 1.
    Raises:
        ValueError: num_tokens < 1 or no steps.
    """
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    if not char_ends:
        raise ValueError("char_ends is empty: split_steps always returns at least one step")
    out: list[int] = []
    lo_bound = 0
    for c in char_ends[:-1]:
        lo, hi = lo_bound, num_tokens - 1
        while lo < hi:  # smallest t in [lo_bound, R-1] with decoded_len(t + 1) >= c
            mid = (lo + hi) // 2
            if decoded_len(mid + 1) >= c:
                hi = mid
            else:
                lo = mid + 1
        out.append(lo)
        lo_bound = lo
    out.append(num_tokens - 1)
    return out


def decoded_prefix_lengths(tokenizer, ids: list[int]) -> list[int]:
    """Length in characters of the decoded text of every prefix of ``ids``, in one pass.

    Uses the incremental detokenizer of the ``tokenizers`` library (``DecodeStream``, as vLLM's
    fast detokenizer does) with ``skip_special_tokens=True``, so the cost is O(R) instead of the
    O(R^2) of decoding each prefix (measured on the demo tokenizer, a 1024-token response with
    41 steps: 59 ms per sample with prefix decodes and binary search, 1 ms with this). A token
    that ends inside a multi-byte character adds 0 until the character completes. Tokenizers without a fast backend fall back to decoding each
    prefix.

    Args:
        tokenizer: a Hugging Face tokenizer (``backend_tokenizer`` used when present).
        ids: [R] response token ids.
    Returns:
        [R + 1] non-decreasing ints, ``out[k]`` = length of the text of ``ids[:k]``; use
        ``out.__getitem__`` as ``step_token_ends``'s ``decoded_len``.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        try:
            from tokenizers.decoders import DecodeStream

            stream = DecodeStream(skip_special_tokens=True)
            out, n = [0], 0
            for i in ids:
                n += len(stream.step(backend, i) or "")
                out.append(n)
            return out
        except (ImportError, TypeError):  # an older tokenizers without DecodeStream(skip_special_tokens)
            pass
    return [len(tokenizer.decode(ids[:k], skip_special_tokens=True)) for k in range(len(ids) + 1)]
