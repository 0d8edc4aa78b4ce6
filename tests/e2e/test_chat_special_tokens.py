"""Chat templates whose turn markers are not tokens of the tokenizer: shard_data warns, --add-special-tokens
adds them (the extended tokenizer is saved beside the shards and named in the manifest), and training from a
checkpoint with the smaller vocabulary grows its embedding and untied head, new rows the mean of the old."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from lmtrain import generate as generate_lib
from lmtrain.config import to_json
from lmtrain.data.shards import (
    check_compatibility,
    decode_record,
    load_manifest,
    split_source,
    training_tokenizer_dir,
)
from lmtrain.data.tokenizer import chat_template_markers
from lmtrain.interop import hf_import
from lmtrain.model import ModelConfig, ModelDef
from lmtrain.train import trainer
from lmtrain.train.checkpoint import load_init_params, save_init_params
from lmtrain.train.state import init_params_fn
from lmtrain.workdir import restore_params, start_params
from tests.data.test_tokenizer_families import FAMILIES
from tests.helpers import small_config
from tools import shard_data

TEMPLATES = Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates"
MARKERS = ["<|im_start|>", "<|im_end|>"]
SEQ_LEN = 128
CONVERSATIONS = [[{"role": "user", "content": f"the cat sat {i}"}, {"role": "assistant", "content": f"on a mat {i}"}]
                 for i in range(6)]


def test_markers_are_read_from_the_template_source():
    assert chat_template_markers((TEMPLATES / "qwen2.jinja").read_text()) == MARKERS
    assert chat_template_markers((TEMPLATES / "llama3.jinja").read_text()) == [
        "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    assert chat_template_markers((TEMPLATES / "mistral_v03.jinja").read_text()) == ["[INST]", "[/INST]"]


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> Path:
    """A Qwen2 tokenizer without <|im_start|>/<|im_end|> in its vocabulary, with Qwen2's chat template."""
    directory = tmp_path_factory.mktemp("qwen") / "tok"
    tok = FAMILIES["qwen2"]()
    tok.chat_template = (TEMPLATES / "qwen2.jinja").read_text()
    tok.save_pretrained(str(directory))
    return directory


def chat_shards(tokenizer: Path, out: Path, *extra: str) -> int:
    records = out.parent / f"{out.name}.jsonl"
    records.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS), encoding="utf-8")
    return shard_data.main(["--input", str(records), "--tokenizer", str(tokenizer), "--output", str(out), "--quiet",
                            "--format", "chat", "--seq-len", str(SEQ_LEN), "--val-fraction", "0", *extra])


def stored_tokens(out, example_format: str = "chat") -> list[list[int]]:
    manifest, source = load_manifest(out), split_source(out, "train")
    return [decode_record(example_format, np.dtype(manifest["token_dtype"]), source[i])[0].tolist() for i in range(len(source))]


def test_split_markers_warn_once_and_add_special_tokens_makes_each_one_id(qwen_dir, tmp_path, capsys):
    base = AutoTokenizer.from_pretrained(str(qwen_dir), local_files_only=True)
    assert chat_shards(qwen_dir, tmp_path / "plain") == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "<|im_start|>, <|im_end|> are not single tokens" in err
    assert "--add-special-tokens auto" in err
    assert load_manifest(tmp_path / "plain")["tokenizer"]["fingerprint"] == load_manifest(tmp_path / "plain")[
        "fingerprint"]["tokenizer_fingerprint"]

    assert chat_shards(qwen_dir, tmp_path / "added", "--add-special-tokens", "auto") == 0
    assert "warning" not in capsys.readouterr().err
    manifest = load_manifest(tmp_path / "added")
    saved = tmp_path / "added" / "tokenizer"
    assert manifest["tokenizer"]["dir"] == str(saved) and manifest["tokenizer"]["added_special_tokens"] == MARKERS
    assert manifest["tokenizer"]["extends"]["dir"] == str(qwen_dir)
    extended = AutoTokenizer.from_pretrained(str(saved), local_files_only=True)
    ids = extended.convert_tokens_to_ids(MARKERS)
    assert ids == [len(base), len(base) + 1] and manifest["vocab_size"] == len(base) + 2
    assert manifest["examples"]["truncated"] == 0
    for tokens, messages in zip(stored_tokens(tmp_path / "added"), CONVERSATIONS, strict=True):
        text = extended.apply_chat_template(messages, tokenize=False)
        assert tokens == extended(text, add_special_tokens=False)["input_ids"]
        assert tokens.count(ids[0]) == text.count(MARKERS[0]) == 3 and tokens.count(ids[1]) == 3


