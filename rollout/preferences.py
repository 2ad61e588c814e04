"""Preference pairs for reward-model training (``troupe rm train``), in TRL's preference formats.

A pair is a prompt, a preferred ("chosen") response and a dispreferred ("rejected") one, read from
JSONL (one object per line; blank lines skipped) or Parquet (by suffix: ``.parquet``; anything else
is read as JSONL). Three layouts, as in TRL's preference data sets:

- standard: ``prompt``, ``chosen`` and ``rejected`` are strings;
- conversational: ``prompt`` is a list of ``{"role", "content"}`` messages, ``chosen`` and
  ``rejected`` are lists of (assistant) messages that continue it;
- implicit prompt: no ``prompt`` column; ``chosen`` and ``rejected`` are whole texts or whole
  conversations. For conversations the prompt is their shared leading messages (they must share
  at least one); for plain strings the prompt is ``""`` and both texts are kept whole (what a
  reward model then scores is the full text, prompt included).

Whether a file has a prompt column is decided by its first row (Parquet: its schema); a later row
that differs is an error. Every row is checked when the file is read: a bad one raises
:class:`troupe.rollout.data.DataError` naming ``file:line`` (JSONL, 1-based) or ``file:row i``
(Parquet, 0-based) and the field. Rejected: a line that is not JSON or not an object, a missing
field, a wrong type (strings vs message lists; a message must be an object with string ``role``
and ``content``), an empty chosen or rejected response (an empty string, only whitespace, or no
messages), ``chosen == rejected`` (a pair with no preference carries no Bradley-Terry signal:
its loss gradient pushes both scores apart by nothing but noise, so it is treated as bad data,
not silently kept), and a margin (``margin_field``) that is missing, not a number or not finite.

:func:`pair_texts` turns a pair into the three strings a reward model scores
(``prompt_text + response + eos``); :func:`split_pairs` holds out a seeded evaluation slice.

This module imports no torch, Ray or vLLM (pyarrow lazily, for Parquet).
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

from troupe.rollout.data import DataError, jsonl_rows, open_parquet

__all__ = ["PreferencePair", "load_pairs", "pair_texts", "split_pairs"]

Text = Union[str, list]
"""A prompt or response: a string, or a list of ``{"role", "content"}`` messages."""


@dataclass(frozen=True)
class PreferencePair:
    """One checked preference pair.

    Attributes:
        prompt: a string (``""`` for an implicit-prompt pair of plain texts) or a list of messages.
        chosen: the preferred response: a string, or a list of messages when ``prompt`` is one.
        rejected: the dispreferred response, of the same kind as ``chosen``.
        margin: the row's margin (``margin_field``), or None when no margin field is read.
        where: ``"file:line"`` (JSONL, 1-based) or ``"file:row N"`` (Parquet, 0-based).
    """

    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]
    margin: float | None
    where: str

    @property
    def conversational(self) -> bool:
        """True when prompt and responses are message lists (rendered with a chat template)."""
        return isinstance(self.prompt, list)


# ------------------------------------------------------------------------------------------ checks


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_messages(value: list, where: str, field: str) -> list[dict]:
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"{where}: field {field!r}: message {i} is a {_kind(m)}, expected an object with "
                            "string 'role' and 'content'")
        for key in ("role", "content"):
            if key not in m:
                raise DataError(f"{where}: field {field!r}: message {i} has no {key!r} (a message is an object "
                                "with string 'role' and 'content')")
            if not isinstance(m[key], str):
                raise DataError(f"{where}: field {field!r}: message {i} {key!r} must be a string, got {_kind(m[key])}")
    return value


def _check_text(value: Any, where: str, field: str) -> Text:
    """A string or a list of well-formed messages (anything else: DataError naming ``field``)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _check_messages(value, where, field)
    raise DataError(f"{where}: field {field!r} must be a string or a list of messages, got {_kind(value)}")


def _is_empty(value: Text) -> bool:
    return not value.strip() if isinstance(value, str) else not value


