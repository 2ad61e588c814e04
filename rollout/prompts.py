"""Turn data-set rows into tokenized prompts (chat template or raw format string).

Rows are dicts with at least "question" and "answer" (see ``troupe.rollout.data``: files or a
data-source plugin); other keys ride along as reward-function columns.
"""

from __future__ import annotations

import hashlib
import random
from typing import Iterator

from troupe.core.types import Prompt


def format_prompt(question: str, prompt_format: str, system_prompt: str | None) -> str:
    """The raw prompt text of a question: ``(system_prompt + "\\n" if any) + prompt_format.format(question=...)``.

    The one place raw prompts are formatted: RL prompts (``build_prompts``, template "raw"), the
    cold-start SFT prompts and the tiny tokenizer's corpus (``troupe.cluster.prepare``).
    """
    return (system_prompt + "\n" if system_prompt else "") + prompt_format.format(question=question)


def build_prompts(rows: list[dict], tokenizer, *, template: str, prompt_format: str, system_prompt: str | None,
                  max_prompt_tokens: int) -> tuple[list[Prompt], int]:
    """Tokenize rows into prompts.

    Args:
        rows: dicts with "question" and "answer" (str or number); other keys become columns.
        tokenizer: a HF tokenizer (``apply_chat_template`` used when template == "chat").
        template: "chat" or "raw". Raw: ``(system_prompt + "\\n" if any) + prompt_format.format(question=...)``.
        max_prompt_tokens: longer prompts are dropped.

    Returns:
        (prompts, number dropped for length).
    """
    out, dropped = [], 0
    for i, row in enumerate(rows):
        q = str(row["question"])
        if template == "chat":
            msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
                {"role": "user", "content": prompt_format.format(question=q)}]
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            text = format_prompt(q, prompt_format, system_prompt)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_tokens:
            dropped += 1
            continue
        cols = {k: v for k, v in row.items() if k not in ("question", "answer")}
        out.append(Prompt(uid=row.get("uid", i), text=text, token_ids=list(ids), question=q,
                          answer=str(row["answer"]), columns=cols))
    return out, dropped


def prompt_stream(prompts: list[Prompt], seed: int) -> "PromptStream":
    """Endless shuffled stream of prompts (reshuffled every epoch, deterministic by seed)."""
    return PromptStream(prompts, seed)


class PromptStream:
    """Endless shuffled stream of prompts with a resumable position.

    Every epoch shuffles the previous epoch's order of prompt indices with one
    ``random.Random(seed)``, so epoch e's order depends only on ``seed`` and e.
    ``position`` counts prompts drawn so far; ``state_dict()`` / ``load_state_dict()`` save and
    restore the generator, the current order and the position, so a resumed run draws exactly the
    prompts the uninterrupted run would have drawn (no replayed or skipped data).
    """

    def __init__(self, prompts: list[Prompt], seed: int) -> None:
        if not prompts:
            raise ValueError("PromptStream: no prompts")
        self.prompts = prompts
        self._rng = random.Random(seed)
        self._order: list[int] = []
        self._next = 0  # index into _order
        self.position = 0

    def __iter__(self) -> Iterator[Prompt]:
        return self

    def __next__(self) -> Prompt:
        if self._next >= len(self._order):
            self._order = self._order or list(range(len(self.prompts)))
            self._rng.shuffle(self._order)  # each epoch reshuffles the previous epoch's order
            self._next = 0
        prompt = self.prompts[self._order[self._next]]
        self._next += 1
        self.position += 1
        return prompt

    def take(self, n: int) -> tuple[list[Prompt], list[int]]:
        """The next ``n`` prompts and their stream positions (0-based draw numbers)."""
        start = self.position
        return [next(self) for _ in range(n)], list(range(start, start + n))

    def state_dict(self) -> dict:
        """JSON-serialisable state: generator state, current epoch order, position in it, draws so far."""
        version, internal, gauss = self._rng.getstate()
        return {"rng": [version, list(internal), gauss], "order": list(self._order), "next": self._next,
                "position": self.position, "num_prompts": len(self.prompts)}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``'s state. Raises ``ValueError`` if the prompt set changed size."""
        if state["num_prompts"] != len(self.prompts):
            raise ValueError(f"prompt stream: the checkpoint was taken over {state['num_prompts']} prompts, "
                             f"this run has {len(self.prompts)} (data or data.max_prompt_tokens changed)")
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._order, self._next, self.position = list(state["order"]), int(state["next"]), int(state["position"])


def sampling_seeds(seed: int, step: int, positions: list[int]) -> list[int]:
    """Per-prompt vLLM sampling seeds derived from (run seed, step, stream position) only.

    Samples then depend on neither the engine nor its RNG history nor the chunk a prompt lands in,
    so a resumed run (or a prompt resampled after an engine died) draws the same responses. Seeds
    are 31-bit, leaving room for vLLM's ``seed + k`` for the k-th of a prompt's n samples.
    """
    out = []
    for pos in positions:
        digest = hashlib.blake2b(f"{seed}:{step}:{pos}".encode(), digest_size=8).digest()
        out.append(int.from_bytes(digest, "little") % (2**31 - 2**16))
    return out