def test_auto_needs_a_chat_template(qwen_dir, tmp_path, capsys):
    records = tmp_path / "d.jsonl"
    records.write_text(json.dumps({"text": "the cat sat on a mat and then it ran"}) + "\n", encoding="utf-8")
    code = shard_data.main(["--input", str(records), "--tokenizer", str(qwen_dir), "--output", str(tmp_path / "o"),
                            "--quiet", "--add-special-tokens", "auto"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--format chat" in err


@pytest.mark.slow
def test_training_from_a_smaller_vocabulary_grows_the_embedding_and_head_with_the_mean_row(qwen_dir, tmp_path, capsys):
    """`lmtrain import` of a Qwen2 model whose vocabulary is the tokenizer's, chat shards with the markers added
    (2 more tokens), then training from the imported WORKDIR: at step 0 (one step at a learning rate far below
    float32's resolution) the old rows are the model's and each new row is the mean of the old rows."""
    vocab = len(AutoTokenizer.from_pretrained(str(qwen_dir), local_files_only=True))
    hf_dir, imported, run = tmp_path / "hf", tmp_path / "imported", tmp_path / "run"
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                         tie_word_embeddings=False))
    model.save_pretrained(str(hf_dir))
    AutoTokenizer.from_pretrained(str(qwen_dir), local_files_only=True).save_pretrained(str(hf_dir))
    assert hf_import.main([str(hf_dir), str(imported)]) == 0
    assert chat_shards(imported / "tokenizer", tmp_path / "shards", "--add-special-tokens", "auto") == 0
    capsys.readouterr()
    overrides = {"data.shards_dir": tmp_path / "shards", "task.name": "sft", "model.vocab_size": vocab + 2,
                 "model.vocab_pad_multiple": 1,  # the embedding's shape changes too: (vocab padded to 128) -> vocab+2
                 "data.seq_len": SEQ_LEN, "train.steps": 1, "optimizer.lr": 1e-30, "optimizer.warmup_steps": 0,
                 "data.batch_size": 8, "train.sample_tokens": 0, "train.eval_every": 0,
                 "logging.tensorboard": "false", "logging.loss_curve_png": "false"}
    assert trainer.main(["--config", str(imported / "config.json"), "--workdir", str(run), "--no-progress",
                         *(f"--config.{k}={v}" for k, v in overrides.items())]) == 0
    assert f"lmtrain: data.tokenizer_dir={tmp_path / 'shards' / 'tokenizer'}: " in capsys.readouterr().out
    cfg, params = restore_params(run)
    assert cfg.data.tokenizer_dir == str(tmp_path / "shards" / "tokenizer")  # export/generate find the extended one
    embed = model.model.embed_tokens.weight.detach().numpy()
    head = model.lm_head.weight.detach().numpy()  # [vocab, d]; lmtrain's head is [d, vocab]
    ours_embed, ours_head = np.asarray(jax.device_get(params["embed"])), np.asarray(jax.device_get(params["head"]["w"])).T
    for ours, theirs in ((ours_embed, embed), (ours_head, head)):
        assert ours.shape == (vocab + 2, 32)
        np.testing.assert_array_equal(ours[:vocab], theirs)
        mean = theirs.astype(np.float32).mean(axis=0)
        np.testing.assert_allclose(ours[vocab:], np.stack([mean, mean]), rtol=1e-6, atol=1e-7)


