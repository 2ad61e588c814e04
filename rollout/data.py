"""Prompt data loaders: JSONL and Parquet files, data-source plugins, and the GSM8K / MATH-500 presets.

Every row is checked when the file is read, before any actor starts: a row that is not a
JSON object, lacks the prompt or answer field, has a non-string prompt, or an answer that is
neither a string nor a number raises :class:`DataError` naming ``file:line`` (1-based line
for JSONL, 0-based row index for Parquet) and the field.

A data-source plugin (config ``data.source: "package.module:object"``) generates rows in-process
instead; :class:`DataSource` is its interface, :func:`load_data_source` loads it and
:func:`source_options` validates ``data.options`` with its ``Options`` model. Its rows are checked
like a file's.

Preset data live outside the repository, in ``../shared/data`` relative to the repository
root (see that folder's README), or under ``$TROUPE_DATA_DIR`` when it is set.

This module imports no torch, Ray or vLLM (pyarrow only for Parquet, lazily).
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterator, Literal, Mapping, Optional, Protocol

from pydantic import BaseModel, ValidationError

__all__ = ["DataError", "DataSource", "PRESETS", "check_rows", "data_dir", "jsonl_rows", "load_data_source",
           "load_preset", "load_rows", "preset_path", "source_options"]


class DataError(ValueError):
    """A data source, file or row that cannot be used; the message names ``data.source`` /
    ``data.options.<key>``, or ``file:line`` and the field."""


class DataSource(Protocol):
    """What a data-source plugin (``data.source: "package.module:object"``) provides.

    A class with static methods or a module-level object; the arithmetic demo's is
    ``troupe.demo.arith:ArithTask``.

    Attributes:
        Options: a pydantic model (``extra="forbid"``, bounds, descriptions) validating ``data.options``.
    Methods:
        rows(options, seed, num_eval): (train rows, ``num_eval`` held-out rows), dicts with a
            string ``question`` and an ``answer``; other keys ride along as reward columns.
        cold_start(rows, options, seed) (optional): ``[(question, completion)]`` for ``sft.enabled``
            (DeepSeek-R1's cold start), from the first ``sft.num_examples`` training rows; the
            question is formatted into a prompt like the RL prompts.
        tokenizer_corpus(rows) (optional): extra texts (e.g. worked solutions) the locally built
            tokenizer of ``builtin:`` models is trained on, besides the prompts.
    """

    Options: type[BaseModel]

    def rows(self, options: Any, seed: int, num_eval: int) -> tuple[list[dict], list[dict]]: ...


def load_data_source(spec: str) -> Any:
    """The plugin object named by ``data.source`` ``"package.module:object"`` (``object`` may be dotted).

    Raises:
        DataError: naming ``data.source``, when the module does not import, the object is
            missing, or it lacks ``Options`` (a pydantic model) or a callable ``rows``.
    """
    where = f"data.source {spec!r}"
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise DataError(f"{where}: expected 'package.module:object'")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - any import failure is the plugin's
        raise DataError(f"{where}: importing module {module_name!r} failed: {type(e).__name__}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise DataError(f"{where}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    options = getattr(obj, "Options", None)
    if not (isinstance(options, type) and issubclass(options, BaseModel)) or not callable(getattr(obj, "rows", None)):
        raise DataError(f"{where}: a data source needs an Options pydantic model and a rows(options, seed, num_eval) "
                        "method (see troupe.rollout.data.DataSource)")
    return obj


def source_options(source: Any, options: Mapping[str, Any]) -> BaseModel:
    """``data.options`` validated by ``source.Options``.

    Raises:
        DataError: one line per bad value, each naming ``data.options.<key>``.
    """
    try:
        return source.Options.model_validate(dict(options))
    except ValidationError as err:
        lines = [f"data.options: invalid options for the data source ({err.error_count()} error(s)):"]
        for e in err.errors():
            key = ".".join(["data.options", *(str(x) for x in e["loc"])])
            if e["type"] == "extra_forbidden":
                lines.append(f"  {key}: unknown key")
            else:
                lines.append(f"  {key}: {e['msg']} (got {e['input']!r})" if e["loc"] else f"  {key}: {e['msg']}")
        raise DataError("\n".join(lines)) from None


def check_rows(rows: Any, where: str) -> list[dict]:
    """Check generated rows as file rows are checked (dicts, string ``question``, ``answer``); ``where`` names them."""
    if not isinstance(rows, list):
        raise DataError(f"{where}: expected a list of rows, got {type(rows).__name__}")
    return [_check_row(r, f"{where} {i}", "question", "answer") for i, r in enumerate(rows)]


PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "gsm8k": MappingProxyType(
            {
                "splits": MappingProxyType(
                    {"train": "../shared/data/gsm8k/train.jsonl", "test": "../shared/data/gsm8k/test.jsonl"}
                ),
                "default_split": "train",
                "prompt_field": "question",
                "answer_field": "answer",
                "reward": "gsm8k",
            }
        ),
        "math500": MappingProxyType(
            {
                "splits": MappingProxyType({"test": "../shared/data/math500/test.jsonl"}),
                "default_split": "test",
                "prompt_field": "problem",
                "answer_field": "answer",
                "reward": "math",
            }
        ),
    }
)
"""Preset name -> files per split (relative to the repository root), field names, and the
matching built-in reward. Read-only."""

_SHARED_PREFIX = "../shared/data/"


def _repo_root() -> Path:
    # rollout/data.py -> the repository root (the package is installed editable, so this is
    # the checkout, e.g. /work/main).
    return Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """Where preset files live: ``$TROUPE_DATA_DIR`` if set, else ``<repo root>/../shared/data``."""
    env = os.environ.get("TROUPE_DATA_DIR")
    if env:
        return Path(env).expanduser().resolve()
    return (_repo_root() / _SHARED_PREFIX).resolve()


def preset_path(name: str, split: Optional[str] = None) -> Path:
    """The file of a preset split.

    Args:
        name: a key of :data:`PRESETS` (``gsm8k``, ``math500``).
        split: ``train``/``test``; default the preset's ``default_split``.
    Raises:
        DataError: unknown preset or split.
    """
    if name not in PRESETS:
        raise DataError(f"unknown data preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    preset = PRESETS[name]
    split = split or preset["default_split"]
    if split not in preset["splits"]:
        raise DataError(f"data preset {name!r} has no split {split!r}; known: {', '.join(preset['splits'])}")
    rel = preset["splits"][split]
    return data_dir() / rel[len(_SHARED_PREFIX):]


def _check_row(row: Any, where: str, prompt_field: str, answer_field: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: row is a {type(row).__name__}, expected a JSON object")
    if prompt_field not in row or row[prompt_field] is None:
        raise DataError(f"{where}: missing field {prompt_field!r} (prompt field); row has {sorted(row)[:10]}")
    if answer_field not in row or row[answer_field] is None:
        raise DataError(f"{where}: missing field {answer_field!r} (answer field); row has {sorted(row)[:10]}")
    if not isinstance(row[prompt_field], str):
        raise DataError(
            f"{where}: field {prompt_field!r} (prompt) must be a string, got {type(row[prompt_field]).__name__}"
        )
    ans = row[answer_field]
    if isinstance(ans, bool) or not isinstance(ans, (str, int, float)):
        raise DataError(
            f"{where}: field {answer_field!r} (answer) must be a string or a number, got {type(ans).__name__}"
        )
    return row


def _load_jsonl(path: Path, prompt_field: str, answer_field: str, max_rows: Optional[int]) -> list[dict]:
    rows: list[dict] = []
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if max_rows is not None and len(rows) >= max_rows:
                break
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            rows.append(_check_row(row, where, prompt_field, answer_field))
    return rows


def jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(``"file:line"``, parsed JSON value) for every non-blank line of a JSONL file, lazily.

    Raises:
        DataError: naming ``file:line`` on a line that is not valid JSON.
    """
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None


def open_parquet(path: Path) -> Any:
    """A ``pyarrow.parquet.ParquetFile``; DataError naming ``path`` when it cannot be read."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is a dependency
        raise DataError(f"{path}: reading Parquet needs pyarrow ({e})") from None
    try:
        return pq.ParquetFile(str(path))
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None


def _load_parquet(path: Path, prompt_field: str, answer_field: str, max_rows: Optional[int]) -> list[dict]:
    pf = open_parquet(path)
    names = pf.schema_arrow.names
    for fld, what in ((prompt_field, "prompt"), (answer_field, "answer")):
        if fld not in names:
            raise DataError(f"{path}: missing field {fld!r} ({what} field); columns are {names}")
    rows: list[dict] = []
    index = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            if max_rows is not None and len(rows) >= max_rows:
                return rows
            rows.append(_check_row(row, f"{path}:row {index}", prompt_field, answer_field))
            index += 1
    return rows


def load_rows(
    path: str | os.PathLike,
    fmt: Literal["jsonl", "parquet"],
    *,
    prompt_field: str,
    answer_field: str,
    max_rows: Optional[int] = None,
) -> list[dict]:
    """Read and check the rows of a JSONL or Parquet file.

    Args:
        path: the file.
        fmt: ``"jsonl"`` (one JSON object per line; blank lines skipped) or ``"parquet"``.
        prompt_field: column holding the prompt text (must be a string).
        answer_field: column holding the reference answer (a string or a number; kept as is).
        max_rows: read at most this many rows (None: all).
    Returns:
        The rows as dicts with every column of the file, in file order.
    Raises:
        DataError: missing/unreadable file, unknown ``fmt``, or a bad row; the message names
            ``file:line`` (JSONL, 1-based) or ``file:row i`` (Parquet, 0-based) and the field.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such data file")
    if max_rows is not None and max_rows < 0:
        raise DataError(f"{p}: max_rows must be >= 0, got {max_rows}")
    if fmt == "jsonl":
        return _load_jsonl(p, prompt_field, answer_field, max_rows)
    if fmt == "parquet":
        return _load_parquet(p, prompt_field, answer_field, max_rows)
    raise DataError(f"{p}: unknown data format {fmt!r} (expected 'jsonl' or 'parquet')")


def load_hf_rows(name: str, split: str, *, config: Optional[str] = None, prompt_field: str, answer_field: str,
                 max_rows: Optional[int] = None) -> list[dict]:
    """Rows of a Hugging Face data set split, checked like file rows.

    ``datasets.load_dataset(name, config, split=split)``: a hub name (downloaded once into the
    ``datasets`` cache; ``HF_DATASETS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1`` read the cache only) or a
    local data-set folder (data files in the hub's layout).

    Args:
        name: hub name (``openai/gsm8k``) or folder; config: its configuration (``main``); split: ``train``...
        prompt_field, answer_field: the columns holding the question and the reference answer.
        max_rows: read at most this many rows.
    Returns:
        The rows as dicts with every column, in the split's order.
    Raises:
        DataError: the data set or split cannot be loaded (message names it and the reason), or a
            bad row (``name[split] row i`` and the field).
    """
    try:
        import datasets

        datasets.logging.set_verbosity_error()
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - offline, unknown name, bad split: all one message
        raise DataError(f"data.path {name!r} (data.source 'hf', config {config!r}, split {split!r}) could not be "
                        f"loaded: {type(e).__name__}: {e}") from e
    n = len(ds) if max_rows is None else min(max_rows, len(ds))
    return [_check_row(dict(ds[i]), f"{name}[{split}] row {i}", prompt_field, answer_field) for i in range(n)]


def _gsm8k_number(solution: str) -> str:
    if "####" not in solution:
        raise ValueError("no '####' in the GSM8K answer")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def load_preset(name: str, split: Optional[str] = None, *, max_rows: Optional[int] = None) -> list[dict]:
    """Load a preset data set with uniform keys.

    ``gsm8k``: ``question``; ``answer`` = the number after ``####`` (commas removed);
    ``solution`` = the original worked solution. ``math500``: ``question`` (from ``problem``),
    ``answer``, and ``solution``, ``subject``, ``level``, ``unique_id``.

    Args:
        name: ``"gsm8k"`` or ``"math500"`` (keys of :data:`PRESETS`).
        split: ``"train"``/``"test"`` (gsm8k default train; math500 has only test).
        max_rows: read at most this many rows.
    Returns:
        Rows as dicts with at least ``question`` and ``answer`` (strings).
    Raises:
        DataError: unknown preset/split, missing file (set ``TROUPE_DATA_DIR``), or a bad row.
    """
    path = preset_path(name, split)
    preset = PRESETS[name]
    fmt = "parquet" if path.suffix == ".parquet" else "jsonl"
    if not path.is_file():
        raise DataError(f"{path}: data preset {name!r} file not found (set TROUPE_DATA_DIR to the data folder)")
    raw = load_rows(path, fmt, prompt_field=preset["prompt_field"], answer_field=preset["answer_field"], max_rows=max_rows)
    out: list[dict] = []
    for i, row in enumerate(raw):
        if name == "gsm8k":
            try:
                number = _gsm8k_number(str(row["answer"]))
            except ValueError as e:
                raise DataError(f"{path}: row {i}: field 'answer': {e}") from None
            new = {k: v for k, v in row.items() if k not in ("question", "answer")}
            new.update(question=row["question"], answer=number, solution=row["answer"])
        else:
            new = {k: v for k, v in row.items() if k != preset["prompt_field"]}
            new["question"] = row[preset["prompt_field"]]
            new["answer"] = str(row[preset["answer_field"]])
        out.append(new)
    return out
