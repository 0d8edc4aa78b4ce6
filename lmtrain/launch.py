"""`lmtrain launch`: keep `lmtrain train` running on every worker of a Cloud TPU slice until the run is done.

    lmtrain launch run    --name=NAME --zone=ZONE [resource options] --workdir=gs://B/run -- --config=llama_1b
    lmtrain launch status --name=NAME --zone=ZONE [--workdir=gs://B/run]
    lmtrain launch logs   --name=NAME --zone=ZONE [--worker=all] [--lines=100] [--out=DIR]
    lmtrain launch stop   --name=NAME --zone=ZONE [--delete]

`run` creates the queued resource through setup_tpu.sh when it is missing, starts the trainer detached on all
workers (it survives this command and the ssh session), and watches. After a preemption (the resource leaves
ACTIVE) it recreates the resource or waits for it and relaunches the same command; after a worker failure it
stops the other workers and relaunches with backoff. The trainer resumes from the latest complete checkpoint in
the gs:// WORKDIR. The launcher stops when the run writes WORKDIR/done.json; run again on a finished WORKDIR, it
exits at once. Stopping this command (Ctrl-C) leaves the training running: `run` again re-attaches.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lmtrain.paths import as_path, is_remote

REMOTE_DIR = "~/.lmtrain_launch"  # on each worker: pid, exit_code, stopped, train.log
ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
TRAIN_CMD = "~/lmtrain-venv/bin/python -m lmtrain.cli train"  # the virtualenv setup_tpu.sh makes
WAITING = {"CREATING", "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "SUSPENDING", "DELETING", "UNKNOWN"}
GONE = {"NOT_FOUND", "FAILED", "SUSPENDED"}
HEALTHY_S = 1800.0  # an attempt that ran this long resets the failure backoff
EXIT_CONFIG_ERROR = 2  # `lmtrain train` exits 2 on a bad config: relaunching would fail the same way


class LaunchError(Exception):
    """A problem the user fixes: bad arguments or a resource that cannot be reached. Printed as one line."""


def log(message: str) -> None:
    print(f"[lmtrain launch {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------------------------------------
# gcloud
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Resource:
    """The queued resource and TPU VM (same name) and how to talk to it."""

    name: str
    zone: str
    project: str = ""
    gcloud: str = "gcloud"

    def loc(self) -> list[str]:
        return [f"--zone={self.zone}", "--quiet"] + ([f"--project={self.project}"] if self.project else [])

    def call(self, args: Sequence[str], timeout: float | None = 600) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([self.gcloud, *args], capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError:
            raise LaunchError(f"'{self.gcloud}' not found: install the Google Cloud CLI and run `gcloud auth login`.") from None
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            return subprocess.CompletedProcess(e.cmd, 124, out, f"timed out after {timeout}s")

    def state(self) -> str:
        """The queued resource's state, NOT_FOUND, or UNKNOWN when gcloud itself failed."""
        out = self.call(["compute", "tpus", "queued-resources", "describe", self.name, *self.loc(),
                         "--format=value(state.state)"], timeout=120)
        if out.returncode == 0:
            lines = out.stdout.strip().splitlines()
            return lines[-1].strip() if lines else "UNKNOWN"
        if "NOT_FOUND" in out.stderr or "not found" in out.stderr:
            return "NOT_FOUND"
        log(f"gcloud describe failed: {_last_line(out.stderr)}")
        return "UNKNOWN"

    def workers(self) -> int:
        out = self.call(["compute", "tpus", "tpu-vm", "describe", self.name, *self.loc(), "--format=json"], timeout=120)
        if out.returncode != 0:
            return 0
        try:
            return len(json.loads(out.stdout).get("networkEndpoints") or [])
        except json.JSONDecodeError:
            return 0

    def ssh(self, command: str, worker: str = "all", timeout: float | None = 900) -> subprocess.CompletedProcess:
        return self.call(["compute", "tpus", "tpu-vm", "ssh", self.name, *self.loc(), "--strict-host-key-checking=no",
                          f"--worker={worker}", f"--command={command}"], timeout=timeout)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