def _shared_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _margin(row: dict, field: str, where: str) -> float:
    if field not in row or row[field] is None:
        raise DataError(f"{where}: missing field {field!r} (margin field); row has {sorted(row)[:10]}")
    value = row[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: field {field!r} (margin) must be a number, got {_kind(value)}")
    if not math.isfinite(value):
        raise DataError(f"{where}: field {field!r} (margin) must be finite, got {value!r}")
    return float(value)


def _pair(row: Any, where: str, has_prompt: bool, fields: tuple[str, str, str, Optional[str]]) -> PreferencePair:
    """Check one row and make its pair (``has_prompt``: whether the file has a prompt column)."""
    prompt_field, chosen_field, rejected_field, margin_field = fields
    if not isinstance(row, dict):
        raise DataError(f"{where}: row is a {_kind(row)}, expected a JSON object")
    if has_prompt and prompt_field not in row:
        raise DataError(f"{where}: missing field {prompt_field!r} (prompt field; earlier rows have it); "
                        f"row has {sorted(row)[:10]}")
    if not has_prompt and prompt_field in row:
        raise DataError(f"{where}: field {prompt_field!r} (prompt) present, but the file's first row has no prompt "
                        "(implicit prompt); give every row a prompt or none")
    for field, what in ((chosen_field, "chosen"), (rejected_field, "rejected")):
        if field not in row or row[field] is None:
            raise DataError(f"{where}: missing field {field!r} ({what} field); row has {sorted(row)[:10]}")
    chosen = _check_text(row[chosen_field], where, chosen_field)
    rejected = _check_text(row[rejected_field], where, rejected_field)
    if type(chosen) is not type(rejected):
        raise DataError(f"{where}: fields {chosen_field!r} and {rejected_field!r} must both be strings or both "
                        f"message lists, got {_kind(chosen)} and {_kind(rejected)}")
    if has_prompt:
        if row[prompt_field] is None:
            raise DataError(f"{where}: field {prompt_field!r} (prompt) is null")
        prompt = _check_text(row[prompt_field], where, prompt_field)
        if type(prompt) is not type(chosen):
            raise DataError(f"{where}: field {prompt_field!r} is a {_kind(prompt)} but {chosen_field!r} is a "
                            f"{_kind(chosen)}: a string prompt takes string responses, a message-list prompt "
                            "message-list responses")
    elif isinstance(chosen, list):  # implicit prompt: the shared leading messages
        if chosen == rejected:
            raise DataError(f"{where}: fields {chosen_field!r} and {rejected_field!r} are identical: a pair needs "
                            "a preference")
        k = _shared_prefix(chosen, rejected)
        if k == 0:
            raise DataError(f"{where}: fields {chosen_field!r} and {rejected_field!r} share no leading messages, so "
                            f"there is no implicit prompt; add a {prompt_field!r} field")
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
    else:
        prompt = ""
    for field, value in ((chosen_field, chosen), (rejected_field, rejected)):
        if _is_empty(value):
            what = "no messages after the shared prompt" if not has_prompt and isinstance(value, list) else "empty"
            raise DataError(f"{where}: field {field!r} is {what}: a pair needs two responses")
    if chosen == rejected:
        raise DataError(f"{where}: fields {chosen_field!r} and {rejected_field!r} are identical: a pair needs "
                        "a preference")
    margin = _margin(row, margin_field, where) if margin_field else None
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected, margin=margin, where=where)


# ------------------------------------------------------------------------------------------ readers


def _parquet_rows(path: Path, required: Sequence[str]) -> tuple[list[str], Iterator[tuple[str, Any]]]:
    pf = open_parquet(path)
    names = list(pf.schema_arrow.names)
    for field in required:
        if field not in names:
            raise DataError(f"{path}: missing field {field!r}; columns are {names}")

    def rows() -> Iterator[tuple[str, Any]]:
        index = 0
        for batch in pf.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield f"{path}:row {index}", row
                index += 1

    return names, rows()


