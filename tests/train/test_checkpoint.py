"""Checkpoints keep what the user needs (issue 7, items 2, 7, 8, 9, 10): the best survives restarts, a
non-finite state is never saved, damage falls back to the previous checkpoint, a refused config change
writes nothing, a finished run is left alone, and signals during the final save do not lose it."""

from __future__ import annotations

import json
import pathlib
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmtrain.config import to_json
from lmtrain.paths import as_path
from lmtrain.train import checkpoint as ckpt_lib
from lmtrain.train.actions import TrainingDiverged
from lmtrain.train.checkpoint import Checkpointer, select_step
from lmtrain.train.trainer import main, train
from tests.core_fixtures import REPO, cli, cli_env, run_config, tree_digest
from tests.helpers import small_config

pytestmark = pytest.mark.usefixtures("compile_cache")


def _records(workdir) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def _steps(workdir) -> list[int]:
    d = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())


# ---------------------------------------------------------------------------------------------- Checkpointer units


def _tiny_state(value: float = 1.0) -> dict:
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    w = jax.device_put(np.random.default_rng(int(value)).standard_normal((64, 64), np.float32), one)  # incompressible
    return {"params": {"w": w}, "step": jax.device_put(jnp.int32(0), one)}


def _abstract() -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _tiny_state())


def _save_steps(workdir, steps_and_losses, metric="val_loss", mode="min", keep=1, **kw) -> None:
    ck = Checkpointer(workdir, keep=keep, best_metric=metric, best_mode=mode, **kw)
    try:
        for step, value in steps_and_losses:
            metrics = {metric: value}
            ck.save(step, _tiny_state(step), {"step": step}, {"eval": metrics}, metrics)
    finally:
        ck.close()


@pytest.mark.parametrize("metric, mode, values, best", [
    ("val_loss", "min", [3.0, 1.0, 2.0, 2.5, 2.4], 2),
    ("val_perplexity", "max", [3.0, 9.0, 2.0, 2.5, 2.4], 2),
])
def test_best_checkpoint_survives_two_restarts(tmp_path, metric, mode, values, best):
    """Orbax keeps the best by metrics it reloads from disk only when best_fn is set: restart twice, keep=1."""
    es = {"train.early_stopping.metric": metric, "train.early_stopping.mode": mode}
    (tmp_path / "config.json").write_text(to_json(small_config("llama", **es)))
    pairs = list(enumerate(values, start=1))
    _save_steps(tmp_path, pairs[:2], metric, mode)
    _save_steps(tmp_path, pairs[2:4], metric, mode)  # restart 1
    _save_steps(tmp_path, pairs[4:], metric, mode)  # restart 2
    assert _steps(tmp_path) == [best, 5]
    assert select_step(tmp_path, "best") == best
    assert select_step(tmp_path, "latest") == 5


@pytest.fixture
def two_checkpoints(tmp_path):
    """A checkpoints directory with steps 1 and 2 (asynchronous saves, as in training)."""
    _save_steps(tmp_path, [(1, 2.0), (2, 1.0)], keep=2)
    assert _steps(tmp_path) == [1, 2]
    return tmp_path


def test_every_saved_checkpoint_has_checksums(two_checkpoints):
    for step in (1, 2):
        table = json.loads((two_checkpoints / "checkpoints" / str(step) / ckpt_lib.CHECKSUMS).read_text())["files"]
        assert any(name.startswith("state/") for name in table), table
        assert ckpt_lib.verify_checksums(two_checkpoints / "checkpoints" / str(step)) is None


