"""Token classification (`task.name='token_classify'`): a tag per word, e.g. named entities, with an encoder.

Shards come from tools/shard_data.py --format ner (words and one tag per word); the tag set and its
order are in the manifest and are saved with the run (WORKDIR/labels.json), as for classify. Each word's
first token carries its tag; other pieces, special tokens and padding have weight 0. The model is the
transformer with the 'token_classify' head (BertForTokenClassification's classifier), usually an encoder
pretrained with `mlm` in train.init_from, with a fresh head.

The loss is the token cross-entropy (task.class_weights per tag) summed over the tagged tokens and divided
by their summed weights over the global batch. Evaluation sums, on device, a tag confusion matrix (tag
accuracy, macro and per-tag precision/recall/F1) and, for BIO tags (B-X, I-X, O), the entity counts of
seqeval's default mode: an entity is right when its type, start and end all are, and F1 is over entities.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lmtrain.data import shards
from lmtrain.errors import ConfigError
from lmtrain.model import ModelDef
from lmtrain.tasks.base import dropout_key
from lmtrain.tasks.classify import Classification


def class_cross_entropy_per_token(logits_BxLxC, labels_BxL):
    logits = logits_BxLxC.astype(jnp.float32)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels_BxL[..., None], axis=-1)[..., 0]


def bio_scheme(labels: list) -> tuple[np.ndarray, np.ndarray] | None:
    """(kind_C: 0 for O, 1 for B-, 2 for I-; type_C: an entity type id per tag) when every tag is O, B-X or I-X."""
    kinds, types, names = [], [], {}
    for label in map(str, labels):
        if label == "O":
            kinds.append(0)
            types.append(-1)
        elif label[:2] in ("B-", "I-") and len(label) > 2:
            kinds.append(1 if label[0] == "B" else 2)
            types.append(names.setdefault(label[2:], len(names)))
        else:
            return None
    return np.asarray(kinds, np.int32), np.asarray(types, np.int32)


def entities(tags_BxW, valid_BxW, kind_C, type_C):
    """(start_BxW, type_BxW, end_BxW) of BIO entities over word sequences (seqeval's default, lenient mode: an
    I-X that does not continue an X entity starts one)."""
    kind_BxW = jnp.where(valid_BxW, kind_C[tags_BxW], 0)
    type_BxW = jnp.where(kind_BxW > 0, type_C[tags_BxW], -1)
    prev_type = jnp.pad(type_BxW[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    start_BxW = (kind_BxW == 1) | ((kind_BxW == 2) & (prev_type != type_BxW))
    next_kind = jnp.pad(kind_BxW[:, 1:], ((0, 0), (0, 1)))
    next_type = jnp.pad(type_BxW[:, 1:], ((0, 0), (0, 1)), constant_values=-1)
    continues_BxW = (kind_BxW > 0) & (next_kind == 2) & (next_type == type_BxW)
    width = tags_BxW.shape[1]
    slots_W = jnp.arange(width)
    # the end of the entity through each slot: the first slot at or after it that the entity does not pass
    end_BxW = jnp.flip(jax.lax.cummin(jnp.flip(jnp.where(continues_BxW, width, slots_W), 1), axis=1), 1)
    return start_BxW, type_BxW, end_BxW


def entity_counts(labels_BxL, preds_BxL, weights_BxL, kind_C, type_C):
    """(true positives, gold entities, predicted entities), counted over the tagged tokens of each row (the
    words), in order: untagged pieces between two words do not break an entity."""
    valid_BxL = weights_BxL > 0
    order_BxL = jnp.argsort(~valid_BxL, axis=1, stable=True)  # each row's tagged tokens first, in order
    valid_BxW = jnp.take_along_axis(valid_BxL, order_BxL, axis=1)
    gold = entities(jnp.take_along_axis(labels_BxL, order_BxL, axis=1), valid_BxW, kind_C, type_C)
    pred = entities(jnp.take_along_axis(preds_BxL, order_BxL, axis=1), valid_BxW, kind_C, type_C)
    matched = gold[0] & pred[0] & (gold[1] == pred[1]) & (gold[2] == pred[2])
    return jnp.sum(matched), jnp.sum(gold[0]), jnp.sum(pred[0])


class TokenClassification(Classification):
    name = "token_classify"
    formats = ("ner",)
    head = "token_classify"
    eval_kind = None  # lmtrain eval: the generic scoring (its eval_step and eval_metrics)
    METRIC_MODES = {"val_loss": "min", "val_accuracy": "max", "val_f1_macro": "max", "val_precision_macro": "max",
                    "val_recall_macro": "max", "val_entity_f1": "max", "val_entity_precision": "max",
                    "val_entity_recall": "max"}

    def __init__(self, cfg):
        if cfg.data.source != "shards" or not cfg.data.shards_dir:
            raise ConfigError("task.name=token_classify needs data.source=shards and data.shards_dir made with "
                              "tools/shard_data.py --format ner (words and one tag per word).")
        found = shards.example_format(shards.load_manifest(cfg.data.shards_dir))
        if found != "ner":
            raise ConfigError(f"task.name=token_classify needs shards made with tools/shard_data.py --format ner, but "
                              f"data.shards_dir={cfg.data.shards_dir} holds {found} shards.")
        super().__init__(cfg)
        self.bio = bio_scheme(self.labels)

    def loss_fn(self, model_def: ModelDef):
        class_weights = jnp.asarray(self.class_weights)

        def loss_fn(params, batch, rng):
            logits_BxLxC = model_def.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"],
                                           dropout_key(model_def.cfg, rng), batch.get("token_types"))
            w_BxL = batch["weights"] * class_weights[batch["labels"]]
            ce_BxL = class_cross_entropy_per_token(logits_BxLxC, batch["labels"])
            correct_BxL = (jnp.argmax(logits_BxLxC, -1) == batch["labels"]).astype(jnp.float32)
            return jnp.sum(ce_BxL * w_BxL), jnp.sum(w_BxL), {"accuracy": jnp.sum(correct_BxL * w_BxL)}

        return loss_fn

    def eval_step(self, model_def: ModelDef):
        n, bio = len(self.labels), self.bio

        def eval_step(params, batch):
            logits_BxLxC = model_def.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"], None,
                                           batch.get("token_types"))
            labels_BxL, w_BxL = batch["labels"], batch["weights"]
            pred_BxL = jnp.argmax(logits_BxLxC, -1)
            ce_BxL = class_cross_entropy_per_token(logits_BxLxC, labels_BxL)
            confusion_CxC = jnp.zeros((n, n), jnp.float32).at[labels_BxL, pred_BxL].add(w_BxL)
            sums = {"ce_sum": jnp.sum(ce_BxL * w_BxL), "examples": jnp.sum(w_BxL), "confusion": confusion_CxC}
            if bio is not None:
                tp, gold, pred = entity_counts(labels_BxL, pred_BxL, w_BxL, jnp.asarray(bio[0]), jnp.asarray(bio[1]))
                sums.update(entity_tp=tp.astype(jnp.float32), entity_gold=gold.astype(jnp.float32),
                            entity_pred=pred.astype(jnp.float32))
            return sums

        return eval_step

    def eval_metrics(self, sums: dict) -> dict:
        metrics = super().eval_metrics(sums)  # "examples" are the tagged tokens here
        if metrics and "entity_tp" in sums:
            tp, gold, pred = (float(sums[k]) for k in ("entity_tp", "entity_gold", "entity_pred"))
            precision, recall = (tp / pred if pred else 0.0), (tp / gold if gold else 0.0)
            metrics.update(val_entity_precision=precision, val_entity_recall=recall,
                           val_entity_f1=2 * precision * recall / (precision + recall) if precision + recall else 0.0)
        return metrics
