"""`troupe train` where Ray already runs: `ray job submit` to a real `ray start --head`, and the
embedded cluster after a stopped head left its address file behind.

Each test starts its own head (`ray start --head --block`, free ports, its own temp dir, a unique
marker in its environment) and stops exactly that head: it terminates the `--block` process and
then checks that no process carrying the marker (raylet, GCS, workers, the job's driver) is left.
Nothing here runs `ray stop`, which would stop every Ray cluster on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from ray_head import RAY, Head, marked_pids

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # the venv: its python has troupe installed, its ray is Ray 2.60
# small and quick (tests/test_e2e_slow.py's TINY, one rank, no SFT, 2 steps)
TINY = [
    "sft.enabled=false", "steps=2", "eval_every=0", "data.num_eval=8", "data.options.num_train=512",
    "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=24",
    "learner.micro_batch_size=4", "learner.num_ranks=1", "learner.num_cpus_per_rank=0.5",
    "rollout.num_cpus_per_engine=1", "learner.lr=0.001",
]


def _base_env(**extra: str) -> dict:
    """This environment without Ray settings that would point elsewhere, the venv first on PATH."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                        "RAY_TMPDIR", "RAY_JOB_CONFIG_JSON_ENV_VAR")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # as `source .venv/bin/activate` does
    env.update(extra)
    return env


