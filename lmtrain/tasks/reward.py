"""Reward modelling (`task.name='reward'`) on preference pairs (--format pref): a score per sequence.

The model is the transformer with the sequence-classification head and one output (model.num_labels=1), read
at each sequence's last token, as Hugging Face's *ForSequenceClassification decoders do. Both sequences of a
pair row go through the transformer once (segment masking keeps them apart); the head reads each one's last
token. The loss is the pairwise Bradley-Terry loss -log sigmoid(score(chosen) - score(rejected)). Start from a
language model's weights (train.init_from) with a fresh head. `lmtrain export` writes a
*ForSequenceClassification with num_labels=1 (WORKDIR/labels.json holds its one label), which TRL reads.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp

from lmtrain.errors import ConfigError
from lmtrain.model import ModelConfig, ModelDef
from lmtrain.model.transformer import HEAD_DROPOUT_STREAM
from lmtrain.paths import as_path
from lmtrain.storage.atomic import atomic_write_text
from lmtrain.tasks.base import dropout_key
from lmtrain.tasks.preference import CHOSEN, REJECTED, PreferenceTask

LABELS_FILE = "labels.json"
REWARD_LABELS = ["LABEL_0"]  # the one output's name, as transformers names a num_labels=1 head


def pair_scores(model_def: ModelDef, params: dict, batch: dict, rng=None):
    """(chosen, rejected) scores [B] of a pair batch: one pass, the head read at each segment's last token."""
    model = model_def.bind(params)
    key = dropout_key(model_def.cfg, rng)
    x_BxLxD = model.hidden(batch["inputs"], batch["positions"], batch["segment_ids"], key)
    head_key = None if key is None else jax.random.fold_in(key, HEAD_DROPOUT_STREAM)
    scores = [model.apply_head(x_BxLxD, (batch["segment_ids"] == s).astype(jnp.int32), head_key)[:, 0]
              for s in (CHOSEN, REJECTED)]
    return scores[0], scores[1]


class RewardModelling(PreferenceTask):
    name = "reward"
    head = "classify"

    def model_config(self) -> ModelConfig:
        cfg = dataclasses.replace(super().model_config(), num_labels=1)
        if cfg.pooling != "last":
            raise ConfigError(f"task.name=reward reads each sequence's last token: model.pooling='{cfg.pooling}' "
                              "cannot score the second sequence of a pair row; set model.pooling=last.")
        return cfg

    def make_data(self, workdir, data_index: int, data_count: int):
        data = super().make_data(workdir, data_index, data_count)
        workdir = as_path(workdir)
        if data_index == 0 and not (workdir / LABELS_FILE).exists():  # export and eval read num_labels=1 from it
            atomic_write_text(workdir / LABELS_FILE, json.dumps(REWARD_LABELS))
        return data

    def pair_terms(self, model_def: ModelDef, params: dict, batch: dict, rng) -> dict:
        chosen_B, rejected_B = pair_scores(model_def, params, batch, rng)
        return {"loss": -jax.nn.log_sigmoid(chosen_B - rejected_B), "chosen_reward": chosen_B,
                "rejected_reward": rejected_B, "chosen_score": jax.lax.stop_gradient(chosen_B),
                "rejected_score": jax.lax.stop_gradient(rejected_B)}
