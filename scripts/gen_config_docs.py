"""Generate docs/reference/config.md from the pydantic schema (configs/schema.py, configs/algos.py).

Every key of a run config (``RunConfig``) and of a reward-model training config
(``RewardModelTrainConfig``), with its type, default, bounds and description, as the schema states
them; the algorithm variants (``algo.advantage``, ``algo.policy_loss``) with their own fields. The
page is never edited by hand.

Usage::

    python scripts/gen_config_docs.py            # (re)write docs/reference/config.md
    python scripts/gen_config_docs.py --check    # exit 1 if the page differs from what the schema gives

``.ci/run`` runs ``--check`` (through tests/test_docs_cpu.py), so a schema change without the
regenerated page fails CI.
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from troupe.configs.algos import ADVANTAGE_CONFIGS, POLICY_LOSS_CONFIGS, AdvantageConfig, PolicyLossConfig

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "reference" / "config.md"


def _type_name(tp: typing.Any) -> str:
    """A short readable name of an annotation (``int``, ``list[str]``, ``'a' | 'b'``, ``X | None``)."""
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is typing.Annotated:
        return _type_name(typing.get_args(tp)[0])
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{args}]" if args else name
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _bounds(field: FieldInfo) -> str:
    out = []
    for m in field.metadata:
        for attr, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "len >="),
                          ("max_length", "len <=")):
            v = getattr(m, attr, None)
            if v is not None:
                out.append(f"{sym} {v}")
    return ", ".join(out)


def _default(field: FieldInfo) -> str:
    if field.default is PydanticUndefined:
        if field.default_factory is not None:
            try:
                value = field.default_factory()
            except TypeError:
                return "(computed)"
            return f"`{_short(value)}`"
        return "**required**"
    return f"`{_short(field.default)}`"


def _short(value: typing.Any) -> str:
    if isinstance(value, BaseModel):
        return f"{type(value).__name__}()"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _models_in(tp: typing.Any) -> list[type[BaseModel]]:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return [m for a in typing.get_args(tp) for m in _models_in(a)]


def _table(cls: type[BaseModel], prefix: str, lines: list[str], seen: set) -> None:
    """One table for ``cls`` (keys under ``prefix``), then one per nested model, depth first."""
    doc = (cls.__doc__ or "").strip().split("\n\n")[0]
    lines += [f"## `{prefix or '(top level)'}`", "", _cell(doc) if doc else "", "",
              "| key | type | default | bounds | description |", "|---|---|---|---|---|"]
    nested = []
    for name, field in cls.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        lines.append(f"| `{key}` | {_cell(_type_name(field.annotation))} | {_cell(_default(field))} "
                     f"| {_cell(_bounds(field))} | {_cell(field.description or '')} |")
        for sub in _models_in(field.annotation):
            if sub.__module__.startswith("troupe.configs") and (key, sub) not in seen and not issubclass(sub, (AdvantageConfig, PolicyLossConfig)):
                seen.add((key, sub))
                nested.append((sub, key))
    lines.append("")
    for sub, key in nested:
        _table(sub, key, lines, seen)


def _variants(lines: list[str]) -> None:
    for title, registry in (("algo.advantage", ADVANTAGE_CONFIGS), ("algo.policy_loss", POLICY_LOSS_CONFIGS)):
        lines += [f"## `{title}` variants", "",
                  f"`{title}: NAME` takes the variant's defaults; `{title}: {{name: NAME, field: value}}` sets fields.", ""]
        for name in registry.names():
            cls = registry.config_class(name)
            if not cls.__module__.startswith("troupe."):  # one registered by a plugin or a test, not built in
                continue
            doc = _cell((cls.__doc__ or "").strip().split("\n\n")[0])
            lines += [f"### `{name}`", "", doc, ""]
            fields = {k: f for k, f in cls.model_fields.items() if k != "name"}
            if fields:
                lines += ["| field | type | default | bounds | description |", "|---|---|---|---|---|"]
                lines += [f"| `{k}` | {_cell(_type_name(f.annotation))} | {_cell(_default(f))} | {_cell(_bounds(f))} "
                          f"| {_cell(f.description or '')} |" for k, f in fields.items()]
                lines.append("")


def render() -> str:
    from troupe.configs.schema import RewardModelTrainConfig, RunConfig

    lines = ["# Configuration reference", "",
             "Generated from the pydantic schema by `python scripts/gen_config_docs.py` (never edited by hand; CI "
             "fails when it is out of date). Any key can be overridden on the command line as `key.sub=value`.", "",
             "# Run config (`troupe train`, `troupe check`)", ""]
    _table(RunConfig, "", lines, set())
    _variants(lines)
    lines += ["# Reward-model training config (`troupe rm train`)", ""]
    _table(RewardModelTrainConfig, "", lines, set())
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/reference/config.md is out of date")
    args = ap.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(REPO)} is out of date: run `python scripts/gen_config_docs.py`", file=sys.stderr)
            return 1
        print(f"{OUT.relative_to(REPO)} is up to date")
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