@pytest.fixture
def short_tmp():
    """A short directory under /tmp: Ray's unix socket paths under it must stay below ~107 bytes."""
    d = Path(tempfile.mkdtemp(prefix="tj", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _job(head: Head, env: dict, args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, "job", *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_ray_job_submit(short_tmp, tmp_path):
    """`ray job submit --working-dir` to a head with token auth: the run lands under the absolute output_dir."""
    token = secrets.token_hex(32)
    # Ray 2.60: `ray start` enables token auth when a token is available (here RAY_AUTH_TOKEN; usually
    # ~/.ray/auth_token); the client must then say RAY_AUTH_MODE=token itself
    head = Head(short_tmp, _base_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token), num_cpus=4,
                temp_dir=short_tmp / "ray")
    try:
        head.wait_started()
        client = _base_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
        deadline = time.time() + 120
        while (r := _job(head, client, ["list", "--address", head.url], 60)).returncode != 0:
            assert time.time() < deadline, f"job API did not answer:\n{r.stdout}\n{r.stderr}"
            time.sleep(2)

        # the failure a user sees without RAY_AUTH_MODE=token (the token alone is not sent)
        r = _job(head, _base_env(RAY_AUTH_TOKEN=token), ["list", "--address", head.url], 60)
        assert r.returncode != 0 and "Missing authentication token" in r.stdout + r.stderr

        wd = tmp_path / "wd"
        wd.mkdir()
        shutil.copy(REPO / "configs" / "arith_cpu.yaml", wd / "cfg.yaml")
        # a reward plugin shipped in the working dir: Ray puts the working dir on the workers' sys.path
        (wd / "jobreward.py").write_text("def length_reward(prompts, completions, **kw):\n"
                                         "    return [len(c) / 100.0 for c in completions]\n")
        rewards = "reward.functions=[{name: accuracy}, {name: 'jobreward:length_reward', weight: 0.01}]"
        out = tmp_path / "runs"

        # a relative output_dir would land in Ray's temporary copy of wd: refused at once, status 2
        sid = f"troupe-rel-{uuid.uuid4().hex[:8]}"
        r = _job(head, client, ["submit", "--address", head.url, "--submission-id", sid, "--working-dir", str(wd), "--",
                                "python", "-m", "troupe.cluster.cli", "train", "cfg.yaml", "output_dir=runs"], 300)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "output_dir: 'runs' is relative" in r.stdout and "exit code 2" in r.stdout, r.stdout

        sid = f"troupe-job-{uuid.uuid4().hex[:8]}"
        entry = ("python -c 'import sys; print(\"DRIVER_PYTHON\", sys.executable)' && "
                 f"python -m troupe.cluster.cli train cfg.yaml output_dir={out} name=job \"{rewards}\" " + " ".join(TINY))
        t0 = time.time()
        r = _job(head, client, ["submit", "--address", head.url, "--submission-id", sid, "--working-dir", str(wd),
                                "--", "sh", "-c", entry], 900)  # `ray job` quotes each word
        wall = time.time() - t0
        assert r.returncode == 0, f"{r.stdout}\n{r.stderr}"
        status = subprocess.run(
            [sys.executable, "-c", "import sys; from ray.job_submission import JobSubmissionClient; "
             "print('STATUS', JobSubmissionClient(sys.argv[1]).get_job_status(sys.argv[2]).value)", head.url, sid],
            env=client, capture_output=True, text=True, timeout=120)
        assert "STATUS SUCCEEDED" in status.stdout, status.stdout + status.stderr
        # the driver ran with the head's venv python (the venv was first on PATH when the head started)
        assert f"DRIVER_PYTHON {VENV_BIN / 'python'}" in r.stdout, r.stdout

        run_dir = out / "job"
        assert (run_dir / "config.yaml").exists()
        recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [x for x in recs if x.get("step", 0) >= 1 and not x.get("final")]
        assert [x["step"] for x in steps] == [1, 2]
        assert all(x["reward/jobreward:length_reward_mean"] > 0 for x in steps)  # the plugin ran on the workers
        summary = json.loads((run_dir / "summary.json").read_text())
        assert Path(summary["run_dir"]) == run_dir
        # nothing was written into Ray's working-dir copies
        assert not list((short_tmp / "ray").glob("session_*/runtime_resources/working_dir_files/*/runs"))
        print(f"job wall time {wall:.0f} s")
        (tmp_path / "job.log").write_text(r.stdout)
    finally:
        left = head.stop()
    assert not left, f"processes of the head still running after stop: {left}"


def test_embedded_cluster_after_stopped_head(short_tmp):
    """A stopped `ray start --head` leaves its address file; troupe still starts its own cluster."""
    # the default temp dir (and address file) is $RAY_TMPDIR/ray; HOME: the token a local ray.init
    # creates (~/.ray/auth_token) goes here, not into the user's home
    env = _base_env(RAY_TMPDIR=str(short_tmp), HOME=str(short_tmp))
    head = Head(short_tmp, env, num_cpus=1, temp_dir=None)
    try:
        head.wait_started()
    finally:
        left = head.stop()
    assert not left
    address_file = short_tmp / "ray" / "ray_current_cluster"
    assert address_file.exists(), "the stopped head left no address file: this test no longer sets the scene"
    stale = address_file.read_text().strip()

    script = f"""
import ray
from troupe.cluster.runtime import init_ray
from troupe.configs.schema import load_config

try:  # what a plain ray.init does here: it tries to join the dead head
    ray.init(num_cpus=1)
    raise SystemExit("plain ray.init started a cluster; the scene is not the one of the issue")
except ValueError as e:
    assert "num_cpus and num_gpus must not be provided" in str(e), e
cfg = load_config({str(REPO / 'configs' / 'arith_cpu.yaml')!r}, ["learner.num_cpus_per_rank=0.5"])
init_ray(cfg, None)
res = ray.cluster_resources()
gcs = ray.get_runtime_context().gcs_address
print("RESULT", res.get("CPU"), gcs)
ray.shutdown()
"""
    marker = uuid.uuid4().hex
    r = subprocess.run([sys.executable, "-c", script], env=dict(env, TROUPE_TEST_HEAD=marker), cwd=short_tmp,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("RESULT"))
    _, cpus, gcs = line.split()
    assert float(cpus) >= 2 and gcs != stale  # a new cluster, sized for the run (not the 1-CPU head)
    deadline = time.time() + 60
    while marked_pids(marker) and time.time() < deadline:
        time.sleep(1)
    assert not marked_pids(marker)
