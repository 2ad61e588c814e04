"""Verifiers on tricky pairs and on the real GSM8K / MATH-500 files (CPU only, no Ray)."""

from __future__ import annotations

import json
import sys
from fractions import Fraction

import pytest

from troupe.reward.verifiers import (
    accuracy_reward,
    extract_answer,
    extract_boxed,
    format_reward,
    gsm8k_reference,
    gsm8k_reward,
    language_consistency_reward,
    math_reward,
    numbers_equal,
    parse_number,
    too_large_for_sympy,
)
from troupe.rollout.data import preset_path

# ---------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<answer>5</answer>", "5"),
        ("<answer>1</answer> then <answer> 7 </answer>", "7"),
        ("<answer>3</answer> \\boxed{9}", "3"),  # answer tags win over boxed
        ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{1} and finally \\boxed{2}", "2"),
        ("\\boxed{\\left\\{1, 2\\right\\}}", "\\left\\{1, 2\\right\\}"),
        ("\\boxed{2} then broken \\boxed{3", "2"),  # unbalanced last box skipped
        ("\\boxed 7", "7"),
        ("\\fbox{4}", "4"),
        ("<answer>unclosed 5", None),
        ("no answer here 42", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_boxed_nested():
    assert extract_boxed("x \\boxed{a^{b^{c}}} y") == "a^{b^{c}}"
    assert extract_boxed("\\boxedx") is None


def test_gsm8k_reference():
    assert gsm8k_reference("work\n#### 1,200") == "1200"
    assert gsm8k_reference("#### -3") == "-3"
    assert gsm8k_reference(" 72 ") == "72"
    assert gsm8k_reference(18) == "18"


# ---------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    "a, b",
    [
        ("1/2", "0.5"),
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac{1}{2}", ".5"),
        ("\\frac12", "0.5"),
        ("1,000", "1000"),
        ("1,000,000.50", "1000000.5"),
        ("$18", "18"),
        ("\\$18", "18"),
        ("18.", "18"),
        ("18.00", "18"),
        ("5.0", "5"),
        ("-3", "\u22123"),
        ("50%", "50"),
        ("+7", "7"),
        ("\\boxed{12}", "12"),
        ("\\text{12}", "12"),
        ("1e3", "1000"),
        ("-\\frac{3}{4}", "-0.75"),
    ],
)
def test_numbers_equal_matches(a, b):
    assert numbers_equal(a, b)
    assert numbers_equal(b, a)


@pytest.mark.parametrize(
    "a, b",
    [
        ("18", "19"),
        ("0.5", "0.05"),
        ("1/2", "2"),
        ("1,2", "12"),
        ("-3", "3"),
        ("18 or 19", "18"),
        ("", "0"),
        ("x", "x"),
        ("1/0", "1/0"),
        ("0.3333333", "1/3"),
    ],
)
def test_numbers_equal_near_misses(a, b):
    assert not numbers_equal(a, b)


def test_parse_number_exact():
    assert parse_number("2/6") == Fraction(1, 3)
    assert parse_number("abc") is None


# ---------------------------------------------------------------- gsm8k


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("She makes 9 * 2 = $18 every day.", "#### 18", 1.0),
        ("<answer>18</answer>", "18", 1.0),
        ("<answer>$18.00</answer>", "18", 1.0),
        ("<answer>18 dollars</answer>", "18", 1.0),
        ("<answer>19</answer> 18", "18", 0.0),  # the tagged answer counts, not the last number
        ("The total is \\boxed{1,200}.", "#### 1,200", 1.0),
        ("steps 3 + 4 = 7\n#### 7", "7", 1.0),
        ("steps\n#### 7 is the answer, not 8", "7", 1.0),
        ("it is 17", "18", 0.0),
        ("it is 180", "18", 0.0),
        ("it is 1.8", "18", 0.0),
        ("the answer is -5.", "-5", 1.0),
        ("the answer is \u22125", "-5", 1.0),
        ("nothing numeric", "18", 0.0),
        ("<answer>0.5</answer>", "1/2", 1.0),
    ],
)
def test_gsm8k_reward_pairs(completion, answer, expected):
    assert gsm8k_reward(completion, answer) == expected


def _gsm8k_rows(split: str) -> list[dict]:
    path = preset_path("gsm8k", split)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _bump_final_number(solution: str) -> str:
    head, tail = solution.rsplit("####", 1)
    value = Fraction(tail.strip().replace(",", ""))
    return f"{head}#### {value + 1}"


