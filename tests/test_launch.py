"""`lmtrain launch` against a fake `gcloud` (tests/fake_gcloud): preemption, recreation, worker failures,
bounded retries with backoff, the done marker, and status/logs/stop. The last test runs the real trainer
through a preemption and checks that its losses equal an uninterrupted run's, step for step."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time

import pytest

from lmtrain import launch

REPO = pathlib.Path(__file__).parent.parent
FAKE_DIR = REPO / "tests" / "fake_gcloud"

# A stand-in for `lmtrain train` without JAX: one metrics line per step, a "checkpoint" after each step, resume,
# SIGTERM -> save and exit 0, done.json at the end, and failures on demand (WORKDIR/behavior.json).
FAKE_TRAINER = r'''
import json, os, signal, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
w = args["workdir"]
os.makedirs(w, exist_ok=True)
steps = int(args.get("config.train.steps", 6))
behavior = json.load(open(os.path.join(w, "behavior.json"))) if os.path.exists(os.path.join(w, "behavior.json")) else {}
done_path = os.path.join(w, "done.json")
ckpt_path = os.path.join(w, "ckpt.json")
if os.path.exists(done_path) and json.load(open(done_path))["step"] >= steps:
    print("complete"); sys.exit(0)
attempts = 1 + (int(open(os.path.join(w, "attempts")).read()) if os.path.exists(os.path.join(w, "attempts")) else 0)
open(os.path.join(w, "attempts"), "w").write(str(attempts))
print(f"fake trainer attempt {attempts} env JAX_NUM_PROCESSES={os.environ.get('JAX_NUM_PROCESSES')}", flush=True)
if "FAKE_ECHO" in os.environ:  # what --env gave the trainer, byte for byte
    open(os.path.join(w, "echo"), "w").write(os.environ["FAKE_ECHO"])
if attempts <= behavior.get("fail_attempts", 0):
    print("boom: worker failure", flush=True); sys.exit(behavior.get("exit_code", 1))
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
step = json.load(open(ckpt_path))["step"] if os.path.exists(ckpt_path) else 0
while step < steps:
    if stop:
        print(f"SIGTERM: saved step {step}", flush=True); sys.exit(0)
    time.sleep(behavior.get("step_s", 0.05))
    step += 1
    with open(os.path.join(w, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, "loss": 10.0 / step}) + "\n")
    json.dump({"step": step}, open(ckpt_path + ".tmp", "w")); os.replace(ckpt_path + ".tmp", ckpt_path)
    print(f"step {step}", flush=True)
json.dump({"step": step}, open(done_path + ".tmp", "w")); os.replace(done_path + ".tmp", done_path)
print("done", flush=True)
'''


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
    """The fake gcloud first on PATH; returns a helper to configure it and read what it saw."""
    state = tmp_path / "gcloud_state"
    state.mkdir()
    monkeypatch.setenv("PATH", f"{FAKE_DIR}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GCLOUD_STATE", str(state))
    monkeypatch.setenv("FAKE_GCLOUD_PYTHON", sys.executable)
    monkeypatch.delenv("GCLOUD", raising=False)

    class Fake:
        root = state

        def configure(self, **cfg):
            (state / "config.json").write_text(json.dumps(cfg))

        def calls(self) -> list[list[str]]:
            path = state / "calls.jsonl"
            return [json.loads(x)["argv"] for x in path.read_text().splitlines()] if path.exists() else []

        def events(self) -> list[dict]:
            path = state / "events.jsonl"
            return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

        def qr_state(self, name: str) -> str | None:
            qr = json.loads((state / "state.json").read_text())["qr"].get(name)
            return qr and qr["state"]

    fake = Fake()
    fake.configure()
    return fake


@pytest.fixture(scope="session")
def provisioned_template(tmp_path_factory) -> pathlib.Path:
    """Fake gcloud state where setup_tpu.sh has made queued resource t1 (one worker) ACTIVE and installed lmtrain."""
    state = tmp_path_factory.mktemp("provisioned") / "state"
    state.mkdir()
    env = {**os.environ, "PATH": f"{FAKE_DIR}{os.pathsep}{os.environ['PATH']}", "FAKE_GCLOUD_STATE": str(state),
           "FAKE_GCLOUD_PYTHON": sys.executable}
    env.pop("GCLOUD", None)
    out = subprocess.run(["bash", str(REPO / "setup_tpu.sh"), "create", "--name=t1", "--zone=zz", "--poll-s=0",
                          "--retry-delay-s=0"], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("calls.jsonl", "events.jsonl", "worker_calls.jsonl"):
        (state / name).unlink(missing_ok=True)
    return state


@pytest.fixture
def provisioned(fake_gcloud, provisioned_template):
    """The fake gcloud with t1 already ACTIVE and installed (saves the set-up in tests about the run loop)."""
    shutil.copytree(provisioned_template, fake_gcloud.root, symlinks=True, dirs_exist_ok=True)
    return fake_gcloud


def launch_args(tmp_path, workdir, *extra, train_args=()) -> list[str]:
    trainer = tmp_path / "fake_trainer.py"
    trainer.write_text(FAKE_TRAINER)
    return ["run", "--name=t1", "--zone=zz", f"--workdir={workdir}", "--allow-local-workdir", "--poll-s=0.1",
            "--backoff-s=2", "--max-backoff-s=5", f"--log-dir={tmp_path / 'logs'}",
            f"--train-cmd=python3 {trainer}", "--setup-args=--retry-delay-s=0", *extra, "--", *train_args]


def run_launcher(argv, delays=None) -> int:
    """The launcher in this process, its backoff sleeps recorded (and shortened)."""
    def sleep(s):
        if delays is not None and s > 1:
            delays.append(s)
        time.sleep(min(s, 0.1))

    return launch.Launcher(launch.parse_args(argv), sleep=sleep).run()


def metrics_steps(workdir) -> list[int]:
    return [json.loads(x)["step"] for x in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def ssh_commands(fake) -> list[str]:
    return [next(a for a in c if a.startswith("--command=")) for c in fake.calls() if c[2:4] == ["tpu-vm", "ssh"]]


@pytest.mark.slow
def test_run_from_nothing_to_done_then_a_relaunch_exits_at_once(tmp_path, fake_gcloud, capsys):
    workdir = tmp_path / "run"
    assert run_launcher(launch_args(tmp_path, workdir)) == 0
    assert metrics_steps(workdir) == [1, 2, 3, 4, 5, 6]
    assert json.loads((workdir / "done.json").read_text()) == {"step": 6}
    assert [e["event"] for e in fake_gcloud.events()] == ["created"]
    create = next(c for c in fake_gcloud.calls() if c[2:4] == ["queued-resources", "create"])
    assert "--spot" in create and "--accelerator-type=v4-8" in create and "--node-id=t1" in create
    log = (tmp_path / "logs" / "t1-gen1-worker0.log").read_text()
    assert "=== lmtrain launch attempt 1" in log and "done" in log
    assert "still yours and billed" in capsys.readouterr().out

    n_calls = len(fake_gcloud.calls())
    assert run_launcher(launch_args(tmp_path, workdir)) == 0
    assert "is complete" in capsys.readouterr().out
    assert len(fake_gcloud.calls()) == n_calls  # no TPU touched for a finished run
    # Training further is not "complete": the launcher runs it.
    assert run_launcher(launch_args(tmp_path, workdir, train_args=["--config.train.steps=8"])) == 0
    assert metrics_steps(workdir) == [1, 2, 3, 4, 5, 6, 7, 8]


@pytest.mark.slow
def test_preemption_recreates_the_resource_and_resumes(tmp_path, fake_gcloud):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "behavior.json").write_text(json.dumps({"step_s": 0.3}))
    fake_gcloud.configure(preempt=[{"metrics": str(workdir / "metrics.jsonl"), "after_step": 3,
                                    "on_command": "fake_trainer"}])
    assert run_launcher(launch_args(tmp_path, workdir, "--delete-when-done", train_args=["--config.train.steps=8"])) == 0
    events = fake_gcloud.events()
    assert [e["event"] for e in events] == ["created", "preempted", "deleted", "created", "deleted"]
    preempted = events[1]
    assert 3 <= preempted["final_step"] < 8  # mid-run
    steps = metrics_steps(workdir)
    assert steps[-1] == 8 and sorted(set(steps)) == list(range(1, 9))  # resumed, not restarted from 0
    assert steps.count(1) == 1
    assert fake_gcloud.qr_state("t1") is None  # --delete-when-done
    assert int((workdir / "attempts").read_text()) == 2


def test_worker_failure_relaunches_with_backoff_on_the_same_resource(tmp_path, provisioned):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "behavior.json").write_text(json.dumps({"fail_attempts": 2}))
    delays: list[float] = []
    assert run_launcher(launch_args(tmp_path, workdir), delays) == 0
    assert delays == [2, 4]  # doubling backoff
    assert provisioned.events() == []  # no recreation for a crash
    assert metrics_steps(workdir) == [1, 2, 3, 4, 5, 6]
    assert "boom: worker failure" in (tmp_path / "logs" / "t1-gen1-worker0.log").read_text()


def test_retries_are_bounded(tmp_path, provisioned, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "behavior.json").write_text(json.dumps({"fail_attempts": 99}))
    delays: list[float] = []
    assert run_launcher(launch_args(tmp_path, workdir, "--max-failures=3"), delays) == 1
    assert delays == [2, 4, 5]  # capped at --max-backoff-s
    assert int((workdir / "attempts").read_text()) == 4
    assert "Giving up after 3 failures" in capsys.readouterr().out


def test_env_values_reach_the_trainer_exactly(tmp_path, provisioned):
    workdir = tmp_path / "run"
    value = """a b 'single' "double" $HOME `x` ; exit 3"""
    assert run_launcher(launch_args(tmp_path, workdir, f"--env=FAKE_ECHO={value}", "--env=EMPTY=")) == 0
    assert (workdir / "echo").read_text() == value
    assert int((workdir / "attempts").read_text()) == 1  # ran once, no relaunch


def test_logs_of_a_worker_that_is_not_an_index_or_not_there(provisioned, capsys):
    with pytest.raises(SystemExit) as e:
        launch.main(["logs", "--name=t1", "--zone=zz", "--worker=x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--worker=x: give a worker index (0, 1, ...) or 'all'" in err and "Traceback" not in err
    assert launch.main(["logs", "--name=t1", "--zone=zz", "--worker=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("lmtrain launch: --worker=3: TPU VM 't1' has 1 worker(s), 0 to 0; give one of those or 'all'.")


def test_config_error_is_not_relaunched(tmp_path, provisioned, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "behavior.json").write_text(json.dumps({"fail_attempts": 1, "exit_code": 2}))
    assert run_launcher(launch_args(tmp_path, workdir)) == 2
    assert int((workdir / "attempts").read_text()) == 1
    assert "rejected its arguments (exit 2)" in capsys.readouterr().out


@pytest.mark.slow
def test_pod_slice_gets_one_process_per_worker(tmp_path, fake_gcloud):
    workdir = tmp_path / "run"
    fake_gcloud.configure(workers=2, devices_per_worker=2)
    assert run_launcher(launch_args(tmp_path, workdir, "--setup-args=--retry-delay-s=0 --expect-devices=4")) == 0
    start = next(c for c in ssh_commands(fake_gcloud) if "setsid" in c)
    assert "JAX_NUM_PROCESSES=2" in start
    for w in (0, 1):
        assert "JAX_NUM_PROCESSES=2" in (tmp_path / "logs" / f"t1-gen1-worker{w}.log").read_text()


def test_status_logs_and_stop(tmp_path, provisioned, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "behavior.json").write_text(json.dumps({"step_s": 0.2}))
    argv = launch_args(tmp_path, workdir, train_args=["--config.train.steps=500"])
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("code", run_launcher(argv)))
    thread.start()
    deadline = time.time() + 120
    while not (workdir / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.1)
    loc = ["--name=t1", "--zone=zz"]
    assert launch.main(["status", *loc, f"--workdir={workdir}"]) == 0
    out = capsys.readouterr().out
    assert "queued resource t1 (zz): ACTIVE" in out and "worker 0" in out and ": running" in out
    assert "not finished" in out
    assert launch.main(["logs", *loc, "--lines=3"]) == 0
    assert "step " in capsys.readouterr().out
    assert launch.main(["stop", *loc, "--stop-timeout-s=30"]) == 0
    thread.join(timeout=120)
    assert result.get("code") == 0  # the run loop saw the stop and did not relaunch
    out = capsys.readouterr().out
    assert "1 saved a checkpoint and exited" in out and "stopped by `lmtrain launch stop`" in out
    assert launch.main(["logs", *loc, "--lines=2"]) == 0
    assert "SIGTERM: saved step" in capsys.readouterr().out
    assert not (workdir / "done.json").exists()
    assert launch.main(["stop", *loc, "--delete"]) == 0
    assert provisioned.qr_state("t1") is None


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        launch.parse_args(["run", "--name=t", "--zone=z", "--workdir=/tmp/local", "--", "--config=tiny"])
    assert e.value.code == 2
    assert "use a gs://BUCKET/PATH WORKDIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        launch.parse_args(["run", "--name=t", "--zone=z", "--workdir=gs://b/r", "--", "--workdir=gs://b/x"])
    assert "give --workdir before `--`" in capsys.readouterr().err
    for bad in ("A B=1", "=1", "1A=x", "NOEQUALS"):
        with pytest.raises(SystemExit):
            launch.parse_args(["run", "--name=t", "--zone=z", "--workdir=gs://b/r", f"--env={bad}", "--", "x"])
        assert f"--env {bad!r}: write KEY=VALUE" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------------------
# The key test: the real trainer through a preemption
# -------------------------------------------------------------------------------------------------------------


def _losses(workdir: pathlib.Path) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out.setdefault(record["step"], []).append(record["loss"])
    return out


@pytest.mark.slow
@pytest.mark.heavy  # minutes on 2 CPU cores: run by `-m heavy` (.ci/run runs it)
def test_preempted_real_run_matches_an_uninterrupted_one(tmp_path, fake_gcloud):
    from lmtrain import config as config_lib
    from tests.helpers import small_config

    steps = 24
    cfg = small_config(**{"train.steps": steps, "train.log_every": 1, "checkpoint.every": 4, "train.eval_every": 0,
                          "data.max_docs": 40, "model.vocab_size": 512, "checkpoint.async_save": False})
    config_file = tmp_path / "small.json"
    config_file.write_text(config_lib.to_json(cfg))
    train_args = [f"--config={config_file}", "--no-progress"]

    # The uninterrupted run, in the same environment a fake worker has (4 CPU devices), beside the launcher's.
    ref = tmp_path / "ref"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LMTRAIN_", "JAX_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    ref_log = open(tmp_path / "ref.log", "w")  # noqa: SIM115 - closed below
    reference = subprocess.Popen([sys.executable, "-m", "lmtrain.cli", "train", f"--workdir={ref}", *train_args],
                                 env=env, stdout=ref_log, stderr=subprocess.STDOUT, cwd=tmp_path)

    workdir = tmp_path / "run"
    fake_gcloud.configure(devices_per_worker=4, preempt=[{"metrics": str(workdir / "metrics.jsonl"), "after_step": 6}])
    argv = ["run", "--name=t1", "--zone=zz", f"--workdir={workdir}", "--allow-local-workdir", "--poll-s=0.2",
            "--backoff-s=1", f"--log-dir={tmp_path / 'logs'}", "--setup-args=--retry-delay-s=0", "--", *train_args]
    assert run_launcher(argv) == 0
    assert reference.wait(timeout=900) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    ref_log.close()

    events = fake_gcloud.events()
    assert [e["event"] for e in events] == ["created", "preempted", "deleted", "created"]
    assert 6 <= events[1]["final_step"] < steps, events[1]  # killed mid-run
    assert json.loads((workdir / "done.json").read_text())["step"] == steps
    log = (tmp_path / "logs" / "t1-gen2-worker0.log").read_text()
    assert "resuming" in log  # the second VM resumed from the checkpoint, it did not start over

    ref_losses, run_losses = _losses(ref), _losses(workdir)
    assert sorted(run_losses) == list(range(1, steps + 1)) == sorted(ref_losses)
    for step, losses in run_losses.items():
        # Steps repeated after the kill are logged twice; every value must equal the uninterrupted run's.
        assert losses == [ref_losses[step][0]] * len(losses), f"step {step}: {losses} vs {ref_losses[step]}"
    # Relaunching after success touches no TPU.
    n_calls = len(fake_gcloud.calls())
    assert run_launcher(argv) == 0
    assert len(fake_gcloud.calls()) == n_calls


# -------------------------------------------------------------------------------------------------------------
# SLURM: tools/slurm_train.sbatch with a fake srun
# -------------------------------------------------------------------------------------------------------------

FAKE_SRUN = r'''
import json, os, pathlib, signal, subprocess, sys, time
# Like srun inside an allocation: one process per task with the variables SLURM gives a job step. With
# FAKE_SRUN_TERM_AT=PATH:STEP it sends SIGTERM to every task once PATH shows that step, as SLURM's
# --signal=TERM@N does before the time limit.
args = sys.argv[1:]
opts = []
while args and args[0].startswith("-"):
    opts.append(args.pop(0))
n = int(os.environ["SLURM_NTASKS"])
log = pathlib.Path(os.environ["FAKE_SLURM_LOG"])
with log.open("a") as f:
    f.write(json.dumps({"srun": opts + args, "ntasks": n}) + "\n")
procs = []
for i in range(n):
    env = dict(os.environ, SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_NODEID="0", SLURM_STEP_ID="0",
               SLURM_STEP_NUM_TASKS=str(n), SLURM_STEP_NUM_NODES="1", SLURM_STEP_NODELIST="localhost",
               SLURM_STEP_TASKS_PER_NODE=str(n))
    procs.append(subprocess.Popen(args, env=env))
term = os.environ.get("FAKE_SRUN_TERM_AT")
if term:
    path, step = term.rsplit(":", 1)
    while any(p.poll() is None for p in procs):
        lines = pathlib.Path(path).read_text().splitlines() if pathlib.Path(path).exists() else []
        seen = max([json.loads(x).get("step", 0) for x in lines if x.strip()] or [0])
        if seen >= int(step):
            for p in procs:
                p.send_signal(signal.SIGTERM)
            with log.open("a") as f:
                f.write(json.dumps({"sigterm_at_step": seen}) + "\n")
            break
        time.sleep(0.05)
codes = [p.wait() for p in procs]
sys.exit(max(codes))
'''


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.heavy  # minutes on 2 CPU cores: run by `-m heavy` (.ci/run runs it)
def test_slurm_sbatch_runs_one_process_per_task_and_requeues_until_done(tmp_path):
    from lmtrain import config as config_lib
    from tests.helpers import small_config

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!{sys.executable}\n" + FAKE_SRUN)
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\necho "scontrol $*" >> "$FAKE_SLURM_LOG.scontrol"\n')
    for exe in ("srun", "scontrol"):
        (bin_dir / exe).chmod(0o755)
    steps = 20
    cfg = small_config(**{"train.steps": steps, "train.log_every": 1, "checkpoint.every": 3, "train.eval_every": 0,
                          "data.max_docs": 40, "model.vocab_size": 512, "checkpoint.async_save": False})
    config_file = tmp_path / "small.json"
    config_file.write_text(config_lib.to_json(cfg))
    workdir = tmp_path / "run"
    slurm_log = tmp_path / "slurm.jsonl"
    # What sbatch gives the batch script: an allocation of 2 tasks on one node, no job step yet.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LMTRAIN_", "JAX_", "SLURM_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID=str(10000 + os.getpid() % 50000),
               SLURM_NTASKS="2", SLURM_NNODES="1", SLURM_JOB_NODELIST="localhost", SLURM_PROCID="0",
               JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2", LMTRAIN_PYTHON=sys.executable,
               FAKE_SLURM_LOG=str(slurm_log), FAKE_SRUN_TERM_AT=f"{workdir / 'metrics.jsonl'}:3")
    script = [str(REPO / "tools" / "slurm_train.sbatch"), f"--config={config_file}", f"--workdir={workdir}",
              "--no-progress"]

    # First allocation: the time limit's SIGTERM arrives at step 3; every task saves and exits 0; requeued.
    out = subprocess.run(["bash", *script], env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    records = [json.loads(x) for x in slurm_log.read_text().splitlines()]
    assert records[1]["sigterm_at_step"] < steps, records
    assert "requeueing job" in out.stdout, out.stdout[-3000:]
    assert (tmp_path / "slurm.jsonl.scontrol").read_text() == f"scontrol requeue {env['SLURM_JOB_ID']}\n"
    assert not (workdir / "done.json").exists()
    srun = json.loads(slurm_log.read_text().splitlines()[0])
    assert srun["ntasks"] == 2 and srun["srun"][:4] == ["--kill-on-bad-exit=1", sys.executable, "-m", "lmtrain.cli"]

    # The requeued job resumes from the checkpoint, finishes, and is not requeued again.
    env.update(SLURM_RESTART_COUNT="1")
    env.pop("FAKE_SRUN_TERM_AT")
    out = subprocess.run(["bash", *script], env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resuming" in out.stdout and "the run is complete" in out.stdout
    assert json.loads((workdir / "done.json").read_text())["step"] == steps
    assert (tmp_path / "slurm.jsonl.scontrol").read_text().count("requeue") == 1
    logged = sorted({json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()})
    assert logged == list(range(1, steps + 1))