# --------------------------------------------------------------------------------------------------------------
# What runs on the workers
# --------------------------------------------------------------------------------------------------------------


def start_script(train_command: str, attempt: int) -> str:
    """Start `train_command` detached (new session, no terminal) unless it already runs; record its pid and,
    when it ends, its exit code."""
    inner = f"cd ~ && {train_command}; code=$?; echo $code > {REMOTE_DIR}/exit_code.tmp && " \
            f"mv {REMOTE_DIR}/exit_code.tmp {REMOTE_DIR}/exit_code"
    return "\n".join([
        f"mkdir -p {REMOTE_DIR} && cd {REMOTE_DIR}",
        'if [ -f pid ] && [ ! -f exit_code ] && kill -0 "$(cat pid)" 2>/dev/null; then'
        ' echo "LMTRAIN_STARTED already $(hostname)"; exit 0; fi',
        "rm -f exit_code exit_code.tmp stopped pid",
        f"printf '=== lmtrain launch attempt {attempt} %s\\n' \"$(date -u +%Y-%m-%dT%H:%M:%SZ)\" >> train.log",
        f"setsid nohup bash -c {shlex.quote(inner)} >> train.log 2>&1 < /dev/null &",
        "echo $! > pid",
        'echo "LMTRAIN_STARTED $(hostname) $(cat pid)"',
    ])


PROBE_SCRIPT = "\n".join([
    "if [ ! -x ~/lmtrain-venv/bin/python ]; then state=noinstall",
    f"elif [ ! -d {REMOTE_DIR} ]; then state=idle",
    f"elif [ -f {REMOTE_DIR}/stopped ]; then state=stopped",
    f'elif [ -f {REMOTE_DIR}/exit_code ]; then state="exit:$(cat {REMOTE_DIR}/exit_code)"',
    f'elif [ -f {REMOTE_DIR}/pid ] && kill -0 "$(cat {REMOTE_DIR}/pid)" 2>/dev/null; then state=running',
    f"elif [ -f {REMOTE_DIR}/pid ]; then state=lost",
    "else state=idle; fi",
    f"last=$(tail -n 1 {REMOTE_DIR}/train.log 2>/dev/null | tr -d '\\r' | cut -c1-300)",
    'echo "LMTRAIN_STATUS $state $(hostname) $last"',
])


def stop_script(timeout_s: int, mark_stopped: bool) -> str:
    """SIGTERM the trainer's process group (it checkpoints and exits), SIGKILL after `timeout_s`."""
    return "\n".join([
        f"cd {REMOTE_DIR} 2>/dev/null || exit 0",
        "touch stopped" if mark_stopped else "true",
        '[ -f pid ] || exit 0',
        'pid=$(cat pid)',
        'kill -0 "$pid" 2>/dev/null && kill -TERM -- "-$pid" 2>/dev/null',
        f'for _ in $(seq {max(timeout_s, 1)}); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done',
        'if kill -0 "$pid" 2>/dev/null; then kill -KILL -- "-$pid"; echo "LMTRAIN_STOPPED killed $(hostname)";'
        ' else echo "LMTRAIN_STOPPED clean $(hostname)"; fi',
    ])


@dataclass
class WorkerStatus:
    state: str  # noinstall, idle, running, exit:N, lost, stopped
    host: str
    last_line: str


def parse_status(stdout: str) -> list[WorkerStatus]:
    out = []
    for line in stdout.splitlines():
        if line.startswith("LMTRAIN_STATUS "):
            parts = line.split(" ", 3)
            out.append(WorkerStatus(parts[1], parts[2] if len(parts) > 2 else "?", parts[3] if len(parts) > 3 else ""))
    return out


# --------------------------------------------------------------------------------------------------------------
# The run's done marker
# --------------------------------------------------------------------------------------------------------------


