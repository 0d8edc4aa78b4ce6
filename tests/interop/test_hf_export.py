"""`lmtrain export`: transformers loads the export as it is, with equal logits; importing it gives back the weights."""

import json

import jax
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmtrain.interop import hf_export
from lmtrain.interop.families import HFInteropError
from lmtrain.interop.hf_export import export_params, parse_size
from lmtrain.interop.hf_import import load_hf_model
from lmtrain.model import ModelConfig, ModelDef
from lmtrain.train.trainer import train
from lmtrain.workdir import restore_params
from tests.data.test_tokenizer_families import remote_code_tokenizer
from tests.helpers import small_config
from tests.interop.test_hf_import import VOCAB

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


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_the_training_chat_template_and_end_of_turn_eos_are_exported(tmp_path):
    """The template the model was trained with becomes the export's (tokenizer_config.json's chat_template, which
    apply_chat_template uses), over one the tokenizer had; generation_config.json stops at <|im_end|> and EOS."""
    from tests.interop.test_hf_import import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = "{{ 'not the template the model was trained with' }}"
    tok.save_pretrained(str(tmp_path / "tok"))
    cfg = ModelConfig.from_config(small_config("llama", **{"model.vocab_size": VOCAB}).model)
    out = tmp_path / "hf"
    export_params(cfg, _perturbed_params(cfg), out, tokenizer_dir=tmp_path / "tok", chat_template=CHATML)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHATML
    exported = AutoTokenizer.from_pretrained(str(out))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert exported.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n")
    im_end = exported.convert_tokens_to_ids("<|im_end|>")
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [exported.eos_token_id, im_end] and im_end != exported.eos_token_id

    plain = tmp_path / "plain"  # no chat template anywhere: one EOS id, as before
    export_params(cfg, _perturbed_params(cfg), plain, tokenizer_dir=tmp_path / "tok")
    assert json.loads((plain / "generation_config.json").read_text())["eos_token_id"] == exported.eos_token_id


@pytest.mark.slow
def test_export_says_which_step_and_metric_and_takes_the_runs_chat_template(tmp_path, capsys):
    workdir = tmp_path / "work"
    cfg = small_config("llama", **{"model.vocab_size": 512, "data.max_docs": 60, "train.steps": 4, "train.eval_every": 2,
                                   "train.eval_batches": 1, "checkpoint.every": 2, "checkpoint.async_save": False})
    train(cfg, workdir)
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["val_loss"], r["step"]) for r in logged if "val_loss" in r]
    best_loss, best_step = min(evals)
    assert hf_export.main([str(workdir), str(tmp_path / "best"), "--which", "best"]) == 0
    assert f"exported step {best_step} (best by val_loss={best_loss:.4g}) of {workdir}" in capsys.readouterr().out
    assert hf_export.main([str(workdir), str(tmp_path / "two"), "--which", "2"]) == 0
    assert "exported step 2 of" in capsys.readouterr().out

    # a run on chat shards: the template its manifest records is the export's
    shards = tmp_path / "chat_shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"fingerprint": {"chat_template": CHATML}}))
    config = json.loads((workdir / "config.json").read_text())
    config["data"]["shards_dir"] = str(shards)
    (workdir / "config.json").write_text(json.dumps(config))
    assert hf_export.main([str(workdir), str(tmp_path / "chat")]) == 0
    assert "exported step 4 (latest) of" in capsys.readouterr().out
    assert json.loads((tmp_path / "chat" / "tokenizer_config.json").read_text())["chat_template"] == CHATML


def test_export_help_says_what_best_means(capsys):
    with pytest.raises(SystemExit):
        hf_export.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "lowest validation loss" not in help_text
    assert "train.early_stopping.metric" in help_text and "val_accuracy" in help_text


def test_a_tokenizer_that_needs_its_own_code_is_refused_and_never_runs(tmp_path, capsys):
    """export loads the tokenizer through lmtrain's one loader: a directory asking for its own tokenization code is
    an HFInteropError (one line from `lmtrain export`) naming it, and the code never runs (export used to fall back
    to its tokenizer.json and ship it)."""
    marker = tmp_path / "MARKER"
    directory = remote_code_tokenizer(tmp_path / "custom", marker)
    cfg = ModelConfig.from_config(small_config("llama", **{"model.vocab_size": VOCAB}).model)
    with pytest.raises(HFInteropError, match=rf"^tokenizer directory {directory} needs its own Python code"):
        export_params(cfg, _perturbed_params(cfg), tmp_path / "hf", tokenizer_dir=directory)
    assert not marker.exists()
