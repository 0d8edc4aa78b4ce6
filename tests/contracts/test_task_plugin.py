"""The task contract: a task defined outside lmtrain, in a plugin module named in LMTRAIN_PLUGINS and registered
through the public registry, shards, trains, resumes exactly and is evaluated by `lmtrain eval`, with no edit
to lmtrain. Everything runs through the command lines, as a user would."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from lmtrain.config import to_json
from tests.helpers import small_config

REPO = pathlib.Path(__file__).resolve().parents[2]
TASK = "toy_weighted_lm"

TOY_TASK = '''
"""Language modelling that weighs the tokens past position 8 by task.toy_late_weight, and reports top-1."""
import jax.numpy as jnp

from lmtrain.errors import ConfigError
from lmtrain.tasks import Task, register_task
from lmtrain.tasks.base import dropout_key
from lmtrain.tasks.losses import token_loss_sums
from lmtrain.tasks.options import TaskOptions


class ToyOptions(TaskOptions):
    defaults = {"toy_late_weight": 2.0}

    @classmethod
    def validate(cls, cfg):
        if not cfg.task.toy_late_weight > 0:
            raise ConfigError(f"task.toy_late_weight={cfg.task.toy_late_weight} must be positive.")


class ToyWeightedLM(Task):
    formats = ("text",)
    head = "lm"
    options = ToyOptions
    METRIC_MODES = {"val_loss": "min", "val_top1": "max"}

    def loss_fn(self, model_def):
        late, vocab = self.cfg.task.toy_late_weight, model_def.cfg.vocab_size

        def loss_fn(params, batch, rng):
            logits = model_def.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"],
                                     dropout_key(model_def.cfg, rng))
            w_BxL = batch["loss_mask"] * jnp.where(batch["positions"] >= 8, late, 1.0)
            ce_sum, _, _ = token_loss_sums(logits, batch["targets"], w_BxL, vocab)
            return ce_sum, jnp.sum(w_BxL), {"loss": ce_sum}

        return loss_fn

    def eval_step(self, model_def):
        vocab = model_def.cfg.vocab_size

        def eval_step(params, batch):
            logits = model_def.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"])
            ce_sum, _, n = token_loss_sums(logits, batch["targets"], batch["loss_mask"], vocab)
            hits = (jnp.argmax(logits[..., :vocab], -1) == batch["targets"]) * batch["loss_mask"]
            return {"ce_sum": ce_sum, "tokens": n, "top1": jnp.sum(hits)}

        return eval_step

    def eval_metrics(self, sums):
        if not float(sums.get("tokens", 0)):
            return {}
        return {"val_loss": float(sums["ce_sum"]) / float(sums["tokens"]),
                "val_top1": float(sums["top1"]) / float(sums["tokens"])}


register_task("toy_weighted_lm", ToyWeightedLM)
'''


def _run(args, plugin_dir, check=True, plugins="toy_task_plugin"):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LMTRAIN_PLUGINS": plugins,
           "PYTHONPATH": os.pathsep.join([str(plugin_dir), str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _records(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _losses(workdir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(workdir) if "loss" in r}


@pytest.mark.heavy  # five command-line runs: about 2 minutes on 2 CPU cores; .ci/run runs it
def test_a_plugin_task_shards_trains_resumes_exactly_and_evaluates(tmp_path, builtin_shards):
    tokenizer, _ = builtin_shards
    (tmp_path / "toy_task_plugin.py").write_text(TOY_TASK)
    shards = tmp_path / "shards"
    _run(["tools/shard_data.py", "--builtin", "--max-docs", "60", "--tokenizer", tokenizer, "--output", str(shards),
          "--val-fraction", "0.2", "--workers", "1", "--quiet"], tmp_path)

    cfg = small_config("llama", **{
        "task.name": TASK, "data.source": "shards", "data.shards_dir": str(shards), "data.tokenizer_dir": tokenizer,
        "model.vocab_size": 1024, "optimizer.lr": 3e-3, "optimizer.schedule": "constant",
        "optimizer.warmup_steps": 0, "train.log_every": 1, "train.eval_every": 2, "train.eval_batches": 1,
        "checkpoint.every": 2, "checkpoint.keep": 1})
    config = tmp_path / "toy.json"
    config.write_text(to_json(cfg))

    def train(workdir, steps):
        return _run(["-m", "lmtrain.cli", "train", f"--config={config}", f"--workdir={workdir}", "--no-progress",
                     f"--config.train.steps={steps}", "--config.task.toy_late_weight=3.0"], tmp_path)

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, 4)
    train(resumed, 2)
    second = train(resumed, 4)
    assert "resuming" in second.stdout
    assert json.loads((resumed / "config.json").read_text())["task"]["toy_late_weight"] == 3.0
    a, b = _losses(straight), _losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(a[s] == b[s] for s in a), (a, b)
    evals = {r["step"]: r for r in _records(straight) if "val_top1" in r}
    assert sorted(evals) == [2, 4]

    out = tmp_path / "eval"
    done = _run(["-m", "lmtrain.cli", "eval", str(resumed), "--data", str(shards), "--out", str(out),
                 "--batch-size", "8", "--max-examples", "8"], tmp_path)
    result = json.loads((out / "eval.json").read_text())["result"]
    assert result["task"] == TASK and result["checkpoint"].startswith("step 4")
    assert set(result["metrics"]) == {"loss", "top1"}, done.stdout
    # the first validation batch, as training's last evaluation scored it
    assert math.isclose(result["metrics"]["loss"], evals[4]["val_loss"], rel_tol=1e-5)
    assert math.isclose(result["metrics"]["top1"], evals[4]["val_top1"], rel_tol=1e-5)
    assert (out / "report.html").exists()


def test_without_the_plugin_its_workdir_is_an_unknown_task_in_one_line(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({"task": {"name": TASK}}))
    proc = _run(["-m", "lmtrain.cli", "eval", str(workdir), "--data", str(tmp_path)], tmp_path, check=False,
                plugins="")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"task.name='{TASK}' is unknown" in proc.stderr


# A task that reads a format that is a plugin too (tests/data/test_formats.py's scored_text: one text per row with
# a per-example score): language modelling on each row, each example's tokens weighted by its score.
SCORED_TASK = '''
import jax.numpy as jnp

from lmtrain.tasks import Task, register_task
from lmtrain.tasks.base import dropout_key
from lmtrain.tasks.losses import token_loss_sums


def _shifted(batch):
    """Next-token targets within each row, and where they count (both tokens real)."""
    targets_BxL = jnp.roll(batch["inputs"], -1, axis=1)
    real_BxL = (batch["segment_ids"] > 0) & (jnp.roll(batch["segment_ids"], -1, axis=1) > 0)
    return targets_BxL, real_BxL.at[:, -1].set(False).astype(jnp.float32)


class ScoreWeightedLM(Task):
    formats = ("scored_text",)
    head = "lm"
    METRIC_MODES = {"val_loss": "min", "val_weighted_loss": "min"}

    def loss_fn(self, model_def):
        vocab = model_def.cfg.vocab_size

        def loss_fn(params, batch, rng):
            logits = model_def.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"],
                                     dropout_key(model_def.cfg, rng))
            targets_BxL, real_BxL = _shifted(batch)
            w_BxL = real_BxL * batch["score"][:, None]
            ce_sum, _, _ = token_loss_sums(logits, targets_BxL, w_BxL, vocab)
            return ce_sum, jnp.sum(w_BxL), {"loss": ce_sum}

        return loss_fn

    def eval_step(self, model_def):
        vocab = model_def.cfg.vocab_size

        def eval_step(params, batch):
            logits = model_def.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"])
            targets_BxL, real_BxL = _shifted(batch)
            ce_sum, _, n = token_loss_sums(logits, targets_BxL, real_BxL, vocab)
            w_BxL = real_BxL * batch["score"][:, None]
            weighted, _, w = token_loss_sums(logits, targets_BxL, w_BxL, vocab)
            return {"ce_sum": ce_sum, "tokens": n, "weighted": weighted, "weight": w}

        return eval_step

    def eval_metrics(self, sums):
        if not float(sums.get("tokens", 0)):
            return {}
        return {"val_loss": float(sums["ce_sum"]) / float(sums["tokens"]),
                "val_weighted_loss": float(sums["weighted"]) / float(sums["weight"])}


register_task("score_weighted_lm", ScoreWeightedLM)
'''


@pytest.mark.heavy  # five command-line runs: about 2 minutes on 2 CPU cores; .ci/run runs it
def test_a_plugin_task_on_a_plugin_format_shards_trains_resumes_and_evaluates(tmp_path, builtin_shards):
    from tests.data.test_formats import PLUGIN, PLUGIN_SOURCE

    tokenizer, _ = builtin_shards
    (tmp_path / f"{PLUGIN}.py").write_text(PLUGIN_SOURCE)
    (tmp_path / "scored_task_plugin.py").write_text(SCORED_TASK)
    plugins = f"{PLUGIN},scored_task_plugin"
    records = [{"text": f"note {k}: the {'quick' if k % 2 else 'slow'} fox " + "jumps over the dog " * (1 + k % 3),
                "score": 0.5 + (k % 4)} for k in range(64)]
    data = tmp_path / "scored.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    shards = tmp_path / "shards"
    _run(["tools/shard_data.py", "--input", str(data), "--format", "scored_text", "--tokenizer", tokenizer,
          "--output", str(shards), "--seq-len", "32", "--val-fraction", "0.25", "--workers", "1", "--quiet"],
         tmp_path, plugins=plugins)
    assert json.loads((shards / "manifest.json").read_text())["example_format"] == "scored_text"

    cfg = small_config("llama", **{
        "task.name": "score_weighted_lm", "data.source": "shards", "data.shards_dir": str(shards),
        "data.tokenizer_dir": tokenizer, "data.seq_len": 32, "model.vocab_size": 1024, "optimizer.lr": 3e-3,
        "optimizer.schedule": "constant", "optimizer.warmup_steps": 0, "train.log_every": 1, "train.eval_every": 2,
        "train.eval_batches": 1, "checkpoint.every": 2, "checkpoint.keep": 1})
    config = tmp_path / "scored.json"
    config.write_text(to_json(cfg))

    def train(workdir, steps):
        return _run(["-m", "lmtrain.cli", "train", f"--config={config}", f"--workdir={workdir}", "--no-progress",
                     f"--config.train.steps={steps}"], tmp_path, plugins=plugins)

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, 4)
    train(resumed, 2)
    assert "resuming" in train(resumed, 4).stdout
    a, b = _losses(straight), _losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(a[s] == b[s] for s in a), (a, b)
    evals = {r["step"]: r for r in _records(straight) if "val_weighted_loss" in r}
    assert sorted(evals) == [2, 4]
    assert evals[4]["val_weighted_loss"] != evals[4]["val_loss"]  # the scores reached the task: not all equal

    out = tmp_path / "eval"
    _run(["-m", "lmtrain.cli", "eval", str(resumed), "--data", str(shards), "--out", str(out), "--batch-size", "8",
          "--max-examples", "8"], tmp_path, plugins=plugins)
    result = json.loads((out / "eval.json").read_text())["result"]
    assert result["task"] == "score_weighted_lm" and set(result["metrics"]) == {"loss", "weighted_loss"}
    assert math.isclose(result["metrics"]["loss"], evals[4]["val_loss"], rel_tol=1e-5)
