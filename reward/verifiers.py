"""Answer extraction and verifiers: plain functions from (completion, reference) to a score.

Everything here is pure Python (``math_verify`` is imported lazily by :func:`math_reward`),
so this module can be imported without Ray, torch or vLLM, and reward workers can call
every function from any thread.

Sources:
- DeepSeek-R1 (arXiv 2501.12948), section 2.2.2: rule-based accuracy and format rewards
  (``<think>...</think>`` then ``<answer>...</answer>``), and section 2.3.2: the language
  consistency reward (share of target-language words in the chain of thought).
- GSM8K, Cobbe et al. (arXiv 2110.14168): reference solutions end in ``#### <number>``.
- MATH, Hendrycks et al. (arXiv 2103.03874): answers are given as ``\\boxed{...}``.
- math-verify (github.com/huggingface/Math-Verify): LaTeX/expression parsing and
  equivalence checking (fractions, decimals, intervals, sets, symbolic expressions).
"""

from __future__ import annotations

import ast
import math
import re
import unicodedata
from fractions import Fraction
from typing import Any, Optional

__all__ = [
    "accuracy_reward",
    "extract_answer",
    "extract_boxed",
    "format_reward",
    "gsm8k_reference",
    "gsm8k_reward",
    "language_consistency_reward",
    "math_reward",
    "numbers_equal",
    "parse_number",
    "too_large_for_sympy",
]

_MAX_BOXES_TRIED = 20  # unbalanced boxes are skipped; looking further back is quadratic
_MAX_GROUP_SCAN = 256  # exponent / factorial operands longer than this are not inspected
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\b")
# A number as written in text: optional sign, thousands groups or plain digits, decimals.
_NUMBER_RE = re.compile(
    r"(?<![\w.])[-\u2212]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<![\w.\d])[-\u2212]?\.\d+"
)
_MINUS_CHARS = {"\u2212": "-", "\u2013": "-", "\ufe63": "-", "\uff0d": "-"}
# Exponents are capped at 3 digits: Fraction("1e999999999") would build a 10^9-digit integer.
_PLAIN_NUMBER_RE = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d*)?(?:[eE][+-]?\d{1,3})?")
_FRAC_RE = re.compile(r"([+-]?)\\[dt]?frac\s*\{\s*([^{}]+?)\s*\}\s*\{\s*([^{}]+?)\s*\}")
_FRAC_SHORT_RE = re.compile(r"([+-]?)\\[dt]?frac\s*(\d)\s*(\d)")
_SLASH_RE = re.compile(r"([^/]+)/([^/]+)")
_TEXT_WRAP_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")


def _as_text(value: Any) -> str:
    """A reference or completion as text (numbers become their decimal repr; None becomes '')."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    return value if isinstance(value, str) else str(value)


def _blocks(text: str, tag: str) -> list[str]:
    """Contents of ``<tag>...</tag>`` blocks, left to right, in linear time (no regex backtracking)."""
    open_, close = f"<{tag}>", f"</{tag}>"
    out: list[str] = []
    i = 0
    while True:
        a = text.find(open_, i)
        if a < 0:
            return out
        b = text.find(close, a + len(open_))
        if b < 0:
            return out
        out.append(text[a + len(open_) : b])
        i = b + len(close)


def _last_block(text: str, tag: str) -> Optional[str]:
    """Content of the last complete ``<tag>...</tag>``: from the last opening tag before the
    last closing tag (linear time)."""
    b = text.rfind(f"</{tag}>")
    if b < 0:
        return None
    a = text.rfind(f"<{tag}>", 0, b)
    if a < 0:
        return None
    return text[a + len(tag) + 2 : b]


def extract_boxed(text: str) -> Optional[str]:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``.

    Braces are matched (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``); an unbalanced last
    box is skipped in favour of the one before it. ``\\boxed 5`` (no braces) gives ``5``.

    Args:
        text: any string.
    Returns:
        The stripped box content, or None when there is no complete box.
    Source: MATH (Hendrycks et al., arXiv 2103.03874) marks final answers with ``\\boxed``.
    """
    starts = [m.end() for m in _BOXED_RE.finditer(text)]
    for pos in reversed(starts[-_MAX_BOXES_TRIED:]):
        j = pos
        while j < len(text) and text[j] in " \t":
            j += 1
        if j >= len(text):
            continue
        if text[j] != "{":
            if j == pos:  # e.g. "\boxedfoo": not a box
                continue
            m = re.match(r"[^\s$]+", text[j:])
            if m:
                return m.group(0).strip()
            continue
        depth = 0
        for k in range(j, len(text)):
            ch = text[k]
            if ch == "{" and (k == 0 or text[k - 1] != "\\"):
                depth += 1
            elif ch == "}" and (k == 0 or text[k - 1] != "\\"):
                depth -= 1
                if depth == 0:
                    return text[j + 1 : k].strip()
    return None


