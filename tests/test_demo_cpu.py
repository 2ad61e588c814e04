"""Fast CPU tests of the local demo's pieces: the arithmetic task (troupe.demo.arith) and its
data-source plugin as the run preparation loads it, the tiny model builder, SFT."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from troupe.cluster.cli import main
from troupe.configs.schema import load_config
from troupe.demo.arith import (
    PROMPT_FORMAT,
    ArithTask,
    arith_rows,
    cold_start_examples,
    worked_solution,
)
from troupe.reward.verifiers import accuracy_reward as arith_reward
from troupe.reward.verifiers import extract_answer
from troupe.rollout.data import DataError

REPO = Path(__file__).resolve().parents[1]


def _key(row):
    return row["question"]


def test_arith_splits_disjoint_and_deterministic():
    train = arith_rows(3000, seed=0, max_operand=99, split="train")
    held = arith_rows(500, seed=0, max_operand=99, split="eval")
    assert len(train) == 3000 and len(held) == 500
    assert len({_key(r) for r in held}) == 500  # held-out rows are distinct
    assert not ({_key(r) for r in train} & {_key(r) for r in held})
    # a different seed draws different rows from the same split, still disjoint
    train_b = arith_rows(3000, seed=1, max_operand=99, split="train")
    assert train_b != train
    assert not ({_key(r) for r in train_b} & {_key(r) for r in held})
    assert arith_rows(3000, seed=0, max_operand=99, split="train") == train
    assert arith_rows(500, seed=0, max_operand=99, split="eval") == held
    for r in train[:50] + held[:50]:
        a, b = (int(x) for x in r["question"].split("+"))
        assert 0 <= a <= 99 and 0 <= b <= 99 and int(r["answer"]) == a + b


def test_arith_bad_arguments():
    with pytest.raises(ValueError):
        arith_rows(10, seed=0, max_operand=99, split="test")
    with pytest.raises(ValueError):  # only ~20% of 4 pairs are held out
        arith_rows(100, seed=0, max_operand=1, split="eval")


def test_worked_solutions_are_correct():
    rows = arith_rows(100, seed=3, max_operand=99, split="train") + arith_rows(
        100, seed=3, max_operand=999, split="eval", num_operands=3
    )
    for r in rows:
        sol = worked_solution(r)
        assert sol.startswith("<think>") and sol.endswith("</answer>")
        assert extract_answer(sol) == r["answer"]
        assert arith_reward(sol, r["answer"]) == 1.0
        think = sol[len("<think>") : sol.index("</think>")]
        # each column step is a true equation
        for step in think.split(",")[:-1]:
            lhs, rhs = step.split("=")
            assert sum(int(t) for t in lhs.split("+")) == int(rhs)
    assert worked_solution({"question": "67+48"}) == "<think>7+8=15,6+4+1=11,so 115</think><answer>115</answer>"
    assert arith_reward("<think></think><answer>114</answer>", "115") == 0.0
    assert arith_reward("115", "115") == 0.0
    assert "{question}" in PROMPT_FORMAT


def test_cold_start_carry_slip():
    rows = arith_rows(400, seed=0, max_operand=99, split="train")
    clean = cold_start_examples(rows)
    assert all(arith_reward(c, r["answer"]) == 1.0 for (_, c), r in zip(clean, rows))
    assert clean[0][0] == PROMPT_FORMAT.format(question=rows[0]["question"])
    assert worked_solution({"question": "67+48"}, forget_carry=True) == (
        "<think>7+8=15,6+4=10,so 105</think><answer>105</answer>"
    )
    assert worked_solution({"question": "12+34"}, forget_carry=True) == worked_solution({"question": "12+34"})
    sloppy = cold_start_examples(rows, carry_slip=1.0)
    for (_, c), r in zip(sloppy, rows):
        a, b = (int(x) for x in r["question"].split("+"))
        carries_into_tens = (a % 10 + b % 10 >= 10) and max(a, b) >= 10
        assert arith_reward(c, r["answer"]) == (0.0 if carries_into_tens else 1.0), (r, c)
    half = cold_start_examples(rows, carry_slip=0.5, seed=1)
    assert half == cold_start_examples(rows, carry_slip=0.5, seed=1)
    wrong = sum(arith_reward(c, r["answer"]) == 0.0 for (_, c), r in zip(half, rows))
    assert 0 < wrong < sum(arith_reward(c, r["answer"]) == 0.0 for (_, c), r in zip(sloppy, rows))
    mixed = cold_start_examples(rows, carry_slip=0.7, triples=0.3, seed=0)
    assert len(mixed) == 400 + 120
    triple_rows = [(p, c) for p, c in mixed if p.count("+") == 2]
    assert len(triple_rows) == 120
    for p, c in triple_rows:
        q = p[len("Compute ") : p.index(".")]
        assert arith_reward(c, str(sum(int(x) for x in q.split("+")))) == 1.0


def test_plugin_reproduces_the_demo_data():
    """ArithTask through cluster.prepare gives exactly the rows, cold-start pairs and tokenizer text
    the demo's functions give for configs/arith_cpu.yaml."""
    from troupe.cluster.prepare import cold_start_examples as prepared_examples
    from troupe.cluster.prepare import data_source, load_task, tokenizer_corpus

    cfg = load_config(REPO / "configs" / "arith_cpu.yaml", ["data.options.num_train=3000"])
    train, held = load_task(cfg)
    assert train == arith_rows(3000, 0, 99, "train", min_operand=10)
    assert held == arith_rows(256, 0, 99, "eval", min_operand=10)
    source, options = data_source(cfg)
    assert source is ArithTask and (options.carry_slip, options.triples) == (0.7, 0.3)
    assert prepared_examples(cfg, train, source, options) == cold_start_examples(
        train[:2000], prompt_format=PROMPT_FORMAT, carry_slip=0.7, triples=0.3, seed=0)
    corpus = tokenizer_corpus(cfg, train, source)
    assert corpus == [PROMPT_FORMAT.format(question=r["question"]) for r in train] + [worked_solution(r) for r in train]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("data.options.max_operand=-1", "data.options.max_operand"),
        ("data.options.carry_slip=2", "data.options.carry_slip"),
        ("data.options.colour=red", "data.options.colour: unknown key"),
        ("data.options.min_operand=100", "min_operand must not exceed max_operand"),
        ("data.source=troupe.demo.nope:ArithTask", "data.source 'troupe.demo.nope:ArithTask'"),
        ("data.source=troupe.demo.arith:Nope", "has no attribute 'Nope'"),
        ("data.source=troupe.demo.arith:worked_solution", "needs an Options pydantic model"),
        ("data.source=arith", "data.source must be one of"),
        ("data.source=jsonl", "data.path is required"),
        ("data.arith_max_operand=99", "data.arith_max_operand: unknown key"),
    ],
)
def test_bad_source_or_option_names_the_key_and_exits_2(capsys, override, needle):
    assert main(["check", str(REPO / "configs" / "arith_cpu.yaml"), override]) == 2
    assert needle in capsys.readouterr().err


