"""Everything a run needs before actors start: data rows, the model directory, cold-start SFT.

Data rows are read and checked here (a bad row fails with file:line before Ray starts); a
data-source plugin (``data.source: "package.module:object"``, ``troupe.rollout.data.DataSource``)
is loaded by name and its ``data.options`` validated, so ``troupe check`` catches a bad option.
``builtin:qwen2-tiny`` is built locally (tokenizer trained on the task's text, random Qwen2);
with ``sft.enabled`` the model is fine-tuned on the plugin's cold-start examples first
(DeepSeek-R1's cold start) and GRPO starts from that checkpoint.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Callable, Optional

from troupe.cluster.models import resolve_model
from troupe.configs.schema import RunConfig
from troupe.rollout.data import DataError, check_rows, load_data_source, load_hf_rows, load_rows, source_options
from troupe.rollout.prompts import format_prompt

TOKENIZER_ROWS = 5000
"""Training rows whose text the locally built tokenizer is trained on."""


def data_source(cfg: RunConfig) -> tuple[Any, Any]:
    """The plugin named by ``data.source`` and its validated ``data.options``.

    Raises ``DataError`` naming ``data.source`` / ``data.options.<key>``, or ``sft.enabled`` when
    the plugin has no ``cold_start``.
    """
    source = load_data_source(cfg.data.source)
    options = source_options(source, cfg.data.options)
    if cfg.sft.enabled and not callable(getattr(source, "cold_start", None)):
        raise DataError(f"sft.enabled: data.source {cfg.data.source!r} has no cold_start(rows, options, seed) "
                        "to make cold-start examples; set sft.enabled: false")
    return source, options


def load_task(cfg: RunConfig) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows), each a dict with "question", "answer" and other columns.

    A data-source plugin generates both. For files, held-out rows come from ``data.eval_path``
    when set, else the last ``data.num_eval`` rows of the (shuffled, seeded) training file,
    which are then removed from training.
    Raises ``troupe.rollout.data.DataError`` (data.source, data.options.<key>, or file:line and
    field) on a bad source, option or row.
    """
    d = cfg.data
    if d.is_plugin:
        source, options = data_source(cfg)
        train, held = source.rows(options, cfg.seed, d.num_eval)
        where = f"data.source {d.source!r}:"
        return check_rows(train, f"{where} train row"), check_rows(held, f"{where} held-out row")
    if d.source == "hf":
        return _load_hf_task(cfg)
    rows = load_rows(d.path, d.source, prompt_field=d.prompt_field, answer_field=d.answer_field,
                     max_rows=d.max_train_rows)
    if d.eval_path:
        held = load_rows(d.eval_path, "parquet" if d.eval_path.endswith(".parquet") else "jsonl",
                         prompt_field=d.prompt_field, answer_field=d.answer_field, max_rows=d.num_eval or None)
        return rows, held[:d.num_eval]
    return _held_out_slice(rows, cfg, str(d.path))


def _held_out_slice(rows: list[dict], cfg: RunConfig, where: str) -> tuple[list[dict], list[dict]]:
    """(train, held-out): the last ``data.num_eval`` rows of the seeded shuffle are held out."""
    rows = list(rows)
    random.Random(cfg.seed).shuffle(rows)
    if cfg.data.num_eval >= len(rows):
        raise ValueError(f"data.num_eval = {cfg.data.num_eval} leaves no training rows in {where} ({len(rows)} rows)")
    return rows[:len(rows) - cfg.data.num_eval], rows[len(rows) - cfg.data.num_eval:]


