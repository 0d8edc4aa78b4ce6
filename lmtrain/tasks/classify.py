"""Sequence classification (`task.name='classify'`): text in, one of the run's classes out.

Shards come from tools/shard_data.py --format classify (text and label fields); the class list and its
order are in the manifest and are saved with the run (WORKDIR/labels.json, and every checkpoint's meta).
The model is the transformer with a classification head: for a decoder it reads the last real token, as
Hugging Face's *ForSequenceClassification models do. It starts from a language model's weights (an
imported or pretrained WORKDIR in train.init_from) with a fresh head.

The loss is the example cross-entropy, optionally weighted per class (task.class_weights), divided by
the summed weights of the global batch. Each evaluation sums a confusion matrix on device; accuracy,
macro and per-class precision/recall/F1 come from it, and the last one is drawn as a PNG at the end.
"""

from __future__ import annotations

import base64
import dataclasses
import json

import jax.numpy as jnp
import numpy as np

from lmtrain.data import shards
from lmtrain.data.pipeline import check_labels
from lmtrain.errors import ConfigError
from lmtrain.model import ModelConfig, ModelDef
from lmtrain.paths import as_path
from lmtrain.plots import confusion_matrix_png
from lmtrain.storage.atomic import atomic_write_text
from lmtrain.tasks.base import Task, dropout_key
from lmtrain.tasks.losses import class_cross_entropy
from lmtrain.tasks.options import ClassifyOptions
from lmtrain.tasks.scores import classification_metrics_from_counts

LABELS_FILE = "labels.json"


def read_manifest_labels(shards_dir: str) -> list:
    if not shards_dir:
        raise ConfigError("task.name=classify needs data.source=shards and data.shards_dir made with "
                          "tools/shard_data.py --format classify (or --builtin-task classify for the demo).")
    labels = shards.load_manifest(shards_dir).get("labels")
    if not labels:
        raise ConfigError(f"data.shards_dir={shards_dir} holds no labels: classification needs shards made with "
                          "tools/shard_data.py --format classify from data with text and label fields.")
    return list(labels)


class Classification(Task):
    name = "classify"
    formats = ("classify",)
    head = "classify"
    has_labels = True
    eval_kind = "classify"  # lmtrain eval: accuracy, macro and per-class scores, the confusion matrix
    options = ClassifyOptions  # task.class_weights
    METRIC_MODES = {"val_loss": "min", "val_accuracy": "max", "val_f1_macro": "max",
                    "val_precision_macro": "max", "val_recall_macro": "max"}

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.data.source != "shards":
            raise ConfigError("task.name=classify needs data.source=shards: make them with tools/shard_data.py "
                              "--format classify (or --builtin-task classify for the demo).")
        self.labels = read_manifest_labels(cfg.data.shards_dir)
        self.class_weights = self._class_weights(cfg)

    def _class_weights(self, cfg) -> np.ndarray:
        if cfg.model.num_labels and cfg.model.num_labels != len(self.labels):
            raise ConfigError(f"model.num_labels={cfg.model.num_labels}, but {cfg.data.shards_dir} has "
                              f"{len(self.labels)} classes ({self.labels}). Set model.num_labels=0 to take them from the data.")
        weights = tuple(cfg.task.class_weights)
        if weights and len(weights) != len(self.labels):
            raise ConfigError(f"task.class_weights has {len(weights)} values for {len(self.labels)} classes "
                              f"({self.labels}); give one weight per class, in that order.")
        return np.asarray(weights or [1.0] * len(self.labels), np.float32)

    def model_config(self) -> ModelConfig:
        return dataclasses.replace(super().model_config(), num_labels=len(self.labels))

    def make_data(self, workdir, data_index: int, data_count: int):
        data = super().make_data(workdir, data_index, data_count)
        check_labels(self.labels, data.labels, self.cfg.data.shards_dir)
        workdir = as_path(workdir)
        if data_index == 0 and not (workdir / LABELS_FILE).exists():
            atomic_write_text(workdir / LABELS_FILE, json.dumps(self.labels))  # a JSON list, in class order
        return data

    def loss_fn(self, model_def: ModelDef):
        class_weights = jnp.asarray(self.class_weights)

        def loss_fn(params, batch, rng):
            logits_BxC = model_def.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"],
                                         dropout_key(model_def.cfg, rng))
            w_B = batch["weights"] * class_weights[batch["labels"]]
            ce_B = class_cross_entropy(logits_BxC, batch["labels"])
            correct_B = (jnp.argmax(logits_BxC, -1) == batch["labels"]).astype(jnp.float32)
            return jnp.sum(ce_B * w_B), jnp.sum(w_B), {"accuracy": jnp.sum(correct_B * w_B)}

        return loss_fn

    def eval_step(self, model_def: ModelDef):
        n = len(self.labels)

        def eval_step(params, batch):
            logits_BxC = model_def.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"])
            w_B = batch["weights"]
            ce_B = class_cross_entropy(logits_BxC, batch["labels"])
            pred_B = jnp.argmax(logits_BxC, -1)
            confusion_CxC = jnp.zeros((n, n), jnp.float32).at[batch["labels"], pred_B].add(w_B)
            return {"ce_sum": jnp.sum(ce_B * w_B), "examples": jnp.sum(w_B), "confusion": confusion_CxC}

        return eval_step

    def eval_metrics(self, sums: dict) -> dict:
        if not float(sums.get("examples", 0)):
            return {}
        counts_CxC = np.rint(np.asarray(sums["confusion"])).astype(np.int64)
        scores = classification_metrics_from_counts(counts_CxC, self.labels)
        metrics = {
            "val_loss": float(sums["ce_sum"]) / float(sums["examples"]),
            "val_accuracy": scores["accuracy"],
            "val_precision_macro": scores["precision_macro"],
            "val_recall_macro": scores["recall_macro"],
            "val_f1_macro": scores["f1_macro"],
        }
        for label, s in scores["per_class"].items():  # logged (metrics.jsonl, TensorBoard), not printed
            metrics.update({f"val_{name}/{label}": s[name] for name in ("precision", "recall", "f1")})
        metrics["val_confusion_matrix"] = counts_CxC  # [true, predicted]; in metrics.jsonl as a list of rows
        return metrics

    def write_eval_artifacts(self, sums: dict, workdir) -> list[str]:
        counts = np.rint(np.asarray(sums["confusion"])).astype(np.int64)
        uri = confusion_matrix_png(counts, [str(label) for label in self.labels], "the last validation")
        path = as_path(workdir) / "confusion_matrix.png"
        path.write_bytes(base64.b64decode(uri.split(",", 1)[1]))
        return [str(path)]