def test_sft_needs_a_source_with_cold_start(tmp_path, monkeypatch, capsys):
    (tmp_path / "rows_only.py").write_text(
        "from troupe.demo.arith import ArithTask\n"
        "class Task:\n    Options = ArithTask.Options\n    rows = staticmethod(ArithTask.rows)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("rows_only", None)
    cfg = REPO / "configs" / "arith_cpu.yaml"
    assert main(["check", str(cfg), "data.source=rows_only:Task", "data.options.num_train=100"]) == 2
    err = capsys.readouterr().err
    assert "sft.enabled" in err and "rows_only:Task" in err and "cold_start" in err
    assert main(["check", str(cfg), "data.source=rows_only:Task", "data.options.num_train=100", "sft.enabled=false"]) == 0
    gsm8k = REPO / "configs" / "gsm8k_cpu.yaml"
    assert main(["check", str(gsm8k), "sft.enabled=true"]) == 2
    assert "sft.enabled" in capsys.readouterr().err


def test_plugin_rows_are_checked(tmp_path, monkeypatch):
    from troupe.cluster.prepare import load_task

    (tmp_path / "bad_rows.py").write_text(
        "from troupe.demo.arith import ArithTask\n"
        "class Task:\n    Options = ArithTask.Options\n"
        "    @staticmethod\n    def rows(options, seed, num_eval):\n"
        "        return [{'question': '1+1', 'answer': '2'}, {'question': 3, 'answer': '3'}], []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("bad_rows", None)
    cfg = load_config(REPO / "configs" / "arith_cpu.yaml", ["data.source=bad_rows:Task", "sft.enabled=false"])
    with pytest.raises(DataError, match=r"data.source 'bad_rows:Task': train row 1: field 'question'"):
        load_task(cfg)


def test_core_does_not_import_the_demo():
    """The demo is reached through configuration only: no core module imports troupe.demo."""
    import re

    demo_import = re.compile(r"^\s*(from\s+troupe\.demo|import\s+troupe\.demo|from\s+troupe\s+import\s+demo)", re.M)
    for folder in ("configs", "core", "rollout", "reward", "learner", "cluster"):
        for path in (REPO / folder).glob("*.py"):
            assert not demo_import.search(path.read_text()), path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from troupe.learner.tiny_model import build_tiny_model

    torch.set_num_threads(1)
    rows = arith_rows(500, seed=0, max_operand=99, split="train")
    corpus = [PROMPT_FORMAT.format(question=r["question"]) + worked_solution(r) for r in rows]
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny")), corpus, hidden_size=64, num_heads=2,
                            num_kv_heads=1, intermediate_size=128)


def test_tiny_model_loads_with_transformers(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert tok.eos_token is not None and tok.eos_token_id is not None
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.config.vocab_size >= len(tok)
    ids = tok("12345+67890", add_special_tokens=False)["input_ids"]
    assert [tok.decode([i]) for i in ids] == list("12345+67890")
    for t in ("<think>", "</think>", "<answer>", "</answer>"):
        tid = tok(t, add_special_tokens=False)["input_ids"]
        assert len(tid) == 1, t
    text = PROMPT_FORMAT.format(question="37+48") + worked_solution({"question": "37+48"})
    enc = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(enc) == text
    assert tok.decode(enc, skip_special_tokens=True) == text  # tags are normal tokens: vLLM keeps them
    chat = tok.apply_chat_template([{"role": "user", "content": "37+48"}], tokenize=False, add_generation_prompt=True)
    assert "37+48" in chat
    assert os.path.exists(os.path.join(tiny_dir, "model.safetensors"))
    assert os.path.exists(os.path.join(tiny_dir, "generation_config.json"))


def test_sft_lowers_loss_and_saves(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from troupe.learner.sft import run_sft

    rows = arith_rows(64, seed=1, max_operand=99, split="train")
    examples = [(PROMPT_FORMAT.format(question=r["question"]), worked_solution(r)) for r in rows]
    out = str(tmp_path / "sft")
    res = run_sft(tiny_dir, examples, out, steps=30, batch_size=16, lr=3e-3, log=lambda s: None)
    assert res["steps"] == 30 and res["seconds"] > 0
    assert res["loss_last"] < res["loss_first"]
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token_id == model.config.eos_token_id
    assert os.path.exists(os.path.join(out, "model.safetensors"))


def test_instruction_rows_in_two_languages_and_mixed_cold_start():
    """zh_share: whole-instruction questions, a seeded share in Chinese; zh_mixing: Chinese-prompt
    solutions that conclude in English (language mixing), which the language reward scores 0."""
    from troupe.demo.arith import ArithOptions, ArithTask
    from troupe.reward.verifiers import language_consistency_reward

    opts = ArithOptions(min_operand=10, max_operand=99, num_train=400, zh_share=0.3, zh_mixing=0.5)
    train, held = ArithTask.rows(opts, 0, 64)
    assert (train, held) == ArithTask.rows(opts, 0, 64)  # seeded
    zh = [r for r in train if r["lang"] == "zh"]
    assert 0.2 < len(zh) / len(train) < 0.4 and {r["lang"] for r in held} == {"en", "zh"}
    assert zh[0]["question"].startswith("计算") and train[0]["question"].count("<think></think>") == 1
    # the operands are still read from the instruction: worked solutions and the process verifier work
    row = next(r for r in train if r["lang"] == "en")
    assert worked_solution(row).endswith(f",so {row['answer']}</think><answer>{row['answer']}</answer>")
    pairs = ArithTask.cold_start(train, opts, 0)
    zh_pairs = [(q, c) for q, c in pairs if q.startswith("计算")]
    scores = [language_consistency_reward(c, q) for q, c in zh_pairs]
    mixed = sum(s == 0.0 for s in scores) / len(scores)
    assert 0.35 < mixed < 0.65 and set(scores) == {0.0, 1.0}
    assert all(language_consistency_reward(c, q) == 1.0 for q, c in pairs if not q.startswith("计算"))
    # without zh_share, questions stay bare additions (the demo is unchanged)
    plain, _ = ArithTask.rows(ArithOptions(num_train=16), 0, 4)
    assert all("lang" not in r and "+" in r["question"] and " " not in r["question"] for r in plain)


def test_running_solution_long_responses():
    """solution: running (the long-response task): left-to-right partial sums, one step per operand,
    through the options, the cold start and the accuracy reward; carry_slip is refused with it."""
    from troupe.demo.arith import ArithOptions, running_solution

    assert running_solution({"question": "12+47+85"}) == "<think>12+47=59,59+85=144,so 144</think><answer>144</answer>"
    assert worked_solution({"question": "12+47+85"}, style="running") == running_solution({"question": "12+47+85"})
    with pytest.raises(ValueError, match="column solutions only"):
        worked_solution({"question": "12+47"}, style="running", forget_carry=True)
    with pytest.raises(ValueError, match="solution style"):
        worked_solution({"question": "12+47"}, style="diagonal")
    with pytest.raises(ValueError, match="carry_slip"):
        ArithOptions(solution="running", carry_slip=0.5)
    opts = ArithOptions(min_operand=10, max_operand=99, num_operands=12, num_train=64, solution="running")
    train, held = ArithTask.rows(opts, 0, 8)
    pairs = ArithTask.cold_start(train, opts, 0)
    assert len(pairs) == 64
    for (q, c), row in zip(pairs, train):
        assert q == row["question"] and c.count("+") == 11 and c.count("=") == 11
        assert arith_reward(c, answer=row["answer"]) == 1.0
