"""Scored groups -> ``TrainBatch`` (padded tensors), log-probs of tokens under logits, and how the
learner cuts a batch into micro-batches (fixed row counts or a token budget; padding trimmed).

The batch layout is documented on ``troupe.core.types.TrainBatch``. Imports torch only.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from troupe.core.types import Group, TrainBatch


def collate_groups(groups: list[Group], pad_id: int, *, mask_truncated: bool = False) -> TrainBatch:
    """Collate scored groups into a ``TrainBatch``.

    Args:
        groups: scored groups; ``group.rewards[i]`` None means excluded (mask 0, reward NaN).
            When the groups carry ``step_rewards`` (process supervision), the batch gets
            ``step_rewards``/``step_ends`` from them and ``sample.step_ends``.
        pad_id: token id used for padding (never attended to).
        mask_truncated: exclude truncated responses from the loss (DAPO overlong filtering);
            their rewards still count in their group's statistics.

    Raises:
        ValueError: if groups is empty, a sample has mismatched ids/logprobs lengths, or a
            sample's step rewards do not match its step ends (process supervision).
    """
    if not groups:
        raise ValueError("collate_groups: no groups")
    rows = [(g.prompt.token_ids, s, (g.rewards[i] if g.rewards else None)) for g in groups for i, s in enumerate(g.samples)]
    P = max(len(p) for p, _, _ in rows)
    T = max(1, max(len(s.response_ids) for _, s, _ in rows))
    B = len(rows)
    input_ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, P + T), dtype=torch.long)
    resp_mask = torch.zeros((B, T), dtype=torch.float32)
    samp_lp = torch.zeros((B, T), dtype=torch.float32)
    rewards = torch.full((B,), math.nan, dtype=torch.float32)
    truncated = torch.zeros((B,), dtype=torch.bool)
    for b, (p, s, r) in enumerate(rows):
        if len(s.response_ids) != len(s.sampling_logprobs):
            raise ValueError(f"collate_groups: sample {b} has {len(s.response_ids)} ids but {len(s.sampling_logprobs)} logprobs")
        n = len(s.response_ids)
        input_ids[b, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        attn[b, P - len(p):P] = 1
        if n:
            input_ids[b, P:P + n] = torch.tensor(s.response_ids, dtype=torch.long)
            attn[b, P:P + n] = 1
            samp_lp[b, :n] = torch.tensor(s.sampling_logprobs, dtype=torch.float32)
        truncated[b] = s.truncated
        if r is not None and not math.isnan(r):
            rewards[b] = float(r)
            if not (mask_truncated and s.truncated):
                resp_mask[b, :n] = 1.0
    lengths = torch.tensor([len(s.response_ids) for _, s, _ in rows], dtype=torch.long)
    batch = TrainBatch(input_ids, attn, resp_mask, samp_lp, rewards, truncated, lengths, prompt_len=P)
    if any(g.step_rewards for g in groups):
        batch.step_rewards, batch.step_ends = _collate_steps(groups)
    return batch


def _collate_steps(groups: list[Group]) -> tuple[list[list[float]], list[list[int]]]:
    """Per-sample step rewards and step-end token indices, in batch row order."""
    step_rewards: list[list[float]] = []
    step_ends: list[list[int]] = []
    b = 0
    for g in groups:
        for i, s in enumerate(g.samples):
            sr = g.step_rewards[i] if i < len(g.step_rewards) else None
            if sr is None or not s.response_ids:
                step_rewards.append([])
                step_ends.append([])
            elif len(sr) != len(s.step_ends):
                raise ValueError(
                    f"collate_groups: sample {b} has {len(sr)} step rewards but {len(s.step_ends)} step ends "
                    "(engines and reward workers must cut steps with the same reward.step_delimiter)"
                )
            else:
                step_rewards.append([float(x) for x in sr])
                step_ends.append(list(s.step_ends))
            b += 1
    return step_rewards, step_ends


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[target] in float32, nats.

    Args:
        logits: [..., V] (any leading shape).
        targets: [...] token ids, the same leading shape.
        temperature: logits are divided by it first, as the engine did when sampling.
    Returns:
        [...] float32.
    """
    lg = logits.float()
    if temperature != 1.0:
        lg = lg / temperature
    return torch.gather(lg.log_softmax(-1), -1, targets.unsqueeze(-1)).squeeze(-1)


