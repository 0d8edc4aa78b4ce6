"""Multi-host code, for real: 2 and 4 local processes joined by jax.distributed on 127.0.0.1, each with its own
fake CPU devices, run `lmtrain train` and `lmtrain export` through the CLI.

They check that every host takes part to the end (eval, checkpoints, the final sample, export), that a stop
signal delivered to one host stops all of them at the same step with a checkpoint, that resuming reproduces
the uninterrupted run, and that meshes whose fsdp or tensor axis spans hosts train like plain data
parallelism on one process.
"""

import json
import signal
import time

import numpy as np
import pytest

from lmtrain.config import to_json
from lmtrain.train.trainer import train
from tests.helpers import small_config
from tests.multihost import Job, losses

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

STEPS = 12


def _cfg(**kw):
    values = {"model.vocab_size": 512, "model.n_heads": 8, "model.n_kv_heads": 8, "data.max_docs": 60,
              "train.steps": STEPS, "train.log_every": 1, "train.eval_every": 6, "train.eval_batches": 2,
              "checkpoint.every": 6, "optimizer.lr": 3e-3, "train.sample_tokens": 6}
    values.update(kw)
    return small_config("gpt2", **values)


def _config_file(tmp_path, name="cfg.json", **kw):
    path = tmp_path / name
    path.write_text(to_json(_cfg(**kw)))
    return str(path)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted 2-process run (2 x 4 devices, data parallel over both hosts), and the tokenizer it trained."""
    root = tmp_path_factory.mktemp("mp")
    config = _config_file(root)
    workdir = root / "straight"
    job = Job(["train", f"--config={config}", f"--workdir={workdir}", "--no-progress"], n=2, devices=4,
              log_dir=root / "logs-straight")
    job.check()
    return root, workdir, job


def test_two_processes_train_to_the_end_like_one_process(straight, tmp_path):
    root, workdir, job = straight
    out = job.output(0)
    assert "lmtrain: done at step 12" in out and "lmtrain: sample (prompt" in out, out[-2000:]
    assert (workdir / "done.json").exists() and json.loads((workdir / "done.json").read_text())["step"] == STEPS
    # The same global batches on one process with 8 devices give the same losses.
    single = tmp_path / "single"
    train(_cfg(**{"data.tokenizer_dir": str(workdir / "tokenizer")}), single)
    a, b = losses(workdir), losses(single)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(b)], rtol=2e-5)
    assert a[STEPS] < a[1]


def _wait_for_steps(path, n, job, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and sum('"loss"' in line for line in path.read_text().splitlines()) >= n:
            return
        if any(p.poll() is not None for p in job.procs):
            raise AssertionError("a process ended early:\n" + job.output(0)[-3000:] + job.output(1)[-3000:])
        time.sleep(0.1)
    raise AssertionError("no progress")


@pytest.mark.heavy  # minutes on 2 CPU cores: run by `-m heavy` (.ci/run runs it)
def test_sigterm_to_one_process_stops_all_with_a_checkpoint_and_resume_is_exact(straight):
    root, reference, _ = straight
    config = _config_file(root, "cfg-tok.json", **{"data.tokenizer_dir": str(reference / "tokenizer")})
    workdir = root / "preempted"
    args = ["train", f"--config={config}", f"--workdir={workdir}", "--no-progress"]
    job = Job(args, n=2, devices=4, log_dir=root / "logs-preempted")
    _wait_for_steps(workdir / "metrics.jsonl", 2, job)
    job.signal(1, signal.SIGTERM)  # one host only, as a TPU maintenance event would
    job.check()
    out = job.output(0)
    assert "stopped by a signal on another host at step" in out, out[-1500:]
    step = int(out.split("stopped by a signal on another host at step ")[1].split(";")[0])
    assert 2 <= step < STEPS
    assert (workdir / "checkpoints" / str(step)).is_dir()
    assert sorted(p.name for p in (workdir / "checkpoints" / str(step) / "data").glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    resumed = Job(args, n=2, devices=4, log_dir=root / "logs-resumed")
    resumed.check()
    assert f"resuming {workdir} from step {step}" in resumed.output(0)
    a, b = losses(reference), losses(workdir)
    assert sorted(b) == list(range(1, STEPS + 1))
    assert all(a[s] == b[s] for s in a), (a, b)


@pytest.mark.heavy  # minutes on 2 CPU cores: run by `-m heavy` (.ci/run runs it)
def test_four_processes_stop_and_resume_match_two(straight):
    root, reference, _ = straight
    config = _config_file(root, "cfg-4.json", **{"data.tokenizer_dir": str(reference / "tokenizer")})
    workdir = root / "four"
    args = ["train", f"--config={config}", f"--workdir={workdir}", "--no-progress"]
    Job([*args, "--stop-at-step=5"], n=4, devices=2, log_dir=root / "logs-four-a").check()
    assert (workdir / "checkpoints" / "5").is_dir()
    Job(args, n=4, devices=2, log_dir=root / "logs-four-b").check()
    a, b = losses(reference), losses(workdir)
    assert sorted(b) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=2e-5)


@pytest.mark.heavy  # minutes on 2 CPU cores: run by `-m heavy` (.ci/run runs it)
@pytest.mark.parametrize("mesh", [(1, 8, 1), (1, 1, 8)], ids=["fsdp-across-hosts", "tensor-across-hosts"])
def test_fsdp_or_tensor_axis_across_hosts_trains_like_data_parallel(straight, mesh):
    """Parameters split over both hosts: the same losses as data parallel, and the run ends as a whole (the
    end-of-run sample gathers nothing to one host: every host decodes; it once raised on non-addressable arrays)."""
    root, reference, _ = straight
    data, fsdp, tensor = mesh
    config = _config_file(root, f"cfg-{fsdp}-{tensor}.json", **{
        "data.tokenizer_dir": str(reference / "tokenizer"), "train.steps": STEPS, "mesh.data": data,
        "mesh.fsdp": fsdp, "mesh.tensor": tensor})
    workdir = root / f"mesh-{fsdp}-{tensor}"
    job = Job(["train", f"--config={config}", f"--workdir={workdir}", "--no-progress"], n=2, devices=4,
              log_dir=root / f"logs-mesh-{fsdp}-{tensor}")
    job.check()  # every process exits 0
    out = job.output(0)
    assert f"lmtrain: done at step {STEPS}" in out and "lmtrain: sample (prompt" in out, out[-2000:]
    a, b = losses(reference), losses(workdir)
    assert sorted(b) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=2e-5)


def test_export_from_a_multiprocess_checkpoint_equals_single_process_export(straight, tmp_path):
    from lmtrain.interop.hf_export import export_workdir

    root, workdir, _ = straight
    out_mp = tmp_path / "export-mp"
    Job(["export", str(workdir), str(out_mp)], n=2, devices=4, log_dir=tmp_path / "logs-export").check()
    out_single = tmp_path / "export-single"
    export_workdir(workdir, out_single)
    assert (out_mp / "model.safetensors").read_bytes() == (out_single / "model.safetensors").read_bytes()
    assert json.loads((out_mp / "config.json").read_text()) == json.loads((out_single / "config.json").read_text())
