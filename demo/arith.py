"""Synthetic arithmetic task in the R1-Zero format (the local demo's data set).

A row is ``{"question": "37+48", "answer": "85"}``; the raw prompt is
``PROMPT_FORMAT.format(question=row["question"])`` and a correct response is
``<think>...</think><answer>85</answer>`` (the response opens with ``<think>`` itself, so a
format reward can check ``^<think>.*</think>\\s*<answer>.*</answer>$`` on the response alone).

Train and held-out ("eval") rows are disjoint by construction: every operand tuple is assigned
to one split by a hash of the tuple, so no held-out question is ever a training question.

``worked_solution(row)`` is the cold-start (DeepSeek-R1) completion: column addition from the
least significant digit, one step per column with the carry written out, e.g. for 67+48::

    <think>7+8=15,6+4+1=11,so 115</think><answer>115</answer>

The demo's cold start (``cold_start_examples(rows, carry_slip=0.7, triples=0.3)``) is an
*imperfect* teacher: 70% of its solutions come from a student who forgets to carry, so the SFT
model drops carries under greedy decoding (~55% held-out accuracy) while still sampling the
carry often enough for GRPO's outcome reward to make it the greedy choice (~95%). A short SFT on
clean solutions instead lands on a knife edge (20% at 200 steps, 95% at 350) from which GRPO
did not improve in the prototype.

The task reaches the core only through configuration (nothing in the core imports this module):

* ``data.source: "troupe.demo.arith:ArithTask"``: :class:`ArithTask` is a data-source plugin
  (interface: ``troupe.rollout.data.DataSource``) whose ``data.options`` are
  :class:`ArithOptions`; it generates the rows, the cold-start examples (``sft.enabled``) and
  the worked solutions the local tiny tokenizer is trained on.
* ``reward.functions: [{name: "troupe.demo.arith:arith_steps", kind: process}]``: the process
  verifier :func:`arith_steps` (``configs/arith_process_cpu.yaml``).

This module imports neither torch nor ray nor vllm.
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from troupe.reward.registry import accuracy

PROMPT_FORMAT = "Compute {question}. Think in <think></think>, answer in <answer></answer>.\n"
"""Raw prompt template (data.template 'raw'); the response starts with ``<think>``."""

ZH_PROMPT_FORMAT = "计算{question}。在<think></think>中思考，在<answer></answer>中回答。"
"""The Chinese instruction of a row with ``lang: zh`` (``ArithOptions.zh_share``); the R1 preset's
language-consistency reward then asks the reasoning to stay in Chinese."""

CONCLUSION = {"en": "so", "zh": "所以"}
"""The word before the result in a worked solution, per prompt language."""

EVAL_FRACTION = 0.2
"""Share of operand tuples that belong to the held-out split."""

_SPLITS = ("train", "eval")


def _split_of(operands: tuple[int, ...]) -> str:
    """Deterministic split of an operand tuple (same on every machine and Python version)."""
    key = "+".join(str(x) for x in operands).encode()
    h = int.from_bytes(hashlib.sha256(key).digest()[:8], "big")
    return "eval" if (h % 10_000) < EVAL_FRACTION * 10_000 else "train"


def arith_rows(
    n: int,
    seed: int,
    max_operand: int,
    split: str = "train",
    *,
    num_operands: int = 2,
    min_operand: int = 0,
) -> list[dict]:
    """``n`` addition problems with operands drawn uniformly from [min_operand, max_operand].

    Args:
        n: rows to return.
        seed: RNG seed; the same arguments always give the same rows.
        max_operand: largest operand.
        split: "train" (rows may repeat when n exceeds the train pool) or "eval" (distinct rows;
            ValueError if the held-out pool is smaller than n).
        num_operands: operands per question (2: ``a+b``; 3: ``a+b+c``).
        min_operand: smallest operand.

    Returns:
        ``[{"question": "37+48", "answer": "85"}, ...]``.
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if n < 0 or max_operand < min_operand or min_operand < 0 or num_operands < 2:
        raise ValueError("need n >= 0, 0 <= min_operand <= max_operand, num_operands >= 2")
    rng = random.Random(f"arith:{seed}:{split}:{min_operand}:{max_operand}:{num_operands}")
    pool = (max_operand - min_operand + 1) ** num_operands
    rows: list[dict] = []
    seen: set[tuple[int, ...]] = set()
    attempts = 0
    max_attempts = 50 * n + 10_000
    while len(rows) < n:
        attempts += 1
        if attempts > max_attempts:
            raise ValueError(
                f"could not draw {n} distinct {split!r} rows from operands in "
                f"[{min_operand}, {max_operand}] (pool of {pool} tuples); lower n or raise max_operand"
            )
        ops = tuple(rng.randint(min_operand, max_operand) for _ in range(num_operands))
        if _split_of(ops) != split:
            continue
        if split == "eval":
            if ops in seen:
                continue
            seen.add(ops)
        rows.append({"question": "+".join(str(x) for x in ops), "answer": str(sum(ops))})
    return rows