def test_gsm8k_test_split_gold_and_perturbed():
    rows = _gsm8k_rows("test")
    assert len(rows) == 1319
    gold_ok = [gsm8k_reward(r["answer"], r["answer"]) for r in rows]
    assert sum(gold_ok) == 1319, [r["answer"][-40:] for r, ok in zip(rows, gold_ok) if ok != 1.0][:5]
    wrong = [gsm8k_reward(_bump_final_number(r["answer"]), r["answer"]) for r in rows]
    assert sum(wrong) == 0
    # the same through the preset's bare-number reference, and inside answer tags
    tagged = [gsm8k_reward(f"<think>x</think><answer>{gsm8k_reference(r['answer'])}</answer>", r["answer"]) for r in rows]
    assert sum(tagged) == 1319


# ---------------------------------------------------------------- math (math-verify)


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("0.5", "\\frac{1}{2}"),
        ("1/2", "0.5"),
        ("\\dfrac{1}{2}", "\\frac12"),
        ("1000", "1,000"),
        ("\\$18", "18"),
        ("(1, 2]", "(1,2]"),
        ("[0, \\infty)", "[0,\\infty)"),
        ("\\{3, 2, 1\\}", "\\{1,2,3\\}"),
        ("3, 2, 1", "1,2,3"),
        ("\\frac{\\sqrt2}{2}", "\\sqrt{2}/2"),
        ("(x+1)^2", "x^2+2x+1"),
        ("10 \\sqrt 3", "10\\sqrt{3}"),
        ("\\text{(C)}", "C"),
        ("\u22123", "-3"),
        ("5.0", "5"),
    ],
)
def test_math_reward_equivalent(pred, gold):
    assert math_reward(f"reasoning... \\boxed{{{pred}}}", gold) == 1.0
    assert math_reward(f"<think>r</think><answer>{pred}</answer>", gold) == 1.0


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("18", "19"),
        ("0.05", "0.5"),
        ("2", "1/2"),
        ("(2, 1)", "(1,2)"),
        ("[1, 2]", "(1,2)"),
        ("\\{1, 2\\}", "\\{1,2,3\\}"),
        ("6.28", "2\\pi"),
        ("x^2+1", "(x+1)^2"),
    ],
)
def test_math_reward_near_misses(pred, gold):
    assert math_reward(f"\\boxed{{{pred}}}", gold) == 0.0


def test_math_reward_no_answer_and_bad_gold():
    assert math_reward("I don't know", "5") == 0.0
    assert math_reward("\\boxed{5}", "") == 0.0
    assert math_reward("the answer is $5$", "5") == 1.0  # no box: math-verify searches the text


def test_math_reward_from_thread():
    """math-verify's signal timeouts are off, so the reward works outside the main thread."""
    import threading

    out = []
    t = threading.Thread(target=lambda: out.append(math_reward("\\boxed{\\frac{2}{4}}", "0.5")))
    t.start()
    t.join(60)
    assert out == [1.0]


def test_math500_gold_solutions_verify():
    path = preset_path("math500")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(rows) == 500
    misses = []
    for r in rows:
        if math_reward(r["solution"], r["answer"]) != 1.0:
            misses.append((r["unique_id"], r["answer"], extract_answer(r["solution"])))
    print(f"\nMATH-500 gold solution misses: {len(misses)}", file=sys.stderr)
    for m in misses:
        print("  miss:", m, file=sys.stderr)
    assert len(rows) - len(misses) >= 495, misses


