"""MkDocs hook: a ``troupe`` package folder for the API reference's static analysis.

troupe's sub-packages are top-level folders mapped to ``troupe.<name>`` by setuptools' package-dir
(pyproject.toml), so there is no ``troupe/`` folder for mkdocstrings (griffe) to find, and griffe's
import of the editable install's namespace package lists no members. Before the build this writes
``.mkdocs_src/troupe/`` with a link per sub-package (mkdocs.yml points the handler's ``paths`` at it).
"""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "demo", "configs", "rollout", "reward", "learner", "cluster")


def build_source_tree() -> Path:
    """(Re)write ``.mkdocs_src/troupe`` (links to the sub-package folders); returns ``.mkdocs_src``."""
    root = REPO / ".mkdocs_src" / "troupe"
    shutil.rmtree(root.parent, ignore_errors=True)
    root.mkdir(parents=True)
    (root / "__init__.py").write_text('"""troupe: distributed actor/learner GRPO."""\n')
    for name in PACKAGES:
        (root / name).symlink_to(REPO / name, target_is_directory=True)
    return root.parent


# at import, i.e. when mkdocs loads its config: before any plugin's on_config (mkdocstrings drops search
# paths that do not exist yet)
build_source_tree()
