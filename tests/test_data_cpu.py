"""Data loaders on the real GSM8K / MATH-500 files, Parquet round trip, and bad rows."""

from __future__ import annotations

import json

import pytest

from troupe.reward.verifiers import gsm8k_reference
from troupe.rollout.data import (
    PRESETS,
    DataError,
    check_rows,
    data_dir,
    load_data_source,
    load_preset,
    load_rows,
    preset_path,
    source_options,
)


def test_presets_resolve_to_shared_data():
    assert set(PRESETS) == {"gsm8k", "math500"}
    assert preset_path("gsm8k").name == "train.jsonl"
    assert preset_path("gsm8k", "test").parent.name == "gsm8k"
    assert preset_path("math500").is_file()
    assert (data_dir() / "gsm8k" / "train.jsonl").is_file()


def test_data_dir_env_override(monkeypatch, tmp_path):
    (tmp_path / "math500").mkdir()
    (tmp_path / "math500" / "test.jsonl").write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    monkeypatch.setenv("TROUPE_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path.resolve()
    rows = load_preset("math500")
    assert rows == [{"question": "1+1?", "answer": "2"}]


def test_load_rows_gsm8k_train():
    rows = load_rows(preset_path("gsm8k", "train"), "jsonl", prompt_field="question", answer_field="answer")
    assert len(rows) == 7473
    assert set(rows[0]) == {"question", "answer"}
    assert "####" in rows[0]["answer"]
    assert len(load_rows(preset_path("gsm8k", "train"), "jsonl", prompt_field="question", answer_field="answer", max_rows=10)) == 10


def test_load_preset_gsm8k():
    train = load_preset("gsm8k")
    test = load_preset("gsm8k", "test")
    assert len(train) == 7473 and len(test) == 1319
    row = test[0]
    assert set(row) == {"question", "answer", "solution"}
    assert row["answer"] == "18" and row["solution"].endswith("#### 18")
    assert all("," not in r["answer"] and r["answer"] == gsm8k_reference(r["solution"]) for r in train)
    assert load_preset("gsm8k", max_rows=5)[4]["question"] == train[4]["question"]


def test_load_preset_math500():
    rows = load_preset("math500")
    assert len(rows) == 500
    assert set(rows[0]) == {"question", "answer", "solution", "subject", "level", "unique_id"}
    assert all(isinstance(r["question"], str) and isinstance(r["answer"], str) for r in rows)


def test_unknown_preset_and_split():
    with pytest.raises(DataError, match="unknown data preset 'nope'"):
        load_preset("nope")
    with pytest.raises(DataError, match="no split 'train'"):
        load_preset("math500", "train")


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    src = load_preset("math500", max_rows=50)
    path = tmp_path / "math.parquet"
    pq.write_table(pa.Table.from_pylist(src), path, row_group_size=16)
    back = load_rows(path, "parquet", prompt_field="question", answer_field="answer")
    assert back == src
    assert load_rows(path, "parquet", prompt_field="question", answer_field="answer", max_rows=20) == src[:20]
    # numeric answers are allowed and kept as numbers
    pq.write_table(pa.table({"q": ["a", "b"], "a": [1, 2]}), tmp_path / "num.parquet")
    assert load_rows(tmp_path / "num.parquet", "parquet", prompt_field="q", answer_field="a")[1] == {"q": "b", "a": 2}


def test_parquet_bad_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"question": ["ok", None, "x"], "answer": ["1", "2", "3"]}), path)
    with pytest.raises(DataError) as exc:
        load_rows(path, "parquet", prompt_field="question", answer_field="answer")
    assert f"{path}:row 1" in str(exc.value) and "'question'" in str(exc.value)
    with pytest.raises(DataError, match="missing field 'solution'"):
        load_rows(path, "parquet", prompt_field="question", answer_field="solution")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_rows(tmp_path / "junk.parquet", "parquet", prompt_field="question", answer_field="answer")


