"""cluster/models.py: model.path as a local folder or a hub id (resolved from the HF cache offline), checked early."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from troupe.cluster.models import ModelPathError, check_model, resolve_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from troupe.learner.tiny_model import build_tiny_model

    path = tmp_path_factory.mktemp("tiny") / "m"
    build_tiny_model(str(path), ["1+2=3", "4+5=9"] * 8, hidden_size=32, num_layers=1, num_heads=1, num_kv_heads=1,
                     intermediate_size=64, max_position_embeddings=64)
    return Path(path)


def test_local_folder_and_builtin_pass_through(tiny):
    assert resolve_model(str(tiny)) == str(tiny)
    assert resolve_model("builtin:qwen2-tiny") == "builtin:qwen2-tiny"
    assert check_model(str(tiny)).startswith(f"{tiny}: qwen2, vocab ")


@pytest.mark.parametrize("path", ["/no/such/model", "./missing", "a/b/c"])
def test_local_looking_paths_that_do_not_exist(path):
    with pytest.raises(ModelPathError, match="no such folder here"):
        resolve_model(path)


def test_folder_without_a_loadable_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelPathError, match="its config does not load"):
        check_model(str(tmp_path))


def _hub_cache(root: Path, repo: str, model: Path, commit: str = "0" * 40) -> Path:
    """The HF hub cache layout (models--org--name/{refs/main, snapshots/<commit>/...}) holding ``model``'s files."""
    d = root / ("models--" + repo.replace("/", "--"))
    snap = d / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in model.iterdir():
        shutil.copy(f, snap / f.name)
    (d / "refs").mkdir()
    (d / "refs" / "main").write_text(commit)
    return snap


def test_hub_id_resolves_from_the_offline_cache(tmp_path, tiny):
    snap = _hub_cache(tmp_path / "hub", "troupe-test/tiny", tiny)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = ("import json; from troupe.cluster.models import check_model, resolve_model, ModelPathError\n"
            "out = {'path': resolve_model('troupe-test/tiny'), 'check': check_model('troupe-test/tiny')}\n"
            "try:\n    resolve_model('troupe-test/not-cached')\nexcept ModelPathError as e:\n    out['missing'] = str(e)\n"
            "print(json.dumps(out))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(out["path"]) == snap
    assert out["check"].startswith("troupe-test/tiny: qwen2, vocab ") and str(snap) in out["check"]
    assert "model.path 'troupe-test/not-cached': not a local folder" in out["missing"]
    assert "HF cache" in out["missing"]