def response_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, prompt_len: int, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities of the response tokens under ``logits``.

    Args:
        logits: [B, P+T, V] model output.
        input_ids: [B, P+T].
        prompt_len: P.
        temperature: as ``token_logprobs``.

    Returns:
        [B, T] float32 log pi(token_t | prefix) in nats.
    """
    T = input_ids.shape[1] - prompt_len
    return token_logprobs(logits[:, prompt_len - 1: prompt_len - 1 + T], input_ids[:, prompt_len:prompt_len + T], temperature)


def chunked_response_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, prompt_len: int,
                              temperature: float = 1.0, chunk_tokens: int = 1024,
                              with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``response_logprobs`` (and the detached entropy) without a float32 copy of the whole micro-batch's logits.

    Each row's T response positions are taken ``chunk_tokens`` at a time (views of the logits, no copy);
    each chunk's float32 log-softmax is computed under ``torch.utils.checkpoint`` when the logits need a
    gradient, so autograd keeps only the model's own logits (in the model's dtype) and recomputes a
    chunk's float32 values in backward. The peak extra memory is a few float32 copies of one chunk ([chunk_tokens, V])
    instead of about six of [B, T, V] (5 GB each for 8 x 1,024 tokens x 151,936 vocabulary: issue 26).
    Each row's values are the same operations as the unchunked path (a row's log-softmax does not depend
    on other rows), so results and gradients equal it bit for bit (tests/test_batch_cpu.py).

    Args:
        logits: [B, P+T, V] model output (any float dtype).
        input_ids: [B, P+T].
        prompt_len: P.
        temperature: as ``token_logprobs``.
        chunk_tokens: positions per chunk; 0: one chunk (today's unchunked computation).
        with_entropy: also return the entropy of each position's distribution (no gradient).
    Returns:
        ([B, T] float32 log-probs, [B, T] float32 entropies or None), nats.
    Raises:
        ValueError: ``chunk_tokens`` < 0.
    """
    from torch.utils.checkpoint import checkpoint

    from troupe.learner.losses import entropy_from_logits

    if chunk_tokens < 0:
        raise ValueError(f"chunk_tokens must be >= 0, got {chunk_tokens}")
    B, T = input_ids.shape[0], input_ids.shape[1] - prompt_len
    if not chunk_tokens:
        z = logits[:, prompt_len - 1: prompt_len - 1 + T]
        lp = token_logprobs(z, input_ids[:, prompt_len:prompt_len + T].to(logits.device), temperature)
        if not with_entropy:
            return lp, None
        with torch.no_grad():
            return lp, entropy_from_logits(z.float() / temperature)
    targets = input_ids[:, prompt_len:prompt_len + T].to(logits.device)
    lps, ents = [], []
    for b in range(B):  # a row's [T, V] slice is a view (no copy); chunks of it along T are views too
        for s in range(0, T, chunk_tokens):
            zc, tc = logits[b, prompt_len - 1 + s: prompt_len - 1 + min(T, s + chunk_tokens)], targets[b, s:s + chunk_tokens]
            grad = zc.requires_grad
            lps.append(checkpoint(token_logprobs, zc, tc, temperature, use_reentrant=False) if grad
                       else token_logprobs(zc, tc, temperature))
            if with_entropy:
                with torch.no_grad():
                    ents.append(entropy_from_logits(zc.float() / temperature))
    lp = torch.cat(lps).reshape(B, T) if lps else torch.zeros(B, T, device=logits.device)
    ent = (torch.cat(ents).reshape(B, T) if ents else torch.zeros_like(lp)) if with_entropy else None
    return lp, ent


