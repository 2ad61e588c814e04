"""Import purity: the maths, the data types and the config schema stay free of the heavy stack.

Each check runs in a fresh interpreter (``sys.executable``) so that modules imported by other
tests in this process cannot hide or fake an import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

HEAVY = ("ray", "vllm", "deepspeed")


def _loaded_after_import(modules: list[str], banned: tuple[str, ...]) -> list[str]:
    """Import ``modules`` in a fresh interpreter; return the banned top-level packages it loaded."""
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}:\n"
        "    importlib.import_module(m)\n"
        f"banned = {banned!r}\n"
        "print(json.dumps(sorted({k.split('.')[0] for k in sys.modules if k.split('.')[0] in banned})))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=dict(os.environ)
    )
    assert proc.returncode == 0, f"importing {modules} failed:\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_core_modules_do_not_import_ray_vllm_deepspeed():
    # the maths, the data types and the schema together; transformers is banned here too (grpo must
    # never import it, and types/schema are lighter still), one interpreter start for all of it.
    mods = ["troupe.learner.grpo", "troupe.learner.gae", "troupe.core.types", "troupe.configs.schema"]
    assert _loaded_after_import(mods, HEAVY + ("transformers",)) == []


def test_core_modules_load_nothing_heavy():
    """core/ is records and pure helpers: no module of it loads torch, Ray, vLLM or DeepSpeed at import."""
    from pathlib import Path

    core = Path(__file__).resolve().parents[1] / "core"
    mods = [f"troupe.core.{p.stem}" for p in sorted(core.glob("*.py")) if p.stem != "__init__"]
    assert len(mods) >= 6
    assert _loaded_after_import(mods, HEAVY + ("torch", "transformers")) == []


def test_config_schema_does_not_import_torch():
    assert _loaded_after_import(["troupe.configs.schema"], HEAVY + ("torch",)) == []


def test_learner_and_reward_modules_do_not_import_ray():
    # the learner is Ray-free (the cluster layer drives it); the reward scoring runs in-process too
    mods = ["troupe.learner.step", "troupe.learner.registry", "troupe.learner.batch", "troupe.learner.zero",
            "troupe.learner.sft", "troupe.learner.sft_rank", "troupe.learner.tiny_model", "troupe.reward.scoring",
            "troupe.reward.registry", "troupe.reward.rejection", "troupe.rollout.rejection"]
    assert _loaded_after_import(mods, ("ray", "vllm")) == []


# which troupe packages each layer may import (docs/architecture.md, "Layers")
ALLOWED = {
    "core": set(),
    "configs": set(),
    "rollout": {"core", "configs"},
    "reward": {"core", "configs"},
    "learner": {"core", "configs", "reward"},
    "cluster": {"core", "configs", "rollout", "reward", "learner", "cluster"},
    "demo": {"core", "configs", "reward"},
}


def _troupe_imports(path) -> set[str]:
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        found |= {n.split(".")[1] for n in names if n.startswith("troupe.") and len(n.split(".")) > 1}
    return found


def test_layering():
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    bad = []
    for layer, allowed in ALLOWED.items():
        for path in sorted((repo / layer).glob("*.py")):
            extra = _troupe_imports(path) - allowed - {layer}
            if extra:
                bad.append(f"{path.relative_to(repo)} imports troupe.{', troupe.'.join(sorted(extra))}")
    assert not bad, "\n".join(bad)


def test_no_private_name_is_imported_from_another_module():
    """Library code imports only public names of other troupe modules (issue 24): a name that starts with
    ``_`` is that module's business, and one used elsewhere gets a public name and a docstring."""
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    bad = []
    for layer in ALLOWED:
        for path in sorted((repo / layer).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("troupe."):
                    bad += [f"{path.relative_to(repo)}:{node.lineno} {node.module}.{a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, bad


MAX_FUNCTION_LINES = 60


def _code_lines(fn) -> int:
    """Lines of a function from its first statement after the docstring to its end (issue 24's 60-line rule
    counts code: docstrings give shapes, errors and sources, and are not what makes a function hard to read)."""
    import ast

    body = fn.body
    has_doc = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)
    if has_doc and len(body) == 1:
        return 0
    first = body[1] if has_doc else body[0]
    start = min([first.lineno] + [d.lineno for d in getattr(first, "decorator_list", [])])
    return fn.end_lineno - start + 1


def test_no_library_function_is_over_60_lines_of_code():
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    long = []
    for layer in ALLOWED:
        for path in sorted((repo / layer).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(node) > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(repo)}:{node.lineno} {node.name} ({_code_lines(node)} lines)")
    assert not long, long
