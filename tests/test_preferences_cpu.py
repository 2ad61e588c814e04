"""Preference-pair loading (troupe.rollout.preferences): TRL's formats, every row error, pair texts, splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from troupe.rollout.data import DataError
from troupe.rollout.preferences import PreferencePair, load_pairs, pair_texts, split_pairs

U = {"role": "user", "content": "2+2?"}
A4 = {"role": "assistant", "content": "4"}
A5 = {"role": "assistant", "content": "5"}


def _jsonl(tmp_path: Path, rows: list, name: str = "pairs.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _parquet(tmp_path: Path, rows: list[dict], name: str = "pairs.parquet") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / name
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return path


@pytest.fixture(scope="module")
def chat_tokenizer():
    """A real fast tokenizer with a chat template: the tiny model's (troupe.learner.tiny_model)."""
    from troupe.learner.tiny_model import train_tokenizer

    tok = train_tokenizer(["User: what is 2+2?\nAssistant: 4", "Hello world, the answer is 5."], vocab_size=300)
    assert tok.chat_template
    return tok


# ------------------------------------------------------------------------------------------ formats


def test_standard_format(tmp_path):
    path = _jsonl(tmp_path, [{"prompt": "Q1 ", "chosen": "good", "rejected": "bad", "extra": 1}, "",
                             {"prompt": "Q2 ", "chosen": "yes", "rejected": "no"}])
    pairs = load_pairs(path)
    assert pairs == [PreferencePair("Q1 ", "good", "bad", None, f"{path}:1"),
                     PreferencePair("Q2 ", "yes", "no", None, f"{path}:3")]  # blank line 2 skipped, numbering kept
    assert not pairs[0].conversational


def test_custom_fields_and_max_rows(tmp_path):
    path = _jsonl(tmp_path, [{"q": "x", "good": "a", "bad": "b"}, {"q": "y", "good": "c", "bad": "d"}, "not json"])
    pairs = load_pairs(path, prompt_field="q", chosen_field="good", rejected_field="bad", max_rows=2)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("x", "a", "b"), ("y", "c", "d")]
    with pytest.raises(DataError, match="max_rows"):
        load_pairs(path, max_rows=0)


def test_conversational_format(tmp_path):
    sys_msg = {"role": "system", "content": "be brief", "name": "kept"}
    path = _jsonl(tmp_path, [{"prompt": [sys_msg, U], "chosen": [A4], "rejected": [A5]}])
    (pair,) = load_pairs(path)
    assert pair.conversational and pair.prompt == [sys_msg, U] and pair.chosen == [A4] and pair.rejected == [A5]


def test_implicit_prompt_conversations(tmp_path):
    follow = {"role": "user", "content": "sure?"}
    path = _jsonl(tmp_path, [{"chosen": [U, A4], "rejected": [U, A5]},
                             {"chosen": [U, A4, follow, A4], "rejected": [U, A4, follow, A5]}])
    p1, p2 = load_pairs(path)
    assert (p1.prompt, p1.chosen, p1.rejected) == ([U], [A4], [A5])
    assert (p2.prompt, p2.chosen, p2.rejected) == ([U, A4, follow], [A4], [A5])


def test_implicit_prompt_plain_texts(tmp_path):
    path = _jsonl(tmp_path, [{"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"}])
    (pair,) = load_pairs(path)
    assert (pair.prompt, pair.chosen, pair.rejected) == ("", "Q: 2+2? A: 4", "Q: 2+2? A: 5")


def test_margin(tmp_path):
    path = _jsonl(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2},
                             {"prompt": "p", "chosen": "c", "rejected": "d", "margin": 0.5}])
    assert [p.margin for p in load_pairs(path, margin_field="margin")] == [2.0, 0.5]
    assert [p.margin for p in load_pairs(path)] == [None, None]  # no margin field: margins not read