def read_done(workdir: str, res: Resource) -> dict | None:
    """WORKDIR/done.json, or None while the run is not finished (or the file is not whole yet)."""
    url = workdir.rstrip("/") + "/done.json"
    if is_remote(workdir):
        if not workdir.startswith("gs://"):
            raise LaunchError(f"--workdir={workdir}: the launcher reads gs:// WORKDIRs (or local ones in tests).")
        out = res.call(["storage", "cat", url], timeout=120)
        text = out.stdout if out.returncode == 0 else None
    else:
        path = as_path(url)
        text = path.read_text() if path.exists() else None
    if not text:
        return None
    try:
        done = json.loads(text)
    except json.JSONDecodeError:
        return None
    return done if isinstance(done, dict) and "step" in done else None


def requested_steps(train_args: Sequence[str]) -> int | None:
    """train.steps when the command overrides it (to train a finished run further)."""
    steps = None
    for a in train_args:
        if a.startswith("--config.train.steps="):
            try:
                steps = int(float(a.split("=", 1)[1]))
            except ValueError:
                pass
    return steps


# --------------------------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Backoff:
    """Failure delays: base, 2x base, 4x base... capped; reset after a healthy attempt."""

    base_s: float
    max_s: float
    consecutive: int = 0

    def next_delay(self, attempt_ran_s: float) -> float:
        if attempt_ran_s >= HEALTHY_S:
            self.consecutive = 0
        self.consecutive += 1
        return min(self.base_s * 2 ** (self.consecutive - 1), self.max_s)


def _assignment(key_value: str) -> str:
    """KEY=VALUE for a shell command line: the value quoted, not the whole assignment (which bash would run as a
    command named 'KEY=VALUE')."""
    key, _, value = key_value.partition("=")
    return f"{key}={shlex.quote(value)}"