def trim_padding(b: TrainBatch) -> TrainBatch:
    """``b`` cut to its own longest prompt and response (the columns that are padding in every row dropped).

    A step batch is padded to the step's longest prompt (left) and response (right); a micro-batch
    of shorter rows needs fewer columns. The layout stays that of ``TrainBatch``: prompt left-padded
    to the new ``prompt_len`` P' (the longest real prompt, at least 1 column when P >= 1), response
    right-padded to T' = max(1, longest response). Per-token tensors keep their first T' columns;
    ``step_ends`` (< response length <= T') stay valid. Returns ``b`` itself when nothing is cut.
    Real tokens keep their relative positions, so with rotary position embeddings (Qwen2, Llama)
    the log-probs agree with the untrimmed batch up to float rounding (~1e-6 in float32).
    """
    P, T = b.prompt_len, b.response_len
    if b.size == 0:
        return b
    p = min(P, max(1, int(b.attention_mask[:, :P].sum(1).max()))) if P else 0
    t = min(T, max(1, int(b.response_lengths.max())))
    if p == P and t == T:
        return b
    return b.with_(input_ids=b.input_ids[:, P - p:P + t], attention_mask=b.attention_mask[:, P - p:P + t],
                   response_mask=b.response_mask[:, :t], sampling_logprobs=b.sampling_logprobs[:, :t], prompt_len=p,
                   values=None if b.values is None else b.values[:, :t])