def _operands(question: str) -> list[int]:
    """The operands of the addition in ``question`` ("37+48", or an instruction that contains it)."""
    m = re.search(r"\d+(?:\+\d+)+", question)
    if m and not question.replace("+", "").isdigit():
        question = m.group(0)
    parts = question.split("+")
    if len(parts) < 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"not an addition question: {question!r}")
    return [int(p) for p in parts]


SOLUTION_STYLES = ("columns", "running")
"""``ArithOptions.solution``: column addition (the demo) or running sums (long responses)."""


def running_solution(row: dict, *, conclusion: str = "so") -> str:
    """The running-sum worked solution: the operands added left to right, one step per operand.

    For ``12+47+85``: ``<think>12+47=59,59+85=144,so 144</think><answer>144</answer>``. With
    many operands this is a long response made of easy steps (a two-digit number added to the
    partial sum): ``n`` operands of two digits give about ``11 * n`` response tokens with the demo's
    digit-by-digit tokenizer (128-132 for 12 operands). Tried for the long pipelining bench: a 22M model after 300 SFT steps
    still got the partial sums wrong (README "Speed").
    """
    nums = _operands(row["question"])
    steps, total = [], nums[0]
    for x in nums[1:]:
        steps.append(f"{total}+{x}={total + x}")
        total += x
    return f"<think>{','.join(steps)},{conclusion} {total}</think><answer>{total}</answer>"


def worked_solution(row: dict, *, forget_carry: bool = False, conclusion: str = "so", style: str = "columns") -> str:
    """The cold-start response for ``row``: column addition, then the tagged answer.

    Each column adds the operands' digits (missing digits omitted) plus the incoming carry,
    e.g. ``7+8=15,6+4+1=11,so 115``; the answer is the column results' last digits read from
    the most significant column, with the final carry in front.

    ``forget_carry=True`` writes the solution of a sloppy student who drops every carry into a
    column that has digits (``7+8=15,6+4=10,so 105``): an internally consistent worked
    solution with the classic carry slip, and a wrong answer whenever a carry occurs. Used to
    build an imperfect cold-start set (``cold_start_examples``) whose systematic error GRPO
    then has to remove. ``conclusion`` is the word before the result (``CONCLUSION[lang]``).
    ``style="running"`` gives :func:`running_solution` instead (ValueError with ``forget_carry``:
    the sloppy student only does column addition); ValueError for an unknown style.
    """
    if style not in SOLUTION_STYLES:
        raise ValueError(f"solution style must be one of {SOLUTION_STYLES}, got {style!r}")
    if style == "running":
        if forget_carry:
            raise ValueError("forget_carry (carry_slip) applies to column solutions only, not style='running'")
        return running_solution(row, conclusion=conclusion)
    nums = _operands(row["question"])
    width = max(len(str(x)) for x in nums)
    steps = []
    digits = []
    carry = 0
    for col in range(width):
        terms = [str(x)[::-1][col] for x in nums if col < len(str(x))]
        if carry and not forget_carry:
            terms.append(str(carry))
        s = sum(int(t) for t in terms)
        steps.append("+".join(terms) + f"={s}" if len(terms) > 1 else f"{terms[0]}={s}")
        digits.append(s % 10)
        carry = s // 10
    result = str(int((str(carry) if carry else "") + "".join(str(d) for d in reversed(digits))))
    if not forget_carry:
        assert result == str(sum(nums)), (row, result)
    return f"<think>{','.join(steps)},{conclusion} {result}</think><answer>{result}</answer>"


