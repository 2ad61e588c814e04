"""`troupe train` as a `ray job submit` driver: a relative output_dir fails at once (cluster/jobs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from troupe.cluster.cli import main
from troupe.cluster.jobs import JOB_CONFIG_ENV, check_output_dir, in_temporary_working_dir
from troupe.configs.schema import ConfigError

REPO = Path(__file__).resolve().parents[1]
WORKING_DIR_COPY = "/tmp/ray/session_x/runtime_resources/working_dir_files/_ray_pkg_0123"
# what Ray 2.60's job supervisor puts in a driver's environment for `ray job submit --working-dir .`
JOB_ENV = json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip", "env_vars": {}},
                      "metadata": {"job_submission_id": "raysubmit_x", "job_name": "raysubmit_x"}})


def test_outside_a_job_nothing_is_checked():
    check_output_dir("runs", "ckpt", environ={}, cwd=WORKING_DIR_COPY)
    assert not in_temporary_working_dir({}, WORKING_DIR_COPY)


def test_job_with_working_dir_needs_absolute_paths():
    env = {JOB_CONFIG_ENV: JOB_ENV}
    assert in_temporary_working_dir(env, WORKING_DIR_COPY)
    with pytest.raises(ConfigError, match=r"output_dir: 'runs' is relative.*output_dir=/shared/runs"):
        check_output_dir("runs", None, environ=env, cwd=WORKING_DIR_COPY)
    with pytest.raises(ConfigError, match=r"checkpoint\.dir: 'ckpt' is relative"):
        check_output_dir("/shared/runs", "ckpt", environ=env, cwd=WORKING_DIR_COPY)
    check_output_dir("/shared/runs", None, environ=env, cwd=WORKING_DIR_COPY)
    check_output_dir("/shared/runs", "/shared/ckpt", environ=env, cwd=WORKING_DIR_COPY)


def test_job_without_working_dir_runs_where_the_head_was_started():
    """No --working-dir: the driver's cwd is the head's (kept), a relative output_dir is allowed."""
    env = {JOB_CONFIG_ENV: json.dumps({"runtime_env": {"env_vars": {}}, "metadata": {}})}
    check_output_dir("runs", None, environ=env, cwd="/home/me/troupe")
    # ... unless the cwd is a runtime_env copy all the same
    with pytest.raises(ConfigError, match="output_dir"):
        check_output_dir("runs", None, environ=env, cwd=WORKING_DIR_COPY)


@pytest.mark.parametrize("cmd", ["train", "check"])
def test_cli_fails_with_status_2(monkeypatch, capsys, tmp_path, cmd):
    monkeypatch.setenv(JOB_CONFIG_ENV, JOB_ENV)
    monkeypatch.chdir(tmp_path)
    assert main([cmd, str(REPO / "configs" / "arith_cpu.yaml"), "output_dir=runs"]) == 2
    err = capsys.readouterr().err
    assert "output_dir: 'runs' is relative" in err and "ray job submit" in err
    assert not (tmp_path / "runs").exists()
    # an absolute output_dir passes the check (check validates, starts nothing)
    assert main(["check", str(REPO / "configs" / "arith_cpu.yaml"), f"output_dir={tmp_path / 'out'}"]) == 0


@pytest.fixture
def fake_ray(monkeypatch):
    """troupe.cluster.runtime with ray.init recorded instead of run."""
    from troupe.cluster import runtime

    calls = []
    monkeypatch.setattr(runtime.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(runtime.ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    return runtime, calls


def test_init_ray_address_precedence(fake_ray, monkeypatch):
    """--address, then cluster.address, then RAY_ADDRESS, else a fresh local cluster (address='local')."""
    from troupe.configs.schema import load_config

    runtime, calls = fake_ray
    arith = str(REPO / "configs" / "arith_cpu.yaml")
    cfg, cfg_addr = load_config(arith, []), load_config(arith, ["cluster.address=10.0.0.2:6379"])
    runtime.init_ray(cfg, None)
    assert calls[-1]["address"] == "local" and calls[-1]["num_cpus"] >= 2  # never a left-behind `ray start` address
    runtime.init_ray(cfg_addr, None)
    assert calls[-1]["address"] == "10.0.0.2:6379" and "num_cpus" not in calls[-1]
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.3:6379")  # what Ray sets in a `ray job submit` driver
    runtime.init_ray(cfg, None)
    assert calls[-1]["address"] == "10.0.0.3:6379"
    runtime.init_ray(cfg_addr, None)
    assert calls[-1]["address"] == "10.0.0.2:6379"
    runtime.init_ray(cfg_addr, "ray://head:10001")
    assert calls[-1]["address"] == "ray://head:10001"


def test_init_ray_connection_error_names_token_auth(fake_ray, monkeypatch):
    runtime, _ = fake_ray
    from troupe.configs.schema import load_config

    def refuse(**kw):
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.2:6379")

    monkeypatch.setattr(runtime.ray, "init", refuse)
    cfg = load_config(str(REPO / "configs" / "arith_cpu.yaml"), [])
    with pytest.raises(ConnectionError, match="set RAY_AUTH_MODE=token"):
        runtime.init_ray(cfg, "10.0.0.2:6379")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # already set: Ray's own message, unchanged
    with pytest.raises(ConnectionError, match=r"^Failed to connect to Ray cluster at 10\.0\.0\.2:6379$"):
        runtime.init_ray(cfg, "10.0.0.2:6379")