# ---------------------------------------------------------------- accuracy / format / language


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("<think>3+4</think><answer>7</answer>", "7", 1.0),
        ("<answer> 7. </answer>", 7, 1.0),
        ("<answer>7.0</answer>", "7", 1.0),
        ("<answer>-12</answer>", "-12", 1.0),
        ("<answer>8</answer>", "7", 0.0),
        ("<answer>7 or 8</answer>", "7", 0.0),
        ("the answer is 7", "7", 0.0),  # no tags: no credit
        ("\\boxed{7}", "7", 0.0),
        ("<answer>70</answer>", "7", 0.0),
    ],
)
def test_accuracy_reward(completion, answer, expected):
    assert accuracy_reward(completion, answer) == expected


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>reasoning</think><answer>7</answer>", 1.0),
        ("<think>\nreasoning\n</think>\n<answer>\n7\n</answer>\n", 1.0),
        ("  <think>a</think>   <answer>b</answer>  ", 1.0),
        ("reasoning</think><answer>7</answer>", 1.0),  # prompt ended with "<think>"
        ("<think></think><answer></answer>", 1.0),
        ("<think>a</think><answer>7</answer> trailing text", 0.0),
        ("preamble <think>a</think><answer>7</answer>", 0.0),
        ("<answer>7</answer><think>a</think>", 0.0),
        ("<think>a</think>", 0.0),
        ("<answer>7</answer>", 0.0),
        ("<think>a</think>middle<answer>7</answer>", 0.0),
        ("<think>a<think>b</think><answer>7</answer>", 0.0),
        ("<think>a</think><answer>7</answer><answer>8</answer>", 0.0),
        ("<think>a</think><answer>7", 0.0),
        ("", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(completion) == expected
    assert format_reward(completion, answer="ignored") == expected


def test_language_consistency():
    en = "What is two plus two?"
    zh = "二加二等于多少？"
    ru = "Сколько будет два плюс два?"
    assert language_consistency_reward("<think>two plus two is four</think><answer>4</answer>", en) == 1.0
    assert language_consistency_reward("<think>二加二等于四</think><answer>四</answer>", zh) == 1.0
    assert language_consistency_reward("<think>два плюс два</think><answer>4</answer>", ru) == 1.0
    # 3 CJK characters + 2 English words -> 3/5 for a Chinese prompt, 2/5 for an English one
    mixed = "<think>我认为 answer is</think><answer>4</answer>"
    assert language_consistency_reward(mixed, zh) == pytest.approx(3 / 5)
    assert language_consistency_reward(mixed, en) == pytest.approx(2 / 5)
    # math notation is not language: LaTeX commands, digits, lone Greek letters
    assert language_consistency_reward("<think>二加二 \\frac{4}{1} = 4, π</think><answer>4</answer>", zh) == 1.0
    # the prompt may end with <think>: a completion without the opening tag is still read
    assert language_consistency_reward("两个 two</think><answer>4</answer>", zh) == pytest.approx(2 / 3)
    assert language_consistency_reward("<answer>4</answer>", en) == 1.0  # no words at all
    assert 0.0 <= language_consistency_reward("Hola Привет 你好", en) <= 1.0


def test_verifiers_import_without_heavy_deps():
    """reward/verifiers, registry and scoring import no Ray, torch or vLLM (fresh interpreter)."""
    import subprocess

    code = (
        "import sys, troupe.reward.verifiers, troupe.reward.registry, troupe.reward.scoring, troupe.rollout.data;"
        "bad=[m for m in ('ray','torch','vllm','deepspeed','sympy') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr



@pytest.mark.parametrize(
    "expr, refused",
    [
        ("9^{9^{9}}", True),
        ("10^{10^{10}}", True),
        ("10^{10}!", True),
        ("(10^{6})!", True),
        ("2^{10^{8}}", True),
        ("2^{2\\cdot 10^{9}}", True),
        ("2**10**10", True),
        ("9^9^9", True),
        ("2^{2023}", False),
        ("2^{2^{10}}", False),
        ("10^{100}", False),
        ("e^{x^2}", False),
        ("(x+1)^{200}", False),
        ("5!", False),
        ("5!=120", False),
        ("\\frac{1}{2}", False),
    ],
)
def test_too_large_for_sympy(expr, refused):
    assert too_large_for_sympy(expr) is refused


def test_math_reward_refuses_gil_bombs_quickly():
    """SymPy would evaluate these while holding the GIL (no timeout can stop it): they score 0 at
    once. Run in a subprocess so that a regression fails the test instead of hanging pytest."""
    import subprocess

    code = (
        "from troupe.reward.verifiers import math_reward\n"
        "for e in ['9^{9^{9}}', '10^{10^{10}}', '10^{10}!', '2**10**10']:\n"
        "    assert math_reward('\\\\boxed{%s}' % e, '1') == 0.0, e\n"
        "    assert math_reward('<answer>1</answer>', e) == 0.0, e\n"
        "assert math_reward('\\\\boxed{2^{2023}}', '2^{2023}') == 1.0\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_number_parsing_has_no_huge_exponents():
    assert parse_number("1e999999999") is None  # would build a 10^9-digit integer
    assert parse_number("1" * 5000) is None  # beyond Python's int digit limit: not a number here
    assert gsm8k_reward("<answer>1e99999999</answer>", "5") == 0.0