def _load_hf_task(cfg: RunConfig) -> tuple[list[dict], list[dict]]:
    """``data.source: hf``: the training split and the held-out split (or slice); the local fallback files
    (``data.fallback_path``/``fallback_eval_path``, logged) when the data set cannot be loaded."""
    d = cfg.data
    fields = dict(prompt_field=d.prompt_field, answer_field=d.answer_field)
    try:
        train = load_hf_rows(d.path, d.split, config=d.hf_config, max_rows=d.max_train_rows, **fields)
        held = load_hf_rows(d.path, d.eval_split, config=d.hf_config, max_rows=d.num_eval or None, **fields) \
            if d.eval_split else None
    except DataError as e:
        if not d.fallback_path:
            raise
        logging.getLogger("troupe").warning(f"{e}; reading the fallback data.fallback_path {d.fallback_path} instead")
        fmt = "parquet" if d.fallback_path.endswith(".parquet") else "jsonl"
        train = load_rows(d.fallback_path, fmt, max_rows=d.max_train_rows, **fields)
        held = None
        if d.fallback_eval_path:
            efmt = "parquet" if d.fallback_eval_path.endswith(".parquet") else "jsonl"
            held = load_rows(d.fallback_eval_path, efmt, max_rows=d.num_eval or None, **fields)
    if held is not None:
        return train, held[:d.num_eval]
    return _held_out_slice(train, cfg, d.path)


def _prompt(cfg: RunConfig, question: str) -> str:
    return format_prompt(question, cfg.data.prompt_format, cfg.data.system_prompt)


def tokenizer_corpus(cfg: RunConfig, train_rows: list[dict], source: Optional[Any]) -> list[str]:
    """Texts the builtin model's tokenizer is trained on: the prompts, then the plugin's
    ``tokenizer_corpus`` (e.g. worked solutions) or else the answers and the R1 tags."""
    rows = train_rows[:TOKENIZER_ROWS]
    corpus = [_prompt(cfg, r["question"]) for r in rows]
    extra = getattr(source, "tokenizer_corpus", None)
    if callable(extra):
        return corpus + list(extra(rows))
    return corpus + [str(r["answer"]) for r in rows] + ["<think></think><answer></answer>"]


def cold_start_examples(cfg: RunConfig, train_rows: list[dict], source: Any, options: Any) -> list[tuple[str, str]]:
    """(prompt, completion) pairs for the cold-start SFT: the plugin's ``cold_start`` on the first
    ``sft.num_examples`` training rows, each question formatted as an RL prompt."""
    pairs = source.cold_start(train_rows[:cfg.sft.num_examples], options, cfg.seed)
    return [(_prompt(cfg, q), completion) for q, completion in pairs]


def _build_model(cfg: RunConfig, run_dir: Path, corpus: list[str]) -> str:
    from troupe.learner.tiny_model import build_tiny_model

    m = cfg.model
    return build_tiny_model(str(run_dir / "model_init"), corpus, hidden_size=m.hidden_size, num_layers=m.num_layers,
                            num_heads=m.num_heads, num_kv_heads=max(1, m.num_heads // 2),
                            intermediate_size=m.intermediate_size,
                            max_position_embeddings=max(512, cfg.rollout.max_model_len), seed=cfg.seed)


def prepare_model(cfg: RunConfig, run_dir: Path, train_rows: list[dict], log: Callable[[str], None]) -> tuple[str, dict]:
    """The model directory GRPO starts from (built and/or SFT-trained as the config says).

    Returns (path, info) where info records build/SFT facts for the run summary.
    """
    info: dict = {}
    path = resolve_model(cfg.model.path)  # a hub id: downloaded once here, the actors get the snapshot folder
    if path != cfg.model.path:
        log(f"model {cfg.model.path} from {path}")
    source, options = data_source(cfg) if cfg.data.is_plugin else (None, None)
    if path.startswith("builtin:"):
        path = _build_model(cfg, run_dir, tokenizer_corpus(cfg, train_rows, source))
        log(f"built {cfg.model.path} at {path}")
    if cfg.sft.enabled:
        from troupe.learner.sft import run_sft

        s = cfg.sft
        examples = cold_start_examples(cfg, train_rows, source, options)
        out = str(run_dir / "checkpoints" / "sft")
        res = run_sft(path, examples, out, steps=s.steps, batch_size=s.batch_size, lr=s.lr, seed=cfg.seed, log=log)
        info["sft"] = res
        log(f"cold-start SFT: loss {res['loss_first']:.3f} -> {res['loss_last']:.3f} in {res['seconds']:.0f} s")
        path = out
    return path, info
