"""The command line turns the library's exceptions into exit statuses, and only there (issue 24).

``troupe.cluster.runs.train`` raises; ``troupe.cluster.cli.run_train`` maps. Each error is injected
on purpose by replacing ``runs.train`` with a function that raises it (the real raising paths run in
tests/test_faults_slow.py and tests/test_pipeline_slow.py).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from troupe.cluster import cli, runs
from troupe.cluster.train import RunStopped
from troupe.configs.schema import ConfigError, load_config

CFG = load_config(Path(__file__).resolve().parents[1] / "configs" / "arith_cpu.yaml")


@pytest.mark.parametrize("error,status", [
    (ConfigError("no training prompt fits data.max_prompt_tokens = 8"), 2),
    (runs.RunFailed("run failed: learner rank 1 died", Path("r"), Path("r/resume/step_2")), 1),
    (RunStopped(signal.SIGINT, 3, Path("r/resume/step_3")), 130),
    (RunStopped(signal.SIGTERM, 3, None), 143),
])
def test_each_error_has_its_exit_status(monkeypatch, capsys, error, status):
    def raising(*args, **kwargs):
        raise error

    monkeypatch.setattr(runs, "train", raising)
    assert cli.run_train(CFG, [], [], None) == status
    if isinstance(error, ConfigError):  # the one error the run's log has not said already
        assert "no training prompt fits" in capsys.readouterr().err


def test_a_finished_run_exits_0(monkeypatch):
    monkeypatch.setattr(runs, "train", lambda *a, **k: {"checkpoint": "c"})
    assert cli.run_train(CFG, [], [], None) == 0


def test_run_failed_carries_the_checkpoint_and_is_a_runtime_error():
    e = runs.RunFailed("run failed: x", Path("r"), Path("r/resume/step_2"))
    assert isinstance(e, RuntimeError) and e.checkpoint == Path("r/resume/step_2") and str(e) == "run failed: x"