def load_pairs(
    path: str | os.PathLike,
    *,
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    margin_field: Optional[str] = None,
    max_rows: Optional[int] = None,
) -> list[PreferencePair]:
    """Read and check the preference pairs of a JSONL or Parquet file (module docstring: formats, checks).

    Args:
        path: the file; ``.parquet`` is read as Parquet, anything else as JSONL.
        prompt_field: the prompt column; when the first row (Parquet: the schema) lacks it, the file
            is read in TRL's implicit-prompt layout.
        chosen_field, rejected_field: the preferred and dispreferred responses.
        margin_field: a per-pair margin column (a finite number in every row), or None: no margins.
        max_rows: read at most this many pairs (None: all).
    Returns:
        The pairs in file order.
    Raises:
        DataError: no such file, an empty file (no rows), ``max_rows`` < 1, or a bad row (message
            names ``file:line`` or ``file:row i`` and the field).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such preference data file")
    if max_rows is not None and max_rows < 1:
        raise DataError(f"{p}: max_rows must be >= 1, got {max_rows}")
    fields = (prompt_field, chosen_field, rejected_field, margin_field)
    has_prompt: Optional[bool] = None
    if p.suffix == ".parquet":
        names, rows = _parquet_rows(p, [chosen_field, rejected_field] + ([margin_field] if margin_field else []))
        has_prompt = prompt_field in names
    else:
        rows = jsonl_rows(p)
    pairs: list[PreferencePair] = []
    for where, row in rows:
        if has_prompt is None:
            has_prompt = not isinstance(row, dict) or prompt_field in row
        pairs.append(_pair(row, where, has_prompt, fields))
        if max_rows is not None and len(pairs) >= max_rows:
            break  # before the next row is read: rows after the limit are not checked
    if not pairs:
        raise DataError(f"{p}: no preference pairs (the file is empty)")
    return pairs


# ------------------------------------------------------------------------------------------ use


def _render(tokenizer: Any, messages: list, where: str, generation_prompt: bool) -> str:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # noqa: BLE001 - a template's own raise_exception, jinja errors, ...
        raise DataError(f"{where}: the tokenizer's chat template failed on this pair: {type(e).__name__}: {e}") from None
    if not isinstance(text, str):
        raise DataError(f"{where}: apply_chat_template returned a {type(text).__name__}, expected a string")
    return text


def pair_texts(pair: PreferencePair, tokenizer: Any) -> tuple[str, str, str]:
    """``(prompt_text, chosen_text, rejected_text)``: the reward model scores ``prompt_text + response + eos``.

    Standard and implicit plain pairs: the strings as they are (an implicit pair's prompt is ``""``).
    Conversational pairs: ``prompt_text`` is the prompt messages rendered with the tokenizer's chat
    template and its generation prompt; a response text is the rendering of prompt + response
    messages (no generation prompt) minus ``prompt_text`` in front, so it holds the template's own
    end-of-turn markers (e.g. ``<|im_end|>``). When that rendering does not begin with
    ``prompt_text`` (a template that rewrites earlier turns, e.g. drops reasoning), both
    responses are the full renderings and ``prompt_text`` is ``""``: the texts the model scores
    are the same, only the prompt/response split is lost. Rendered texts contain special tokens
    as text: tokenize them without adding special tokens.

    Raises:
        DataError: a conversational pair and a tokenizer without a chat template, or a template
            that fails on the pair; the message names ``pair.where``.
    """
    if not pair.conversational:
        return pair.prompt, pair.chosen, pair.rejected  # type: ignore[return-value]
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{pair.where}: a conversational pair (message lists) needs a tokenizer with a chat template; "
                        f"{type(tokenizer).__name__} has none")
    prompt_text = _render(tokenizer, pair.prompt, pair.where, True)  # type: ignore[arg-type]
    full = [_render(tokenizer, pair.prompt + resp, pair.where, False)  # type: ignore[operator]
            for resp in (pair.chosen, pair.rejected)]
    if all(t.startswith(prompt_text) for t in full):
        return prompt_text, full[0][len(prompt_text):], full[1][len(prompt_text):]
    return "", full[0], full[1]


def split_pairs(pairs: Sequence[PreferencePair], num_eval: int, seed: int) -> tuple[list[PreferencePair],
                                                                                   list[PreferencePair]]:
    """``(train, held_out)``: the pairs shuffled with ``random.Random(seed)``, the last ``num_eval`` held out.

    The training pairs keep the shuffled order. Raises ``ValueError`` when ``num_eval`` is negative
    or leaves no training pair.
    """
    if num_eval < 0:
        raise ValueError(f"num_eval must be >= 0, got {num_eval}")
    if num_eval >= len(pairs):
        raise ValueError(f"holding out {num_eval} pairs leaves none to train on ({len(pairs)} pairs)")
    order = list(pairs)
    random.Random(seed).shuffle(order)
    cut = len(order) - num_eval
    return order[:cut], order[cut:]