@pytest.mark.parametrize("name", ["../../outside.bin", "state/../../../outside.bin", "ABSOLUTE"])
def test_a_checksum_table_naming_a_file_outside_the_step_is_refused(two_checkpoints, name):
    step_dir = two_checkpoints / "checkpoints" / "2"
    outside = two_checkpoints / "outside.bin"
    outside.write_bytes(b"not part of any checkpoint")
    name = str(outside) if name == "ABSOLUTE" else name
    assert (step_dir / name).resolve() == outside.resolve()
    path = step_dir / ckpt_lib.CHECKSUMS
    original = path.read_text()
    table = json.loads(original)
    # Listed with its true size and hash: before the check, the file outside was read and accepted.
    table["files"][name] = {"xxh3_128": ckpt_lib._hash_file(as_path(outside)), "bytes": outside.stat().st_size}
    path.write_text(json.dumps(table))
    try:
        assert ckpt_lib.verify_checksums(step_dir) == f"{path} lists '{name}', which is not a file inside {step_dir}"
    finally:
        path.write_text(original)


def _largest_tensor_file(step_dir: pathlib.Path) -> pathlib.Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return max(files, key=lambda p: p.stat().st_size)


def _truncate(step_dir):
    f = _largest_tensor_file(step_dir)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _delete(step_dir):
    _largest_tensor_file(step_dir).unlink()


def _flip_byte(step_dir):
    f = _largest_tensor_file(step_dir)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _delete, _flip_byte], ids=["truncated", "deleted", "flipped_byte"])
def test_damaged_latest_checkpoint_falls_back_with_a_warning(two_checkpoints, damage, capsys):
    damage(two_checkpoints / "checkpoints" / "2")
    ck = Checkpointer(two_checkpoints, keep=2)
    try:
        restored = ck.restore_latest(_abstract())
    finally:
        ck.close()
    assert restored.step == 1
    np.testing.assert_array_equal(restored.state["params"]["w"], _tiny_state(1)["params"]["w"])
    err = capsys.readouterr().err
    assert "warning" in err and "damaged" in err and "checkpoints/2" in err, err
    aside = [p for p in (two_checkpoints / "checkpoints").iterdir() if p.name.startswith("2.damaged")]
    assert len(aside) == 1 and any(aside[0].rglob("*")), "the damaged step is moved aside, not deleted"
    assert _steps(two_checkpoints) == [1]


@pytest.mark.parametrize("damage", [_truncate, _delete], ids=["truncated", "deleted"])
def test_damage_is_caught_without_checksums_too(two_checkpoints, damage, capsys):
    """With checkpoint.checksums off (or a checkpoint saved before hashing), a read error still falls back."""
    damage(two_checkpoints / "checkpoints" / "2")
    (two_checkpoints / "checkpoints" / "2" / ckpt_lib.CHECKSUMS).unlink()
    ck = Checkpointer(two_checkpoints, keep=2, checksums=False)
    try:
        restored = ck.restore_latest(_abstract())
    finally:
        ck.close()
    assert restored.step == 1
    assert "damaged" in capsys.readouterr().err


def test_a_checkpoint_of_another_shape_is_refused_not_set_aside(two_checkpoints):
    """A state that does not fit (another model) is a config problem: nothing is moved or deleted."""
    before = tree_digest(two_checkpoints)
    other = {"params": {"w": jax.ShapeDtypeStruct((32, 64), jnp.float32, sharding=_abstract()["params"]["w"].sharding)},
             "step": _abstract()["step"]}
    ck = Checkpointer(two_checkpoints, keep=2)
    try:
        with pytest.raises(ckpt_lib.CheckpointError, match=r"params/w: stored \(64, 64\), expected \(32, 64\)"):
            ck.restore_latest(other)
    finally:
        ck.close()
    assert tree_digest(two_checkpoints) == before


def test_stale_orbax_tmp_directories_are_removed(two_checkpoints):
    stale = two_checkpoints / "checkpoints" / "7.orbax-checkpoint-tmp-1732290000"
    (stale / "state").mkdir(parents=True)
    (stale / "state" / "half").write_bytes(b"x" * 100)
    ck = Checkpointer(two_checkpoints, keep=2)
    try:
        assert ck.steps() == [1, 2]
        ck.save(3, _tiny_state(3), {}, {})
    finally:
        ck.close()
    assert not stale.exists()
    assert _steps(two_checkpoints) == [2, 3]


