"""Weights & Biases logging of metrics.jsonl's records (cluster/metrics.py ``MetricsWriter(wandb=...)``).

Offline mode only (no network, no account): the offline run W&B writes under the run folder is
read back from its transaction log (``run-<id>.wandb``: LevelDB-style log records, each a
``wandb_internal_pb2.Record`` protobuf, the format ``wandb sync`` uploads) and the logged rows,
step axes and config are compared with what was written. Everything wandb writes goes under
``tmp_path`` (WANDB_DIR/WANDB_CACHE_DIR/WANDB_CONFIG_DIR/WANDB_DATA_DIR, HOME).
"""

from __future__ import annotations

import json
import math
import struct

import pytest

from troupe.cluster.metrics import MetricsWriter, WandbInitError
from troupe.configs.schema import WandbConfig

pytest.importorskip("wandb")


@pytest.fixture(autouse=True)
def _wandb_env(tmp_path, monkeypatch):
    """Keep wandb's files in tmp_path and the environment from choosing a mode or an account."""
    for var, sub in (("WANDB_DIR", "wandb_dir"), ("WANDB_CACHE_DIR", "wandb_cache"),
                     ("WANDB_CONFIG_DIR", "wandb_config"), ("WANDB_DATA_DIR", "wandb_data"),
                     ("WANDB_ARTIFACT_DIR", "wandb_artifacts"), ("HOME", "home")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))  # absent: no `wandb login` key
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_PROJECT",
                "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_NAME", "WANDB_TAGS"):
        monkeypatch.delenv(var, raising=False)
    yield
    _teardown_wandb()


def _teardown_wandb() -> None:
    """Stop wandb's service process: ``run.finish()`` only tells it the run is done, the run's
    ``.wandb`` file is complete once the service has closed the stream; also drops wandb's
    process-wide settings, read from the environment (this test's tmp_path) when first set up."""
    import sys

    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()


