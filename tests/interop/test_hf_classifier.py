"""Sequence classifiers both ways: GPT-2, Llama, Mistral and Qwen2 *ForSequenceClassification import with logits
equal to transformers', and lmtrain's 'classify' head exports to them with id2label/label2id.

Reference models are small random transformers classifiers built from their config classes (no hub), with every
weight perturbed; batches are right-padded so that the pooled token differs between rows.
"""

import json

import jax
import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForSequenceClassification,
    Qwen2Config,
    Qwen2ForSequenceClassification,
)

from lmtrain.config import load_config
from lmtrain.interop import hf_import
from lmtrain.interop.families import HFInteropError
from lmtrain.interop.hf_export import export_params
from lmtrain.interop.hf_import import load_hf_model, read_hf_labels
from lmtrain.model import ModelConfig, ModelDef
from tests.helpers import small_config

VOCAB, PAD = 99, 0
TOLERANCE = 1e-4
LABELS = ["negative", "neutral", "positive"]
_LABEL_KW = dict(num_labels=3, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)},
                 pad_token_id=PAD)

HF_CLASSIFIERS = {
    "gpt2": lambda: GPT2ForSequenceClassification(
        GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, **_LABEL_KW)),
    "llama": lambda: LlamaForSequenceClassification(
        LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, **_LABEL_KW)),
    "mistral": lambda: MistralForSequenceClassification(
        MistralConfig(vocab_size=VOCAB, hidden_size=48, head_dim=16, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, sliding_window=None,
                      **_LABEL_KW)),
    "qwen2": lambda: Qwen2ForSequenceClassification(
        Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, **_LABEL_KW)),
}


def random_hf_classifier(name: str, directory, seed: int = 0):
    torch.manual_seed(seed)
    model = HF_CLASSIFIERS[name]().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(directory))
    return model


def padded_batch(lengths=(16, 11, 5, 1), length=16, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded token ids (real tokens never the pad id) and lmtrain segment ids (0 on padding)."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(1, VOCAB, (len(lengths), length)).astype(np.int32)
    segments = (np.arange(length)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    return np.where(segments > 0, ids, PAD).astype(np.int32), segments


def lmtrain_class_logits(cfg: ModelConfig, params: dict, ids, segments) -> np.ndarray:
    return np.asarray(jax.jit(ModelDef(cfg).apply)(params, ids, None, segments))


def hf_class_logits(model, ids, segments) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(segments))
    return out.logits.float().numpy()


def _perturbed_params(cfg: ModelConfig, seed=0) -> dict:
    rs = np.random.RandomState(seed)

    def one(path, s):
        mean = 1.0 if path[-1].key == "scale" else 0.0
        return jax.numpy.asarray(rs.normal(mean, 0.1, s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(one, ModelDef(cfg).shapes)


@pytest.mark.parametrize("name", list(HF_CLASSIFIERS))
def test_imported_classifier_logits_equal_transformers(tmp_path, name):
    model = random_hf_classifier(name, tmp_path)
    cfg, params = load_hf_model(tmp_path)
    assert cfg.head == "classify" and cfg.num_labels == 3
    assert read_hf_labels(tmp_path) == LABELS
    ids, segments = padded_batch()
    ours = lmtrain_class_logits(cfg, params, ids, segments)
    theirs = hf_class_logits(model, ids, segments)
    assert ours.shape == theirs.shape == (4, 3)
    assert np.max(np.abs(ours - theirs)) <= TOLERANCE
    assert len(set(np.argmax(theirs, -1))) > 1 or np.ptp(theirs) > 0.1, "the reference must not be degenerate"


CLASSIFY_MODELS = {  # name: (tests.helpers.small_config family, overrides, the HF class it exports to)
    "gpt2": ("gpt2", {}, "GPT2ForSequenceClassification"),
    "llama": ("llama", {}, "LlamaForSequenceClassification"),
    "mistral": ("llama", {}, "MistralForSequenceClassification"),
    "qwen2": ("llama", {"model.qkv_bias": True}, "Qwen2ForSequenceClassification"),
}


@pytest.mark.parametrize("name", list(CLASSIFY_MODELS))
def test_classify_head_exports_to_transformers_with_labels_and_imports_back(tmp_path, name):
    family, overrides, architecture = CLASSIFY_MODELS[name]
    base = ModelConfig.from_config(small_config(family, **{"model.vocab_size": VOCAB, **overrides}).model)
    cfg = ModelConfig(**{**base.__dict__, "head": "classify", "num_labels": 3})
    params = _perturbed_params(cfg)
    assert set(params["head"]) == {"score"}
    export_params(cfg, params, tmp_path / "out", labels=LABELS, source_config={"model_type": name, "pad_token_id": PAD})

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == [architecture] and config["pad_token_id"] == PAD
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert config["label2id"] == {"negative": 0, "neutral": 1, "positive": 2}
    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "out")).eval()
    assert type(model).__name__ == architecture and model.config.id2label[2] == "positive"

    ids, segments = padded_batch(seed=1)
    ours = lmtrain_class_logits(cfg, params, ids, segments)
    assert np.max(np.abs(ours - hf_class_logits(model, ids, segments))) <= TOLERANCE

    imported_cfg, imported = load_hf_model(tmp_path / "out")
    assert imported_cfg.head == "classify" and imported_cfg.num_labels == 3
    assert read_hf_labels(tmp_path / "out") == LABELS
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(imported)[0], jax.tree.leaves(params), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if jax.tree_util.keystr(path) == "['embed']":  # padding rows of the vocab come back as zeros
            a, b = a[:VOCAB], b[:VOCAB]
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_wrong_labels_are_refused(tmp_path):
    base = ModelConfig.from_config(small_config("llama", **{"model.vocab_size": VOCAB}).model)
    cfg = ModelConfig(**{**base.__dict__, "head": "classify", "num_labels": 3})
    for labels in (["a", "b"], ["a", "a", "b"]):
        with pytest.raises(HFInteropError, match="one distinct name per class"):
            export_params(cfg, _perturbed_params(cfg), tmp_path / "out", labels=labels)
    assert not (tmp_path / "out").exists()


def test_bad_id2label_is_named(tmp_path, capsys):
    random_hf_classifier("llama", tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    config = json.loads(path.read_text())
    config["id2label"] = {"0": "a", "2": "b"}
    path.write_text(json.dumps(config))
    assert hf_import.main([str(tmp_path / "hf"), str(tmp_path / "work")]) == 2
    err = capsys.readouterr().err
    assert f"{path}: field 'id2label'" in err and "class ids 0 to num_labels-1" in err


def test_import_of_a_classifier_writes_a_classify_workdir(tmp_path, capsys):
    from lmtrain.train.checkpoint import load_init_params

    random_hf_classifier("qwen2", tmp_path / "hf")
    workdir = tmp_path / "work"
    assert hf_import.main([str(tmp_path / "hf"), str(workdir)]) == 0
    assert "sequence classifier over 3 classes (negative, neutral, positive" in capsys.readouterr().out
    cfg = load_config(str(workdir / "config.json"))
    assert cfg.task.name == "classify" and cfg.model.num_labels == 3
    assert json.loads((workdir / "labels.json").read_text()) == LABELS

    model_cfg = ModelConfig(**{**ModelConfig.from_config(cfg.model).__dict__, "head": "classify"})
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), ModelDef(model_cfg).shapes)
    restored, fresh, unused = load_init_params(cfg.train.init_from, target)
    assert fresh == [] and unused == []
    _, direct = load_hf_model(tmp_path / "hf")
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(direct), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
