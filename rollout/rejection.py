"""Rejection sampling's data side: SFT files of (prompt, completion) lines and the general-data mix.

The rejection-sampling stage (``troupe.cluster.rejection``; its filters: ``troupe.reward.rejection``)
writes ``sft_data.jsonl`` and may mix in a general SFT file (``rejection.general_sft``), as
DeepSeek-R1 (arXiv 2501.12948, section 2.3.3) adds about 200k non-reasoning samples (writing,
factual QA, ...) to about 600k reasoning ones. The choices:

* **SFT files** are JSONL, one object per line with a string ``prompt`` (the exact text the model
  sees before the completion; used verbatim, never templated again; may be empty) and a non-blank
  string ``completion``; other keys ride along and are ignored; blank lines are skipped.
* **General rows**: ``rejection.general_sft.fraction`` is the share of the final set:
  ``round(fraction / (1 - fraction) * kept)`` rows (Python's round, halves to even), at most the
  file's rows, drawn without replacement by a ``random.Random`` seeded with the run seed, kept in file
  order. R1's ~200k of ~800k is a fraction of 0.25.

This module imports neither Ray, torch nor vLLM.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Sequence

from troupe.rollout.data import DataError, jsonl_rows

__all__ = ["mix_general", "read_sft_file"]


def mix_general(num_kept: int, general: Sequence[Any], fraction: float, seed: int) -> list[Any]:
    """The general rows to add to ``num_kept`` rejection-sampled ones (module docstring: the rule).

    Args:
        num_kept: rows kept by rejection sampling.
        general: the general file's rows (e.g. :func:`read_sft_file`'s pairs).
        fraction: share of the final set from ``general``, in [0, 1).
        seed: the run seed (the draw depends on it and on nothing else but the arguments).
    Returns:
        ``min(len(general), round(fraction / (1 - fraction) * num_kept))`` rows of ``general``, in
        file order.
    Raises:
        ValueError: ``fraction`` outside [0, 1) or ``num_kept`` < 0.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"rejection.general_sft.fraction must be in [0, 1), got {fraction}")
    if num_kept < 0:
        raise ValueError(f"num_kept must be >= 0, got {num_kept}")
    n = min(len(general), round(fraction / (1.0 - fraction) * num_kept))
    rng = random.Random(f"{seed}:rejection-general")  # str seeds hash with sha512: the same in every process
    return [general[i] for i in sorted(rng.sample(range(len(general)), n))]


def read_sft_file(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, completion) pairs of a JSONL SFT file, in file order; blank lines skipped, other keys ignored.

    Every line must be a JSON object with a string ``prompt`` (may be empty) and a non-blank string
    ``completion``.

    Raises:
        DataError: no such file, no rows, or a bad line (message names ``file:line`` and the field).
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such SFT data file")
    out = []
    for where, row in jsonl_rows(p):
        if not isinstance(row, dict):
            raise DataError(f"{where}: row is a {type(row).__name__}, expected a JSON object with 'prompt' and "
                            "'completion'")
        for key in ("prompt", "completion"):
            if key not in row:
                raise DataError(f"{where}: missing field {key!r}; row has {sorted(row)[:10]}")
            if not isinstance(row[key], str):
                raise DataError(f"{where}: field {key!r} must be a string, got {type(row[key]).__name__}")
        if not row["completion"].strip():
            raise DataError(f"{where}: field 'completion' is empty")
        out.append((row["prompt"], row["completion"]))
    if not out:
        raise DataError(f"{p}: no rows")
    return out
