"""Pipeline configs: several stages (SFT, GRPO, rejection sampling, reward-model training) in one YAML.

A pipeline file is a run config with a ``stages:`` list. Every other top-level key is the *base*
that the policy stages share (model, data, rollout, reward, algo, learner, ...); each stage is
``{kind, name, <overrides>}`` and its config is the base deep-merged with its overrides (a mapping
merges key by key, anything else replaces)::

    name: r1_arith                 # the pipeline folder is output_dir/name
    model: {path: builtin:qwen2-tiny, ...}
    data: {...}
    stages:
      - {kind: sft, name: cold_start, sft: {steps: 400}}
      - {kind: grpo, name: reasoning_rl, steps: 30}
      - {kind: rejection_sampling, name: rejection, rejection: {n: 8}, sft: {steps: 200}}
      - {kind: rm_train, name: rm, data: {path: "${rejection}/pairs.jsonl"}, train: {epochs: 2}}
      - {kind: grpo, name: final_rl, reward: {models: [{path: "${rm}/model", name: rm}]}}

Choices, stated once:

* **Policy chaining.** A policy stage (``sft``, ``grpo``, ``rejection_sampling``) starts from the
  policy the previous policy stage wrote, unless it sets ``model.path`` itself; the first one
  starts from the base ``model.path`` (``builtin:`` builds the tiny model).
* **rm_train stages** are ``troupe rm train`` configs (``RewardModelTrainConfig``): they take only
  ``seed``, ``device`` and ``cluster`` from the base, and their ``model.path`` defaults to the
  current policy (DeepSeekMath and InstructGPT start the reward model from the SFT policy).
* **References.** ``${<stage name>}`` anywhere in a string value is that stage's folder
  (``<pipeline folder>/<stage name>``), so a later stage can read an earlier stage's files
  (``${rejection}/pairs.jsonl``, ``${rm}/model``). Only earlier stages may be referenced.
* **Command-line overrides** address the base by its keys (``seed=1``) and a stage by its name
  (``stages.reasoning_rl.steps=5``).

Errors (``ConfigError``) name the file and the stage (``stages[1] 'reasoning_rl' (grpo)``) and
the dotted key inside it. This module imports only pydantic and yaml.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from troupe.configs.schema import (
    ConfigError,
    RewardModelTrainConfig,
    RunConfig,
    apply_overrides,
    format_errors,
    read_yaml_mapping,
    resolve_file,
)

__all__ = ["KINDS", "POLICY_KINDS", "PipelineConfig", "Stage", "is_pipeline", "load_pipeline", "stage_dir"]

KINDS = ("sft", "grpo", "rejection_sampling", "rm_train")
POLICY_KINDS = ("sft", "grpo", "rejection_sampling")
"""Stages that write a policy (a causal LM) the next policy stage starts from."""

_REF = re.compile(r"\$\{([A-Za-z0-9_.-]+)\}")
_RM_BASE_KEYS = ("seed", "device", "cluster")


class Stage(BaseModel):
    """One resolved stage: its kind, name, index and validated config."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    index: int
    kind: Literal["sft", "grpo", "rejection_sampling", "rm_train"]
    name: str
    config: Union[RunConfig, RewardModelTrainConfig]
    model_from_previous: bool = Field(description="model.path is filled in at run time with the policy the "
                                      "previous policy stage wrote.")

    @property
    def label(self) -> str:
        """``stages[i] 'name' (kind)``: how messages name the stage."""
        return f"stages[{self.index}] {self.name!r} ({self.kind})"


class PipelineConfig(BaseModel):
    """A validated pipeline: its name, output folder, source file and stages (in order)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str
    output_dir: str
    source: str
    stages: list[Stage]

    @property
    def folder(self) -> Path:
        """``output_dir/name``: holds one folder per stage, pipeline_state.json and summary.md."""
        return Path(self.output_dir) / self.name


def stage_dir(folder: Path, name: str) -> Path:
    """A stage's folder inside the pipeline folder."""
    return Path(folder) / name


def is_pipeline(path: str | Path) -> bool:
    """True when the YAML file at ``path`` has a top-level ``stages`` key (False if unreadable)."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and "stages" in raw


def _merge(base: Any, over: Any) -> Any:
    """Deep merge: mappings key by key, anything else (lists included) replaced by ``over``."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base.get(k), v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


