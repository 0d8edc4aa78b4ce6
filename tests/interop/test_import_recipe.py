"""`lmtrain import` carries an encoder's own recipe (issue 25): its dropout (hidden, attention probabilities,
classifier) becomes config values the model applies in training only, the optimizer settings its authors
fine-tuned with are set and printed, and the next steps it prints are the classification ones."""

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from lmtrain.config import load_config
from lmtrain.interop import hf_import
from lmtrain.model import ModelConfig, ModelDef
from lmtrain.model.attention import _dense_attention, dropout_attention
from lmtrain.tasks.base import dropout_key
from tests.tasks.test_encoder import encoder_config


def _classifier(**changes):
    cfg = dataclasses.replace(ModelConfig.from_config(encoder_config().model), head="classify", num_labels=3, **changes)
    return ModelDef(cfg)


def _batch():
    rs = np.random.RandomState(0)
    segments = (np.arange(16)[None] < np.array([[16], [9], [4]])).astype(np.int32)
    ids = np.where(segments > 0, rs.randint(2, 256, (3, 16)), 0).astype(np.int32)
    positions = np.where(segments > 0, np.arange(16)[None], 0).astype(np.int32)
    return ids, positions, segments


def test_attention_and_classifier_dropout_act_in_training_only_and_zero_changes_nothing():
    plain = _classifier()
    params = plain.init(jax.random.key(0))
    batch, key = _batch(), jax.random.key(7)
    reference = {"hidden": np.asarray(plain.hidden(params, *batch)), "logits": np.asarray(plain.apply(params, *batch))}
    # Rates of 0 (the default, and every config before this): a dropout key changes nothing.
    np.testing.assert_array_equal(np.asarray(plain.apply(params, *batch, key)), reference["logits"])
    assert dropout_key(plain.cfg, key) is None
    # Attention dropout changes the hidden states, classifier dropout only the head's input.
    for rates, where in (({"attention_dropout": 0.3}, "hidden"), ({"classifier_dropout": 0.3}, "logits")):
        model = _classifier(**rates)
        assert dropout_key(model.cfg, key) is key  # the task hands the model a key for either rate alone
        run = model.hidden if where == "hidden" else model.apply
        np.testing.assert_array_equal(np.asarray(run(params, *batch)), reference[where])  # evaluation: no dropout
        trained = np.asarray(run(params, *batch, key))
        # Training: dropped out. Hidden states are O(1) and the written-out attention agrees with the fused one
        # to 1e-5 (the next test), so 1e-3 is dropout, not rounding; the classifier's input is dropped directly.
        floor = 1e-3 if where == "hidden" else 0.05 * np.abs(reference[where]).max()
        assert np.abs(trained - reference[where]).max() > floor, rates
    np.testing.assert_array_equal(np.asarray(_classifier(classifier_dropout=0.3).hidden(params, *batch, key)),
                                  np.asarray(plain.hidden(params, *batch, key)))


@pytest.mark.parametrize("causal", [False, True])
def test_the_written_out_dropout_attention_masks_as_the_fused_one(causal):
    """At a vanishing rate nothing is dropped: the explicit path must then equal the dense kernel, segment masks,
    padding, causality and grouped-query heads included."""
    rs = np.random.RandomState(1)
    q = rs.randn(2, 8, 4, 16).astype(np.float32)
    k, v = rs.randn(2, 8, 2, 16).astype(np.float32), rs.randn(2, 8, 2, 16).astype(np.float32)
    segments = np.array([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 0, 0, 0]], np.int32)
    expected = _dense_attention(q, np.repeat(k, 2, 2), np.repeat(v, 2, 2), segments, causal, "xla")
    got = dropout_attention(q, k, v, segments, causal, 1e-12, jax.random.key(0))
    real = segments > 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(expected)[real], atol=1e-5, rtol=0)
    dropped = dropout_attention(q, k, v, segments, causal, 0.5, jax.random.key(0))
    assert np.abs(np.asarray(dropped)[real] - np.asarray(expected)[real]).max() > 1e-2


def _bert_dir(path, **config):
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64, **config)).save_pretrained(str(path))
    return path


def test_import_carries_bert_dropout_and_recipe_and_prints_the_classification_steps(tmp_path, capsys):
    hf = _bert_dir(tmp_path / "hf", hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.15)
    workdir = tmp_path / "work"
    assert hf_import.main([str(hf), str(workdir)]) == 0
    out = capsys.readouterr().out
    cfg = load_config(str(workdir / "config.json"))
    m, o = cfg.model, cfg.optimizer
    # classifier_dropout None in config.json: the hidden dropout, as BertForSequenceClassification takes it
    assert (m.dropout, m.attention_dropout, m.classifier_dropout) == (0.2, 0.15, 0.2)
    assert (o.lr, o.b2, o.weight_decay, o.schedule) == (3e-5, 0.999, 0.01, "linear")
    assert o.warmup_steps == round(0.06 * cfg.train.steps)
    assert "lr 2e-5 to 5e-5" in out and "6% of the steps" in out
    tokenizer, shards = workdir.resolve() / "tokenizer", workdir.resolve() / "shards"
    assert f"python tools/shard_data.py --input 'data/*.jsonl' --format classify --tokenizer {tokenizer}" in out
    assert f"--config.task.name=classify --config.data.shards_dir={shards}" in out
    assert "Fine-tune on your own text" not in out  # the decoders' plain-text path is not an encoder's first step


def test_a_dropout_rate_of_one_or_more_is_refused_naming_the_key(tmp_path, capsys):
    hf = _bert_dir(tmp_path / "hf", attention_probs_dropout_prob=1.0)
    assert hf_import.main([str(hf), str(tmp_path / "work")]) == 2
    err = capsys.readouterr().err
    assert "attention_probs_dropout_prob" in err and "[0, 1)" in err and "Traceback" not in err


def test_a_decoder_import_keeps_the_base_optimizer_and_plain_text_steps(tmp_path, capsys):
    from tests.interop.test_hf_import import random_hf_model

    random_hf_model("gpt2", tmp_path / "hf")
    assert hf_import.main([str(tmp_path / "hf"), str(tmp_path / "work")]) == 0
    out = capsys.readouterr().out
    cfg = load_config(str(tmp_path / "work" / "config.json"))
    assert cfg.optimizer.schedule == "cosine" and cfg.model.dropout == 0.0
    assert "Fine-tune on your own text" in out and "--format classify" not in out and "recipe" not in out
    assert json.loads((tmp_path / "work" / "hf_config.json").read_text())["model_type"] == "gpt2"
