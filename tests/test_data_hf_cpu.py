"""data.source: hf — a Hugging Face data set through `datasets` (a local folder in the hub's layout here; hub
names take the same call), the held-out split or slice, and the local fallback files when it cannot be loaded."""

from __future__ import annotations

import json

import pytest

from troupe.cluster.prepare import load_task
from troupe.configs.schema import load_config
from troupe.rollout.data import DataError, load_hf_rows


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _rows(n, tag):
    return [{"q": f"{tag} {i}+1=", "a": str(i + 1), "extra": i} for i in range(n)]


@pytest.fixture
def dataset(tmp_path):
    """A data-set folder as on the hub: data files named by split."""
    _jsonl(tmp_path / "ds" / "train.jsonl", _rows(20, "train"))
    _jsonl(tmp_path / "ds" / "test.jsonl", _rows(6, "test"))
    return tmp_path / "ds"


def _config(tmp_path, data: dict):
    cfg = {"model": {"path": "builtin:qwen2-tiny"}, "data": {"prompt_field": "q", "answer_field": "a", **data}}
    p = tmp_path / "c.yaml"
    p.write_text(json.dumps(cfg))
    return load_config(p)


def test_splits_load_with_every_column(dataset):
    rows = load_hf_rows(str(dataset), "test", prompt_field="q", answer_field="a")
    assert [r["q"] for r in rows] == [f"test {i}+1=" for i in range(6)] and rows[2]["extra"] == 2
    assert len(load_hf_rows(str(dataset), "train", prompt_field="q", answer_field="a", max_rows=5)) == 5
    with pytest.raises(DataError, match="split 'validation'"):
        load_hf_rows(str(dataset), "validation", prompt_field="q", answer_field="a")
    with pytest.raises(DataError, match=r"row 0: .*'nope'"):
        load_hf_rows(str(dataset), "test", prompt_field="nope", answer_field="a")


def test_config_with_eval_split_and_with_a_held_out_slice(tmp_path, dataset):
    train, held = load_task(_config(tmp_path, {"source": "hf", "path": "ds", "eval_split": "test", "num_eval": 4}))
    assert len(train) == 20 and [r["q"] for r in held] == [f"test {i}+1=" for i in range(4)]
    train, held = load_task(_config(tmp_path, {"source": "hf", "path": "ds", "num_eval": 5}))
    assert len(train) == 15 and len(held) == 5 and not {r["q"] for r in train} & {r["q"] for r in held}


def test_unloadable_data_set_falls_back_to_local_files(tmp_path, caplog, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    # offline, as the machines here are (HF_HUB_OFFLINE=1 read at import): no ~45 s of retries on a missing network
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _jsonl(tmp_path / "local" / "train.jsonl", _rows(10, "local"))
    _jsonl(tmp_path / "local" / "test.jsonl", _rows(3, "localtest"))
    data = {"source": "hf", "path": "troupe-test/no-such-dataset", "eval_split": "test", "num_eval": 3}
    with pytest.raises(DataError, match="troupe-test/no-such-dataset"):
        load_task(_config(tmp_path, data))
    cfg = _config(tmp_path, {**data, "fallback_path": "local/train.jsonl", "fallback_eval_path": "local/test.jsonl"})
    with caplog.at_level("WARNING", logger="troupe"):
        train, held = load_task(cfg)
    assert len(train) == 10 and [r["q"] for r in held] == [f"localtest {i}+1=" for i in range(3)]
    assert "reading the fallback data.fallback_path" in caplog.text


def test_hf_only_keys_are_refused_for_files(tmp_path):
    from troupe.configs.schema import ConfigError

    _jsonl(tmp_path / "f.jsonl", _rows(3, "f"))
    with pytest.raises(ConfigError, match="only for data.source 'hf'"):
        _config(tmp_path, {"source": "jsonl", "path": "f.jsonl", "eval_split": "test"})
