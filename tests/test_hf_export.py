"""`lmtrain export`: transformers loads the export as it is, with equal logits; importing it gives back the weights."""

import json

import jax
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmtrain.interop import hf_export
from lmtrain.interop.hf_export import export_params, parse_size
from lmtrain.interop.hf_import import load_hf_model
from lmtrain.model import ModelConfig, ModelDef
from lmtrain.train.checkpoint import restore_params
from lmtrain.train.trainer import train
from tests.helpers import small_config
from tests.test_hf_import import VOCAB

TOLERANCE = 1e-4


def _hf_logits(directory, ids, dtype=torch.float32) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def _ids(vocab, batch=2, length=12) -> np.ndarray:
    return np.random.RandomState(1).randint(0, vocab, (batch, length)).astype(np.int32)


def _perturbed_params(cfg: ModelConfig, seed=0) -> dict:
    """Random params with norms and biases away from their defaults, as training would leave them."""
    rs = np.random.RandomState(seed)

    def one(path, s):
        mean = 1.0 if path[-1].key == "scale" else 0.0  # norm scales near 1, weights and biases near 0
        return jax.numpy.asarray(rs.normal(mean, 0.1, s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(one, ModelDef(cfg).shapes)


def _assert_same_weights(imported: dict, original: dict, vocab: int) -> None:
    """Bit-identical on every real row; padding rows of the vocab come back as zeros."""
    for path, a in jax.tree_util.tree_flatten_with_path(imported)[0]:
        name = jax.tree_util.keystr(path)
        a, b = np.asarray(a), np.asarray(_lookup(original, path))
        if name == "['embed']":
            a, b, pad = a[:vocab], b[:vocab], a[vocab:]
            assert not pad.any(), name
        elif name == "['head']['w']":
            a, b, pad = a[:, :vocab], b[:, :vocab], a[:, vocab:]
            assert not pad.any(), name
        assert a.dtype == b.dtype and a.shape == b.shape, name
        np.testing.assert_array_equal(a, b, err_msg=name)


def _lookup(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def test_trained_model_exports_loads_in_transformers_and_imports_back(tmp_path):
    workdir, out = tmp_path / "work", tmp_path / "hf"
    cfg = small_config("llama", **{"model.vocab_size": 512, "data.max_docs": 60, "train.steps": 3,
                                   "train.eval_every": 0, "checkpoint.async_save": False,
                                   "model.rope_scaling": ("llama3", 4.0, 1.0, 4.0, 16), "model.rope_theta": 5e5})
    train(cfg, workdir)
    assert hf_export.main([str(workdir), str(out), "--max-shard-size", "100KB"]) == 0
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file(), name

    _, params = restore_params(workdir, "latest")
    model_cfg = ModelConfig.from_config(cfg.model)
    ids = _ids(512)
    ours = np.asarray(jax.jit(ModelDef(model_cfg).apply)(params, ids))
    assert np.max(np.abs(ours[..., :512] - _hf_logits(out, ids))) <= TOLERANCE

    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.eos_token_id is not None
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tok.eos_token_id
    text = "The quick brown fox."
    assert tok.decode(tok.encode(text)) == text

    imported_cfg, imported = load_hf_model(out)
    assert imported_cfg.rope_scaling == model_cfg.rope_scaling and imported_cfg.rope_theta == model_cfg.rope_theta
    _assert_same_weights(imported, params, 512)


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_export_import_round_trip_with_padded_vocab(tmp_path, family):
    overrides = {"model.vocab_size": VOCAB}
    if family == "qwen2":
        overrides.update({"model.qkv_bias": True, "model.tie_embeddings": True})
    cfg = ModelConfig.from_config(small_config("gpt2" if family == "gpt2" else "llama", **overrides).model)
    params = _perturbed_params(cfg)
    export_params(cfg, params, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == family

    ids = _ids(VOCAB)
    ours = np.asarray(jax.jit(ModelDef(cfg).apply)(params, ids))[..., :VOCAB]
    assert np.max(np.abs(ours - _hf_logits(tmp_path, ids))) <= TOLERANCE
    imported_cfg, imported = load_hf_model(tmp_path)
    assert imported_cfg == cfg
    _assert_same_weights(imported, params, VOCAB)


def test_export_returns_to_the_imported_family_with_its_token_ids(tmp_path):
    cfg = ModelConfig.from_config(small_config("llama", **{"model.vocab_size": VOCAB}).model)
    source = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "bos_token_id": 1, "eos_token_id": 2}
    export_params(cfg, _perturbed_params(cfg), tmp_path, source_config=source,
                  generation_config={"eos_token_id": 2, "temperature": 0.7, "do_sample": True})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"] and config["eos_token_id"] == 2
    assert config["sliding_window"] is None
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    assert generation["temperature"] == 0.7 and generation["bos_token_id"] == 1
    assert type(AutoModelForCausalLM.from_pretrained(str(tmp_path))).__name__ == "MistralForCausalLM"


def test_bfloat16_export_holds_the_rounded_weights(tmp_path):
    cfg = ModelConfig.from_config(small_config("llama", **{"model.vocab_size": VOCAB}).model)
    params = _perturbed_params(cfg)
    export_params(cfg, params, tmp_path, dtype="bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    _, imported = load_hf_model(tmp_path)
    rounded = jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16).astype(x.dtype), params)
    _assert_same_weights(imported, rounded, VOCAB)


def test_shard_size_parsing_and_bad_workdir(tmp_path, capsys):
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("100KB") == 10**5
    assert hf_export.main([str(tmp_path / "nothing"), str(tmp_path / "out")]) == 2
    assert "no config.json" in capsys.readouterr().err