def test_parquet_standard_conversational_implicit(tmp_path):
    std = _parquet(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1.5}], "std.parquet")
    (pair,) = load_pairs(std, margin_field="margin")
    assert (pair.prompt, pair.chosen, pair.rejected, pair.margin, pair.where) == ("p", "a", "b", 1.5, f"{std}:row 0")
    conv = _parquet(tmp_path, [{"prompt": [U], "chosen": [A4], "rejected": [A5]}] * 2, "conv.parquet")
    pairs = load_pairs(conv)
    assert pairs[1].prompt == [U] and pairs[1].chosen == [A4] and pairs[1].where == f"{conv}:row 1"
    implicit = _parquet(tmp_path, [{"chosen": [U, A4], "rejected": [U, A5]}], "implicit.parquet")
    assert load_pairs(implicit)[0].prompt == [U]


# ------------------------------------------------------------------------------------------ errors


def _error(tmp_path: Path, rows: list, line: int, *words: str, **kw) -> str:
    path = _jsonl(tmp_path, rows)
    with pytest.raises(DataError) as err:
        load_pairs(path, **kw)
    msg = str(err.value)
    assert f"{path}:{line}:" in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize("rows,line,words,kw", [
    ([GOOD, "", "{not json"], 3, ["invalid JSON"], {}),
    ([GOOD, [1, 2]], 2, ["list", "expected a JSON object"], {}),
    ([GOOD, {"prompt": "p", "rejected": "b"}], 2, ["'chosen'", "missing"], {}),
    ([GOOD, {"prompt": "p", "chosen": "a", "rejected": None}], 2, ["'rejected'", "missing"], {}),
    ([GOOD, {"chosen": "a", "rejected": "b"}], 2, ["'prompt'", "missing"], {}),  # first row has a prompt
    ([{"chosen": "a", "rejected": "b"}, GOOD], 2, ["'prompt'", "implicit"], {}),  # first row has none
    ([{"prompt": None, "chosen": "a", "rejected": "b"}], 1, ["'prompt'", "null"], {}),
    ([{"prompt": 3, "chosen": "a", "rejected": "b"}], 1, ["'prompt'", "int"], {}),
    ([{"prompt": "p", "chosen": 1.5, "rejected": "b"}], 1, ["'chosen'", "float"], {}),
    ([{"prompt": "p", "chosen": "a", "rejected": [A5]}], 1, ["'chosen'", "'rejected'", "both"], {}),
    ([{"prompt": [U], "chosen": "a", "rejected": "b"}], 1, ["'prompt'", "'chosen'"], {}),
    ([{"prompt": "p", "chosen": [A4], "rejected": [A5]}], 1, ["'prompt'", "'chosen'"], {}),
    ([{"prompt": [U], "chosen": ["4"], "rejected": [A5]}], 1, ["'chosen'", "message 0", "str"], {}),
    ([{"prompt": [U], "chosen": [A4], "rejected": [{"role": "assistant"}]}], 1, ["'rejected'", "message 0 has no 'content'"], {}),
    ([{"prompt": [{"role": 1, "content": "x"}], "chosen": [A4], "rejected": [A5]}], 1, ["'prompt'", "'role'", "int"], {}),
    ([{"prompt": [U], "chosen": [A4], "rejected": [{"role": "assistant", "content": ["5"]}]}], 1,
     ["'rejected'", "'content'", "list"], {}),
    ([GOOD, {"prompt": "p", "chosen": "  \n", "rejected": "b"}], 2, ["'chosen'", "empty"], {}),
    ([{"prompt": [U], "chosen": [A4], "rejected": []}], 1, ["'rejected'", "empty"], {}),
    ([{"prompt": "p", "chosen": "same", "rejected": "same"}], 1, ["'chosen'", "'rejected'", "identical"], {}),
    ([{"prompt": [U], "chosen": [A4], "rejected": [A4]}], 1, ["identical"], {}),
    ([{"chosen": [U, A4], "rejected": [U, A4]}], 1, ["identical"], {}),
    ([{"chosen": [U, A4], "rejected": [A5]}], 1, ["'chosen'", "'rejected'", "share no leading messages"], {}),
    ([{"chosen": [U], "rejected": [U, A5]}], 1, ["'chosen'", "no messages after the shared prompt"], {}),
    ([{"chosen": "same", "rejected": "same"}], 1, ["identical"], {}),
    ([GOOD], 1, ["'margin'", "missing"], {"margin_field": "margin"}),
    ([{**GOOD, "margin": "0.5"}], 1, ["'margin'", "number", "str"], {"margin_field": "margin"}),
    ([{**GOOD, "margin": True}], 1, ["'margin'", "number", "bool"], {"margin_field": "margin"}),
    (['{"prompt": "p", "chosen": "a", "rejected": "b", "margin": NaN}'], 1, ["'margin'", "finite", "nan"],
     {"margin_field": "margin"}),
    (['{"prompt": "p", "chosen": "a", "rejected": "b", "margin": -Infinity}'], 1, ["'margin'", "finite"],
     {"margin_field": "margin"}),
])
def test_row_errors_name_file_line_and_field(tmp_path, rows, line, words, kw):
    _error(tmp_path, rows, line, *words, **kw)