def _write(tmp_path, lines: list[str]):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "bad_line, field, what",
    [
        ('{"question": "q", "answer": ', None, "invalid JSON"),
        ('{"answer": "1"}', "question", "missing field"),
        ('{"question": "q"}', "answer", "missing field"),
        ('{"question": 5, "answer": "1"}', "question", "must be a string"),
        ('{"question": ["q"], "answer": "1"}', "question", "must be a string"),
        ('{"question": "q", "answer": {"x": 1}}', "answer", "string or a number"),
        ('{"question": "q", "answer": true}', "answer", "string or a number"),
        ('{"question": "q", "answer": null}', "answer", "missing field"),
        ('["q", "1"]', None, "expected a JSON object"),
    ],
)
def test_jsonl_bad_row_names_file_line_and_field(tmp_path, bad_line, field, what):
    good = json.dumps({"question": "q", "answer": "1"})
    path = _write(tmp_path, [good, "", good, bad_line, good])
    with pytest.raises(DataError) as exc:
        load_rows(path, "jsonl", prompt_field="question", answer_field="answer")
    msg = str(exc.value)
    assert f"{path}:4:" in msg  # 1-based line, blank line counted
    assert what in msg
    if field:
        assert repr(field) in msg


def test_jsonl_good_rows_and_numbers(tmp_path):
    path = _write(tmp_path, [json.dumps({"question": "q", "answer": 3, "extra": [1]}), json.dumps({"question": "r", "answer": 1.5})])
    rows = load_rows(path, "jsonl", prompt_field="question", answer_field="answer")
    assert rows == [{"question": "q", "answer": 3, "extra": [1]}, {"question": "r", "answer": 1.5}]


def test_missing_file_and_bad_format(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        load_rows(tmp_path / "nope.jsonl", "jsonl", prompt_field="q", answer_field="a")
    path = _write(tmp_path, ['{"q": "x", "a": "1"}'])
    with pytest.raises(DataError, match="unknown data format 'csv'"):
        load_rows(path, "csv", prompt_field="q", answer_field="a")


def test_bad_row_is_found_before_any_row_is_returned(tmp_path):
    """The whole file is checked: a bad last row fails the load (nothing starts on half a file)."""
    lines = [json.dumps({"question": f"q{i}", "answer": str(i)}) for i in range(1000)] + ['{"question": "q"}']
    path = _write(tmp_path, lines)
    with pytest.raises(DataError, match=r":1001: missing field 'answer'"):
        load_rows(path, "jsonl", prompt_field="question", answer_field="answer")


PLUGIN = """
from pydantic import BaseModel, ConfigDict, Field


class Opts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int = Field(3, ge=1)


class Source:
    Options = Opts

    @staticmethod
    def rows(options, seed, num_eval):
        return [{"question": f"q{i}", "answer": str(i)} for i in range(options.n)], []


no_options = Source.rows
"""


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    import sys

    (tmp_path / "my_source.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_source", None)
    return "my_source:Source"


def test_data_source_plugin_loads_and_validates_options(plugin):
    source = load_data_source(plugin)
    opts = source_options(source, {"n": 2})
    assert opts.n == 2 and source_options(source, {}).n == 3
    assert source.rows(opts, 0, 0)[0] == [{"question": "q0", "answer": "0"}, {"question": "q1", "answer": "1"}]
    with pytest.raises(DataError) as exc:
        source_options(source, {"n": 0, "m": 1})
    msg = str(exc.value)
    assert "data.options.n: Input should be greater than or equal to 1 (got 0)" in msg
    assert "data.options.m: unknown key" in msg


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("no_such_module_xyz:Source", "importing module 'no_such_module_xyz' failed"),
        ("my_source:Nope", "has no attribute 'Nope'"),
        ("my_source:no_options", "needs an Options pydantic model"),
        ("my_source", "expected 'package.module:object'"),
    ],
)
def test_data_source_errors_name_data_source(plugin, spec, needle):
    with pytest.raises(DataError) as exc:
        load_data_source(spec)
    assert f"data.source {spec!r}" in str(exc.value) and needle in str(exc.value)


def test_generated_rows_are_checked_like_file_rows():
    rows = [{"question": "q", "answer": 1}]
    assert check_rows(rows, "gen row") == rows
    with pytest.raises(DataError, match="gen row 1: missing field 'answer'"):
        check_rows(rows + [{"question": "r"}], "gen row")
    with pytest.raises(DataError, match="expected a list of rows"):
        check_rows(iter(rows), "gen row")