def cold_start_examples(
    rows: list[dict],
    *,
    prompt_format: str = PROMPT_FORMAT,
    carry_slip: float = 0.0,
    triples: float = 0.0,
    seed: int = 0,
    zh_mixing: float = 0.0,
    style: str = "columns",
) -> list[tuple[str, str]]:
    """(prompt, worked solution) pairs for the cold-start SFT.

    Args:
        rows: task rows (``arith_rows(..., split="train")``).
        prompt_format: raw prompt template.
        carry_slip: share of rows (chosen by ``seed``) written by the sloppy student
            (``worked_solution(row, forget_carry=True)``); it differs from the correct solution only
            on rows with a carry into a column. With e.g. 0.7 the SFT model usually drops carries
            (greedy accuracy ~ the share of carry-free questions, ~55% for operands <= 99) while
            still sampling the carry ~30% of the time, which the outcome reward then reinforces.
        triples: adds ``int(triples * len(rows))`` correct single-digit three-term rows
            (``6+4+1``) so the model learns the three-term digit sums that a kept carry needs
            (``6+4+1=11``) even when most two-operand demonstrations drop the carry.
        seed: which rows are sloppy, which triples, and the final shuffle.
        zh_mixing: share of the Chinese rows (``lang: zh``) whose solution concludes with the
            English "so" instead of "所以": the language mixing DeepSeek-R1 saw in its RL, which a
            language-consistency reward then removes. When rows carry instructions (``lang`` set),
            the triples are wrapped in the English instruction too.
        style: "columns" or "running" (:func:`worked_solution`); the triples follow it too.

    Returns:
        the pairs, shuffled when ``triples`` adds rows.
    """
    rng = random.Random(f"cold_start:{seed}")
    out = []
    for r in rows:
        sloppy = carry_slip > 0 and rng.random() < carry_slip
        lang = r.get("lang", "en")
        mixed = lang == "zh" and zh_mixing > 0 and rng.random() < zh_mixing
        word = CONCLUSION["en" if mixed else lang]
        out.append((prompt_format.format(question=r["question"]),
                    worked_solution(r, forget_carry=sloppy, conclusion=word, style=style)))
    n_triples = int(triples * len(rows))
    if n_triples:
        extra = arith_rows(n_triples, seed, 9, "train", num_operands=3)
        if any("lang" in r for r in rows):
            extra = localize(extra, 0.0, seed, "train")
        out += [(prompt_format.format(question=r["question"]), worked_solution(r, style=style)) for r in extra]
        rng.shuffle(out)
    return out


def localize(rows: list[dict], zh_share: float, seed: int, split: str) -> list[dict]:
    """Rows whose ``question`` is the whole instruction, English (``PROMPT_FORMAT``) or, for a seeded
    ``zh_share`` of them, Chinese (``ZH_PROMPT_FORMAT``), with a ``lang`` column ("en" / "zh").

    Use with ``data.prompt_format: "{question}\n"``; the operands stay recoverable from the text
    (``worked_solution``, ``arith_steps`` read them from it).
    """
    rng = random.Random(f"lang:{seed}:{split}")
    out = []
    for r in rows:
        zh = zh_share > 0 and rng.random() < zh_share
        text = (ZH_PROMPT_FORMAT if zh else PROMPT_FORMAT.rstrip("\n")).format(question=r["question"])
        out.append({**r, "question": text, "lang": "zh" if zh else "en"})
    return out


def arith_steps(prompts: list[str], completions: list[Any], steps: list[list[str]], **columns: Any) -> list[list[float]]:
    """Process reward for the arithmetic task (config: ``name: "troupe.demo.arith:arith_steps"``, ``kind: process``).

    A rule-based process verifier with gold step labels (as Math-Shepherd labels steps
    automatically): the reference is the column-addition worked solution of
    :func:`worked_solution` cut at ``","`` (reward.step_delimiter: ","), e.g.
    for 67+48 the steps ``<think>7+8=15``, ``6+4+1=11``, ``so 115</think><answer>115</answer>``.
    Step j < S-1 of a completion scores 1.0 when it equals reference step j (whitespace
    stripped) and 0.0 otherwise (a dropped carry, a wrong digit sum, an extra step); the last
    step scores the outcome, :func:`troupe.reward.verifiers.accuracy_reward` of the whole
    completion against ``answer`` (the built-in ``accuracy`` reward).

    Inputs: ``prompts`` (the questions, ``"67+48"``), ``completions``, ``steps`` ([N] lists of
    step texts), ``answer``. Output: [N] lists of len(steps[i]) scores.
    Raises ValueError when ``answer`` is missing or a question is not an addition.
    """
    outcomes = accuracy(prompts, completions, **columns)
    out = []
    for q, st, outcome in zip(prompts, steps, outcomes):
        gold = [g.strip() for g in worked_solution({"question": str(q).strip()}).split(",")]
        scores = [1.0 if j < len(gold) - 1 and t.strip() == gold[j] else 0.0 for j, t in enumerate(st[:-1])]
        out.append(scores + [outcome])
    return out