def test_an_extended_tokenizer_travels_with_gcs_shards_and_training_finds_it(qwen_dir, fake_gcs, tmp_path,
                                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    records = tmp_path / "d.jsonl"
    records.write_text("".join(json.dumps({"text": f"the cat sat on a mat {i} <|x|> and ran"}) + "\n"
                               for i in range(5)), encoding="utf-8")
    shards_uri = f"{fake_gcs.url}/shards"
    assert shard_data.main(["--input", str(records), "--tokenizer", str(qwen_dir), "--output", shards_uri, "--quiet",
                            "--workers", "1", "--val-fraction", "0", "--add-special-tokens", "<|x|>"]) == 0
    names = fake_gcs.object_names()
    assert "shards/tokenizer/tokenizer.json" in names and "shards/manifest.json" in names
    assert training_tokenizer_dir(shards_uri, str(qwen_dir)) == f"{shards_uri}/tokenizer"
    assert training_tokenizer_dir(shards_uri, "") == f"{shards_uri}/tokenizer"
    vocab = len(AutoTokenizer.from_pretrained(str(qwen_dir), local_files_only=True)) + 1
    check_compatibility(shards_uri, f"{shards_uri}/tokenizer", vocab)
    x_id = vocab - 1
    assert all(tokens.count(x_id) == 1 for tokens in stored_tokens(shards_uri, "text"))



def test_a_vocabulary_grown_inside_the_padding_also_gets_the_mean_rows(tmp_path):
    """vocab 200 -> 203 keeps the padded shape (256 rows): the stored padding rows 200..202 become the mean
    of rows 0..199 (embedding and untied head), and the rows past the vocabulary are zero."""
    source_cfg = small_config("llama", **{"model.vocab_size": 200})
    params = jax.device_get(init_params_fn(ModelDef(ModelConfig.from_config(source_cfg.model)), 0)())
    save_init_params(str(tmp_path), params)
    (tmp_path / "config.json").write_text(to_json(source_cfg))
    model_def = ModelDef(ModelConfig.from_config(small_config("llama", **{"model.vocab_size": 203}).model))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), model_def.shapes)
    loaded, fresh, _ = load_init_params(str(tmp_path / "init_params"), target, vocab_size=203,
                                        logical_axes=model_def.logical_axes)
    assert not fresh
    for ours, theirs in ((loaded["embed"], params["embed"]), (loaded["head"]["w"].T, params["head"]["w"].T)):
        ours, theirs = np.asarray(ours), np.asarray(theirs)
        assert ours.shape == theirs.shape == (256, 64)
        np.testing.assert_array_equal(ours[:200], theirs[:200])
        np.testing.assert_allclose(ours[200:203], np.stack([theirs[:200].mean(axis=0)] * 3), rtol=1e-6, atol=1e-7)
        assert not ours[203:].any()
    np.testing.assert_array_equal(np.asarray(loaded["final_norm"]["scale"]), params["final_norm"]["scale"])


def test_generate_and_eval_start_from_a_smaller_vocabulary_with_the_mean_rows(tmp_path):
    """A WORKDIR with no checkpoint yet whose train.init_from has a smaller vocabulary (vocab 200 -> 203, a
    tokenizer grown by --add-special-tokens): `lmtrain generate`'s parameters and `lmtrain eval --which start`'s
    grow the embedding as training does (they used to keep the source's stored padding rows)."""
    source_cfg = small_config("llama", **{"model.vocab_size": 200})
    params = jax.device_get(init_params_fn(ModelDef(ModelConfig.from_config(source_cfg.model)), 0)())
    save_init_params(str(tmp_path / "src"), params)
    (tmp_path / "src" / "config.json").write_text(to_json(source_cfg))
    work = tmp_path / "work"
    work.mkdir()
    cfg = small_config("llama", **{"model.vocab_size": 203, "train.init_from": str(tmp_path / "src" / "init_params")})
    (work / "config.json").write_text(to_json(cfg))
    model_def, generate_params, _ = generate_lib.load_model(work)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), model_def.shapes)
    mean = params["embed"][:200].mean(axis=0)
    for loaded in (generate_params, start_params(cfg, model_def, target)):
        embed = np.asarray(jax.device_get(loaded["embed"]))
        np.testing.assert_array_equal(embed[:200], params["embed"][:200])
        np.testing.assert_allclose(embed[200:203], np.stack([mean] * 3), rtol=1e-6, atol=1e-7)