def token_budget_micro_batches(prompt_lengths: Sequence[int], response_lengths: Sequence[int], budget: int,
                               count: int = 0) -> list[list[int]]:
    """Rows packed into micro-batches of at most ``budget`` padded tokens, longest rows first.

    Rows are sorted by prompt + response length, longest first (ties: lower index first), and
    added to the current micro-batch while ``rows x (longest prompt + longest response)`` -- the
    size of the micro-batch once its padding is trimmed to its own longest row (``trim_padding``)
    -- stays within ``budget``; a row alone over the budget gets a micro-batch of its own (at least
    one row each). Sorting keeps similar lengths together, so little of a micro-batch is padding
    (OpenRLHF ``packing_samples``, veRL ``use_dynamic_bsz``: micro-batches by token budget).

    Args:
        prompt_lengths, response_lengths: [N] real (unpadded) token counts per row.
        budget: padded tokens per micro-batch (``learner.micro_batch_tokens``), > 0.
        count: at least this many micro-batches: the one with the most padded tokens (among those of
            two rows or more) is split in halves until there are (data-parallel ranks must run the
            same number of micro-batches: every forward and backward is collective under ZeRO-2/3).
    Returns:
        Micro-batches as lists of row indices (each in the sorted order); every row in exactly one.
    Raises:
        ValueError: budget < 1, lengths of different sizes, or count > N.
    """
    if budget < 1:
        raise ValueError(f"learner.micro_batch_tokens must be > 0 for token-budget micro-batches, got {budget}")
    P, T = [int(x) for x in prompt_lengths], [max(1, int(x)) for x in response_lengths]
    if len(P) != len(T):
        raise ValueError(f"token_budget_micro_batches: {len(P)} prompt lengths but {len(T)} response lengths")
    if count > len(P):
        raise ValueError(f"token_budget_micro_batches: {count} micro-batches asked of {len(P)} rows")
    order = sorted(range(len(P)), key=lambda i: (-(P[i] + T[i]), i))
    out: list[list[int]] = []
    cur: list[int] = []
    mp = mt = 0
    for i in order:
        np_, nt = max(mp, P[i]), max(mt, T[i])
        if cur and (len(cur) + 1) * (np_ + nt) > budget:
            out.append(cur)
            cur, np_, nt = [], P[i], T[i]
        cur.append(i)
        mp, mt = np_, nt
    if cur:
        out.append(cur)

    def cost(mb: list[int]) -> int:
        return len(mb) * (max(P[i] for i in mb) + max(T[i] for i in mb))

    while len(out) < count:
        k = max((j for j in range(len(out)) if len(out[j]) > 1), key=lambda j: (cost(out[j]), -j))
        mb = out[k]
        out[k:k + 1] = [mb[:(len(mb) + 1) // 2], mb[(len(mb) + 1) // 2:]]
    return out


def micro_batch_plan(prompt_lengths: Sequence[int], response_lengths: Sequence[int], *, num_ranks: int,
                     mini_batches: int, micro_batch_size: int, micro_batch_tokens: int = 0) -> list[list[list[list[int]]]]:
    """Every rank's micro-batches of every mini-batch of a step batch.

    Rank r trains rows [r*B/R, (r+1)*B/R) and its mini-batch m is the m-th contiguous slice of
    them (as ``troupe.learner.step.minibatch_norms``). ``micro_batch_tokens`` 0: consecutive
    micro-batches of ``min(micro_batch_size, rows)`` rows; > 0: ``token_budget_micro_batches`` of
    each rank's mini-batch rows, every rank with as many micro-batches as the rank that needs the
    most (all ranks compute the same plan from the whole batch, so no communication is needed).

    Args:
        prompt_lengths, response_lengths: [B] real token counts of the whole batch's rows.
        num_ranks, mini_batches: R and M; B must be divisible by R * M.
        micro_batch_size: rows per micro-batch (``learner.micro_batch_size``; fixed mode).
        micro_batch_tokens: token budget per micro-batch (``learner.micro_batch_tokens``; 0 = fixed mode).
    Returns:
        ``plan[r][m]``: rank r's micro-batches of mini-batch m, lists of row indices into rank r's
        rows (0 .. B/R - 1). ``len(plan[r][m])`` is the same for every r.
    Raises:
        ValueError: B not divisible by R * M, or the packing's errors.
    """
    B = len(prompt_lengths)
    if len(response_lengths) != B:
        raise ValueError(f"micro_batch_plan: {B} prompt lengths but {len(response_lengths)} response lengths")
    if B == 0 or B % (num_ranks * mini_batches):
        raise ValueError(f"micro_batch_plan: batch of {B} rows is not divisible by learner.num_ranks ({num_ranks}) "
                         f"x algo.mini_batches ({mini_batches})")
    per, rows = B // num_ranks, B // num_ranks // mini_batches
    if not micro_batch_tokens:
        micro = min(micro_batch_size, rows)
        one = [[list(range(s, min(s + micro, (m + 1) * rows))) for s in range(m * rows, (m + 1) * rows, micro)]
               for m in range(mini_batches)]
        return [one for _ in range(num_ranks)]
    plan: list[list[list[list[int]]]] = [[] for _ in range(num_ranks)]
    for m in range(mini_batches):
        starts = [r * per + m * rows for r in range(num_ranks)]
        lens = [([int(prompt_lengths[s + i]) for i in range(rows)], [int(response_lengths[s + i]) for i in range(rows)])
                for s in starts]
        count = max(len(token_budget_micro_batches(p, t, micro_batch_tokens)) for p, t in lens)
        for r, (p, t) in enumerate(lens):
            plan[r].append([[m * rows + i for i in mb] for mb in token_budget_micro_batches(p, t, micro_batch_tokens, count)])
    return plan


def padding_share(prompt_lengths: Sequence[int], response_lengths: Sequence[int], micro_batches: list[list[int]]) -> float:
    """Share of padding in the forward passes of ``micro_batches`` (row index lists), each trimmed to its own
    longest prompt and response (``trim_padding``): 1 - real tokens / (sum over micro-batches of rows x width)."""
    real = padded = 0
    for mb in micro_batches:
        p = [int(prompt_lengths[i]) for i in mb]
        t = [int(response_lengths[i]) for i in mb]
        real += sum(p) + sum(t)
        padded += len(mb) * (max(p) + max(1, max(t)))
    return 1.0 - real / padded if padded else 0.0
