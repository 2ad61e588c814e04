"""Reward functions by name: the built-ins, and user plugins loaded from a module or a file.

Every reward function has TRL's signature (``trl.GRPOTrainer`` ``reward_funcs``)::

    fn(prompts: list[str], completions: list[str], **columns) -> list[float | None]

called with keyword arguments: ``prompts`` (the raw questions), ``completions`` (generated
texts), and one list per data-set column; ``answer`` (the reference answers as strings) is
always among the columns. It returns one score per completion; ``None`` means "no score for
this sample" (the sample is left out of its group's statistics). ``async def`` functions are
allowed (``troupe.reward.scoring`` runs them with ``asyncio.run``). The reward workers also pass
``prompt_texts`` (the templated prompts the policy saw, ``Prompt.text``; ``troupe.reward.scoring``).

Process reward functions (config ``kind: process``) also get ``steps`` (per completion, the list
of its reasoning-step texts) and return per completion a list of one score per step
(``troupe.reward.scoring``).

This module imports no Ray, torch or vLLM.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping, Optional

from troupe.reward import verifiers as V

__all__ = ["BUILTIN_FACTORIES", "BUILTIN_REWARDS", "RewardFn", "check_reward_signature", "load_reward_function"]

RewardFn = Callable[..., Any]


def completion_text(completion: Any) -> str:
    """A completion as text: strings as is; TRL conversational form (list of messages) -> last content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    return "" if completion is None else str(completion)


def _answers(n: int, columns: Mapping[str, Any]) -> list[Any]:
    answer = columns.get("answer")
    if answer is None:
        raise ValueError("this reward function needs an 'answer' column")
    if len(answer) != n:
        raise ValueError(f"'answer' has {len(answer)} entries for {n} completions")
    return list(answer)


def accuracy(prompts: list[str], completions: list[Any], **columns: Any) -> list[Optional[float]]:
    """Built-in "accuracy": :func:`troupe.reward.verifiers.accuracy_reward` per completion.

    Inputs: completions and the ``answer`` column. Output: 1.0/0.0 per completion.
    Raises ValueError when ``answer`` is missing or has the wrong length.
    """
    answers = _answers(len(completions), columns)
    return [V.accuracy_reward(completion_text(c), a) for c, a in zip(completions, answers)]


def format_(prompts: list[str], completions: list[Any], **columns: Any) -> list[Optional[float]]:
    """Built-in "format": :func:`troupe.reward.verifiers.format_reward` (DeepSeek-R1 tags)."""
    return [V.format_reward(completion_text(c)) for c in completions]


def gsm8k(prompts: list[str], completions: list[Any], **columns: Any) -> list[Optional[float]]:
    """Built-in "gsm8k": :func:`troupe.reward.verifiers.gsm8k_reward` against ``answer``.

    Raises ValueError when ``answer`` is missing or has the wrong length.
    """
    answers = _answers(len(completions), columns)
    return [V.gsm8k_reward(completion_text(c), a) for c, a in zip(completions, answers)]


def math(prompts: list[str], completions: list[Any], **columns: Any) -> list[Optional[float]]:
    """Built-in "math": :func:`troupe.reward.verifiers.math_reward` (math-verify) against ``answer``.

    Raises ValueError when ``answer`` is missing or has the wrong length.
    """
    answers = _answers(len(completions), columns)
    return [V.math_reward(completion_text(c), a) for c, a in zip(completions, answers)]


def language(prompts: list[str], completions: list[Any], **columns: Any) -> list[Optional[float]]:
    """Built-in "language": :func:`troupe.reward.verifiers.language_consistency_reward`.

    Compares each completion's script with its prompt's (``prompts[i]``).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    return [V.language_consistency_reward(completion_text(c), completion_text(p)) for c, p in zip(completions, prompts)]


BUILTIN_REWARDS: Mapping[str, RewardFn] = MappingProxyType(
    {
        "accuracy": accuracy,
        "format": format_,
        "gsm8k": gsm8k,
        "math": math,
        "language": language,
    }
)
"""Built-in reward functions by config name (read-only)."""


class _LazyFactories(Mapping[str, Callable[..., RewardFn]]):
    """Read-only name -> factory mapping that imports a factory's module on first lookup."""

    def __init__(self, targets: Mapping[str, str]) -> None:
        self._targets = dict(targets)

    def __getitem__(self, name: str) -> Callable[..., RewardFn]:
        module, attr = self._targets[name].split(":")
        return getattr(importlib.import_module(module), attr)

    def __iter__(self) -> Iterator[str]:
        return iter(self._targets)

    def __len__(self) -> int:
        return len(self._targets)

    def __repr__(self) -> str:
        return f"BUILTIN_FACTORIES({self._targets})"


BUILTIN_FACTORIES: Mapping[str, Callable[..., RewardFn]] = _LazyFactories({"http": "troupe.reward.http:HttpReward"})
"""Built-ins that take options (config ``options``), by name: ``factory(**options)`` returns the
reward function (``http``: :class:`troupe.reward.http.HttpReward`). Read-only; a factory's module
is imported on first lookup, so this module stays light."""


