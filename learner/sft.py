"""Cold-start supervised fine-tuning (DeepSeek-R1's cold start), plain single-process torch.

``run_sft(model_dir, examples, out_dir, steps=..., batch_size=..., lr=...)`` trains an HF
causal LM on (prompt, completion) pairs with cross-entropy on the completion tokens only (the
completion is followed by EOS), AdamW, linear warmup then cosine decay, and saves the result as
an HF directory (safetensors, tokenizer copied) that the GRPO stage starts from.

Prompt and completion are tokenized separately and concatenated, exactly as the engines see
them at RL time (the prompt tokenized alone, the response generated after it).

The encoding, collation, schedule, batching and the split-invariant loss share
(``encode_examples``, ``collate_examples``, ``lr_schedule``, ``batch_indices``,
``completion_loss_share``) are also what the DeepSpeed ZeRO SFT ranks use
(``troupe.learner.sft_rank``, ``troupe.cluster.sft_train``).
"""

from __future__ import annotations

import math
import random
import time
from typing import Callable, Iterator, Sequence


def encode_examples(tok, examples: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + [EOS]) per (prompt, completion) pair, each text tokenized alone
    without special tokens (as the engines see a prompt at RL time). Used by ``run_sft`` and by
    ``troupe.cluster.sft_train.train_sft`` (the DeepSpeed ZeRO ranks)."""
    prompts = tok([p for p, _ in examples], add_special_tokens=False)["input_ids"]
    comps = tok([c for _, c in examples], add_special_tokens=False)["input_ids"]
    return [(p, c + [tok.eos_token_id]) for p, c in zip(prompts, comps)]


def collate_examples(batch: Sequence[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded ``(input_ids, attention_mask, labels)``, each [N, W] long (W: the longest prompt +
    completion); labels are the completion ids at their positions and -100 elsewhere (prompt,
    padding), so a causal-LM loss covers the completion (with its EOS) only."""
    import torch

    width = max(len(p) + len(c) for p, c in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, (p, c) in enumerate(batch):
        seq = p + c
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        labels[i, len(p) : len(seq)] = torch.tensor(c)
    return ids, attn, labels


def _adamw(model, lr: float, weight_decay: float):
    """AdamW (betas 0.9/0.98); weight decay on matrices only."""
    import torch

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.98),
    )


def lr_schedule(lr: float, steps: int, warmup: int, min_lr_ratio: float) -> Callable[[int], float]:
    """Learning rate at a step: linear warmup over ``warmup`` steps, then cosine decay to ``min_lr_ratio * lr``."""

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))

    return lr_at


def default_warmup(steps: int) -> int:
    """Warm-up steps when none are given: 5% of ``steps``, at least 1."""
    return max(1, steps // 20)


def target_tokens(examples: Sequence[tuple[Sequence[int], Sequence[int]]]) -> int:
    """Completion tokens that get a loss in ``examples`` (encoded pairs): every completion token
    (its EOS included) except a first one with no prompt before it (nothing predicts it)."""
    return sum(len(c) - (0 if p else 1) for p, c in examples)


def completion_loss_share(logits, labels, step_tokens: int):
    """This micro-batch's share of the step's token-mean SFT loss: a 0-d float32 tensor.

    ``sum over the micro-batch's completion tokens of -log p(token | prefix) / step_tokens``,
    where ``step_tokens`` counts the completion tokens of the whole optimizer step (every rank,
    every micro-batch; :func:`target_tokens`). Summed over the step's micro-batches and ranks the
    shares give the token mean over the step, whatever the split (split invariance: each
    micro-batch is weighted by its token count, not 1 / number of micro-batches). The loss mask
    is OpenRLHF's SFT convention (labels -100 on prompt and padding: only the response and its
    EOS are learned).

    Args:
        logits: [N, W, V] causal-LM logits (any float dtype; the loss is computed in float32).
        labels: [N, W] long, -100 where there is no target (``collate_examples``).
        step_tokens: completion tokens of the whole step (> 0).
    Raises:
        ValueError: ``step_tokens`` < 1.
    """
    import torch.nn.functional as F

    if step_tokens < 1:
        raise ValueError(f"step_tokens must be >= 1, got {step_tokens}")
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(logits.device)
    total = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                            ignore_index=-100, reduction="sum")
    return total / step_tokens


def batch_indices(n: int, batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    """Endless batches of example indices: epochs shuffled by ``rng``, a batch may span two epochs."""
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            fresh = list(range(n))
            rng.shuffle(fresh)
            order.extend(fresh)
        idx, order = order[:batch_size], order[batch_size:]
        yield idx


def _train_step(model, opt, batch, lr: float) -> float:
    """One AdamW step at learning rate ``lr`` on a collated (ids, attention, labels) batch; returns the loss."""
    import torch

    ids, attn, labels = batch
    for group in opt.param_groups:
        group["lr"] = lr
    loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


def _save(model, tok, out_dir: str) -> None:
    """Write the model (eval mode, safetensors) and its tokenizer as an HF directory."""
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)


def run_sft(
    model_dir: str,
    examples: list[tuple[str, str]],
    out_dir: str,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    warmup_steps: int | None = None,
    min_lr_ratio: float = 0.1,
    weight_decay: float = 0.0,
    log: Callable[[str], None] = print,
    log_every: int = 25,
) -> dict:
    """Fine-tune ``model_dir`` on ``examples`` and save the result to ``out_dir``.

    Args:
        model_dir: HF directory (model + tokenizer) to start from.
        examples: (prompt, completion) pairs; loss is on the completion and the EOS after it.
        out_dir: where the fine-tuned HF directory is written (safetensors, tokenizer copied).
        steps: optimizer steps; batches cycle through shuffled ``examples``.
        batch_size: examples per step.
        lr: peak learning rate (linear warmup over ``warmup_steps``, default 5% of steps,
            then cosine decay to ``min_lr_ratio * lr``).
        seed: shuffling and dropout seed.
        log: callable for progress lines.

    Returns:
        ``{"loss_first", "loss_last", "steps", "seconds"}``: the first step's loss, the mean loss
        of the last ``min(10, steps)`` steps, the steps run, the wall time of the training loop.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if steps < 1 or batch_size < 1 or not examples:
        raise ValueError("need steps >= 1, batch_size >= 1 and at least one example")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.train()
    data = encode_examples(tok, examples)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    warmup = default_warmup(steps) if warmup_steps is None else max(0, warmup_steps)
    opt = _adamw(model, lr, weight_decay)
    lr_at = lr_schedule(lr, steps, warmup, min_lr_ratio)
    batches = batch_indices(len(data), batch_size, rng)
    losses: list[float] = []
    t0 = time.time()
    for step in range(steps):
        batch = collate_examples([data[i] for i in next(batches)], pad_id)
        losses.append(_train_step(model, opt, batch, lr_at(step)))
        if log_every and (step % log_every == 0 or step == steps - 1):
            log(f"sft step {step + 1}/{steps} loss {losses[-1]:.4f} lr {lr_at(step):.2e}")
    seconds = time.time() - t0
    _save(model, tok, out_dir)
    tail = losses[-min(10, len(losses)) :]
    return {"loss_first": losses[0], "loss_last": sum(tail) / len(tail), "steps": steps, "seconds": seconds}