class Launcher:
    def __init__(self, args: argparse.Namespace, sleep: Callable[[float], None] = time.sleep):
        self.a = args
        self.res = Resource(args.name, args.zone, args.project, args.gcloud)
        self.sleep = sleep
        self.failures = 0
        self.preemptions = 0
        self.attempt = 0
        self.generation = 0  # resource incarnations this launcher has seen (for log file names)
        self.backoff = Backoff(args.backoff_s, args.max_backoff_s)
        self.initial_done: dict | None = None
        self.last_logs = 0.0

    # -- pieces -------------------------------------------------------------------------------------------

    def train_command(self, workers: int) -> str:
        env = [f"JAX_NUM_PROCESSES={workers}"] if workers > 1 else []
        env += [_assignment(e) for e in self.a.env]
        args = [f"--workdir={self.a.workdir}", *self.a.train_args]
        return " ".join([*env, self.a.train_cmd, *(shlex.quote(x) for x in args)])

    def setup(self, subcommand: str) -> int:
        script = self.a.setup_script
        cmd = ["bash", str(script), subcommand, f"--name={self.a.name}", f"--zone={self.a.zone}",
               f"--accelerator-type={self.a.accelerator_type}", f"--capacity={self.a.capacity}",
               f"--ship={self.a.ship}", f"--poll-s={self.a.poll_s:g}"]
        if self.a.project:
            cmd.append(f"--project={self.a.project}")
        if self.a.runtime_version:
            cmd.append(f"--runtime-version={self.a.runtime_version}")
        cmd += shlex.split(self.a.setup_args)
        log(f"setup_tpu.sh {subcommand} {self.a.name}")
        env = {**os.environ, "GCLOUD": self.a.gcloud}
        code = subprocess.run(cmd, env=env).returncode
        if code == 2:
            raise LaunchError(f"setup_tpu.sh rejected its arguments (above): {shlex.join(cmd[2:])}")
        return code

    def done(self) -> dict | None:
        done = read_done(self.a.workdir, self.res)
        return done if done is not None and done != self.initial_done else None

    def probe(self) -> list[WorkerStatus] | None:
        out = self.res.ssh(PROBE_SCRIPT, timeout=300)
        statuses = parse_status(out.stdout)
        return statuses or None

    def collect_logs(self, workers: int) -> None:
        """Copy each worker's train.log to --log-dir (a preempted VM takes its disk with it)."""
        if workers < 1:
            return
        out_dir = pathlib.Path(self.a.log_dir)
        out_dir.mkdir(parents=True, exist_ok=True)

        def fetch(w: int) -> None:
            out = self.res.ssh(f"cat {REMOTE_DIR}/train.log 2>/dev/null", worker=str(w), timeout=300)
            if out.returncode == 0 and out.stdout:
                (out_dir / f"{self.a.name}-gen{self.generation}-worker{w}.log").write_text(out.stdout)

        with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, workers)) as pool:
            list(pool.map(fetch, range(workers)))
        self.last_logs = time.monotonic()

    def stop_workers(self, mark_stopped: bool) -> None:
        self.res.ssh(stop_script(self.a.stop_timeout_s, mark_stopped), timeout=self.a.stop_timeout_s + 300)

    def failure(self, why: str, ran_s: float) -> int | None:
        """Count a failure; None to go on after the backoff, or the exit code when out of retries."""
        self.failures += 1
        if self.failures > self.a.max_failures:
            log(f"{why}. Giving up after {self.a.max_failures} failures; the WORKDIR keeps the latest checkpoint. "
                f"Logs are in {self.a.log_dir}. Fix the cause and run the same command again to resume.")
            return 1
        delay = self.backoff.next_delay(ran_s)
        log(f"{why}. Relaunching in {delay:g}s (failure {self.failures} of {self.a.max_failures}).")
        self.sleep(delay)
        return None

    # -- the loop -------------------------------------------------------------------------------------------

    def run(self) -> int:
        self.initial_done = read_done(self.a.workdir, self.res)
        if self.initial_done is not None:
            want = requested_steps(self.a.train_args)
            if want is None or want <= int(self.initial_done["step"]):
                log(f"{self.a.workdir} is complete (done.json: step {self.initial_done['step']}). Nothing to do; "
                    "pass --config.train.steps=N with a larger N to train further.")
                return 0
        while True:
            state = self.res.state()
            if state in GONE:
                code = self.recreate(state)
                if code is not None:
                    return code
                continue
            if state != "ACTIVE":
                log(f"queued resource '{self.a.name}' is {state}; waiting.")
                self.sleep(self.a.poll_s)
                continue
            code = self.attach_or_start()
            if code is not None:
                return code

    def recreate(self, state: str) -> int | None:
        if state == "NOT_FOUND" and self.generation == 0:
            log(f"no queued resource '{self.a.name}' in {self.a.zone}: creating it.")
        else:
            self.preemptions += 1
            if self.preemptions > self.a.max_preemptions:
                log(f"'{self.a.name}' is {state} and was preempted {self.a.max_preemptions} times; giving up. "
                    "Run the same command again to go on from the latest checkpoint.")
                return 1
            log(f"queued resource '{self.a.name}' is {state} (preemption {self.preemptions} of "
                f"{self.a.max_preemptions}): recreating it.")
        # setup_tpu.sh deletes a FAILED/SUSPENDED resource, requests it again, waits, installs and verifies.
        if self.setup("create") != 0:
            return self.failure("setup_tpu.sh create failed", 0.0)
        self.generation += 1
        return None

    def attach_or_start(self) -> int | None:
        """With the resource ACTIVE: start the trainer (or find it running) and watch it until it ends."""
        workers = self.res.workers()
        if workers < 1:
            log(f"cannot list the workers of '{self.a.name}'; retrying.")
            self.sleep(self.a.poll_s)
            return None
        if self.generation == 0:
            self.generation = 1
        statuses = self.probe()
        if statuses is None:
            return self.unreachable(0.0)
        if any(s.state == "noinstall" for s in statuses):
            log("lmtrain is not installed on every worker: running setup_tpu.sh install.")
            if self.setup("install") != 0:
                return self.failure("setup_tpu.sh install failed", 0.0)
            statuses = self.probe() or statuses
        if all(s.state == "running" for s in statuses):
            log(f"the trainer is already running on {workers} worker(s): watching it.")
        else:
            if any(s.state == "running" for s in statuses):
                self.stop_workers(mark_stopped=False)  # a partial job from an earlier attempt
            self.attempt += 1
            command = self.train_command(workers)
            log(f"attempt {self.attempt}: starting on {workers} worker(s): {command}")
            out = self.res.ssh(start_script(command, self.attempt), timeout=300)
            started = out.stdout.count("LMTRAIN_STARTED")
            if started < workers:
                return self.failure(f"the trainer started on {started} of {workers} workers "
                                    f"({_last_line(out.stderr or out.stdout)})", 0.0)
        return self.watch(workers)

    def unreachable(self, ran_s: float) -> int | None:
        if self.res.state() != "ACTIVE":
            return None  # preempted meanwhile: the main loop recreates
        return self.failure("the workers do not answer over ssh", ran_s)

    def watch(self, workers: int) -> int | None:
        started = time.monotonic()
        misses = 0
        last_shown = ""
        while True:
            self.sleep(self.a.poll_s)
            ran = time.monotonic() - started
            done = self.done()
            if done is not None:
                return self.finish(done, workers)
            state = self.res.state()
            if state != "ACTIVE" and state != "UNKNOWN":
                log(f"queued resource '{self.a.name}' left ACTIVE ({state}) after {ran:.0f}s: preempted.")
                return None
            statuses = self.probe()
            if statuses is None or len(statuses) < workers:
                misses += 1
                if misses >= 3:
                    return self.unreachable(ran)
                continue
            misses = 0
            kinds = {s.state for s in statuses}
            if "stopped" in kinds:
                log("stopped by `lmtrain launch stop`; the WORKDIR keeps the latest checkpoint.")
                return 0
            if kinds == {"exit:0"}:
                done = self.done()
                if done is not None:
                    return self.finish(done, workers)
                self.collect_logs(workers)
                code = self.failure("the trainer exited 0 on every worker without writing done.json "
                                    "(stopped by a signal?)", ran)
                return code
            bad = [s for s in statuses if s.state not in ("running", "exit:0")]
            if bad:
                first = bad[0]
                self.collect_logs(workers)
                self.stop_workers(mark_stopped=False)
                if first.state == f"exit:{EXIT_CONFIG_ERROR}":
                    log(f"the trainer on {first.host} rejected its arguments (exit 2): {first.last_line}. Not "
                        "relaunching: fix the command and run it again.")
                    return 2
                return self.failure(f"worker {first.host} failed ({first.state}): {first.last_line}", ran)
            line = statuses[0].last_line
            if line and line != last_shown:
                log(f"{workers} worker(s) running; worker 0: {line}")
                last_shown = line
            if time.monotonic() - self.last_logs >= self.a.log_every_s:
                self.collect_logs(workers)

    def finish(self, done: dict, workers: int) -> int:
        log(f"the run is complete: done.json says step {done['step']}.")
        deadline = time.monotonic() + self.a.stop_timeout_s
        while time.monotonic() < deadline:  # let the trainers finish their last lines (sample, plot) and exit
            statuses = self.probe()
            if not statuses or all(s.state != "running" for s in statuses):
                break
            self.sleep(min(self.a.poll_s, 10.0))
        self.collect_logs(workers)
        if self.a.delete_when_done:
            log(f"deleting '{self.a.name}' (--delete-when-done).")
            self.setup("delete")
        else:
            log(f"the TPU is still yours and billed: `bash setup_tpu.sh delete --name={self.a.name} "
                f"--zone={self.a.zone}` when you are done with it.")
        return 0


