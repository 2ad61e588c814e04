"""Running as a ``ray job submit`` driver: where a run's outputs may go.

Ray starts a job's entrypoint (on the head node by default) with ``RAY_JOB_CONFIG_JSON_ENV_VAR``
set (JSON: the job's ``runtime_env`` and ``metadata.job_submission_id``; checked against Ray
2.60's ``dashboard/modules/job/job_supervisor.py``) and ``RAY_ADDRESS`` set to the cluster's GCS
address. With ``--working-dir`` the entrypoint's working directory is Ray's temporary copy of it
(``<ray temp dir>/session_*/runtime_resources/working_dir_files/_ray_pkg_*``), removed with the
session: a relative ``output_dir`` would put the run there. Imports nothing of Ray's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from troupe.configs.schema import ConfigError

JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # ray._private.runtime_env.constants.RAY_JOB_CONFIG_JSON_ENV_VAR


def job_config(environ: Mapping[str, str] | None = None) -> dict | None:
    """The job config Ray gave this process if it is a ``ray job submit`` driver, else None."""
    raw = (os.environ if environ is None else environ).get(JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except ValueError:
        return {}
    return cfg if isinstance(cfg, dict) else {}


def in_temporary_working_dir(environ: Mapping[str, str] | None = None, cwd: str | None = None) -> bool:
    """True in a job driver whose working directory is Ray's temporary copy of ``--working-dir``."""
    job = job_config(environ)
    if job is None:
        return False
    runtime_env = job.get("runtime_env") or {}
    cwd = cwd if cwd is not None else os.getcwd()
    return bool(runtime_env.get("working_dir")) or "runtime_resources" in Path(cwd).parts


def check_output_dir(output_dir: str, checkpoint_dir: str | None = None,
                     environ: Mapping[str, str] | None = None, cwd: str | None = None) -> None:
    """Raise ``ConfigError`` if a run directory would land in a job's temporary working directory.

    Inside a ``ray job submit --working-dir`` driver, ``output_dir`` (and ``checkpoint.dir`` if
    set) must be absolute: relative ones resolve inside Ray's copy of the working directory,
    which is deleted with the Ray session. Anywhere else this does nothing.
    """
    if not in_temporary_working_dir(environ, cwd):
        return
    cwd = cwd if cwd is not None else os.getcwd()
    for key, value in (("output_dir", output_dir), ("checkpoint.dir", checkpoint_dir)):
        if value is not None and not os.path.isabs(value):
            raise ConfigError(
                f"{key}: {value!r} is relative, and this `ray job submit` driver runs in Ray's temporary copy of "
                f"the working directory ({cwd}), deleted with the Ray session: the run would be lost. Pass an "
                f"absolute path on storage that outlives the job (shared by all nodes on a multi-node cluster), "
                f"e.g. {key}=/shared/runs")