def check_reward_signature(fn: Callable, spec: str = "<function>") -> None:
    """Raise ValueError unless ``fn`` can be called as ``fn(prompts=..., completions=..., **columns)``.

    The function must accept ``prompts`` and ``completions`` by keyword (named parameters or
    ``**kwargs``) and take ``**kwargs`` (columns vary by data set); required parameters named
    after columns (e.g. ``answer``) are fine (a missing column fails at call time and counts
    as an ``exception``). Callables whose signature cannot be read are accepted.

    Args:
        fn: the candidate reward function.
        spec: how the user named it (used in the message).
    Raises:
        ValueError: naming ``spec`` and the signature.
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins / C callables: cannot check, accept
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    if not has_var_kw:
        raise ValueError(
            f"reward function {spec!r}: signature {sig} cannot accept (prompts, completions, **kwargs); "
            "define it as `def fn(prompts, completions, **kwargs) -> list[float | None]`"
        )
    positional_only = [
        p.name
        for p in sig.parameters.values()
        if p.kind is inspect.Parameter.POSITIONAL_ONLY and p.default is inspect.Parameter.empty
    ]
    try:
        if positional_only:
            raise TypeError(f"positional-only parameter(s) {positional_only}")
        # Other required parameters are data-set columns (e.g. `answer`), bound at call time.
        sig.bind_partial(prompts=[], completions=[], answer=[], __troupe_probe__=[])
    except TypeError as e:
        raise ValueError(
            f"reward function {spec!r}: signature {sig} cannot accept (prompts, completions, **kwargs): {e}; "
            "define it as `def fn(prompts, completions, **kwargs) -> list[float | None]`"
        ) from None


def _split_spec(spec: str) -> tuple[str, str]:
    if ":" not in spec:
        raise ValueError(
            f"reward function {spec!r}: not a built-in ({', '.join(sorted([*BUILTIN_REWARDS, *BUILTIN_FACTORIES]))}) "
            "and not of the form 'package.module:function' or '/path/to/file.py:function'"
        )
    target, attr = spec.rsplit(":", 1)
    if not target or not attr:
        raise ValueError(f"reward function {spec!r}: empty module/file or function name")
    return target, attr


def _is_path(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def _load_file_module(target: str, spec: str) -> Any:
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"reward function {spec!r}: file not found: {path}")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    mod_name = f"troupe_reward_plugin_{path.stem}_{digest}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"reward function {spec!r}: cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[mod_name]
        raise ValueError(f"reward function {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from e
    return module


def _load_named_module(target: str, spec: str) -> Any:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        if e.name and (target == e.name or target.startswith(e.name + ".")):
            raise ValueError(
                f"reward function {spec!r}: no module named {target!r} "
                f"(is it installed, or on PYTHONPATH of the reward workers?)"
            ) from None
        raise ValueError(
            f"reward function {spec!r}: importing module {target!r} failed: {type(e).__name__}: {e}"
        ) from e
    except Exception as e:
        raise ValueError(
            f"reward function {spec!r}: importing module {target!r} failed: {type(e).__name__}: {e}"
        ) from e


def _build_factory(spec: str, options: dict[str, Any]) -> RewardFn:
    """``BUILTIN_FACTORIES[spec](**options)``; a rejected option is a ValueError naming ``spec``."""
    factory = BUILTIN_FACTORIES[spec]
    params = inspect.signature(factory).parameters.values()
    named = [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    unknown = [k for k in options if k not in named]
    missing = [p.name for p in params if p.default is p.empty and p.name in named and p.name not in options]
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params):
        raise ValueError(f"reward function {spec!r}: options: unknown {', '.join(map(repr, unknown))} "
                         f"(accepted: {', '.join(named)})")
    if missing:
        raise ValueError(f"reward function {spec!r}: options: missing {', '.join(map(repr, missing))}")
    try:
        return factory(**options)
    except (TypeError, ValueError) as e:
        raise ValueError(f"reward function {spec!r}: options: {e}") from e


def load_reward_function(name: str, options: Optional[Mapping[str, Any]] = None) -> RewardFn:
    """Resolve a reward-function spec to a callable with the TRL reward signature.

    Args:
        name: a built-in name (``accuracy``, ``format``, ``gsm8k``, ``math``, ``language``,
            ``http``), ``package.module:function`` (importable on the worker's ``sys.path``), or
            ``/path/to/file.py:function`` (a file; relative paths resolve against the
            current directory). ``function`` may be a dotted attribute path (``Class.method``).
        options: keyword settings of a built-in that takes them (:data:`BUILTIN_FACTORIES`,
            e.g. ``http``: ``url``, ``timeout_s``, ...); None or empty for every other spec.
    Returns:
        The callable (plain or ``async def``); for a factory built-in, ``factory(**options)``.
    Raises:
        ValueError: naming ``name``, when the module or file is missing or fails to import,
            the attribute is missing, it is not callable, or its signature cannot accept
            ``(prompts, completions, **kwargs)``; when a factory built-in rejects its options
            (``reward function 'http': options: ...``); when any other spec gets options.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"reward function {name!r}: expected a non-empty string")
    spec = name.strip()
    if options is not None and not isinstance(options, Mapping):
        raise ValueError(f"reward function {spec!r}: options must be a mapping, got {type(options).__name__}")
    if spec in BUILTIN_FACTORIES:
        return _build_factory(spec, dict(options or {}))
    if options:
        raise ValueError(f"reward function {spec!r} takes no options (got {', '.join(map(str, options))})")
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    target, attr = _split_spec(spec)
    module = _load_file_module(target, spec) if _is_path(target) else _load_named_module(target, spec)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(
                f"reward function {spec!r}: {getattr(module, '__name__', target)!r} has no attribute {attr!r}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"reward function {spec!r}: {attr!r} is a {type(obj).__name__}, not callable")
    check_reward_signature(obj, spec)
    return obj
