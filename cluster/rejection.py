"""The rejection-sampling stage (DeepSeek-R1, arXiv 2501.12948, section 2.3.3): an SFT data set from a
policy's own filtered samples, plus general SFT rows.

:func:`run_rejection_sampling` samples ``rejection.n`` responses for each of the first
``rejection.num_prompts`` training rows (``troupe.cluster.prepare.load_task`` order; prompts built
exactly as a run builds them, those longer than ``data.max_prompt_tokens`` dropped and counted) at
``rejection.temperature`` (default ``rollout.temperature``), with the engines on the given policy and
the run's reward lanes (``troupe.cluster.sampling.PolicySampler``, the pieces ``troupe rm pairs`` uses;
the i-th prompt's samples are seeded with ``sampling_seeds(seed, 0, [i])``, so a second call writes the
same files). ``troupe.reward.rejection`` filters and selects them and ``troupe.rollout.rejection``
mixes in ``rejection.general_sft`` rows (their docstrings state every rule). Files written in ``out_dir`` (each under a temporary name,
renamed when complete):

* ``sft_data.jsonl``: the kept samples in prompt then sample order, then the general rows, one line each
  ``{"prompt": the templated prompt text the policy saw (general rows: the file's prompt, verbatim),
  "completion", "question", "answer" (null for general rows), "source": "rejection" | "general"}``;
  ``troupe.rollout.rejection.read_sft_file`` reads it back as (prompt, completion) pairs.
* ``pairs.jsonl``: per prompt, one pair of all its samples (filtered or not), a highest-combined-reward
  sample chosen against a lowest one (``troupe.cluster.rm_pairs.group_pairs``, exactly ``troupe rm
  pairs``' format and rule with one pair per prompt; tied groups give none), for a reward model.
* ``rejection_stats.json``: the counts (see :func:`run_rejection_sampling`).

Ray: joined with ``troupe.cluster.runtime.init_ray(cfg, None)``, which returns at once when Ray is
already initialized (the pipeline runner starts it once); this stage never shuts Ray down. Its engines,
placement group and reward lanes are always stopped before it returns.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from troupe.configs.schema import ConfigError, RunConfig
from troupe.core.types import Group
from troupe.rollout.data import DataError

__all__ = ["run_rejection_sampling", "write_rejection_set"]

SFT_FILE, PAIRS_FILE, STATS_FILE = "sft_data.jsonl", "pairs.jsonl", "rejection_stats.json"


def run_rejection_sampling(cfg: RunConfig, model_path: str, out_dir: Path,
                           log: Callable[[str], None] = print) -> dict:
    """Sample ``model_path``, filter, mix, write ``out_dir``/{sft_data.jsonl, pairs.jsonl,
    rejection_stats.json} (module docstring).

    Args:
        cfg: the run config; ``rejection`` is this stage's section, ``data``/``rollout``/``reward``/
            ``cluster``/``seed`` as in a run.
        model_path: the policy folder (HF format with its tokenizer), e.g. a run's checkpoints/final.
        out_dir: created if missing.
        log: progress lines.
    Returns:
        The stats written to rejection_stats.json: ``prompts`` (sampled), ``prompts_dropped`` (longer than
        ``data.max_prompt_tokens``), ``n``, ``samples`` (= prompts * n), ``filters``, ``removed`` (filter ->
        samples it removed), ``over_max_per_prompt`` (passing samples beyond ``max_per_prompt``),
        ``kept`` (= samples - sum(removed) - over_max_per_prompt), ``prompts_with_kept``, ``general``
        (rows mixed in), ``rows`` (= kept + general, the lines of sft_data.jsonl), ``num_pairs``,
        ``accuracy_function`` and ``accuracy_mean`` (mean score of ``rejection.correct_function`` over
        the samples it scored; None when it scored none), ``seconds``; plus ``sft_data`` and ``pairs``
        (the two files' paths; not in the stats file).
    Raises:
        ConfigError: ``rejection.correct_function`` is not a ``reward.functions`` name (filter
            ``correct``), or ``model_path`` is not a folder.
        DataError: a bad data row or general SFT file (``file:line``), no training rows, or no sample
            passed the filters (the message names ``rejection.filters`` and what to loosen; no file is
            written then, so an SFT on an empty set never starts).
        ValueError: a bad reward spec, an unreadable tokenizer, or no prompt that fits.
        ConnectionError: the Ray cluster cannot be joined.
        RuntimeError / TimeoutError: the engines failed to start or to sample (``ActorFailed``,
            ``RemoteTimeout``, more than ``cluster.max_engine_failures`` engine deaths).
    """
    from troupe.cluster.prepare import load_task
    from troupe.cluster.sampling import PolicySampler, policy_prompts, policy_sampling
    from troupe.reward.scoring import check_reward_config
    from troupe.rollout.rejection import read_sft_file

    t0 = time.time()
    rc = cfg.rejection
    try:
        rc.check_reward(cfg.reward, default_too=True)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not Path(model_path).is_dir():
        raise ConfigError(f"rejection sampling: model folder {model_path!r} does not exist")
    model = str(Path(model_path).resolve())
    check_reward_config(cfg.reward)  # what the reward lanes check, before Ray starts
    general = read_sft_file(rc.general_sft.path) if rc.general_sft is not None else []
    rows = load_task(cfg)[0][:rc.num_prompts]
    if not rows:
        raise DataError("rejection.num_prompts: the training split has no rows")
    prompts, dropped = policy_prompts(cfg, model, rows)
    out = Path(out_dir)
    for name in (SFT_FILE, PAIRS_FILE, STATS_FILE):  # an earlier attempt's files: present only when this one completes
        (out / name).unlink(missing_ok=True)
    from troupe.cluster.runtime import init_ray  # imports Ray and vLLM: after the cheap checks

    init_ray(cfg, None)
    sampler = PolicySampler(cfg, model)
    try:
        sampler.start_rewards()
        sampler.start_engines(log)
        log(f"rejection sampling: {len(sampler.engines)} engine(s) on {model} ready in {time.time() - t0:.0f} s; "
            f"{len(prompts)} prompts x {rc.n} samples, filters {rc.filters}")
        chunks = sampler.chunks(prompts, policy_sampling(cfg, rc.n, rc.temperature))
        stats = write_rejection_set(cfg, chunks, len(prompts), general, out, log)
    finally:
        sampler.stop()
    stats.update(prompts_dropped=dropped, seconds=time.time() - t0)
    stats_tmp = out / (STATS_FILE + ".tmp")
    stats_tmp.write_text(json.dumps(stats, indent=2) + "\n")
    os.replace(stats_tmp, out / STATS_FILE)
    log(f"rejection sampling: kept {stats['kept']} of {stats['samples']} samples ({stats['prompts_with_kept']} of "
        f"{stats['prompts']} prompts), removed {stats['removed']}, {stats['over_max_per_prompt']} over "
        f"rejection.max_per_prompt; {stats['general']} general rows; {stats['rows']} rows in {out / SFT_FILE}; "
        f"{stats['num_pairs']} pairs; {stats['seconds']:.0f} s")
    return {**stats, "sft_data": str(out / SFT_FILE), "pairs": str(out / PAIRS_FILE)}


def write_rejection_set(cfg: RunConfig, chunks: Iterable[tuple[list[int], list[Group]]], num_prompts: int,
                        general: Sequence[tuple[str, str]], out: Path, log: Callable[[str], None] = print) -> dict:
    """Filter scored groups and write ``out``/sft_data.jsonl and pairs.jsonl (module docstring).

    Args:
        cfg: the run config (``rejection``, ``seed``).
        chunks: (positions, scored groups) in prompt order, as ``PolicySampler.chunks`` yields them;
            position = the prompt's index among the sampled prompts (seeds the pair choice).
        num_prompts: how many prompts the chunks hold (for the counts and progress lines).
        general: the general SFT file's (prompt, completion) pairs (ignored without ``rejection.general_sft``).
        out: the folder (created if missing).
    Returns:
        The counts of :func:`run_rejection_sampling` but ``prompts_dropped`` and ``seconds``.
    Raises:
        DataError: no sample passed the filters (no file written).
    """
    from troupe.cluster.rm_pairs import group_pairs
    from troupe.reward.rejection import apply_filters, group_records, select
    from troupe.rollout.rejection import mix_general

    rc = cfg.rejection
    stats: dict = {"prompts": num_prompts, "n": rc.n, "samples": 0, "filters": list(rc.filters),
                   "removed": {name: 0 for name in rc.filters}, "over_max_per_prompt": 0, "kept": 0,
                   "prompts_with_kept": 0, "general": 0, "rows": 0, "num_pairs": 0,
                   "accuracy_function": rc.correct_name, "accuracy_mean": None}
    scores: list[float] = []
    out.mkdir(parents=True, exist_ok=True)
    sft_tmp, pairs_tmp = out / (SFT_FILE + ".tmp"), out / (PAIRS_FILE + ".tmp")
    try:
        with sft_tmp.open("w", encoding="utf-8") as sft, pairs_tmp.open("w", encoding="utf-8") as pairs:
            for positions, groups in chunks:
                for pos, g in zip(positions, groups):
                    records = group_records(g)
                    passed, removed = apply_filters(records, rc)
                    chosen = select(passed, rc.max_per_prompt)
                    for name, count in removed.items():
                        stats["removed"][name] += count
                    stats["samples"] += len(records)
                    stats["over_max_per_prompt"] += len(passed) - len(chosen)
                    stats["kept"] += len(chosen)
                    stats["prompts_with_kept"] += bool(chosen)
                    scores += [s for s in (r.parts.get(rc.correct_name) for r in records)
                               if s is not None and math.isfinite(s)]
                    for r in chosen:
                        sft.write(json.dumps({"prompt": r.prompt, "completion": r.completion, "question": r.question,
                                              "answer": r.answer, "source": "rejection"}) + "\n")
                    for line in group_pairs(g, pos, 1, cfg.seed):
                        pairs.write(json.dumps(line) + "\n")
                        stats["num_pairs"] += 1
                log(f"rejection sampling: {positions[-1] + 1}/{num_prompts} prompts, {stats['kept']} samples kept")
            stats["accuracy_mean"] = sum(scores) / len(scores) if scores else None
            if not stats["kept"]:
                raise DataError(
                    f"rejection sampling: none of the {stats['samples']} samples ({num_prompts} prompts x rejection.n "
                    f"= {rc.n}) passed rejection.filters {list(rc.filters)} (removed per filter: {stats['removed']}; "
                    f"mean {rc.correct_name} {_fmt(stats['accuracy_mean'])}); {out / SFT_FILE} not written. Loosen "
                    "rejection.filters (or rejection.correct_threshold, rejection.min_language, "
                    "rejection.max_tokens) or sample more (rejection.n, rejection.num_prompts)")
            if rc.general_sft is not None:
                mixed = mix_general(stats["kept"], general, rc.general_sft.fraction, cfg.seed)
                for prompt, completion in mixed:
                    sft.write(json.dumps({"prompt": prompt, "completion": completion, "question": None,
                                          "answer": None, "source": "general"}) + "\n")
                stats["general"] = len(mixed)
            stats["rows"] = stats["kept"] + stats["general"]
        os.replace(sft_tmp, out / SFT_FILE)
        os.replace(pairs_tmp, out / PAIRS_FILE)
    finally:
        sft_tmp.unlink(missing_ok=True)
        pairs_tmp.unlink(missing_ok=True)
    return stats


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.3f}"
