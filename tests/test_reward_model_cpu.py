"""Reward-model maths and folders (reward/model.py, learner/reward_model.py): by hand, no Ray.

The Bradley-Terry loss against hand values; the scalar head read at the last real token under
left and right padding; texts truncated from the left; a causal-LM folder turned into a reward
model and saved with its reward statistics; the scorer's normalisation.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from troupe.learner.reward_model import bradley_terry_loss
from troupe.reward.model import (
    STATS_FILE,
    encode_texts,
    last_token_index,
    load_reward_model,
    read_stats,
    reward_text,
    save_reward_model,
    sequence_rewards,
)


def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 1.5])
    # -log sigmoid(1) and -log sigmoid(-1)
    a, b = math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(1.0))
    loss, met = bradley_terry_loss(chosen, rejected)
    assert loss.item() == pytest.approx((a + b) / 2, abs=1e-6)
    assert met == {"accuracy": 0.5, "margin": pytest.approx(0.0)}
    # margins: -log sigmoid(1 - 0.5) and -log sigmoid(-1 - 2)
    loss_m, _ = bradley_terry_loss(chosen, rejected, torch.tensor([0.5, 2.0]), reduction="sum")
    assert loss_m.item() == pytest.approx(math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(3.0)), abs=1e-6)
    # gradient of the mean loss w.r.t. r_c is -sigmoid(-(d))/B
    c = chosen.clone().requires_grad_(True)
    bradley_terry_loss(c, rejected)[0].backward()
    assert c.grad.tolist() == pytest.approx([-1 / (1 + math.e) / 2, -1 / (1 + math.exp(-1)) / 2], abs=1e-6)
    with pytest.raises(ValueError, match="equal 1-D"):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))


def test_last_token_index_left_right_and_errors():
    right = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]])
    assert last_token_index(right).tolist() == [2, 0, 3]
    assert last_token_index(left).tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="no token"):
        last_token_index(torch.tensor([[0, 0]]))


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    from troupe.learner.tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("rm")
    lm = build_tiny_model(str(root / "lm"), ["12+34=<answer>46</answer> what is"] * 30, hidden_size=32, num_layers=1,
                          num_heads=2, num_kv_heads=1, intermediate_size=64, max_position_embeddings=128, seed=0)
    model = load_reward_model(lm, seed=3)
    out = save_reward_model(model, str(root / "rm"), lm, stats={"mean": 0.25, "std": 2.0, "count": 8})
    return lm, out


def test_head_reads_last_real_token_under_left_and_right_padding(rm_dir):
    from transformers import AutoTokenizer

    _, path = rm_dir
    model = load_reward_model(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    texts = ["12+34=<answer>46</answer>", "1+2=", "what is 12+34=<answer>4</answer>"]
    with torch.no_grad():
        alone = [sequence_rewards(model, *encode_texts(tok, [t], 64)).item() for t in texts]
        ids, mask = encode_texts(tok, texts, 64)  # right padded
        right = sequence_rewards(model, ids, mask)
        lids, lmask = torch.full_like(ids, 7), torch.zeros_like(mask)  # left padded, junk in the padding
        for i in range(len(texts)):
            n = int(mask[i].sum())
            lids[i, -n:], lmask[i, -n:] = ids[i, :n], 1
        left = sequence_rewards(model, lids, lmask)
        ids_junk = ids.clone()
        ids_junk[mask == 0] = 11  # the padding token's value does not matter either
        right_junk = sequence_rewards(model, ids_junk, mask)
    assert right.tolist() == pytest.approx(alone, abs=1e-5)
    assert left.tolist() == pytest.approx(alone, abs=1e-5)
    assert right_junk.tolist() == pytest.approx(alone, abs=1e-5)
    assert len(set(round(x, 4) for x in alone)) == 3  # the rows really differ


def test_encode_keeps_the_last_tokens_and_text_has_eos(rm_dir):
    from transformers import AutoTokenizer

    _, path = rm_dir
    tok = AutoTokenizer.from_pretrained(path)
    text = reward_text("12+34=", "<answer>46</answer>", tok.eos_token)
    assert text.endswith(tok.eos_token) and text.startswith("12+34=")
    full = tok(text, add_special_tokens=False)["input_ids"]
    ids, mask = encode_texts(tok, [text, "1"], 4)
    assert ids[0].tolist() == full[-4:] and mask[0].tolist() == [1, 1, 1, 1]
    assert mask[1].tolist() == [1, 0, 0, 0]
    with pytest.raises(ValueError, match="empty"):
        encode_texts(tok, [""], 4)


def test_folder_is_an_hf_sequence_classifier_with_stats(rm_dir):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    lm, path = rm_dir
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.num_labels == 1 and cfg.architectures[0].endswith("ForSequenceClassification")
    hf = AutoModelForSequenceClassification.from_pretrained(path)
    ours = load_reward_model(path)
    assert torch.equal(hf.score.weight, ours.score.weight)
    # the head of a new reward model is seeded and small: N(0, 1/(hidden+1))
    assert torch.equal(load_reward_model(lm, seed=3).score.weight, ours.score.weight)
    assert not torch.equal(load_reward_model(lm, seed=4).score.weight, ours.score.weight)
    assert float(ours.score.weight.detach().std()) == pytest.approx(1 / math.sqrt(33), rel=0.5)
    assert read_stats(path) == {"mean": 0.25, "std": 2.0, "count": 8}
    assert read_stats(lm) is None
    with pytest.raises(ValueError, match="cannot read its config"):
        load_reward_model(str(lm) + "-missing")


def test_bad_stats_file_is_named(tmp_path):
    (tmp_path / STATS_FILE).write_text(json.dumps({"mean": 1.0}))
    with pytest.raises(ValueError, match=STATS_FILE):
        read_stats(str(tmp_path))


def test_scorer_uses_prompt_text_and_normalises(rm_dir):
    from troupe.reward.model import RewardModelScorer

    _, path = rm_dir
    raw = RewardModelScorer(path, normalize=False, batch_size=2)
    norm = RewardModelScorer(path, normalize=True, batch_size=2)
    completions = ["<answer>46</answer>", "<answer>4</answer>", "x"]
    prompt_texts = ["Q: 12+34=", "Q: 12+34=", "Q: 1+2="]
    r = raw(["12+34", "12+34", "1+2"], completions, prompt_texts=prompt_texts)
    eos = raw.tokenizer.eos_token
    assert r == pytest.approx(raw.score_texts([p + c + eos for p, c in zip(prompt_texts, completions)]), abs=1e-6)
    assert r != pytest.approx(raw(["12+34", "12+34", "1+2"], completions), abs=1e-6)  # not the raw question
    assert norm(["a"] * 3, completions, prompt_texts=prompt_texts) == pytest.approx([(x - 0.25) / 2.0 for x in r], abs=1e-5)
    assert norm.normalized and not raw.normalized
