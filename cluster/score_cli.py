"""``troupe score``: score a JSONL file of completions offline, in-process (no Ray).

Usage::

    troupe score INPUT.jsonl (--rewards gsm8k,format:0.1 | --config CONFIG.yaml)
                 [--out OUT.jsonl] [--preset gsm8k|math500 [--split test]]
                 [--prompt-field prompt] [--completion-field completion] [--answer-field reference]
                 [--timeout S] [--on-failure zero|exclude]

Each input row holds a completion and (unless ``--preset``) a reference answer (field
``reference``, else ``answer``, or ``--answer-field``); the prompt is optional. With
``--preset``, prompts and references come from the preset data set, row ``i`` of the input
matching row ``index`` (the input's ``index`` field, else its position) of the preset split
(default split ``test``), and the default reward is the preset's (``gsm8k`` or ``math``).
Other input fields are passed to reward functions as columns (except those named in
``troupe.reward.scoring.RESERVED_KEYWORDS``). Every function also gets ``prompt_texts``: a row's
``prompt_text`` field (the templated prompt the policy saw) when present, else its prompt; reward
models (``reward.models`` in ``--config``) score ``prompt_text + completion``. Scoring is ``troupe.reward.scoring.RewardSet``,
the same as in the reward workers.

Writes one JSON line per input row: ``{"index", "reward", "parts", "failure"}`` (``failure``:
function name -> cause, or null; with process reward functions in ``--config`` also
``step_rewards``, the completion cut at ``reward.step_delimiter``) to ``--out`` (or stdout),
and a summary (rows, mean reward, per-function means, failures by cause) to stdout (stderr
when the rows go to stdout). Exit status: 0 on success, 2 on bad input (message on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence, TextIO

import yaml
from pydantic import ValidationError

from troupe.configs.schema import RewardConfig
from troupe.reward.scoring import RewardSet, ScoreResult, column_names, reward_columns
from troupe.rollout.data import PRESETS, DataError, load_preset

__all__ = ["main", "parse_reward_list"]


class _InputError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # exit 2 with our prefix
        self.print_usage(sys.stderr)
        print(f"troupe score: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_reward_list(text: str) -> list[tuple[str, float]]:
    """Parse ``--rewards``: comma-separated specs, each optionally ``:weight``.

    ``"gsm8k,format:0.1"`` -> ``[("gsm8k", 1.0), ("format", 0.1)]``;
    ``"mypkg.mod:fn:2"`` -> ``[("mypkg.mod:fn", 2.0)]`` (a last ``:part`` that parses as a
    number is the weight).

    Raises:
        ValueError: an empty list or an empty spec.
    """
    out: list[tuple[str, float]] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"--rewards {text!r}: empty entry")
        spec, weight = item, 1.0
        if ":" in item:
            head, tail = item.rsplit(":", 1)
            try:
                weight = float(tail)
                spec = head
            except ValueError:
                pass
        if not spec:
            raise ValueError(f"--rewards {text!r}: entry {item!r} has no function name")
        out.append((spec, weight))
    if not out:
        raise ValueError("--rewards: no reward functions given")
    return out


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="troupe score", description="Score a JSONL file of completions with reward functions.")
    p.add_argument("input", help="JSONL file, one object per line")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--rewards", help="comma-separated reward specs, each optionally ':weight'")
    src.add_argument("--config", help="run config YAML; its `reward` section is used")
    p.add_argument("--out", help="write per-row JSON lines here (default: stdout)")
    p.add_argument("--preset", choices=["gsm8k", "math500"], help="take prompts/references from a preset data set")
    p.add_argument("--split", default="test", help="preset split (default: test)")
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--completion-field", default="completion")
    p.add_argument(
        "--answer-field", default=None, help="reference answer field (default: 'reference', else 'answer')"
    )
    p.add_argument("--timeout", type=float, default=None, help="per-sample timeout, s (default: config or 10)")
    p.add_argument("--on-failure", choices=["zero", "exclude"], default=None, help="default: config or zero")
    return p


def _read_input(path: str, completion_field: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise _InputError(f"{p}: no such input file")
    rows = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise _InputError(f"{p}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise _InputError(f"{p}:{lineno}: expected a JSON object, got {type(row).__name__}")
            if not isinstance(row.get(completion_field), str):
                got = "missing" if completion_field not in row else type(row[completion_field]).__name__
                raise _InputError(f"{p}:{lineno}: field {completion_field!r} (completion) must be a string ({got})")
            row["__line__"] = lineno
            rows.append(row)
    if not rows:
        raise _InputError(f"{p}: no rows")
    return rows


def _config_section(path: str) -> RewardConfig:
    """The ``reward`` section of a run config file (or the whole file when it has none)."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise _InputError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        raise _InputError(f"{path}: not valid YAML: {e}") from None
    section = raw.get("reward", raw) if isinstance(raw, dict) else None
    if not isinstance(section, dict):
        raise _InputError(f"{path}: no `reward` section")
    try:
        return RewardConfig.model_validate(section)
    except ValidationError as e:
        raise _InputError(f"{path}: {_messages(e)}") from None