# ---------------------------------------------------------------------------------------------- through train()


def _read_params(workdir, step):
    from lmtrain.workdir import restore_params

    _, params = restore_params(workdir, step)
    return params


@pytest.mark.slow
def test_best_by_a_max_metric_survives_a_restart_and_exports(tmp_path, tokenizer_512):
    """keep=1 and a 'max' metric (val_perplexity, so the best is the early step): stop at 2, resume to 4."""
    from lmtrain.interop import hf_export

    workdir = tmp_path / "run"
    es = {"train.early_stopping.metric": "val_perplexity", "train.early_stopping.mode": "max"}
    train(run_config(tokenizer_512, 4, **es), workdir, stop_at_step=2)
    train(run_config(tokenizer_512, 4, **es), workdir)
    evals = {r["step"]: r["val_perplexity"] for r in _records(workdir) if "val_perplexity" in r}
    assert sorted(evals) == [2, 4]
    assert evals[2] > evals[4], f"the loss did not fall, so this run cannot show the best being kept: {evals}"
    assert _steps(workdir) == [2, 4], "keep=1 keeps the latest (4) and the best (2)"
    assert select_step(workdir, "best") == 2
    assert json.loads((workdir / "done.json").read_text())["best_step"] == 2
    out = tmp_path / "export"
    assert hf_export.main([str(workdir), str(out), "--which", "best"]) == 0
    assert list(out.glob("*.safetensors")) and (out / "config.json").exists()


@pytest.mark.slow
def test_init_from_which_best_or_latest_starts_from_that_checkpoint(tmp_path, tokenizer_512):
    """A source WORKDIR whose best checkpoint (step 1 by val_loss) is not its latest (step 2), written by the
    training Checkpointer with parameters of the model's shapes (different at each step); runs started from it
    with init_from_which=best / latest hold that step's parameters (lr 1e-30 leaves float32 weights
    bit-identical after their one step)."""
    from lmtrain.model import ModelConfig, ModelDef

    def cfg(**kw):
        return run_config(tokenizer_512, 1, **{"optimizer.lr": 1e-30, "optimizer.warmup_steps": 0,
                                               "train.eval_every": 0, "checkpoint.every": 1, **kw})

    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text(to_json(cfg()))
    model_def = ModelDef(ModelConfig.from_config(cfg().model))
    rng = np.random.default_rng(0)  # numpy draws: no model initialisation to compile
    want = {step: jax.tree.map(lambda x: (0.02 * rng.standard_normal(x.shape)).astype(x.dtype), model_def.shapes)
            for step in (1, 2)}
    ck = Checkpointer(source, keep=2)
    try:
        for step, val_loss in ((1, 2.0), (2, 3.0)):
            ck.save(step, {"params": want[step], "step": np.int32(step)}, {"step": step}, {"eval": {"val_loss": val_loss}},
                    {"val_loss": val_loss})
    finally:
        ck.close()
    assert select_step(source, "best") == 1 and select_step(source, "latest") == 2
    assert not np.array_equal(want[1]["embed"], want[2]["embed"])
    for which, step in (("best", 1), ("latest", 2)):
        workdir = tmp_path / which
        train(cfg(**{"train.init_from": str(source), "train.init_from_which": which}), workdir)
        got = _read_params(workdir, 1)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want[step]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), b, err_msg=f"init_from_which={which}")