# --------------------------------------------------------------------------------------------------------------
# status, logs, stop
# --------------------------------------------------------------------------------------------------------------


def cmd_status(a: argparse.Namespace) -> int:
    res = Resource(a.name, a.zone, a.project, a.gcloud)
    state = res.state()
    print(f"queued resource {a.name} ({a.zone}): {state}")
    if state == "ACTIVE":
        statuses = parse_status(res.ssh(PROBE_SCRIPT, timeout=300).stdout)
        for i, s in enumerate(statuses):
            print(f"  worker {i} {s.host}: {s.state}  {s.last_line}")
        if not statuses:
            print("  the workers did not answer over ssh")
    if a.workdir:
        done = read_done(a.workdir, res)
        print(f"{a.workdir}: " + (f"complete at step {done['step']}" if done else "not finished"))
    return 0


def cmd_logs(a: argparse.Namespace) -> int:
    res = Resource(a.name, a.zone, a.project, a.gcloud)
    n = res.workers()
    if n < 1:
        raise LaunchError(f"TPU VM '{a.name}' in {a.zone} is not there (state {res.state()}); its logs went with it. "
                          "Logs collected by `lmtrain launch run` are in its --log-dir.")
    if a.worker != "all" and int(a.worker) >= n:
        raise LaunchError(f"--worker={a.worker}: TPU VM '{a.name}' has {n} worker(s), 0 to {n - 1}; give one of "
                          "those or 'all'.")
    targets = list(range(n)) if a.worker == "all" else [int(a.worker)]
    for w in targets:
        if a.out:
            out = res.ssh(f"cat {REMOTE_DIR}/train.log", worker=str(w))
            path = pathlib.Path(a.out) / f"{a.name}-worker{w}.log"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(out.stdout)
            print(f"worker {w}: {path}")
        else:
            out = res.ssh(f"tail -n {int(a.lines)} {REMOTE_DIR}/train.log", worker=str(w))
            print(f"===== worker {w} =====")
            print(out.stdout, end="")
    return 0