def test_custom_field_names_in_errors(tmp_path):
    _error(tmp_path, [{"question": "p", "good": "a", "bad": "a"}], 1, "'good'", "'bad'", "identical",
           prompt_field="question", chosen_field="good", rejected_field="bad")


def test_empty_and_missing_files(tmp_path):
    for rows in ([], ["", "   "]):
        path = _jsonl(tmp_path, rows, "empty.jsonl")
        with pytest.raises(DataError, match="empty") as err:
            load_pairs(path)
        assert str(path) in str(err.value)
    with pytest.raises(DataError, match="no such"):
        load_pairs(tmp_path / "missing.jsonl")
    import pyarrow as pa
    import pyarrow.parquet as pq

    empty_pq = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "chosen": pa.array([], pa.string()),
                             "rejected": pa.array([], pa.string())}), str(empty_pq))
    with pytest.raises(DataError, match="empty") as err:
        load_pairs(empty_pq)
    assert str(empty_pq) in str(err.value)


def test_parquet_errors(tmp_path):
    path = _parquet(tmp_path, [GOOD, {"prompt": "p", "chosen": "x", "rejected": "x"}])
    with pytest.raises(DataError, match=r"row 1: .*identical"):
        load_pairs(path)
    with pytest.raises(DataError, match=r"missing field 'margin'.*columns"):
        load_pairs(path, margin_field="margin")
    with pytest.raises(DataError, match="'good'"):
        load_pairs(path, chosen_field="good")
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(DataError, match="not a readable Parquet"):
        load_pairs(bad)


# ------------------------------------------------------------------------------------------ pair_texts


def test_pair_texts_plain(chat_tokenizer):
    pair = PreferencePair("Q: ", "good", "bad", None, "f:1")
    assert pair_texts(pair, chat_tokenizer) == ("Q: ", "good", "bad")
    assert pair_texts(PreferencePair("", "Q: a", "Q: b", None, "f:1"), None) == ("", "Q: a", "Q: b")


def test_pair_texts_conversational(chat_tokenizer):
    pair = PreferencePair([U], [A4], [A5], None, "f:1")
    prompt, chosen, rejected = pair_texts(pair, chat_tokenizer)
    eos = chat_tokenizer.eos_token
    assert prompt == "User: 2+2?\nAssistant: "  # the generation prompt ends the prompt
    assert chosen == f"4{eos}\n" and rejected == f"5{eos}\n"  # the template's end of turn stays with the response
    assert prompt + chosen == chat_tokenizer.apply_chat_template([U, A4], tokenize=False)


def test_pair_texts_falls_back_when_prefix_differs(chat_tokenizer):
    import copy

    tok = copy.deepcopy(chat_tokenizer)
    # renders the last message first: a prompt + response rendering does not start with the prompt's
    tok.chat_template = ("{% for m in messages|reverse %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}")
    pair = PreferencePair([U], [A4], [A5], None, "f:1")
    prompt, chosen, rejected = pair_texts(pair, tok)
    assert prompt == ""
    assert chosen == "[assistant] 4\n[user] 2+2?\n" and rejected == "[assistant] 5\n[user] 2+2?\n"


def test_pair_texts_needs_a_chat_template(chat_tokenizer):
    import copy

    tok = copy.deepcopy(chat_tokenizer)
    tok.chat_template = None
    with pytest.raises(DataError, match=r"data\.jsonl:7: .*chat template"):
        pair_texts(PreferencePair([U], [A4], [A5], None, "data.jsonl:7"), tok)
    tok.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataError, match=r"data\.jsonl:7: .*roles must alternate"):
        pair_texts(PreferencePair([U], [A4], [A5], None, "data.jsonl:7"), tok)


