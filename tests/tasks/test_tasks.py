"""The task seam: sft and classify losses, early stopping, a classifier started from a language model, what each
task declares about itself, the registry, and the prepare(aux, batch) seam."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmtrain import tasks as tasks_lib
from lmtrain.config import apply_overrides, base_config, validate
from lmtrain.errors import ConfigError
from lmtrain.model import ModelConfig, ModelDef
from lmtrain.tasks import TASKS, Task, eval_head, make_task, task_class, task_config_defaults
from lmtrain.tasks.lm import LanguageModelling
from lmtrain.tasks.losses import cross_entropy_and_log_z, token_loss_sums
from lmtrain.tasks.options import TaskOptions
from lmtrain.train.checkpoint import select_step
from lmtrain.train.trainer import Components, train
from tests.helpers import small_config


@pytest.fixture(scope="module")
def task_shards(builtin_shards, tmp_path_factory):
    """The built-in demo tasks, sharded with the toolchain's tokenizer: (tokenizer, sft shards, classify shards)."""
    from tools import shard_data

    tok, _ = builtin_shards
    root = tmp_path_factory.mktemp("tasks")
    for task in ("sft", "classify"):
        assert shard_data.main(["--builtin-task", task, "--tokenizer", tok, "--output", str(root / task),
                                "--seq-len", "32", "--quiet"]) == 0
    return tok, str(root / "sft"), str(root / "classify")


def _cfg(task, tok, shards, **kw):
    values = {"task.name": task, "data.source": "shards", "data.tokenizer_dir": tok, "data.shards_dir": shards,
              "model.vocab_size": 1024, "data.seq_len": 32, "model.max_seq_len": 32, "train.steps": 6,
              "train.log_every": 1, "train.eval_every": 2, "train.eval_batches": 2, "checkpoint.every": 2,
              "optimizer.lr": 3e-3}
    values.update(kw)
    return small_config("llama", **values)