def cmd_stop(a: argparse.Namespace) -> int:
    res = Resource(a.name, a.zone, a.project, a.gcloud)
    state = res.state()
    if state == "ACTIVE":
        out = res.ssh(stop_script(a.stop_timeout_s, mark_stopped=True), timeout=a.stop_timeout_s + 300)
        clean = out.stdout.count("LMTRAIN_STOPPED clean")
        killed = out.stdout.count("LMTRAIN_STOPPED killed")
        print(f"stopped on {clean + killed} worker(s) ({clean} saved a checkpoint and exited, {killed} killed "
              f"after {a.stop_timeout_s}s).")
    else:
        print(f"queued resource {a.name} is {state}: nothing runs on it.")
    if a.delete:
        cmd = ["bash", str(a.setup_script), "delete", f"--name={a.name}", f"--zone={a.zone}"]
        cmd += [f"--project={a.project}"] if a.project else []
        return subprocess.run(cmd, env={**os.environ, "GCLOUD": a.gcloud}).returncode
    return 0


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def default_setup_script() -> pathlib.Path:
    return pathlib.Path(__file__).absolute().parent.parent / "setup_tpu.sh"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmtrain launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--name", required=True, help="queued resource / TPU VM name")
        q.add_argument("--zone", required=True, help="e.g. us-central2-b")
        q.add_argument("--project", default="", help="default: gcloud's configured project")
        q.add_argument("--gcloud", default=os.environ.get("GCLOUD", "gcloud"), help=argparse.SUPPRESS)
        q.add_argument("--setup-script", type=pathlib.Path, default=default_setup_script(),
                       help="setup_tpu.sh (default: the one in the lmtrain checkout)")

    r = sub.add_parser("run", help="start (or re-attach to) the run and keep it going until done.json")
    common(r)
    r.add_argument("--workdir", required=True, help="gs://BUCKET/PATH: checkpoints outlive the VMs")
    r.add_argument("--accelerator-type", default="v4-8")
    r.add_argument("--runtime-version", default="", help="default: setup_tpu.sh picks one per TPU family")
    r.add_argument("--capacity", default="spot", choices=["spot", "on-demand", "reserved"])
    r.add_argument("--ship", default="scp", help="scp or gs://BUCKET/PATH.tar.gz (see setup_tpu.sh)")
    r.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment for the trainer")
    r.add_argument("--max-failures", type=int, default=5, help="worker failures before giving up")
    r.add_argument("--max-preemptions", type=int, default=100, help="preemptions before giving up")
    r.add_argument("--backoff-s", type=float, default=30.0, help="delay before the first relaunch after a failure")
    r.add_argument("--max-backoff-s", type=float, default=900.0, help="cap of the doubling failure delay")
    r.add_argument("--poll-s", type=float, default=60.0, help="seconds between checks")
    r.add_argument("--log-dir", default="lmtrain_logs", help="where workers' logs are copied")
    r.add_argument("--log-every-s", type=float, default=600.0, help="copy the logs this often while running")
    r.add_argument("--stop-timeout-s", type=int, default=300, help="SIGTERM grace before SIGKILL")
    r.add_argument("--delete-when-done", action="store_true", help="delete the queued resource when the run is done")
    r.add_argument("--allow-local-workdir", action="store_true", help=argparse.SUPPRESS)  # tests: one machine
    r.add_argument("--train-cmd", default=TRAIN_CMD, help=argparse.SUPPRESS)
    r.add_argument("--setup-args", default="", help="extra setup_tpu.sh options, e.g. '--retries=5'")

    s = sub.add_parser("status", help="resource state, each worker's trainer, and done.json")
    common(s)
    s.add_argument("--workdir", default="")

    lg = sub.add_parser("logs", help="the trainer's log on the workers")
    common(lg)
    lg.add_argument("--worker", default="0", help="worker index or 'all'")
    lg.add_argument("--lines", type=int, default=100)
    lg.add_argument("--out", default="", help="copy whole logs into this directory instead")

    st = sub.add_parser("stop", help="SIGTERM the trainer everywhere (it checkpoints), then optionally delete")
    common(st)
    st.add_argument("--stop-timeout-s", type=int, default=300)
    st.add_argument("--delete", action="store_true", help="then delete the queued resource and its VMs")
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    argv = list(argv)
    train_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, train_args = argv[:i], argv[i + 1:]
    parser = build_parser()
    a = parser.parse_args(argv)
    a.train_args = train_args
    if a.command == "run":
        if any(x.startswith("--workdir") for x in train_args):
            parser.error("give --workdir before `--` (the launcher passes it to the trainer).")
        if not a.workdir.startswith("gs://") and not a.allow_local_workdir:
            parser.error(f"--workdir={a.workdir}: use a gs://BUCKET/PATH WORKDIR. A TPU VM's disk is lost when it "
                         "is preempted or deleted, and each worker of a pod would write its own.")
        for e in a.env:
            if not ENV_KEY.match(e.partition("=")[0]) or "=" not in e:
                parser.error(f"--env {e!r}: write KEY=VALUE, KEY a variable name (letters, digits, _).")
        for key in ("max_failures", "max_preemptions"):
            if getattr(a, key) < 0:
                parser.error(f"--{key.replace('_', '-')} must be >= 0.")
    if a.command == "logs" and a.worker != "all" and not a.worker.isdigit():
        parser.error(f"--worker={a.worker}: give a worker index (0, 1, ...) or 'all'.")
    if a.command in ("run", "stop") and not a.setup_script.is_file():
        parser.error(f"setup_tpu.sh not found at {a.setup_script}; pass --setup-script=PATH to the lmtrain checkout's.")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if a.command == "run":
            return Launcher(a).run()
        return {"status": cmd_status, "logs": cmd_logs, "stop": cmd_stop}[a.command](a)
    except LaunchError as e:
        print(f"lmtrain launch: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmtrain launch: interrupted; the trainer keeps running on the workers. `lmtrain launch run` with the "
              "same arguments re-attaches; `lmtrain launch stop` stops it.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