class ArithOptions(BaseModel):
    """``data.options`` of :class:`ArithTask` (validated when the data is loaded, e.g. by ``troupe check``)."""

    model_config = ConfigDict(extra="forbid")

    max_operand: int = Field(99, ge=1, le=10**6, description="Largest operand.")
    min_operand: int = Field(0, ge=0, le=10**6, description="Smallest operand.")
    num_train: int = Field(20000, ge=16, description="Training prompts generated.")
    num_operands: int = Field(2, ge=2, le=16, description="Operands per question.")
    solution: Literal[SOLUTION_STYLES] = Field(
        "columns", description="Cold start's worked solutions: column addition ('7+8=15,6+4+1=11,so 115') or "
        "running sums ('12+47=59,59+85=144,so 144'; long responses with many operands, no carry_slip).")
    carry_slip: float = Field(
        0.0, ge=0.0, le=1.0,
        description="Cold start: share of solutions written by a sloppy student who drops carries "
        "(imperfect cold-start data whose systematic error RL has to remove).")
    triples: float = Field(0.0, ge=0.0, le=10.0,
                           description="Cold start: extra correct three-term digit sums, as a share of sft.num_examples.")
    zh_share: Optional[float] = Field(
        None, ge=0.0, le=1.0,
        description="None: questions are bare additions ('37+48') for data.prompt_format. A number: every question "
        "is a whole instruction (use data.prompt_format '{question}\\n'), this share of them in Chinese, with a "
        "`lang` column: prompts that invite language mixing (the R1 preset's language-consistency reward).")
    zh_mixing: float = Field(0.0, ge=0.0, le=1.0, description="Cold start: share of Chinese-prompt solutions that "
                             "conclude in English ('so' instead of '所以'): language mixing for RL to remove.")

    @model_validator(mode="after")
    def _check(self) -> "ArithOptions":
        if self.min_operand > self.max_operand:
            raise ValueError("min_operand must not exceed max_operand")
        if self.solution == "running" and self.carry_slip > 0:
            raise ValueError("carry_slip applies to solution 'columns' only (the sloppy student adds by columns)")
        return self


class ArithTask:
    """The arithmetic task as a data-source plugin: ``data.source: "troupe.demo.arith:ArithTask"``."""

    Options = ArithOptions

    @staticmethod
    def rows(options: ArithOptions, seed: int, num_eval: int) -> tuple[list[dict], list[dict]]:
        """(``options.num_train`` train rows, ``num_eval`` distinct held-out rows), disjoint splits."""
        kw = dict(num_operands=options.num_operands, min_operand=options.min_operand)
        train = arith_rows(options.num_train, seed, options.max_operand, "train", **kw)
        held = arith_rows(num_eval, seed, options.max_operand, "eval", **kw)
        if options.zh_share is not None:
            train, held = localize(train, options.zh_share, seed, "train"), localize(held, options.zh_share, seed, "eval")
        return train, held

    @staticmethod
    def cold_start(rows: list[dict], options: ArithOptions, seed: int) -> list[tuple[str, str]]:
        """(question, worked solution) pairs: :func:`cold_start_examples` with the options' carry_slip and triples."""
        return cold_start_examples(rows, prompt_format="{question}", carry_slip=options.carry_slip,
                                   triples=options.triples, seed=seed, zh_mixing=options.zh_mixing,
                                   style=options.solution)

    @staticmethod
    def tokenizer_corpus(rows: list[dict]) -> list[str]:
        """The worked solutions of ``rows``: the text the tiny tokenizer must cover besides the prompts."""
        return [worked_solution(r, conclusion=CONCLUSION[r.get("lang", "en")]) for r in rows]