def extract_answer(completion: str) -> Optional[str]:
    """The model's final answer: the last ``<answer>...</answer>``, else the last ``\\boxed{...}``.

    Args:
        completion: the generated text.
    Returns:
        The stripped content of the last complete ``<answer>`` block if there is one; otherwise
        the content of the last brace-balanced ``\\boxed{...}``; otherwise None. An unclosed
        ``<answer>`` (truncated generation) does not count.
    Source: answer tags follow DeepSeek-R1's template (arXiv 2501.12948, table 1); boxed
        answers follow MATH (arXiv 2103.03874).
    """
    completion = _as_text(completion)
    last = _last_block(completion, "answer")
    if last is not None:
        return last.strip()
    return extract_boxed(completion)


def gsm8k_reference(answer_field: str) -> str:
    """The reference number of a GSM8K ``answer`` field.

    Args:
        answer_field: a GSM8K worked solution ending in ``#### <number>``, or a bare number.
    Returns:
        The text after the last ``####`` (or the whole field when there is none), stripped,
        with thousands commas removed: ``"... #### 1,200"`` gives ``"1200"``.
    Source: GSM8K format, Cobbe et al. (arXiv 2110.14168).
    """
    text = _as_text(answer_field)
    if "####" in text:
        text = text.rsplit("####", 1)[1]
    return text.strip().replace(",", "")


def _clean_number_text(s: str) -> str:
    s = s.strip()
    for k, v in _MINUS_CHARS.items():
        s = s.replace(k, v)
    m = _TEXT_WRAP_RE.fullmatch(s)
    if m:
        s = m.group(1).strip()
    boxed = extract_boxed(s) if "\\boxed" in s or "\\fbox" in s else None
    if boxed is not None:
        s = boxed
    for junk in ("\\$", "$", "\\%", "%", "\\!", "\\,", "\\;", "{,}", "\\left", "\\right"):
        s = s.replace(junk, "," if junk == "{,}" else "")
    s = s.strip()
    while s.endswith("."):
        s = s[:-1].rstrip()
    if s.startswith("(") and s.endswith(")") and s.count("(") == 1 and s.count(")") == 1:
        s = s[1:-1].strip()
    if s.startswith("+"):
        s = s[1:]
    return s.replace(" ", "")


