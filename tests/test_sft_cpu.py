"""The SFT loss of the DeepSpeed ranks as pure functions (troupe.learner.sft): the collated loss mask,
the completion-token count, and the per-micro-batch share whose sum over any split of a step (ranks x
micro-batches) is the token mean over the whole step: the same loss and gradient as one forward on
the whole batch (HF's causal-LM loss), unlike a mean of micro-batch means."""

from __future__ import annotations

import pytest
import torch

from troupe.learner.sft import collate_examples, completion_loss_share, target_tokens


def _model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64,
                      initializer_range=0.5)  # wide init: token losses differ a lot
    return Qwen2ForCausalLM(cfg).float()


def _examples() -> list[tuple[list[int], list[int]]]:
    """8 examples with completions of 1 to 15 tokens (lengths differ a lot, so weighting matters)."""
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(8):
        p = torch.randint(3, 40, (1 + i % 3,), generator=g).tolist()
        c = torch.randint(3, 40, (1 + (i * 5) % 15,), generator=g).tolist() + [2]
        out.append((p, c))
    return out


def test_collate_masks_prompt_and_padding():
    ids, attn, labels = collate_examples([([5, 6], [7, 2]), ([5], [8, 9, 2])], pad_id=1)
    assert ids.tolist() == [[5, 6, 7, 2], [5, 8, 9, 2]]
    assert attn.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert labels.tolist() == [[-100, -100, 7, 2], [-100, 8, 9, 2]]
    ids, attn, labels = collate_examples([([5], [2]), ([5, 6], [7, 8, 2])], pad_id=1)
    assert ids[0].tolist() == [5, 2, 1, 1, 1] and attn[0].tolist() == [1, 1, 0, 0, 0]
    assert labels[0].tolist() == [-100, 2, -100, -100, -100]


def test_target_tokens_counts_what_gets_a_loss():
    assert target_tokens([([5, 6], [7, 2]), ([5], [8, 9, 2])]) == 5
    assert target_tokens([([], [7, 2])]) == 1  # nothing predicts the first token of a prompt-less example
    ids, _, labels = collate_examples([([], [7, 2]), ([5], [8, 2])], pad_id=1)
    assert int((labels[:, 1:] != -100).sum()) == target_tokens([([], [7, 2]), ([5], [8, 2])])


@pytest.mark.parametrize("splits", [[8], [3, 3, 2], [1] * 8, [4, 4], [2, 2, 2, 2]])
def test_loss_shares_sum_to_the_whole_step_token_mean(splits):
    model = _model()
    data = _examples()
    n_tokens = target_tokens(data)

    ids, attn, labels = collate_examples(data, pad_id=0)
    model.zero_grad()
    ref = model(input_ids=ids, attention_mask=attn, labels=labels).loss  # HF: token mean over the whole batch
    ref.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    total, means, start = 0.0, [], 0
    for n in splits:  # micro-batches (or ranks: the share does not care which)
        part = data[start:start + n]
        start += n
        ids, attn, labels = collate_examples(part, pad_id=0)
        share = completion_loss_share(model(input_ids=ids, attention_mask=attn).logits, labels, n_tokens)
        share.backward()
        total += float(share.detach())
        means.append(float(share.detach()) * n_tokens / target_tokens(part))
    assert total == pytest.approx(float(ref.detach()), rel=1e-5)
    for g, r in zip((p.grad for p in model.parameters()), ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
    if len(splits) > 1:  # a mean of micro-batch means weights short completions up: it is a different loss
        assert sum(means) / len(means) != pytest.approx(float(ref.detach()), rel=1e-4)


def test_loss_share_needs_tokens():
    with pytest.raises(ValueError, match="step_tokens"):
        completion_loss_share(torch.zeros(1, 2, 5), torch.tensor([[-100, 1]]), 0)


def test_train_sft_names_bad_settings_before_ray_starts(tmp_path):
    """Errors that need no Ray: a step batch the ranks cannot share, no examples, an example longer
    than the model takes (named by index, with the model's limit)."""
    from troupe.cluster.sft_train import train_sft
    from troupe.configs.schema import RunConfig
    from troupe.learner.tiny_model import build_tiny_model

    model = build_tiny_model(str(tmp_path / "m"), ["1+2=3", "hello world"] * 10, hidden_size=32, num_layers=1,
                             num_heads=1, num_kv_heads=1, intermediate_size=64, max_position_embeddings=16)

    def cfg(ranks: int, batch: int) -> RunConfig:
        return RunConfig.model_validate({
            "model": {"path": model}, "data": {"source": "jsonl", "path": "unused.jsonl"},
            "rollout": {"prompts_per_step": 2, "group_size": 4}, "learner": {"num_ranks": ranks, "micro_batch_size": 2},
            "sft": {"steps": 2, "batch_size": batch}})

    out = str(tmp_path / "out" / "model")
    with pytest.raises(ValueError, match=r"sft.batch_size = 6 must be a multiple of learner.num_ranks = 4"):
        train_sft(cfg(4, 6), model, [("1+2=", "3")], out)
    with pytest.raises(ValueError, match="no examples"):
        train_sft(cfg(1, 2), model, [], out)
    with pytest.raises(ValueError, match=r"SFT example 1: .* max_position_embeddings = 16"):
        train_sft(cfg(1, 2), model, [("1+2=", "3"), ("1+2=", "3" * 40)], out)
    assert not (tmp_path / "out").exists()
