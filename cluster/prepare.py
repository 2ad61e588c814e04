"""Everything a run needs before actors start: data rows, the model directory, cold-start SFT.

Data rows are read and checked here (a bad row fails with file:line before Ray starts).
``builtin:qwen2-tiny`` is built locally (tokenizer trained on the task's text, random Qwen2);
with ``sft.enabled`` the model is fine-tuned on worked solutions first (DeepSeek-R1's cold
start) and GRPO starts from that checkpoint.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Callable

from troupe.configs.schema import RunConfig
from troupe.rollout import arith
from troupe.rollout.data import load_rows


def load_task(cfg: RunConfig) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows), each a dict with "question", "answer" and other columns.

    Held-out rows come from ``data.eval_path`` when set, else the last ``data.num_eval`` rows of
    the (shuffled, seeded) training file, which are then removed from training.
    Raises ``troupe.rollout.data.DataError`` (file:line, field) on a bad row.
    """
    d = cfg.data
    if d.source == "arith":
        kw = dict(num_operands=d.arith_num_operands, min_operand=d.arith_min_operand)
        train = arith.arith_rows(d.arith_num_train, cfg.seed, d.arith_max_operand, "train", **kw)
        held = arith.arith_rows(d.num_eval, cfg.seed, d.arith_max_operand, "eval", **kw)
        return train, held
    rows = load_rows(d.path, d.source, prompt_field=d.prompt_field, answer_field=d.answer_field,
                     max_rows=d.max_train_rows)
    if d.eval_path:
        held = load_rows(d.eval_path, "parquet" if d.eval_path.endswith(".parquet") else "jsonl",
                         prompt_field=d.prompt_field, answer_field=d.answer_field, max_rows=d.num_eval or None)
        return rows, held[:d.num_eval]
    rows = list(rows)
    random.Random(cfg.seed).shuffle(rows)
    if d.num_eval >= len(rows):
        raise ValueError(f"data.num_eval = {d.num_eval} leaves no training rows in {d.path} ({len(rows)} rows)")
    return rows[:len(rows) - d.num_eval], rows[len(rows) - d.num_eval:]


def prepare_model(cfg: RunConfig, run_dir: Path, train_rows: list[dict], log: Callable[[str], None]) -> tuple[str, dict]:
    """The model directory GRPO starts from (built and/or SFT-trained as the config says).

    Returns (path, info) where info records build/SFT facts for the run summary.
    """
    info: dict = {}
    path = cfg.model.path
    d = cfg.data
    fmt = lambda q: (d.system_prompt + "\n" if d.system_prompt else "") + d.prompt_format.format(question=q)  # noqa: E731
    if path.startswith("builtin:"):
        from troupe.learner.tiny_model import build_tiny_model

        corpus = [fmt(r["question"]) for r in train_rows[:5000]]
        if d.source == "arith":
            corpus += [arith.worked_solution(r) for r in train_rows[:5000]]
        else:
            corpus += [str(r["answer"]) for r in train_rows[:5000]] + ["<think></think><answer></answer>"]
        m = cfg.model
        path = build_tiny_model(str(run_dir / "model_init"), corpus, hidden_size=m.hidden_size, num_layers=m.num_layers,
                                num_heads=m.num_heads, num_kv_heads=max(1, m.num_heads // 2),
                                intermediate_size=m.intermediate_size,
                                max_position_embeddings=max(512, cfg.rollout.max_model_len), seed=cfg.seed)
        log(f"built {cfg.model.path} at {path}")
    if cfg.sft.enabled:
        from troupe.learner.sft import run_sft

        s = cfg.sft
        examples = [(fmt(q), sol) for q, sol in arith.cold_start_examples(
            train_rows[:s.num_examples], prompt_format="{question}", carry_slip=s.carry_slip, triples=s.triples, seed=cfg.seed)]
        out = str(run_dir / "checkpoints" / "sft")
        res = run_sft(path, examples, out, steps=s.steps, batch_size=s.batch_size, lr=s.lr, seed=cfg.seed, log=log)
        info["sft"] = res
        log(f"cold-start SFT: loss {res['loss_first']:.3f} -> {res['loss_last']:.3f} in {res['seconds']:.0f} s")
        path = out
    return path, info
