"""Turn data-set rows into tokenized prompts (chat template or raw format string).

Rows are dicts with at least "question" and "answer" (see ``troupe.rollout.data``: files or a
data-source plugin); other keys ride along as reward-function columns.
"""

from __future__ import annotations

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


def prompt_stream(prompts: list[Prompt], seed: int) -> Iterator[Prompt]:
    """Endless shuffled stream of prompts (reshuffled every epoch, deterministic by seed)."""
    rng = random.Random(seed)
    order = list(range(len(prompts)))
    while True:
        rng.shuffle(order)
        for i in order:
            yield prompts[i]