def test_packed_sft_examples_give_the_same_loss_sum_as_each_example_alone():
    """Segment masking and per-row positions make packing invisible to the loss."""
    cfg = ModelConfig.from_config(small_config("llama").model)
    model_def = ModelDef(cfg)
    params = model_def.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    lengths = [5, 9, 7]
    examples = [rng.integers(0, 256, n + 1).astype(np.int32) for n in lengths]
    masks = [np.concatenate([np.zeros(n // 2), np.ones(n - n // 2)]).astype(np.float32) for n in lengths]

    def loss_sum(inputs, targets, mask, positions, segments):
        logits = model_def.apply(params, inputs[None], positions[None], segments[None])
        return token_loss_sums(logits, targets[None], mask[None], cfg.vocab_size)[0]

    alone = sum(float(loss_sum(e[:-1], e[1:], m, np.arange(len(m)), np.ones(len(m), np.int32)))
                for e, m in zip(examples, masks))
    packed = float(loss_sum(np.concatenate([e[:-1] for e in examples]), np.concatenate([e[1:] for e in examples]),
                            np.concatenate(masks), np.concatenate([np.arange(n) for n in lengths]),
                            np.concatenate([np.full(n, i + 1, np.int32) for i, n in enumerate(lengths)])))
    np.testing.assert_allclose(packed, alone, rtol=2e-6)


def _sft_batch(rng, b=8, length=16):
    mask = np.zeros((b, length), np.float32)
    for row in range(b):  # completions of very different lengths in each row
        start = rng.integers(1, length - 1)
        mask[row, start:] = 1.0
    return {"inputs": rng.integers(0, 256, (b, length), dtype=np.int32),
            "targets": rng.integers(0, 256, (b, length), dtype=np.int32), "loss_mask": mask,
            "segment_ids": np.ones((b, length), np.int32),
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy()}


def test_sft_gradient_accumulation_equals_one_big_batch(task_shards):
    """The loss is a mean over the completion tokens of the whole global batch, not a mean of micro-batch means."""
    tok, sft, _ = task_shards
    batch = _sft_batch(np.random.default_rng(1))
    out = {}
    for accum in (1, 4):
        # Plain SGD: the update is the gradient itself, so the parameters compare gradients (Adam's first step,
        # lr * g / (|g| + eps), would amplify rounding differences of near-zero gradients).
        cfg = _cfg("sft", tok, sft, **{"train.grad_accum": accum, "data.batch_size": 8, "optimizer.name": "sgd",
                                       "optimizer.momentum": 0.0, "optimizer.weight_decay": 0.0,
                                       "optimizer.clip_norm": 0.0, "optimizer.lr": 1.0})
        parts = Components.from_config(cfg)
        params = parts.model_def.init(jax.random.key(0))
        state = {"params": params, "opt_state": parts.tx.init(params), "step": np.int32(0),
                 "rng": jax.random.key_data(jax.random.key(1))}
        state, metrics = jax.jit(parts.train_step)(state, batch)
        out[accum] = (state, metrics)
    np.testing.assert_allclose(float(out[4][1]["loss"]), float(out[1][1]["loss"]), rtol=1e-6)
    assert float(out[4][1]["weight"]) == batch["loss_mask"].sum()
    np.testing.assert_allclose(float(out[4][1]["grad_norm"]), float(out[1][1]["grad_norm"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(out[1][0]["params"]), jax.tree.leaves(out[4][0]["params"])):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_classification_head_reads_the_last_real_token():
    cfg = dataclasses.replace(ModelConfig.from_config(small_config("llama").model), head="classify", num_labels=3)
    model_def = ModelDef(cfg)
    params = model_def.init(jax.random.key(0))
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 256, (1, 10)).astype(np.int32)
    segments = np.array([[1] * 6 + [0] * 4], np.int32)
    padded = model_def.apply(params, tokens, None, segments)
    changed_padding = tokens.copy()
    changed_padding[0, 6:] = 7
    alone = model_def.apply(params, tokens[:, :6], None, segments[:, :6])
    np.testing.assert_allclose(np.asarray(model_def.apply(params, changed_padding, None, segments)),
                               np.asarray(padded), atol=1e-6)
    np.testing.assert_allclose(np.asarray(alone), np.asarray(padded), atol=2e-6)
    assert padded.shape == (1, 3)


def test_classify_trains_from_a_language_model_with_a_fresh_head_and_reports_metrics(task_shards, tmp_path):
    tok, _, classify = task_shards
    lm_dir = tmp_path / "lm"
    train(small_config("llama", **{"model.vocab_size": 1024, "data.seq_len": 32, "model.max_seq_len": 32,
                                   "data.tokenizer_dir": tok, "data.max_docs": 40, "train.steps": 2,
                                   "train.eval_every": 0, "checkpoint.every": 2}), lm_dir)
    lm_params = {k: np.asarray(v) for k, v in _flat(_params(lm_dir)).items()}
    workdir = tmp_path / "cls"
    cfg = _cfg("classify", tok, classify, **{"train.init_from": str(lm_dir), "train.steps": 2, "optimizer.lr": 1e-30})
    result = train(cfg, workdir)
    labels = json.loads((workdir / "labels.json").read_text())
    assert len(labels) == 6 and result.metrics.keys() >= {"val_accuracy", "val_f1_macro", "val_loss"}
    assert (workdir / "confusion_matrix.png").stat().st_size > 1000
    # Each evaluation logs per-class precision/recall/F1 and the confusion matrix over the validation examples.
    evals = [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert evals and all({f"val_f1/{c}" for c in labels} <= r.keys() for r in evals)
    matrix = np.asarray(evals[-1]["val_confusion_matrix"])
    assert matrix.shape == (6, 6)
    assert np.trace(matrix) / matrix.sum() == pytest.approx(evals[-1]["val_accuracy"])
    for i, c in enumerate(labels):
        if matrix[i].sum():
            assert evals[-1][f"val_recall/{c}"] == pytest.approx(matrix[i, i] / matrix[i].sum())
    tuned = _flat(_params(workdir))
    # The body came from the language model (lr 1e-30 leaves float32 weights as they were); the head is new.
    np.testing.assert_array_equal(np.asarray(tuned["blocks/attn/wq"]), lm_params["blocks/attn/wq"])
    assert tuned["head/score"].shape == (64, 6) and "head/w" not in tuned


def _params(workdir):
    from lmtrain.workdir import restore_params

    return restore_params(workdir)[1]


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _stop_step(workdir):
    return json.loads((workdir / "done.json").read_text())["step"]


def test_early_stopping_survives_a_resume_and_best_follows_the_metric(task_shards, tmp_path):
    """Patience counts evaluations; an interrupted run stops at the same step as a straight one."""
    tok, _, classify = task_shards
    kw = {"train.steps": 40, "train.eval_every": 1, "checkpoint.every": 1, "checkpoint.keep": 1,
          "train.early_stopping.metric": "val_accuracy", "train.early_stopping.patience": 2,
          "train.early_stopping.min_delta": 0.5}  # no accuracy gain of 0.5: stops after the 3rd evaluation
    straight = tmp_path / "straight"
    result = train(_cfg("classify", tok, classify, **kw), straight)
    assert result.stopped_by.startswith("early stopping") and result.step == 3 == _stop_step(straight)
    resumed = tmp_path / "resumed"
    first = train(_cfg("classify", tok, classify, **kw), resumed, stop_at_step=2)
    assert first.step == 2 and first.stopped_by.startswith("--stop-at-step")
    again = train(_cfg("classify", tok, classify, **kw), resumed)
    assert again.step == result.step and again.stopped_by.startswith("early stopping")
    best = select_step(straight, "best")
    accuracies = {r["step"]: r["val_accuracy"] for r in map(json.loads, (straight / "metrics.jsonl").read_text().splitlines())
                  if "val_accuracy" in r}
    assert accuracies[best] == max(accuracies.values())
    assert (straight / "checkpoints" / str(best)).is_dir()  # kept although checkpoint.keep=1


def test_a_task_metric_that_the_task_does_not_report_is_a_clear_error(task_shards):
    tok, sft, _ = task_shards
    from lmtrain.config import ConfigError

    cfg = _cfg("sft", tok, sft, **{"train.early_stopping.metric": "val_accuracy"})
    with pytest.raises(ConfigError, match="val_accuracy.*not a metric of task 'sft'"):
        make_task(cfg).metric_mode("val_accuracy")


def test_sft_trains_and_the_loss_falls(task_shards, tmp_path):
    tok, sft, _ = task_shards
    result = train(_cfg("sft", tok, sft, **{"train.steps": 8, "train.eval_every": 8}), tmp_path / "sft")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert result.step == 8 and losses[-1] < losses[0] and jnp.isfinite(result.metrics["val_loss"])


def test_class_weights_weight_each_example_by_its_class_and_a_zero_weight_removes_a_class(task_shards):
    """task.class_weights: loss = sum(ce * w) / sum(w) with w = weight[label] (and the batch's padding weight);
    weight 0 on a class gives the plain loss over the other classes' examples alone."""
    from lmtrain.data.shards import ShardedTrainIterator

    tok, _, classify = task_shards
    it = ShardedTrainIterator(classify, 32, 16, seed=0, prefetch=0)
    batch = next(it)
    it.close()
    batch["weights"] = batch["weights"].copy()
    batch["weights"][-1] = 0.0  # a filler row, as in an evaluation batch: out of the loss whatever its class
    labels = batch["labels"]
    assert len(set(labels[batch["weights"] > 0].tolist())) >= 3 and (labels[batch["weights"] > 0] == 0).any()
    weights = (0.0, 1.0, 2.5, 0.5, 4.0, 1.5)
    plain = make_task(_cfg("classify", tok, classify))
    weighted = make_task(_cfg("classify", tok, classify, **{"task.class_weights": weights}))
    model_def = ModelDef(plain.model_config())
    params = model_def.init(jax.random.key(3))

    def loss(task, b):
        loss_sum, weight, metrics = task.loss_fn(model_def)(params, b, None)
        return float(loss_sum) / float(weight), float(weight), float(metrics["accuracy"])

    logits = np.asarray(model_def.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"]), np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ce = log_z - logits[np.arange(len(labels)), labels]
    w = batch["weights"] * np.asarray(weights)[labels]
    got, got_weight, got_correct = loss(weighted, batch)
    assert got_weight == pytest.approx(w.sum())
    assert got == pytest.approx(np.sum(ce * w) / np.sum(w), rel=1e-5)
    assert got_correct == pytest.approx(np.sum((logits.argmax(-1) == labels) * w))
    assert abs(got - loss(plain, batch)[0]) > 1e-3  # the weights change the loss

    # Weight 0 on class 0, 1 elsewhere: the same loss as the unweighted one with class 0's examples masked out.
    only_zero = make_task(_cfg("classify", tok, classify, **{"task.class_weights": (0.0, *[1.0] * 5)}))
    masked = {**batch, "weights": batch["weights"] * (labels != 0)}
    np.testing.assert_allclose(loss(only_zero, batch)[:2], loss(plain, masked)[:2], rtol=1e-6)
    assert abs(loss(only_zero, batch)[0] - loss(plain, batch)[0]) > 1e-4


# ----------------------------------------------------------------------------- what a task declares


BUILTIN_FORMATS = {"text", "sft", "chat", "classify", "ner", "pref"}


def test_every_task_declares_its_formats_head_and_lmtrain_eval_scorer():
    declared = {name: task_class(name) for name in TASKS}
    assert {n: c.formats for n, c in declared.items()} == {
        "lm": ("text",), "sft": ("sft", "chat"), "classify": ("classify",), "mlm": ("text",),
        "token_classify": ("ner",), "grpo": ("sft",), "seq2seq": ("sft",), "span_corruption": ("text",),
        "dpo": ("pref",), "orpo": ("pref",), "reward": ("pref",)}
    assert all(set(c.formats) <= BUILTIN_FORMATS for c in declared.values())
    # lmtrain eval: each scorer's head is the head of the task that declares it; the others use the task's eval
    assert (eval_head("lm"), eval_head("sft"), eval_head("classify")) == ("lm", "lm", "classify")
    assert [n for n, c in declared.items() if c.eval_kind is None] == ["mlm", "token_classify", "grpo", "seq2seq",
                                                                       "span_corruption", "dpo", "orpo", "reward"]
    assert [n for n, c in declared.items() if c.generates_text] == ["lm", "sft", "grpo", "dpo", "orpo"]


def test_task_keys_live_with_their_task_and_are_checked_by_it():
    assert base_config().task.to_dict() == {"name": "lm", **task_config_defaults()}
    for key, bad in (("task.mask_prob", 1.5), ("task.eval_generate_examples", -1), ("task.class_weights", (1.0, -1.0)),
                     ("task.noise_density", 1.0), ("task.mean_noise_span_length", 0.5)):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate(small_config("llama", **{key: bad}), 1)


class _ToyOptions(TaskOptions):
    defaults = {"toy_scale": 1.0}

    @classmethod
    def validate(cls, cfg):
        if cfg.task.toy_scale <= 0:
            raise ConfigError(f"task.toy_scale={cfg.task.toy_scale} must be positive.")


class _ToyTask(Task):
    formats = ("text",)
    options = _ToyOptions
    METRIC_MODES = {"val_loss": "min"}


@pytest.fixture
def registry(monkeypatch):
    """The task registry, emptied of plugin tasks for the test and restored after it."""
    monkeypatch.setattr(tasks_lib, "_registered", {})
    return tasks_lib


def test_a_registered_task_brings_its_config_keys_checks_and_name(registry):
    with pytest.raises(ConfigError, match="task.name='toy' is unknown"):
        registry.task_class("toy")
    registry.register_task("toy", _ToyTask)
    assert registry.task_class("toy") is _ToyTask and _ToyTask.name == "toy"
    cfg = base_config()
    assert cfg.task.toy_scale == 1.0
    apply_overrides(cfg, {"task.name": "toy", "task.toy_scale": "2.5"})
    assert make_task(cfg).cfg.task.toy_scale == 2.5
    apply_overrides(cfg, {"task.toy_scale": "0"})
    with pytest.raises(ConfigError, match=r"task\.toy_scale=0\.0 must be positive"):
        validate(cfg, 1)
    with pytest.raises(ValueError, match="registered already"):
        registry.register_task("lm", _ToyTask)
    with pytest.raises(TypeError, match="subclass of lmtrain.tasks.Task"):
        registry.register_task("other", object)
    with pytest.raises(ConfigError, match="task.name='other' is unknown"):
        validate(small_config("llama", **{"task.name": "other"}), 1)


def test_a_task_reads_only_its_formats(registry, tmp_path):
    class ClassifyOnly(_ToyTask):
        formats = ("classify",)

    registry.register_task("classify_only", ClassifyOnly)
    cfg = small_config("llama", **{"task.name": "classify_only"})
    with pytest.raises(ConfigError, match=r"task.name=classify_only .*classify"):
        make_task(cfg).make_data(tmp_path, 0, 1)


class _ReferenceWeightedLM(LanguageModelling):
    """Language modelling that weighs each token by how hard a frozen copy of the initial model found it: the
    reference's per-token cross-entropy is computed by prepare(aux, batch), outside the loss, as DPO's reference
    log-probabilities will be."""

    prepared = 0  # how many times prepare was traced

    def init_aux(self, model_def, start_params):
        self.reference = model_def
        return {"params": start_params}

    def prepare(self, aux, batch):
        type(self).prepared += 1
        logits = self.reference.apply(aux["params"], batch["inputs"], batch["positions"], batch["segment_ids"])
        ce_BxL, _ = cross_entropy_and_log_z(logits, batch["targets"], self.reference.cfg.vocab_size)
        return {**batch, "ref_weight": 1.0 + ce_BxL / jnp.log(float(self.reference.cfg.vocab_size))}

    def loss_fn(self, model_def):
        vocab = model_def.cfg.vocab_size

        def loss_fn(params, batch, rng):
            logits = model_def.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"])
            w_BxL = batch["loss_mask"] * batch["ref_weight"]
            ce_sum, _, _ = token_loss_sums(logits, batch["targets"], w_BxL, vocab)
            return ce_sum, jnp.sum(w_BxL), {"loss": ce_sum}

        return loss_fn

    def eval_step(self, model_def):
        plain = super().eval_step(model_def)

        def eval_step(params, batch):
            return {**plain(params, batch), "ref_weight": jnp.sum(batch["ref_weight"] * batch["loss_mask"])}

        return eval_step


def test_prepare_adds_frozen_reference_state_to_each_batch_and_resume_equals_straight(registry, tmp_path,
                                                                                      tokenizer_dir_512):
    registry.register_task("ref_weighted_lm", _ReferenceWeightedLM)

    def cfg():
        return small_config("llama", **{
            "task.name": "ref_weighted_lm", "model.vocab_size": 512, "data.max_docs": 40,
            "data.tokenizer_dir": tokenizer_dir_512, "optimizer.lr": 3e-3, "train.steps": 4, "train.log_every": 1,
            "train.eval_every": 2, "train.eval_batches": 1, "checkpoint.every": 2, "checkpoint.keep": 1})

    straight = train(cfg(), tmp_path / "straight")
    assert _ReferenceWeightedLM.prepared >= 2  # before the train step and inside the eval step
    train(cfg(), tmp_path / "resumed", stop_at_step=2)
    resumed = train(cfg(), tmp_path / "resumed")
    a, b = _step_losses(tmp_path / "straight"), _step_losses(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(a[s] == b[s] for s in a), (a, b)
    assert straight.metrics["val_loss"] == resumed.metrics["val_loss"]
    assert not list((tmp_path / "resumed" / "checkpoints").rglob("*aux*"))  # rebuilt, never saved


def _step_losses(workdir) -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def tokenizer_dir_512(tmp_path_factory):
    from lmtrain.data.builtin_corpus import builtin_documents
    from lmtrain.data.tokenizer import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("tok512") / "tokenizer"
    train_bpe_tokenizer(builtin_documents(40), 512, out)
    return str(out)
