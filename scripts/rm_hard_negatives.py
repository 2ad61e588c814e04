"""Hard negatives for the arithmetic reward model (docs/results.md, "Earlier tries").

For every pair of a `troupe rm pairs` file, K more pairs of the same prompt: the correct column
worked solution (chosen) against a copy with one corrupted column carried through consistently
(rejected): a wrong digit sum, a wrong operand digit, or an answer that disagrees with the steps.
These are the errors the policy made when it hacked the reward model trained on sampled pairs only.

Usage: python scripts/rm_hard_negatives.py PAIRS.jsonl OUT.jsonl K   (writes the pairs plus K x as many, shuffled)
"""
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from troupe.demo.arith import _operands, worked_solution  # noqa: E402


def corrupt(question: str, rng: random.Random):
    """A column worked solution of ``question`` with one seeded corruption carried through, or None
    when the corruption happens to leave the answer right (the caller draws again)."""
    nums = _operands(question)
    width = max(len(str(x)) for x in nums)
    kind = rng.choice(["sum", "operand", "answer"])
    bad_col = rng.randrange(width)
    steps, digits, carry = [], [], 0
    for col in range(width):
        terms = [int(str(x)[::-1][col]) for x in nums if col < len(str(x))]
        if kind == "operand" and col == bad_col:
            i = rng.randrange(len(terms))
            terms[i] = (terms[i] + rng.randint(1, 9)) % 10
        if carry:
            terms.append(carry)
        s = sum(terms)
        if kind == "sum" and col == bad_col:
            s = max(0, s + rng.choice([-2, -1, 1, 2]))
        steps.append("+".join(map(str, terms)) + f"={s}" if len(terms) > 1 else f"{terms[0]}={s}")
        digits.append(s % 10)
        carry = s // 10
    result = int((str(carry) if carry else "") + "".join(str(d) for d in reversed(digits)))
    ans = result
    if kind == "answer":
        while ans == result:
            ans = max(0, result + rng.choice([-10, -1, 1, 10, 9, 11]))
    if ans == sum(nums):
        return None
    return f"<think>{','.join(steps)},so {result}</think><answer>{ans}</answer>"


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        raise SystemExit(__doc__)
    src_path, out_path, k = argv[0], argv[1], int(argv[2])
    rng = random.Random(0)
    with open(src_path) as f:
        src = [json.loads(line) for line in f]
    out = []
    for r in src:
        for _ in range(k):
            bad = None
            while bad is None:
                bad = corrupt(r["question"], rng)
            out.append({**r, "chosen": worked_solution({"question": r["question"]}), "rejected": bad,
                        "chosen_reward": 1.0, "rejected_reward": 0.0})
    rows = src + out
    rng.shuffle(rows)
    with open(out_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(len(src), "sampled +", len(out), "augmented")


if __name__ == "__main__":
    main(sys.argv[1:])
