"""Training behaviour: exact resume, gradient accumulation, preemption, incomplete checkpoints, the CLI."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lmtrain.train.trainer import Components, train
from tests.helpers import small_config

REPO = pathlib.Path(__file__).resolve().parents[2]


def _losses(workdir) -> dict[int, float]:
    out = {}
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """One tokenizer for the module's runs (trained by the first run, as the default job does)."""
    workdir = tmp_path_factory.mktemp("tok")
    train(_train_cfg(steps=2), workdir)
    return str(workdir / "tokenizer")


def _train_cfg(steps=8, tokenizer_dir="", **kw):
    return small_config(
        "llama", **{"model.vocab_size": 512, "optimizer.lr": 3e-3, "data.max_docs": 60,
                    "data.tokenizer_dir": tokenizer_dir, "train.steps": steps, "train.log_every": 1,
                    "train.eval_every": 4, "train.eval_batches": 2,
                    "checkpoint.every": 2, "checkpoint.keep": 2, "train.z_loss": 1e-4, **kw})


def test_resumed_run_equals_uninterrupted_run(tmp_path, tokenizer_dir):
    straight = tmp_path / "straight"
    train(_train_cfg(8, tokenizer_dir), straight)
    resumed = tmp_path / "resumed"
    first = train(_train_cfg(8, tokenizer_dir, **{"checkpoint.every": 3}), resumed, stop_at_step=4)
    assert first.step == 4 and first.stopped_by
    result = train(_train_cfg(8, tokenizer_dir), resumed)
    assert result.step == 8
    a, b = _losses(straight), _losses(resumed)
    assert sorted(a) == list(range(1, 9)) and sorted(b) == list(range(1, 9))
    for step in range(1, 9):
        assert a[step] == b[step], f"step {step}: straight {a[step]} != resumed {b[step]}"
    assert a[8] < a[1]


def test_resume_ignores_a_checkpoint_whose_save_was_killed(tmp_path, tokenizer_dir):
    workdir = tmp_path / "run"
    train(_train_cfg(4, tokenizer_dir), workdir)
    ckpts = workdir / "checkpoints"
    # A save of step 6 killed half-way leaves Orbax's temporary directory behind, without the state item.
    partial = ckpts / "6.orbax-checkpoint-tmp-1732290000"
    shutil.copytree(ckpts / "4", partial)
    shutil.rmtree(partial / "state")
    result = train(_train_cfg(6, tokenizer_dir), workdir)
    assert result.step == 6
    assert _losses(workdir).keys() >= {5, 6}


def _step_fn(cfg, accum):
    with cfg.unlocked():
        cfg.train.grad_accum, cfg.train.z_loss = accum, 1e-4
    parts = Components.from_config(cfg)
    params = parts.model_def.init(jax.random.key(0))
    state = {"params": params, "opt_state": parts.tx.init(params), "step": np.int32(0),
             "rng": jax.random.key_data(jax.random.key(1))}
    return state, jax.jit(parts.train_step)


