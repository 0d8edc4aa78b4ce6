"""Run an lmtrain command as several local processes that form one JAX job (jax.distributed over 127.0.0.1),
each with its own fake CPU devices: the multi-host code paths, for real, on one machine."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job:
    """N processes of `python -m lmtrain.cli ARGS`, process i with JAX_PROCESS_ID=i and `devices` fake devices."""

    def __init__(self, args: list[str], n: int, devices: int, log_dir: pathlib.Path, extra_env: dict | None = None):
        port = free_port()
        log_dir.mkdir(parents=True, exist_ok=True)
        self.logs = [log_dir / f"process_{i}.log" for i in range(n)]
        self.procs = []
        for i in range(n):
            env = {k: v for k, v in os.environ.items() if k != "LMTRAIN_SINGLE_HOST"}
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(i),
                       XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
                       PYTHONUNBUFFERED="1", **(extra_env or {}))
            out = open(self.logs[i], "w")  # noqa: SIM115 - closed in wait()
            self.procs.append(subprocess.Popen([sys.executable, "-m", "lmtrain.cli", *args], cwd=REPO, env=env,
                                               stdout=out, stderr=subprocess.STDOUT))

    def output(self, i: int) -> str:
        return self.logs[i].read_text()

    def signal(self, i: int, sig: int = signal.SIGTERM) -> None:
        self.procs[i].send_signal(sig)

    def wait(self, timeout: float = 600) -> list[int]:
        deadline = time.time() + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(deadline - time.time(), 1)))
            except subprocess.TimeoutExpired:
                for q in self.procs:
                    q.kill()
                raise AssertionError("multi-process job timed out:\n" + "\n".join(
                    f"--- process {i}\n{self.output(i)[-3000:]}" for i in range(len(self.procs)))) from None
        return codes

    def check(self, timeout: float = 600) -> None:
        codes = self.wait(timeout)
        assert codes == [0] * len(codes), f"exit codes {codes}:\n" + "\n".join(
            f"--- process {i}\n{self.output(i)[-4000:]}" for i in range(len(codes)))


def losses(workdir) -> dict[int, float]:
    out = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out