@pytest.mark.slow
def test_nan_update_is_never_saved_and_the_error_names_the_last_good_step(tmp_path, tokenizer_512):
    """lr=1e30 without clipping: step 1's update is finite (parameters ~1e30, saved), step 2 overflows.
    lr=1e39 (inf in float32): step 1's update itself is non-finite, and nothing is saved."""
    common = {"optimizer.clip_norm": 0.0, "checkpoint.every": 1, "checkpoint.keep": 5, "optimizer.warmup_steps": 0,
              "train.eval_every": 0}
    with pytest.raises(TrainingDiverged) as info:
        train(run_config(tokenizer_512, 6, **{"optimizer.lr": 1e39, **common}), tmp_path / "inf")
    message = str(info.value)
    assert "the update at step 1 made the parameters non-finite" in message and "Lower optimizer.lr" in message
    assert "No checkpoint was saved" in message, message
    assert not (tmp_path / "inf" / "checkpoints").exists() or _steps(tmp_path / "inf") == []

    workdir = tmp_path / "run"
    cfg = run_config(tokenizer_512, 6, **{"optimizer.lr": 1e30, **common})
    with pytest.raises(TrainingDiverged) as info:
        train(cfg, workdir)
    message = str(info.value)
    assert "at step 2" in message, message  # the loss or the update, whichever overflows first
    assert "last good checkpoint is step 1" in message, message
    assert _steps(workdir) == [1]
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(_read_params(workdir, 1)))


@pytest.mark.slow
def test_nan_loss_at_step_1_blames_the_data_not_the_learning_rate(tmp_path, tokenizer_512, monkeypatch):
    """A poisoned first batch (a NaN loss weight): the parameters are finite, the loss is not."""
    from lmtrain.tasks import base

    real = base.make_data

    def poisoned(cfg, workdir, data_index, data_count, **kw):
        bundle = real(cfg, workdir, data_index, data_count, **kw)
        inner = bundle.train

        class Poisoned:
            def __getattr__(self, name):
                return getattr(inner, name)

            def __next__(self):
                batch = next(inner)
                batch["loss_mask"] = np.full_like(batch["loss_mask"], np.nan)
                return batch

        bundle.train = Poisoned()
        return bundle

    monkeypatch.setattr(base, "make_data", poisoned)
    with pytest.raises(TrainingDiverged) as info:
        train(run_config(tokenizer_512, 4, **{"checkpoint.every": 1}), tmp_path / "run")
    message = str(info.value)
    assert "loss is nan at step 1" in message and "finite parameters" in message, message
    assert "data" in message
    assert "optimizer.lr" not in message and "lower" not in message.lower(), message
    assert not (tmp_path / "run" / "checkpoints").exists() or _steps(tmp_path / "run") == []


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tokenizer_512):
    """A finished 2-step run with TensorBoard on."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    train(run_config(tokenizer_512, 2, **{"logging.tensorboard": True}), workdir)
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("override", ["model.d_model=128", "optimizer.name=lion", "optimizer.clip_norm=0.5",
                                      "model.n_layers=3"])
def test_incompatible_change_on_resume_is_refused_before_anything_is_written(finished_run, override, capsys):
    before = tree_digest(finished_run)
    key = override.split("=")[0]
    code = main([f"--config={finished_run / 'config.json'}", f"--workdir={finished_run}", "--config.train.steps=4",
                 f"--config.{override}"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and key in err and "--workdir" in err and "init_from" in err, err
    assert tree_digest(finished_run) == before, "a refused resume must not write anything"


@pytest.mark.slow
def test_finished_run_run_again_says_complete_and_writes_nothing(finished_run, capsys):
    done = json.loads((finished_run / "done.json").read_text())
    assert done["step"] == 2 and "val_loss" in done["metrics"] and done["finished"]
    events = sorted(p.name for p in (finished_run / "tensorboard").iterdir())
    assert events
    before = tree_digest(finished_run)
    assert main([f"--config={finished_run / 'config.json'}", f"--workdir={finished_run}"]) == 0
    out = capsys.readouterr().out
    assert "is complete" in out and "train.steps" in out, out
    assert sorted(p.name for p in (finished_run / "tensorboard").iterdir()) == events
    assert tree_digest(finished_run) == before


# ---------------------------------------------------------------------------------------------- signals

# Runs the CLI with Checkpointer.wait slowed down and announced, so that a test can signal the process
# while the final save is being waited for (the window the issue lost the checkpoint in).
SLOW_FINAL_SAVE = """
import sys, time
from lmtrain.train import checkpoint
_wait, _close = checkpoint.Checkpointer.wait, checkpoint.Checkpointer.close
def wait(self):
    print("TEST: waiting for the final save", flush=True)
    time.sleep(3)
    _wait(self)