# ------------------------------------------------------------------------------------------ split


def test_split_pairs():
    pairs = [PreferencePair("p", f"a{i}", "b", None, f"f:{i}") for i in range(10)]
    train, held = split_pairs(pairs, 3, seed=1)
    assert len(train) == 7 and len(held) == 3
    assert sorted(p.where for p in train + held) == sorted(p.where for p in pairs)
    assert (train, held) == split_pairs(pairs, 3, seed=1)  # seeded
    assert split_pairs(pairs, 3, seed=2) != (train, held)
    assert train + held != pairs  # shuffled
    assert split_pairs(pairs, 0, seed=1)[1] == []
    with pytest.raises(ValueError, match="none to train"):
        split_pairs(pairs, 10, seed=1)
    with pytest.raises(ValueError):
        split_pairs(pairs, -1, seed=1)


# ------------------------------------------------------------------------------------------ troupe rm pairs (no Ray)


def test_choose_pairs_best_against_worst():
    import random

    from troupe.cluster.rm_pairs import choose_pairs

    texts = ["a", "b", "c", "d", "e", " ", "g"]
    rewards = [1.0, 0.0, 1.0, 0.5, 0.0, 5.0, None]  # the blank text (5.0) and the unscored one take no part
    pairs = choose_pairs(texts, rewards, 10, random.Random(0))
    assert sorted(pairs) == [(0, 1), (0, 4), (2, 1), (2, 4)]
    one = choose_pairs(texts, rewards, 1, random.Random(0))
    assert len(one) == 1 and one == choose_pairs(texts, rewards, 1, random.Random(0))  # seeded
    # same texts count once; a pair of identical texts is never made
    assert choose_pairs(["x", "x", "y"], [1.0, 1.0, 0.0], 5, random.Random(0)) == [(0, 2)]
    assert choose_pairs(["x", "x"], [1.0, 0.0], 5, random.Random(0)) == []
    # ties, too few scored samples, non-finite rewards: no pair
    assert choose_pairs(["a", "b"], [0.5, 0.5], 1, random.Random(0)) == []
    assert choose_pairs(["a", "b"], [0.5, None], 1, random.Random(0)) == []
    assert choose_pairs(["a", "b", "c"], [float("nan"), 1.0, 0.0], 3, random.Random(0)) == [(1, 2)]


def test_rm_pairs_bad_input_exits_2_before_ray(tmp_path, capsys):
    import yaml

    from troupe.cluster.rm_pairs import main

    (tmp_path / "data.jsonl").write_text('{"question": "1+1", "answer": "2"}\n{"question": 3, "answer": "2"}\n')
    cfg = {"model": {"path": "builtin:qwen2-tiny"}, "data": {"source": "jsonl", "path": "data.jsonl", "num_eval": 0}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    run, out = str(tmp_path / "run.yaml"), str(tmp_path / "pairs.jsonl")

    def status(*args: str) -> tuple[int, str]:
        try:
            rc = main([*args])
        except SystemExit as e:  # argparse
            rc = e.code
        return rc, capsys.readouterr().err

    rc, err = status(run, "--out", out, "--model", str(model_dir), "rollout.nope=1")
    assert rc == 2 and "rollout.nope" in err
    rc, err = status(run, "--out", out)
    assert rc == 2 and "--model is needed" in err
    rc, err = status(run, "--out", out, "--model", str(tmp_path / "missing"))
    assert rc == 2 and "no such model folder" in err
    rc, err = status(run, "--out", out, "--model", str(model_dir))
    assert rc == 2 and f"{tmp_path / 'data.jsonl'}:2" in err and "'question'" in err
    rc, err = status(run, "--out", out, "--model", str(model_dir), "reward.functions=[{name: 'nosuchmod:fn'}]")
    assert rc == 2 and "nosuchmod" in err
    rc, err = status(run, "--out", out, "--model", str(model_dir), "--n", "1")
    assert rc == 2 and "--n must be >= 2" in err
    rc, err = status(run, "--out", out, "--model", str(model_dir), "--temperature", "0")
    assert rc == 2 and "--temperature" in err
    assert not (tmp_path / "pairs.jsonl").exists()
