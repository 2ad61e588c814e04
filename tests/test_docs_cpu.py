"""The docs: the generated configuration page matches the schema, and every link of README.md resolves.

(``mkdocs build --strict`` in .ci/run checks the links and anchors between the site's pages.)
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _gen_module():
    spec = importlib.util.spec_from_file_location("gen_config_docs", REPO / "scripts" / "gen_config_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_config_page_is_up_to_date():
    gen = _gen_module()
    page = (REPO / "docs" / "reference" / "config.md").read_text()
    assert page == gen.render(), "docs/reference/config.md is out of date: run `python scripts/gen_config_docs.py`"


def test_config_page_lists_every_key_with_its_description():
    from troupe.configs.schema import RolloutConfig

    page = (REPO / "docs" / "reference" / "config.md").read_text()
    for name, field in RolloutConfig.model_fields.items():
        row = next((line for line in page.splitlines() if line.startswith(f"| `rollout.{name}` |")), None)
        assert row is not None, f"rollout.{name} missing from the configuration page"
        assert " ".join((field.description or "").split())[:30].replace("|", "\\|") in row, row


def test_readme_links_resolve_and_readme_is_short():
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) <= 12 * 1024, f"README.md is {len(readme.encode())} bytes (at most 12 KiB)"
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [x for x in links if "://" not in x]
    assert local, "the README links into the docs"
    missing = [x for x in local if not (REPO / x).exists()]
    assert not missing, f"README.md links to missing files: {missing}"
    for page in ("docs/getting-started.md", "docs/results.md", "docs/contributing.md"):
        assert page in local, f"README.md does not link {page}"


def test_readme_yaml_is_a_valid_run_config():
    import yaml

    from troupe.configs.schema import RunConfig

    readme = (REPO / "README.md").read_text()
    block = readme[readme.index("```yaml") + len("```yaml"):]
    block = block[:block.index("```")]
    cfg = RunConfig.model_validate(yaml.safe_load(block))
    assert cfg.algo.policy_loss.clip_high == 0.28 and cfg.learner.zero_stage == 3