def close(self):
    print("TEST: closing the checkpointer", flush=True)
    time.sleep(3)
    _close(self)
checkpoint.Checkpointer.wait, checkpoint.Checkpointer.close = wait, close
from lmtrain.cli import main
sys.exit(main(sys.argv[1:]))
"""


class _Output:
    """Collects a process's merged output in a thread, so that a test can wait for a line without blocking."""

    def __init__(self, proc):
        import threading

        self.proc, self.text = proc, ""
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        for line in self.proc.stdout:
            self.text += line

    def wait_for(self, needle: str, timeout: float) -> None:
        deadline = time.time() + timeout
        while needle not in self.text:
            if time.time() > deadline or (self.proc.poll() is not None and not self._thread.is_alive()):
                self.proc.kill()
                raise AssertionError(f"no {needle!r} in the output (exit {self.proc.poll()}):\n{self.text}")
            time.sleep(0.05)

    def finish(self, timeout: float = 180) -> str:
        self.proc.wait(timeout=timeout)
        self._thread.join(timeout=10)
        return self.text


def _train_args(tokenizer_512, workdir, steps=100000, **kw) -> list[str]:
    """CLI arguments for a run of the tiny test model; its config goes in a file beside the WORKDIR."""
    cfg = run_config(tokenizer_512, steps, **{"train.eval_every": 0, "checkpoint.every": 100000, **kw})
    path = pathlib.Path(workdir).parent / f"{pathlib.Path(workdir).name}-config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(cfg))
    return ["train", f"--config={path}", f"--workdir={workdir}", "--no-progress"]


@pytest.mark.slow
def test_more_signals_during_the_final_save_keep_the_checkpoint(tmp_path, tokenizer_512, compile_cache_dir):
    """SIGTERM at step 2, a second SIGTERM while the final save is waited for, and Ctrl-C (SIGINT) while the
    checkpointer closes (the issue's window: the handlers were already gone and the checkpoint was lost)."""
    import subprocess

    workdir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_FINAL_SAVE, *_train_args(tokenizer_512, workdir)],
                            cwd=REPO, env=cli_env(compile_cache_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    output = _Output(proc)
    output.wait_for("step 2/", 300)
    proc.send_signal(signal.SIGTERM)
    output.wait_for("TEST: waiting for the final save", 120)
    proc.send_signal(signal.SIGTERM)
    output.wait_for("TEST: closing the checkpointer", 120)
    proc.send_signal(signal.SIGINT)
    out = output.finish()
    assert proc.returncode == 0, out
    assert "SIGTERM again: already stopping" in out and "SIGINT again: already stopping" in out, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    stopped_at = int(out.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert _steps(workdir) == [stopped_at]
    assert (workdir / "checkpoints" / str(stopped_at) / ckpt_lib.CHECKSUMS).exists()
    assert ckpt_lib.verify_checksums(workdir / "checkpoints" / str(stopped_at)) is None


@pytest.mark.slow
def test_sigterm_during_start_up_exits_0_with_a_message(tmp_path, tokenizer_512, compile_cache_dir):
    """SIGTERM a second after launch, while Python is still importing JAX (the issue saw exit 143, no message)."""
    workdir = tmp_path / "run"
    proc = cli(_train_args(tokenizer_512, workdir, 4), compile_cache_dir)
    output = _Output(proc)
    time.sleep(1.0)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    out = output.finish()
    assert proc.returncode == 0, out
    assert "stopped by SIGTERM before step 1" in out and "no checkpoint" in out, out
    assert "Traceback" not in out and "step 1/" not in out, out
    assert not (workdir / "checkpoints").exists() or _steps(workdir) == []