def test_gradient_accumulation_equals_one_big_batch():
    cfg = small_config("gpt2", **{"data.batch_size": 8})
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(2):
        mask = (rng.random((8, 16)) > 0.2).astype(np.float32)  # uneven token counts per micro-batch
        batches.append({"inputs": rng.integers(0, 256, (8, 16), dtype=np.int32),
                        "targets": rng.integers(0, 256, (8, 16), dtype=np.int32), "loss_mask": mask,
                        "segment_ids": np.ones((8, 16), np.int32),
                        "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (8, 16)).copy()})
    state1, step1 = _step_fn(cfg, 1)
    state4, step4 = _step_fn(cfg, 4)
    for batch in batches:
        state1, m1 = step1(state1, batch)
        state4, m4 = step4(state4, batch)
        np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-6)
        np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
        assert float(m4["weight"]) == float(batch["loss_mask"].sum())
    for p1, p4 in zip(jax.tree.leaves(state1["params"]), jax.tree.leaves(state4["params"])):
        np.testing.assert_allclose(p4, p1, rtol=1e-5, atol=1e-6)


def _cli(args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "lmtrain.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _shards_args(builtin_shards) -> list[str]:
    tok, shards = builtin_shards
    return [f"--config.data.tokenizer_dir={tok}", f"--config.data.shards_dir={shards}", "--config.model.vocab_size=1024"]


def test_resume_from_shards_equals_uninterrupted_run(tmp_path, builtin_shards):
    """The Grain shard iterator's position is in the checkpoint: a resumed run sees exactly the next batches."""
    tok, shards = builtin_shards
    overrides = {"data.source": "shards", "data.tokenizer_dir": tok, "data.shards_dir": shards,
                 "model.vocab_size": 1024, "data.seq_len": 32, "model.max_seq_len": 32}
    train(_train_cfg(6, **overrides), tmp_path / "straight")
    train(_train_cfg(6, **overrides), tmp_path / "resumed", stop_at_step=3)
    train(_train_cfg(6, **overrides), tmp_path / "resumed")
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert all(a[s] == b[s] for s in a), (a, b)
    state_files = list((tmp_path / "resumed" / "checkpoints" / "6" / "data").glob("process_0-of-1.json"))
    assert state_files and "doc" in json.loads(state_files[0].read_text())


@pytest.mark.slow
def test_sigterm_leaves_a_resumable_checkpoint(tmp_path, builtin_shards):
    workdir = tmp_path / "preempted"
    args = ["train", "--config=tiny:smoke", f"--workdir={workdir}", "--no-progress", *_shards_args(builtin_shards),
            "--config.train.eval_every=0", "--config.checkpoint.every=100000", "--config.train.log_every=1"]
    proc = _cli([*args, "--config.train.steps=100000"])
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped by SIGTERM at step" in out, out
    stopped_at = int(out.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert stopped_at >= 3
    assert (workdir / "checkpoints" / str(stopped_at)).is_dir()
    resumed = _cli([*args, f"--config.train.steps={stopped_at + 2}"])
    out2, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, out2
    assert f"from step {stopped_at}" in out2, out2
    assert sorted(_losses(workdir))[-1] == stopped_at + 2


@pytest.mark.slow
def test_default_job_trains_through_the_cli_and_loss_falls(tmp_path, builtin_shards):
    """The default job through the CLI, stopped with --stop-at-step and run again as the message says; with
    --no-progress it still prints every validation line, and the sample is text, not a Python repr."""
    workdir = tmp_path / "tiny"
    args = ["train", "--config=tiny:smoke", f"--workdir={workdir}", "--config.train.log_every=1", "--no-progress",
            *_shards_args(builtin_shards)]
    first = _cli([*args, "--stop-at-step=10"])
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out
    assert "To resume, run the same command without --stop-at-step" in out, out
    assert "step 10: val_loss" in out, out
    proc = _cli(args)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert "from step 10" in out, out
    losses = _losses(workdir)
    steps = sorted(losses)
    assert steps == list(range(1, 21)), steps
    assert losses[steps[-1]] < losses[steps[0]] - 0.5, losses
    assert "step 20: val_loss" in out and "val_perplexity" in out and "sample (prompt" in out
    sample = out.split("sample (prompt 'The '):\n", 1)[1].split("\nlmtrain:", 1)[0]
    assert sample.startswith("The") and "\\n" not in sample, sample
    assert (workdir / "loss_curve.png").stat().st_size > 1000
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((workdir / "config.json").read_text())["model"]["d_model"] == 128
    assert json.loads((workdir / "config.json").read_text())["data"]["source"] == "shards"
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["epoch"] >= 0 for r in records if "loss" in r)


def test_missing_shards_directory_says_how_to_make_it(tmp_path, capsys):
    from lmtrain.train.trainer import main

    code = main(["--config=tiny:smoke", f"--workdir={tmp_path / 'w'}", f"--config.data.shards_dir={tmp_path / 'nope'}",
                 f"--config.data.tokenizer_dir={tmp_path}"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"data.shards_dir={tmp_path / 'nope'} does not exist" in err and "tools/shard_data.py" in err


def test_version(capsys):
    import lmtrain
    from lmtrain.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"lmtrain {lmtrain.__version__}"
