"""A Ray head for tests: ``ray start --head --block`` with free ports and a marker in its environment.

Used by tests/conftest.py (the one head every ``ray``-marked test joins) and tests/test_job_slow.py
(heads of its own, with token auth and the job API). ``Head.stop()`` terminates exactly that head and
every process that carries its marker; nothing here runs ``ray stop``, which would stop every Ray
cluster on the machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")  # the venv's ray (Ray 2.60), next to the python running the tests


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def marked_pids(marker: str) -> list[int]:
    """Processes whose environment holds ``TROUPE_TEST_HEAD=marker``: this head's and nothing else."""
    needle = f"TROUPE_TEST_HEAD={marker}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if needle in (d / "environ").read_bytes().split(b"\0"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


class Head:
    """``ray start --head --block`` on this machine with free ports; ``stop()`` leaves nothing behind."""

    def __init__(self, root: Path, env: dict, num_cpus: int, temp_dir: Path | None, dashboard: bool = True):
        self.marker = uuid.uuid4().hex
        self.env = dict(env, TROUPE_TEST_HEAD=self.marker)
        self.gcs_port, self.dashboard_port, client, agent, agent_grpc, runtime_env, metrics = free_ports(7)
        self.log = root / "head.log"
        cmd = [RAY, "start", "--head", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
               "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
               "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
               "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(runtime_env),
               "--metrics-export-port", str(metrics), "--num-cpus", str(num_cpus)]
        if not dashboard:
            cmd += ["--include-dashboard=false"]
        if temp_dir is not None:
            cmd += ["--temp-dir", str(temp_dir)]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=root, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    @property
    def address(self) -> str:
        """The GCS address a driver joins (``ray.init(address=...)``, RAY_ADDRESS)."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def wait_started(self, timeout: float = 120.0) -> None:
        deadline = time.time() + timeout
        while "Ray runtime started" not in self.log.read_text(errors="replace"):
            assert self.proc.poll() is None, f"ray start exited with {self.proc.returncode}:\n{self.log.read_text()}"
            assert time.time() < deadline, f"ray start did not start in {timeout} s:\n{self.log.read_text()}"
            time.sleep(0.5)

    def stop(self) -> list[int]:
        """Terminate the ``--block`` process (Ray then stops this node); returns the pids left after 60 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        deadline = time.time() + 60
        while (left := marked_pids(self.marker)) and time.time() < deadline:
            time.sleep(1)
        for pid in left:  # only this head's processes carry the marker
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left