def _messages(e: ValidationError) -> str:
    return "; ".join(f"reward.{'.'.join(map(str, er['loc']))}: {er['msg']}" for er in e.errors())


def _reward_config(args: argparse.Namespace) -> RewardConfig:
    """The RewardConfig to score with: from ``--config``, ``--rewards`` or the preset's reward,
    then ``--timeout`` and ``--on-failure`` (defaults: the config's, else 10 s and ``zero``)."""
    if args.config:
        cfg = _config_section(args.config)
    else:
        if args.rewards:
            try:
                specs = parse_reward_list(args.rewards)
            except ValueError as e:
                raise _InputError(str(e)) from None
        elif args.preset:
            specs = [(PRESETS[args.preset]["reward"], 1.0)]
        else:
            raise _InputError("give --rewards, --config or --preset")
        try:
            cfg = RewardConfig.model_validate({"functions": [{"name": s, "weight": w} for s, w in specs]})
        except ValidationError as e:
            raise _InputError(f"--rewards: {_messages(e)}") from None
    update: dict[str, Any] = {}
    if args.timeout is not None:
        if not args.timeout > 0:
            raise _InputError("--timeout must be > 0")
        update["timeout_s"] = args.timeout
    if args.on_failure:
        update["on_failure"] = args.on_failure
    return cfg.model_copy(update=update)


def _load_rewards(args: argparse.Namespace) -> RewardSet:
    try:
        return RewardSet(_reward_config(args))
    except ValueError as e:
        raise _InputError(str(e)) from None


def _preset_prompts(args: argparse.Namespace, rows: list[dict], indices: list[Any]) -> tuple[list[str], list[str]]:
    """(prompts, answers): row ``index`` of the preset split for each input row."""
    try:
        data = load_preset(args.preset, args.split)
    except DataError as e:
        raise _InputError(str(e)) from None
    prompts, answers = [], []
    for r, idx in zip(rows, indices):
        if not isinstance(idx, int) or not 0 <= idx < len(data):
            raise _InputError(
                f"{args.input}:{r['__line__']}: index {idx!r} is not a row of preset "
                f"{args.preset}/{args.split} ({len(data)} rows)"
            )
        prompts.append(data[idx]["question"])
        answers.append(data[idx]["answer"])
    return prompts, answers