def _plain_fraction(s: str) -> Optional[Fraction]:
    if not s or not _PLAIN_NUMBER_RE.fullmatch(s) or not any(c.isdigit() for c in s):
        return None
    try:
        return Fraction(s.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def parse_number(text: Any) -> Optional[Fraction]:
    """Parse a number written the ways answers are written, exactly (as a Fraction).

    Accepts ``1,000``, ``$18``, ``18%``, ``5.``, ``5.0``, ``-3``/``\u22123``, ``.5``, ``1/2``,
    ``\\frac{1}{2}``, ``\\dfrac12``, ``1e3``, ``\\boxed{7}``, ``\\text{7}``, ``(7)``.

    Args:
        text: a string (or a number, converted with ``str``).
    Returns:
        The exact value, or None when ``text`` is not a single number (``"1,2"``, ``"x+1"``,
        ``"18 or 19"``, division by zero).
    """
    s = _clean_number_text(_as_text(text))
    if not s:
        return None
    value = _plain_fraction(s)
    if value is not None:
        return value
    for rx in (_FRAC_RE, _FRAC_SHORT_RE):
        m = rx.fullmatch(s)
        if m:
            num, den = _plain_fraction(m.group(2)), _plain_fraction(m.group(3))
            if num is None or den is None or den == 0:
                return None
            return -num / den if m.group(1) == "-" else num / den
    m = _SLASH_RE.fullmatch(s)
    if m:
        num, den = _plain_fraction(m.group(1)), _plain_fraction(m.group(2))
        if num is None or den is None or den == 0:
            return None
        return num / den
    return None


def numbers_equal(a: Any, b: Any) -> bool:
    """Exact numeric equality of two answers written as text.

    ``"1,000" == "1000"``, ``"$18" == "18"``, ``"50%" == "50"``, ``"18." == "18"``,
    ``"1/2" == "0.5" == "\\frac{1}{2}"``, ``"-3" == "\u22123"``, ``"5.0" == "5"``; but
    ``"0.5" != "0.05"`` and ``"1/2" != "2"``. No tolerance: values are compared as Fractions.

    Args:
        a, b: strings (or numbers).
    Returns:
        True iff both parse with :func:`parse_number` and are equal; False otherwise
        (never raises).
    """
    x, y = parse_number(a), parse_number(b)
    return x is not None and y is not None and x == y


def _last_number(text: str) -> Optional[str]:
    found = _NUMBER_RE.findall(text)
    return found[-1] if found else None


def _first_number(text: str) -> Optional[str]:
    m = _NUMBER_RE.search(text)
    return m.group(0) if m else None


def _numeric_match(candidate: str, reference: str) -> bool:
    """candidate equals reference as a whole number, or (failing that) its last number does."""
    if numbers_equal(candidate, reference):
        return True
    if parse_number(candidate) is not None:
        return False
    last = _last_number(_clean_text_numbers(candidate))
    return last is not None and numbers_equal(last, reference)


def _clean_text_numbers(text: str) -> str:
    for k, v in _MINUS_CHARS.items():
        text = text.replace(k, v)
    return text.replace("{,}", ",")


def gsm8k_reward(completion: str, answer: Any) -> float:
    """GSM8K correctness: 1.0 iff the completion's final number equals the reference number.

    The final answer is taken, in order, from: the last ``<answer>...</answer>``; the last
    ``\\boxed{...}``; the first number after the last ``####``; the last number anywhere in the
    completion. An answer block holding text (``"18 dollars"``) is judged by its last number.
    Comparison is exact (:func:`numbers_equal`: commas, ``$``, ``%``, ``1/2`` vs ``0.5``).

    Args:
        completion: generated text.
        answer: the reference: a full GSM8K solution with ``#### <number>`` or a bare number.
    Returns:
        1.0 or 0.0.
    Source: GSM8K (Cobbe et al., arXiv 2110.14168); rule-based accuracy reward as in
        DeepSeek-R1 (arXiv 2501.12948).
    """
    completion = _as_text(completion)
    reference = gsm8k_reference(answer)
    if parse_number(reference) is None:
        return 0.0
    candidate = extract_answer(completion)
    if candidate is not None:
        return 1.0 if _numeric_match(candidate, reference) else 0.0
    if "####" in completion:
        tail = _clean_text_numbers(completion.rsplit("####", 1)[1])
        first = _first_number(tail)
        return 1.0 if first is not None and numbers_equal(first, reference) else 0.0
    last = _last_number(_clean_text_numbers(completion))
    return 1.0 if last is not None and numbers_equal(last, reference) else 0.0


def _latex_wrap(expr: str) -> str:
    """Wrap a bare answer so that math-verify's LaTeX extraction sees it."""
    expr = expr.strip()
    if "\\boxed" in expr or expr.startswith("$") or expr.startswith("\\(") or expr.startswith("\\["):
        return expr
    return "$" + expr + "$"


_MAX_ANSWER_CHARS = 2000  # a longer extracted answer is not an answer (scores 0)
_MATH_TAIL_CHARS = 4000  # without an answer block, only this much of the end is searched
_MAX_EXPONENT_LOG10 = 5.0  # refuse numeric exponents / factorial arguments above 10^5
_LATEX_NUMERIC_SUBS = (
    ("\\left", ""),
    ("\\right", ""),
    ("\\!", ""),
    ("\\,", ""),
    ("\\cdot", "*"),
    ("\\times", "*"),
)
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")


def _log10_bound(node: ast.AST) -> Optional[float]:
    """Upper bound on log10|value| of a numeric expression AST; None if not purely numeric."""
    if isinstance(node, ast.Expression):
        return _log10_bound(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        v = abs(node.value)
        return math.log10(v) if v > 1 else 0.0
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        return _log10_bound(node.operand)
    if isinstance(node, ast.BinOp):
        a, b = _log10_bound(node.left), _log10_bound(node.right)
        if a is None or b is None:
            return None
        if isinstance(node.op, (ast.Add, ast.Sub)):
            return max(a, b) + 0.302
        if isinstance(node.op, ast.Mult):
            return a + b
        if isinstance(node.op, ast.Div):
            return a
        if isinstance(node.op, ast.Pow):
            return math.inf if b > 300 else (10.0**b) * max(a, 0.302)
    return None


def _numeric_log10(token: str) -> Optional[float]:
    """log10 upper bound of a LaTeX/plain numeric token (``10^{10}``, ``2\\cdot 10^9``), None if symbolic."""
    t = token
    for a, b in _LATEX_NUMERIC_SUBS:
        t = t.replace(a, b)
    for _ in range(10):
        t2 = _LATEX_FRAC_RE.sub(r"((\1)/(\2))", t)
        if t2 == t:
            break
        t = t2
    t = t.replace("{", "(").replace("}", ")").replace("^", "**").replace(" ", "")
    if not t or not re.fullmatch(r"[0-9.+\-*/()]+", t):
        return None
    try:
        return _log10_bound(ast.parse(t, mode="eval"))
    except (SyntaxError, ValueError, OverflowError, RecursionError):
        return math.inf  # e.g. a literal longer than Python's int digit limit


def _token_start(text: str, end: int) -> int:
    """Start of the token ending at ``end``: a digit run or a balanced (...) / {...} group."""
    j = end
    while j > 0 and text[j - 1] == " ":
        j -= 1
    if j == 0:
        return end
    if text[j - 1] in ")}":
        close = text[j - 1]
        open_ = "(" if close == ")" else "{"
        depth = 0
        for k in range(j - 1, max(-1, j - 1 - _MAX_GROUP_SCAN), -1):
            if text[k] == close:
                depth += 1
            elif text[k] == open_:
                depth -= 1
                if depth == 0:
                    return k
        return end
    k = j
    while k > 0 and (text[k - 1].isdigit() or text[k - 1] == "."):
        k -= 1
    return k


def _group_before(text: str, end: int) -> str:
    """The operand ending just before ``end`` (a ``!``), power chains included: ``10^{10}``."""
    start = _token_start(text, end)
    while start < end:
        k = start
        while k > 0 and text[k - 1] == " ":
            k -= 1
        if k > 0 and text[k - 1] == "^":
            prev = _token_start(text, k - 1)
            if prev >= k - 1:
                break
            start = prev
        else:
            break
    return text[start:end].strip()


def _group_after(text: str, start: int) -> str:
    """The exponent after a ``^`` at ``start - 1``: a balanced {...} group, a digit run, or one char."""
    j = start
    while j < len(text) and text[j] == " ":
        j += 1
    if j >= len(text):
        return ""
    if text[j] == "{":
        depth = 0
        for k in range(j, min(len(text), j + _MAX_GROUP_SCAN)):
            if text[k] == "{":
                depth += 1
            elif text[k] == "}":
                depth -= 1
                if depth == 0:
                    return text[j + 1 : k]
        return text[j + 1 : j + _MAX_GROUP_SCAN]
    m = re.match(r"\d+(?:\.\d+)?(?:\s*(?:\^|\*\*)\s*(?:\{[^{}]*\}|\d+))*", text[j:])
    return m.group(0) if m else text[j]


def too_large_for_sympy(expr: str) -> bool:
    """True if ``expr`` asks for a number too large to compute (sympy would hang on it).

    SymPy evaluates numeric powers and factorials exactly, inside C code that holds the GIL,
    so ``9^{9^{9}}`` or ``10^{10}!`` freezes the whole process (no thread timeout can stop
    it). Refused: any numeric exponent, or factorial argument, above 10^5 (upper bound,
    computed on log10 magnitudes without evaluating anything). Symbolic exponents pass.

    Args:
        expr: an answer string (LaTeX or plain).
    Returns:
        True when the expression must not be handed to math-verify.
    """
    if "^" not in expr and "!" not in expr and "**" not in expr:
        return False
    for m in re.finditer(r"\^|\*\*", expr):
        bound = _numeric_log10(_group_after(expr, m.end()))
        if bound is not None and bound > _MAX_EXPONENT_LOG10:
            return True
    for m in re.finditer(r"(?<!\\)!(?!=)", expr):
        bound = _numeric_log10(_group_before(expr, m.start()))
        if bound is not None and bound > _MAX_EXPONENT_LOG10:
            return True
    return False


def math_reward(completion: str, answer: Any) -> float:
    """MATH-style correctness with math-verify: 1.0 iff the final answer is equivalent to gold.

    The prediction is the last ``<answer>`` block or ``\\boxed{...}`` (:func:`extract_answer`),
    wrapped in ``$...$`` (an extracted answer over 2000 characters scores 0); when the
    completion has neither, math-verify searches the last 4000 characters of the completion
    (its default: last boxed/LaTeX expression, then plain expressions). The gold
    answer is wrapped in ``$...$`` unless it already holds ``$``/``\\boxed``. Equivalence is
    ``math_verify.verify(gold, pred)``: numbers (``1/2`` = ``0.5`` = ``\\frac12``), symbolic
    expressions, intervals, sets, tuples, matrices, equations.

    math-verify's own timeouts use ``signal.alarm``, which only works in the main thread;
    they are disabled here (``parsing_timeout=None``, ``timeout_seconds=None``) so the
    function can run in reward-worker threads, which enforce the timeout instead
    (``troupe.reward.scoring``). Answers asking for astronomically large numbers
    (``9^{9^{9}}``, ``10^{10}!``: :func:`too_large_for_sympy`) score 0 without being parsed,
    because SymPy would compute them while holding the GIL, where no timeout can stop it.

    Args:
        completion: generated text.
        answer: gold answer (LaTeX or plain), e.g. MATH-500's ``answer`` column.
    Returns:
        1.0 or 0.0 (0.0 also when gold or prediction cannot be parsed).
    Source: math-verify (github.com/huggingface/Math-Verify); MATH (arXiv 2103.03874).
    """
    from math_verify import parse, verify  # lazy: sympy is slow to import

    gold_text = _as_text(answer).strip()
    if not gold_text:
        return 0.0
    if too_large_for_sympy(gold_text):
        return 0.0
    gold = parse(_latex_wrap(gold_text), parsing_timeout=None)
    if not gold:
        return 0.0
    completion = _as_text(completion)
    candidate = extract_answer(completion)
    if candidate is not None and len(candidate) > _MAX_ANSWER_CHARS:
        return 0.0
    # Without an answer block, math-verify searches the text; only its tail can hold the
    # final answer, and its regexes (GIL held) are slow on very long degenerate outputs.
    text = candidate if candidate is not None else completion[-_MATH_TAIL_CHARS:]
    if too_large_for_sympy(text):
        return 0.0
    if candidate is not None:
        pred = parse(_latex_wrap(candidate), parsing_timeout=None)
        if not pred:
            pred = parse(candidate, parsing_timeout=None)
    else:
        pred = parse(text, parsing_timeout=None)
    if not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=None) else 0.0


def accuracy_reward(completion: str, answer: Any) -> float:
    """Exact numeric accuracy of the ``<answer>`` block (the synthetic arithmetic task).

    Only the last complete ``<answer>...</answer>`` counts (no boxed or free-text fallback,
    so the format is part of being right); its content must be a single number equal to the
    reference (:func:`numbers_equal`: ``"12"``, ``" 12. "``, ``"12.0"`` all match 12).

    Args:
        completion: generated text.
        answer: the reference number (str or int/float).
    Returns:
        1.0 or 0.0.
    Source: DeepSeek-R1's rule-based accuracy reward (arXiv 2501.12948, section 2.2.2).
    """
    last = _last_block(_as_text(completion), "answer")
    if last is None:
        return 0.0
    return 1.0 if numbers_equal(last, answer) else 0.0


_TAG = r"</?(?:think|answer)>"
_FORMAT_RE = re.compile(
    r"\s*<think>((?:(?!" + _TAG + r").)*)</think>\s*<answer>((?:(?!" + _TAG + r").)*)</answer>\s*",
    re.DOTALL,
)


def format_reward(completion: str, **_: Any) -> float:
    """DeepSeek-R1's format reward: the completion is exactly a think block then an answer block.

    Accepts ``<think>...</think>`` followed by ``<answer>...</answer>``, whitespace allowed
    around and between them, nothing else outside, and no nested/repeated tags inside. The
    prompt may already end with ``<think>`` (R1's template), so ``"<think>" + completion`` is
    also tried.

    Args:
        completion: generated text. Other keyword arguments are ignored.
    Returns:
        1.0 or 0.0.
    Source: DeepSeek-R1 (arXiv 2501.12948), section 2.2.2 "Format rewards".
    """
    completion = _as_text(completion)
    if _FORMAT_RE.fullmatch(completion) or _FORMAT_RE.fullmatch("<think>" + completion):
        return 1.0
    return 0.0


# Unicode character-name prefixes -> script. Kana are grouped with CJK ideographs because
# Japanese writes with both; Hangul is Korean.
_SCRIPT_PREFIXES = (
    ("LATIN", "Latin"),
    ("FULLWIDTH LATIN", "Latin"),
    ("CYRILLIC", "Cyrillic"),
    ("GREEK", "Greek"),
    ("ARABIC", "Arabic"),
    ("HEBREW", "Hebrew"),
    ("DEVANAGARI", "Devanagari"),
    ("BENGALI", "Bengali"),
    ("TAMIL", "Tamil"),
    ("TELUGU", "Telugu"),
    ("GUJARATI", "Gujarati"),
    ("THAI", "Thai"),
    ("HANGUL", "Hangul"),
    ("CJK", "CJK"),
    ("HIRAGANA", "CJK"),
    ("KATAKANA", "CJK"),
    ("HALFWIDTH KATAKANA", "CJK"),
    ("ARMENIAN", "Armenian"),
    ("GEORGIAN", "Georgian"),
    ("ETHIOPIC", "Ethiopic"),
)
_SEGMENTED_PER_CHAR = {"CJK"}  # scripts written without spaces: each character is a word
_LATEX_CMD_RE = re.compile(r"\\[A-Za-z]+")


def _char_script(ch: str) -> Optional[str]:
    if not ch.isalpha():
        return None
    name = unicodedata.name(ch, "")
    for prefix, script in _SCRIPT_PREFIXES:
        if name.startswith(prefix):
            return script
    return "Other" if name and not name.startswith("MATHEMATICAL") else None


def _words_by_script(text: str) -> list[str]:
    """The script of every word in ``text`` (LaTeX commands and single Greek letters skipped)."""
    text = _LATEX_CMD_RE.sub(" ", text)
    scripts: list[str] = []
    current: Optional[str] = None
    length = 0

    def close() -> None:
        nonlocal current, length
        if current is not None and not (current == "Greek" and length == 1):
            scripts.append(current)
        current, length = None, 0

    for ch in text:
        script = _char_script(ch)
        if script is None:
            if current is not None and unicodedata.category(ch).startswith("M"):
                continue  # combining mark (e.g. Devanagari vowel sign) continues the word
            close()
            continue
        if script in _SEGMENTED_PER_CHAR:
            close()
            scripts.append(script)
            continue
        if current is not None and script != current:
            close()
        current = script
        length += 1
    close()
    return scripts


def _dominant(scripts: list[str]) -> Optional[str]:
    if not scripts:
        return None
    counts: dict[str, int] = {}
    for s in scripts:
        counts[s] = counts.get(s, 0) + 1
    return max(counts.items(), key=lambda kv: (kv[1], kv[0] == "Latin"))[0]


def language_consistency_reward(completion: str, prompt: str) -> float:
    """DeepSeek-R1's language-consistency reward: share of words in the prompt's script.

    The scored text is the content of the ``<think>`` and ``<answer>`` blocks (the whole
    completion when it has neither; a missing opening ``<think>`` is tolerated). Words are
    maximal runs of letters of one script (Unicode names: Latin, Cyrillic, Greek, Arabic,
    Hebrew, Devanagari, Thai, Hangul, CJK incl. kana, ...); CJK is written without spaces, so
    each CJK character is one word. Digits, punctuation, LaTeX commands and lone Greek
    letters (math symbols) are not words. The target script is the prompt's dominant script
    (most words); a prompt with no words uses the completion's own dominant script.

    Args:
        completion: generated text.
        prompt: the question as the user wrote it.
    Returns:
        A float in [0, 1]; 1.0 when the completion has no words at all.
    Source: DeepSeek-R1 (arXiv 2501.12948), section 2.3.2: "calculated as the proportion of
        target language words in the CoT".
    """
    completion = _as_text(completion)
    thinks = _blocks(completion, "think") or _blocks("<think>" + completion, "think")
    answers = _blocks(completion, "answer")
    if thinks or answers:
        text = " ".join(thinks + answers)
    else:
        text = re.sub(r"</?(?:think|answer)>", " ", completion)
    words = _words_by_script(text)
    if not words:
        return 1.0
    target = _dominant(_words_by_script(_as_text(prompt))) or _dominant(words)
    return sum(1 for w in words if w == target) / len(words)