def read_wandb_log(path) -> list:
    """The ``Record`` protobufs of a ``.wandb`` file: a 7-byte header (":W&B", magic 0xBEE1, version 0),
    then 32 KiB blocks of records, each a 7-byte header (crc32c, length, type: 1 full, 2 first,
    3 middle, 4 last) and its bytes (the LevelDB log format, as wandb's datastore writes it)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0)
    block, pos, out, buf = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:  # zero padding to the block end
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    assert not buf, "truncated record at the end of the log"
    return out


def _key(item) -> str:
    return item.key or ".".join(item.nested_key)


def offline_run(run_dir) -> dict:
    """The offline run under ``run_dir/wandb``: its run record, history rows (W&B's own ``_`` keys
    left out), step metrics of each metric and the config."""
    _teardown_wandb()
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    logs = list(runs[0].glob("run-*.wandb"))
    assert len(logs) == 1, logs
    recs = read_wandb_log(logs[0])
    kinds = [r.WhichOneof("record_type") for r in recs]
    assert "run" in kinds and kinds[-1] == "exit", kinds  # complete: finish() ran
    run = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
    rows = [{_key(i): json.loads(i.value_json) for i in r.history.item if not _key(i).startswith("_")}
            for r in recs if r.WhichOneof("record_type") == "history"]
    metrics = {r.metric.name: r.metric.step_metric for r in recs if r.WhichOneof("record_type") == "metric"}
    config = {_key(u): json.loads(u.value_json) for u in run.config.update}
    return {"run": run, "rows": rows, "metrics": metrics, "config": config, "kinds": kinds}


RECORDS = [
    {"step": 0, "eval/accuracy": 0.5},
    {"stage": "sft", "step": 1, "loss": 2.0, "lr": 1e-5, "tokens": 96},
    {"stage": "sft", "step": 2, "loss": 1.5, "lr": 2e-5, "tokens": 80},
    {"step": 1, "reward_mean": 0.25, "reward/accuracy_mean": 0.5, "loss": math.nan, "kl_ref": math.inf,
     "sync_strategy": "shm", "dynamic": True, "time/step": 3.5},
    {"step": 1, "eval/accuracy": 0.75},  # same step as the train record before it
    {"step": 2, "reward_mean": 0.5, "loss": 0.125, "time/step": 2.0},
    {"step": 2, "final": True, "eval/accuracy": 1.0},
]

EXPECTED_ROWS = [
    {"eval/accuracy": 0.5, "train/step": 0},
    {"sft/loss": 2.0, "sft/lr": 1e-5, "sft/tokens": 96, "sft/step": 1},
    {"sft/loss": 1.5, "sft/lr": 2e-5, "sft/tokens": 80, "sft/step": 2},
    {"reward_mean": 0.25, "reward/accuracy_mean": 0.5, "time/step": 3.5, "train/step": 1},  # NaN, inf, str, bool out
    {"eval/accuracy": 0.75, "train/step": 1},
    {"reward_mean": 0.5, "loss": 0.125, "time/step": 2.0, "train/step": 2},
    {"eval/accuracy": 1.0, "train/step": 2},
]


def test_wandb_offline_logs_every_record_and_the_config(tmp_path, capfd):
    run_dir = tmp_path / "grpo-run"
    run_dir.mkdir()
    cfg = {"algo": {"name": "grpo", "kl_coef": 0.05}, "steps": 2, "model": "tiny"}
    w = MetricsWriter(run_dir, tensorboard=False, config=cfg,
                      wandb=WandbConfig(project="troupe-test", mode="offline", tags=["ci", "cpu"]))
    for r in RECORDS:
        w.write(r)
    w.close()
    w.close()  # idempotent for the W&B run

    # metrics.jsonl as without W&B
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in x.items() if k != "time"} for x in lines][0] == RECORDS[0]
    assert len(lines) == len(RECORDS)

    got = offline_run(run_dir)
    run = got["run"]
    assert run.project == "troupe-test" and run.display_name == "grpo-run"  # the run folder's name
    assert list(run.tags) == ["ci", "cpu"]
    assert got["config"]["algo"] == {"name": "grpo", "kl_coef": 0.05}
    assert got["config"]["steps"] == 2 and got["config"]["model"] == "tiny"
    # every record is its own row: same-step records and SFT's own step counter are all kept
    assert got["rows"] == EXPECTED_ROWS
    # x-axes: train/step for GRPO keys, sft/step for SFT keys
    m = got["metrics"]
    assert m["train/step"] == "" and m["sft/step"] == ""
    assert {k: m[k] for k in ("eval/accuracy", "reward_mean", "reward/accuracy_mean", "loss", "time/step")} == \
        dict.fromkeys(("eval/accuracy", "reward_mean", "reward/accuracy_mean", "loss", "time/step"), "train/step")
    assert {k: m[k] for k in ("sft/loss", "sft/lr", "sft/tokens")} == dict.fromkeys(
        ("sft/loss", "sft/lr", "sft/tokens"), "sft/step")
    assert got["kinds"][-1] == "exit"  # finish() ran
    # silent, no console capture: nothing printed, no output.log
    out, err = capfd.readouterr()
    assert "wandb" not in out.lower() and "wandb" not in err.lower(), (out, err)
    assert not list((run_dir / "wandb").glob("offline-run-*/files/output.log"))
    assert not list((tmp_path / "home").iterdir())  # nothing in $HOME


def test_wandb_run_name_overrides_the_folder_name(tmp_path):
    w = MetricsWriter(tmp_path, wandb=WandbConfig(project="troupe-test", mode="offline"), run_name="exp-7")
    w.write({"step": 1, "reward_mean": 1.0})
    w.close()
    got = offline_run(tmp_path)
    assert got["run"].display_name == "exp-7" and got["rows"] == [{"reward_mean": 1.0, "train/step": 1}]


def test_wandb_disabled_writes_nothing_and_the_same_jsonl(tmp_path):
    plain, off = tmp_path / "plain", tmp_path / "off"
    plain.mkdir()
    off.mkdir()
    writers = [MetricsWriter(plain), MetricsWriter(off, wandb=WandbConfig(project="troupe-test", mode="disabled"),
                                                   config={"steps": 2})]
    for w in writers:
        for r in RECORDS:
            w.write(r)
        w.close()

    def content(d):
        lines = (d / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "time"} for x in lines]

    assert content(off) == content(plain) and len(content(off)) == len(RECORDS)
    assert sorted(p.name for p in off.iterdir()) == ["metrics.jsonl"]
    for sub in ("wandb_dir", "wandb_cache", "wandb_config", "wandb_data", "home"):
        assert not list((tmp_path / sub).iterdir()), sub


def test_wandb_online_without_credentials_fails_before_training(tmp_path):
    with pytest.raises(WandbInitError, match=r"wandb\.mode.*online[\s\S]*wandb\.mode: offline"):
        MetricsWriter(tmp_path, wandb=WandbConfig(project="troupe-test", mode="online"))
    assert not (tmp_path / "wandb").exists()  # raised before wandb.init: no network, no files


def test_wandb_init_failure_names_the_mode(tmp_path, monkeypatch):
    import wandb

    def fail(**kwargs):
        raise wandb.errors.CommError("Network error (ConnectionError), entering retry loop.")

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # credentials present: the failure is wandb.init's
    monkeypatch.setattr(wandb, "init", fail)
    with pytest.raises(WandbInitError, match=r"wandb\.mode 'online'[\s\S]*CommError[\s\S]*wandb\.mode: offline") as e:
        MetricsWriter(tmp_path, wandb=WandbConfig(project="troupe-test", mode="online"))
    assert isinstance(e.value.__cause__, wandb.errors.CommError)