def _row_prompts(args: argparse.Namespace, rows: list[dict]) -> tuple[list[str], list[str]]:
    """(prompts, answers) from the input rows' own fields (prompt optional, reference required)."""
    prompts, answers = [], []
    for r in rows:
        where = f"{args.input}:{r['__line__']}"
        field = args.answer_field or ("reference" if "reference" in r else "answer")
        if field not in r or r[field] is None:
            raise _InputError(f"{where}: missing field {field!r} (reference answer)")
        a = r[field]
        if isinstance(a, bool) or not isinstance(a, (str, int, float)):
            raise _InputError(f"{where}: field {field!r} must be a string or number")
        p = r.get(args.prompt_field, "")
        if not isinstance(p, str):
            raise _InputError(f"{where}: field {args.prompt_field!r} (prompt) must be a string")
        prompts.append(p)
        answers.append(str(a))
    return prompts, answers


def _mean(xs: Sequence[Optional[float]]) -> Optional[float]:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def main(argv: Optional[list[str]] = None) -> int:
    """Run ``troupe score``.

    Args:
        argv: the arguments after ``score`` (default ``sys.argv[1:]``).
    Returns:
        0 on success, 2 on bad input (bad file, row, field, reward spec or config).
    """
    try:
        args = _build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2, message already printed)
        return e.code if isinstance(e.code, int) else 2
    try:
        return _score(args)
    except _InputError as e:
        print(f"troupe score: error: {e}", file=sys.stderr)
        return 2


def _score(args: argparse.Namespace) -> int:
    """Load the functions, read and score the input, write the rows and the summary; 0."""
    rewards = _load_rewards(args)
    rows = _read_input(args.input, args.completion_field)
    completions = [r[args.completion_field] for r in rows]
    indices = [r.get("index", i) for i, r in enumerate(rows)]
    if args.preset:
        prompts, answers = _preset_prompts(args, rows, indices)
    else:
        prompts, answers = _row_prompts(args, rows)
    read_here = {args.completion_field, args.prompt_field, args.answer_field or "reference", "__line__", "index",
                 "prompt_text"}
    columns = reward_columns(answers, rows, column_names(rows, skip=read_here))
    # what the policy saw (reward models score prompt_text + completion): a row's `prompt_text`, else its prompt
    prompt_texts = [r["prompt_text"] if isinstance(r.get("prompt_text"), str) else p for r, p in zip(rows, prompts)]
    res = rewards.score(prompts, completions, columns, prompt_texts=prompt_texts)
    _write_rows(args.out, res, indices, with_steps=bool(rewards.process))
    _print_summary(args.out, res, len(rows))
    return 0


def _write_rows(path: Optional[str], res: ScoreResult, indices: list[Any], with_steps: bool) -> None:
    """One JSON line per input row to ``path`` (stdout when None)."""
    out: TextIO = sys.stdout if not path else open(path, "w", encoding="utf-8")
    try:
        for i, index in enumerate(indices):
            failure = {name: res.errors[name][i] for name in res.errors if res.errors[name][i] is not None}
            rec = {
                "index": index,
                "reward": res.rewards[i],
                "parts": {name: res.parts[name][i] for name in res.parts},
                "failure": failure or None,
            }
            if with_steps:
                rec["step_rewards"] = res.step_rewards[i]
            out.write(json.dumps(rec) + "\n")
    finally:
        if path:
            out.close()


def _print_summary(path: Optional[str], res: ScoreResult, n: int) -> None:
    """Rows, mean reward, per-function means, failures: to stdout, or stderr when the rows went there."""
    scored = [x for x in res.rewards if x is not None]
    lines = [
        f"rows: {n}  scored: {len(scored)}  mean reward: {_fmt(_mean(res.rewards))}",
        "per function: " + ", ".join(f"{name}={_fmt(_mean(res.parts[name]))}" for name in res.parts),
        "failures: "
        + (", ".join(f"{k}={v}" for k, v in sorted(res.failures.items())) if res.failures else "none")
        + (f"  (no score: {res.none_count})" if res.none_count else ""),
    ]
    for name, msg in res.messages.items():
        lines.append(f"first error in {name}: {msg}")
    if path:
        lines.append(f"wrote {path}")
    print("\n".join(lines), file=sys.stdout if path else sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
