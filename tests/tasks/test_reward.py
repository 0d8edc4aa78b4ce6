"""reward: the pairwise Bradley-Terry loss, one transformer pass scoring both sequences of a pair row, and a
trained reward model that exports as a *ForSequenceClassification with num_labels=1 whose logits equal ours."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

from lmtrain.data.formats.pref import pair_batch
from lmtrain.interop.hf_export import export_params, export_workdir
from lmtrain.model import ModelDef
from lmtrain.tasks import make_task
from lmtrain.tasks.reward import REWARD_LABELS, pair_scores
from lmtrain.train.trainer import train
from lmtrain.workdir import restore_params, workdir_model_config
from tests.helpers import small_config
from tests.interop.test_hf_export import _perturbed_params
from tests.interop.test_hf_import import VOCAB
from tests.tasks.test_dpo import SEQ, _dpo_cfg, _pairs, pref_shards  # noqa: F401


def test_both_scores_of_a_pair_row_equal_each_sequence_scored_alone():
    cfg = small_config("llama", **{"task.name": "reward"})
    model_def = ModelDef(make_task(cfg).model_config())
    assert model_def.cfg.head == "classify" and model_def.cfg.num_labels == 1
    params = model_def.init(jax.random.key(0))
    pairs = _pairs(cfg.model.vocab_size, n=3)
    batch = pair_batch(pairs, cfg.model.max_seq_len, 4)
    chosen, rejected = jax.jit(lambda p, b: pair_scores(model_def, p, b))(params, batch)
    alone = pair_batch([{"tokens": seq, "weights": np.zeros(len(seq)), "chosen_len": len(seq)}
                        for pair in pairs for seq in pair["_seqs"]], cfg.model.max_seq_len, 6)  # one per row
    scores = jax.jit(model_def.apply)(params, alone["inputs"], alone["positions"], alone["segment_ids"])[:, 0]
    ours = np.stack([np.asarray(chosen[:3]), np.asarray(rejected[:3])], 1).reshape(-1)
    np.testing.assert_allclose(ours, np.asarray(scores), rtol=1e-5, atol=1e-6)
    task = make_task(cfg)
    loss_sum, weight, sums = task.loss_fn(model_def)(params, batch, None)
    expected = np.sum(np.log1p(np.exp(-(np.asarray(chosen[:3]) - np.asarray(rejected[:3])))))  # Bradley-Terry
    assert float(weight) == 3 and abs(float(loss_sum) - expected) < 1e-5
    assert float(sums["reward_accuracy"]) == float(np.sum(np.asarray(chosen[:3]) > np.asarray(rejected[:3])))


def test_a_reward_head_exports_with_one_label_and_equal_logits(tmp_path):
    cfg = small_config("llama", **{"task.name": "reward", "model.vocab_size": VOCAB})
    model_cfg = make_task(cfg).model_config()
    params = _perturbed_params(model_cfg)
    export_params(model_cfg, params, tmp_path, labels=REWARD_LABELS)
    _assert_transformers_scores_equal(ModelDef(model_cfg), params, tmp_path, VOCAB)


def _assert_transformers_scores_equal(model_def, params, hf_dir, vocab):
    hf_config = AutoConfig.from_pretrained(str(hf_dir))
    assert hf_config.num_labels == 1 and hf_config.architectures[0].endswith("ForSequenceClassification")
    hf = AutoModelForSequenceClassification.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ids = np.random.RandomState(0).randint(1, vocab, (3, 12)).astype(np.int32)
    if hf_config.pad_token_id is not None:  # transformers reads the last token that is not the pad token
        ids[ids == hf_config.pad_token_id] = hf_config.pad_token_id % (vocab - 1) + 1
    ours = np.asarray(model_def.apply(params, ids, np.broadcast_to(np.arange(12), ids.shape), np.ones_like(ids)))
    with torch.no_grad():  # a row at a time: without a pad token transformers takes no batch
        theirs = np.concatenate([hf(torch.tensor(row[None], dtype=torch.long)).logits.numpy() for row in ids])
    assert theirs.shape == (3, 1) and np.max(np.abs(ours - theirs)) <= 1e-4


@pytest.mark.heavy  # ~50 s on 2 cores: a short run and its export; the test above covers the export in the default run
def test_reward_model_trains_and_exports_with_one_label_and_equal_logits(pref_shards, tmp_path):  # noqa: F811
    cfg = _dpo_cfg(pref_shards, **{"task.name": "reward", "train.steps": 2, "train.eval_every": 2,
                                   "optimizer.lr": 1e-2})
    result = train(cfg, tmp_path / "run")
    assert {"val_loss", "val_reward_accuracy", "val_margin", "val_chosen_score", "val_rejected_score"} <= set(
        result.metrics)
    assert json.loads((tmp_path / "run" / "labels.json").read_text()) == ["LABEL_0"]
    export_workdir(tmp_path / "run", tmp_path / "hf")
    run_cfg, params = restore_params(tmp_path / "run")
    _assert_transformers_scores_equal(ModelDef(workdir_model_config(run_cfg, tmp_path / "run")), params,
                                      tmp_path / "hf", 512)