def _expand(value: Any, folders: dict[str, Path], later: set[str], where: str) -> Any:
    """``${stage}`` -> that stage's folder in every string of ``value``; ConfigError for unknown or later stages."""
    if isinstance(value, dict):
        return {k: _expand(v, folders, later, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, folders, later, f"{where}.{i}") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        ref = m.group(1)
        if ref in folders:
            return str(folders[ref])
        if ref in later:
            raise ConfigError(f"{where}: ${{{ref}}} refers to a later stage; a stage can only read earlier stages' files")
        raise ConfigError(f"{where}: ${{{ref}}} names no stage (stages: {', '.join(sorted(folders) + sorted(later))})")

    return _REF.sub(sub, value)


def _split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(base overrides, {stage name: its overrides}) from ``key=value`` / ``stages.NAME.key=value``."""
    base: list[str] = []
    per_stage: dict[str, list[str]] = {}
    for item in overrides:
        if item.startswith("stages."):
            rest = item[len("stages."):]
            name, _, tail = rest.partition(".")
            if not tail or "=" not in tail:
                raise ConfigError(f"override {item!r}: expected stages.<stage name>.key=value")
            per_stage.setdefault(name, []).append(tail)
        else:
            base.append(item)
    return base, per_stage


def _validate(cls: type[BaseModel], raw: dict, source: str, label: str) -> Any:
    """``cls`` from ``raw``; ConfigError naming the file, the stage and every bad dotted key."""
    try:
        return cls.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_errors(e, f"{source}: {label}")) from None


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read, override, expand and validate a pipeline YAML (module docstring).

    Each stage's config is validated as a ``RunConfig`` (``sft``, ``grpo``, ``rejection_sampling``)
    or a ``RewardModelTrainConfig`` (``rm_train``); its name becomes the config's ``name`` and its
    ``output_dir`` the pipeline folder, so stage ``s`` writes ``<output_dir>/<pipeline name>/s``.
    Relative data files resolve against the pipeline file's folder as in ``load_config``; a data
    file written by an earlier stage (a ``${stage}`` reference) is not checked here.

    Raises:
        ConfigError: unreadable YAML, no or empty ``stages``, an unknown ``kind``, a duplicate or
            missing stage name, a reference to an unknown or later stage, an override of an
            unknown stage, or any invalid key (the message names the stage and the dotted key).
    """
    path = Path(path)
    source = str(path)
    raw = read_yaml_mapping(path)
    stages_raw = raw.pop("stages", None)
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ConfigError(f"{path}: stages: expected a non-empty list of {{kind, name, ...}}")
    base_over, stage_over = _split_overrides(list(overrides or []))
    apply_overrides(raw, base_over)
    name, output_dir = str(raw.get("name", "pipeline")), str(raw.get("output_dir", "runs"))
    folder = Path(output_dir) / name

    names: list[str] = []
    for i, s in enumerate(stages_raw):
        if not isinstance(s, dict):
            raise ConfigError(f"{path}: stages[{i}]: expected a mapping {{kind, name, ...}}, got {s!r}")
        if s.get("kind") not in KINDS:
            raise ConfigError(f"{path}: stages[{i}].kind: expected one of {', '.join(KINDS)}, got {s.get('kind')!r}")
        n = s.get("name")
        if not isinstance(n, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", n):
            raise ConfigError(f"{path}: stages[{i}].name: expected a folder name (letters, digits, _ . -), got {n!r}")
        if n in names:
            raise ConfigError(f"{path}: stages[{i}].name: {n!r} is used twice")
        names.append(n)
    unknown = sorted(set(stage_over) - set(names))
    if unknown:
        raise ConfigError(f"override stages.{unknown[0]}...: no stage called {unknown[0]!r} (stages: {', '.join(names)})")

    stages: list[Stage] = []
    for i, s in enumerate(stages_raw):
        kind, sname = s["kind"], s["name"]
        label = f"stages[{i}] {sname!r} ({kind})"
        over = {k: v for k, v in s.items() if k not in ("kind", "name")}
        apply_overrides(over, stage_over.get(sname, []))
        if kind == "rm_train":
            merged = _merge({k: raw[k] for k in _RM_BASE_KEYS if k in raw}, over)
        else:
            merged = _merge({k: v for k, v in raw.items() if k not in ("name", "output_dir")}, over)
        folders = {n: stage_dir(folder, n).resolve() for n in names[:i]}
        merged = _expand(merged, folders, set(names[i:]), f"{source}: {label}")
        explicit_model = isinstance(over.get("model"), dict) and "path" in over["model"]
        from_previous = not explicit_model and any(p.kind in POLICY_KINDS for p in stages)
        merged["name"], merged["output_dir"] = sname, str(folder)
        if from_previous:  # a placeholder that validates; the runner puts the previous policy here
            merged.setdefault("model", {})
            merged["model"] = {**merged["model"], "path": "${previous policy}"}
        cls = RewardModelTrainConfig if kind == "rm_train" else RunConfig
        cfg = _validate(cls, merged, source, label)
        files = [(cfg.data, "path", "data.path"), (cfg.data, "eval_path", "data.eval_path")]
        if kind != "rm_train":
            files.append((cfg.sft, "path", "sft.path"))
            if cfg.rejection.general_sft is not None:
                files.append((cfg.rejection.general_sft, "path", "rejection.general_sft.path"))
        for section, key, where in files:
            value = getattr(section, key, None)
            if value and not str(value).startswith(str(folder.resolve())):  # an earlier stage's file: not yet there
                resolve_file(path, section, key, f"{label}: {where}")
        stages.append(Stage(index=i, kind=kind, name=sname, config=cfg, model_from_previous=from_previous))
    return PipelineConfig(name=name, output_dir=output_dir, source=source, stages=stages)
