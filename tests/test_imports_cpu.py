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
    mods = ["troupe.learner.grpo", "troupe.core.types", "troupe.configs.schema"]
    assert _loaded_after_import(mods, HEAVY + ("transformers",)) == []


def test_config_schema_does_not_import_torch():
    assert _loaded_after_import(["troupe.configs.schema"], HEAVY + ("torch",)) == []
