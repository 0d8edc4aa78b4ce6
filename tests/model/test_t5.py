"""The T5 encoder-decoder against transformers' T5ForConditionalGeneration, built locally from tiny random configs
(no hub): T5 v1.0 (ReLU, tied head scaled by d_model**-0.5) and v1.1 (gated-GELU, untied, unscaled). Weights go
through the family's rules both ways; the encoder output, teacher-forced logits and greedy generation must match,
and the parameters must shard on a (data, fsdp, tensor) mesh of the 8 fake CPU devices with equal results."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec
from safetensors.numpy import save_file
from transformers import T5Config as HFT5Config
from transformers import T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Attention as HFT5Attention

from lmtrain.config import DEFAULT_AXIS_RULES
from lmtrain.errors import ConfigError
from lmtrain.interop.families import HFInteropError
from lmtrain.interop.families import t5 as t5_family
from lmtrain.model.adapters import merged_params
from lmtrain.model.encdec import T5Config, T5ModelDef, generate_greedy, pad_inputs
from lmtrain.model.encdec.generate import cross_keys_values
from lmtrain.model.encdec.layers import relative_position_bucket
from lmtrain.parallel.mesh import make_mesh
from lmtrain.parallel.partitioning import axis_rules, param_shardings

VOCAB = 96  # not a multiple of 128: the padded vocab rows are exercised
VERSIONS = {
    # T5 v1.0: ReLU feed-forward, head tied to the shared embedding, decoder output scaled by d_model**-0.5
    "v1.0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
    # T5 v1.1 / Flan-T5: gated-GELU, untied head, no scaling; decoder deeper than the encoder
    "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_decoder_layers=3),
}
# Inputs of different lengths; 8 buckets up to distance 16 put some pairs in the logarithmic buckets.
INPUT_LENGTHS = (13, 5, 20)


def _hf_model(version: str) -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = HFT5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                        decoder_start_token_id=0, **VERSIONS[version])
    model = T5ForConditionalGeneration(config)
    if not config.scale_decoder_outputs:
        # transformers 5 builds every T5 with a tied head and unties it only when loading a checkpoint whose
        # lm_head differs from the embedding: give the v1.1 model a head of its own, as its checkpoints have.
        model.lm_head = torch.nn.Linear(32, VOCAB, bias=False)
        torch.nn.init.normal_(model.lm_head.weight)
    return model.eval()


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module", params=list(VERSIONS))
def converted(request):
    """(version, HF model, our T5Config, our params) with the weights converted by the family's rules."""
    hf = _hf_model(request.param)
    state = _state(hf)
    cfg, _ = t5_family.config_from_hf(hf.config.to_dict(), state)
    return request.param, hf, cfg, t5_family.params_from_hf(state, cfg)


def _inputs(seed=0, lengths=INPUT_LENGTHS, target_len=9):
    rng = np.random.default_rng(seed)
    rows = [rng.integers(2, VOCAB, n).tolist() for n in lengths]
    tokens_BxS, mask_BxS = pad_inputs(rows, pad_id=0)
    dec_BxT = np.concatenate([np.zeros((len(rows), 1), np.int32),
                              rng.integers(2, VOCAB, (len(rows), target_len - 1), dtype=np.int32)], axis=1)
    return tokens_BxS, mask_BxS, dec_BxT


def _hf_forward(hf, tokens_BxS, mask_BxS, dec_BxT):
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(tokens_BxS, dtype=torch.long), attention_mask=torch.tensor(mask_BxS).long(),
                 decoder_input_ids=torch.tensor(dec_BxT, dtype=torch.long))
    return out.encoder_last_hidden_state.numpy(), out.logits.numpy()


def test_relative_position_buckets_equal_transformers():
    rel = np.arange(-300, 300)
    for buckets, distance in [(32, 128), (8, 16), (16, 64), (6, 20)]:
        for bidirectional in (True, False):
            want = HFT5Attention._relative_position_bucket(torch.tensor(rel), bidirectional, buckets, distance).numpy()
            got = np.asarray(relative_position_bucket(rel, bidirectional, buckets, distance))
            np.testing.assert_array_equal(got, want, err_msg=f"{buckets} buckets, {distance}, {bidirectional}")


def test_config_reads_tying_and_scaling_like_transformers(converted):
    version, hf, cfg, params = converted
    assert cfg.mlp == hf.config.feed_forward_proj
    assert cfg.scale_decoder_outputs == (version == "v1.0")
    assert cfg.tie_embeddings == (version == "v1.0")
    assert ("head" in params) == (version == "v1.1")
    assert cfg.decoder_layers == hf.config.num_decoder_layers and cfg.head_dim == 8


def test_encoder_output_and_decoder_logits_equal_transformers(converted):
    _, hf, cfg, params = converted
    tokens_BxS, mask_BxS, dec_BxT = _inputs()
    want_enc, want_logits = _hf_forward(hf, tokens_BxS, mask_BxS, dec_BxT)
    model_def = T5ModelDef(cfg)
    enc = np.asarray(jax.jit(model_def.encode)(params, tokens_BxS, mask_BxS))
    np.testing.assert_allclose(enc, want_enc, atol=1e-4, rtol=0)
    logits = np.asarray(jax.jit(model_def.apply)(params, tokens_BxS, mask_BxS, dec_BxT))
    assert logits.shape == (*dec_BxT.shape, cfg.padded_vocab)
    np.testing.assert_allclose(logits[..., :VOCAB], want_logits, atol=1e-4, rtol=0)


def _hf_generate(hf, tokens_BxS, mask_BxS, max_new: int, **kwargs) -> np.ndarray:
    # transformers 5.25 sizes generate()'s cache by the encoder's num_layers and fails on a deeper decoder: that
    # model decodes without its cache (the same greedy tokens, recomputed)
    kwargs.setdefault("use_cache", hf.config.num_decoder_layers == hf.config.num_layers)
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(tokens_BxS, dtype=torch.long),
                          attention_mask=torch.tensor(mask_BxS).long(), max_new_tokens=max_new, num_beams=1,
                          do_sample=False, **kwargs).numpy()
    assert (out[:, 0] == hf.config.decoder_start_token_id).all()
    # transformers stops when every row has ended; after its EOS a row holds padding, as ours does
    return np.pad(out[:, 1:], ((0, 0), (0, max_new - out.shape[1] + 1)), constant_values=hf.config.pad_token_id)


def test_greedy_generation_equals_transformers_on_a_padded_batch(converted):
    _, hf, cfg, params = converted
    tokens_BxS, mask_BxS, _ = _inputs(seed=1)
    max_new = 12
    ours = generate_greedy(T5ModelDef(cfg), params, tokens_BxS, mask_BxS, max_new)
    np.testing.assert_array_equal(ours, _hf_generate(hf, tokens_BxS, mask_BxS, max_new))
    # an EOS that one row reaches early: that row ends (then pads) while the others go on
    eos = int(ours[0, 3])
    stopped = generate_greedy(T5ModelDef(dataclasses.replace(cfg, eos_id=eos)), params, tokens_BxS, mask_BxS, max_new)
    assert (stopped == cfg.pad_id).any() and not (stopped[:, 0] == cfg.pad_id).all()
    np.testing.assert_array_equal(stopped, _hf_generate(hf, tokens_BxS, mask_BxS, max_new, eos_token_id=eos))


def test_a_row_generates_the_same_alone_and_in_a_padded_batch(converted):
    _, _, cfg, params = converted
    tokens_BxS, mask_BxS, _ = _inputs(seed=2)
    model_def = T5ModelDef(cfg)
    batch = generate_greedy(model_def, params, tokens_BxS, mask_BxS, 6)
    n = int(mask_BxS[1].sum())
    alone = generate_greedy(model_def, params, tokens_BxS[1:2, :n], mask_BxS[1:2, :n], 6)
    np.testing.assert_array_equal(batch[1:2], alone)


def test_cross_attention_keys_values_come_from_the_encoder_output_once_per_layer(converted):
    _, _, cfg, params = converted
    tokens_BxS, mask_BxS, _ = _inputs()
    model = T5ModelDef(cfg).bind(params)
    enc = model.encode(tokens_BxS, mask_BxS)
    k, v = cross_keys_values(model, enc)
    assert k.shape == v.shape == (cfg.decoder_layers, *tokens_BxS.shape, cfg.n_heads, cfg.head_dim)
    wk = params["decoder"]["blocks"]["cross"]["wk"]
    np.testing.assert_allclose(np.asarray(k[1]), np.einsum("bsd,dnh->bsnh", enc, wk[1]), atol=1e-5)


def test_export_loads_into_transformers_with_equal_logits(converted, tmp_path):
    _, hf, cfg, params = converted
    exported = t5_family.params_to_hf(params, cfg)
    original = _state(hf)
    for name, value in exported.items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)
    assert ("lm_head.weight" in exported) == (not cfg.tie_embeddings)
    (tmp_path / "config.json").write_text(json.dumps(t5_family.config_to_hf(cfg)))
    save_file(exported, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    reloaded = T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert reloaded.config.scale_decoder_outputs == cfg.scale_decoder_outputs
    inputs = _inputs(seed=3)
    ours = np.asarray(T5ModelDef(cfg).apply(params, *inputs))[..., :VOCAB]
    np.testing.assert_allclose(_hf_forward(reloaded, *inputs)[1], ours, atol=1e-4, rtol=0)
    np.testing.assert_allclose(_hf_forward(reloaded, *inputs)[1], _hf_forward(hf, *inputs)[1], atol=1e-5, rtol=0)
    # and back: the exported directory imports to the same parameters
    back_cfg, _ = t5_family.config_from_hf(json.loads((tmp_path / "config.json").read_text()), exported)
    assert back_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, t5_family.params_from_hf(exported, back_cfg),
                 jax.tree.map(np.asarray, params))


@pytest.mark.multidevice
@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), (1, 2, 4)])
def test_sharded_equals_unsharded(converted, mesh_shape):
    _, _, cfg, params = converted
    tokens_BxS, mask_BxS, dec_BxT = _inputs(seed=4, lengths=(13, 5, 20, 9))
    model_def = T5ModelDef(cfg)
    want_logits = np.asarray(jax.jit(model_def.apply)(params, tokens_BxS, mask_BxS, dec_BxT))
    want_tokens = generate_greedy(model_def, params, tokens_BxS, mask_BxS, 5)
    mesh = make_mesh(mesh_shape, jax.devices()[: math.prod(mesh_shape)])
    shardings = param_shardings(model_def.logical_axes, mesh, DEFAULT_AXIS_RULES, model_def.shapes)
    # the mesh really splits the weights: heads over `tensor`, d_model over `fsdp`
    assert shardings["encoder"]["blocks"]["attn"]["wq"].spec == PartitionSpec(None, "fsdp", "tensor", None)
    sharded = jax.device_put(params, shardings)
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
    inputs = [jax.device_put(x, batch) for x in (tokens_BxS, mask_BxS, dec_BxT)]
    with axis_rules(mesh, DEFAULT_AXIS_RULES):
        logits = np.asarray(jax.jit(model_def.apply)(sharded, *inputs))
        tokens = generate_greedy(model_def, sharded, inputs[0], inputs[1], 5)
    np.testing.assert_allclose(logits, want_logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(tokens, want_tokens)


def _with_adapters(params: dict, fresh: dict) -> dict:
    out = dict(params)
    for key, value in fresh.items():
        if key not in params:
            out[key] = value
        elif isinstance(value, dict):
            out[key] = _with_adapters(params[key], value)
    return out


def test_lora_adapts_every_projection_through_dense_and_merges_exactly(converted):
    _, _, cfg, params = converted
    names = ("q", "k", "v", "o", "wi_0", "wi_1", "wo") if cfg.mlp == "gated-gelu" else ("q", "v", "o", "wi", "wo")
    lora_cfg = T5Config.from_config({**dataclasses.asdict(cfg), "lora_rank": 2, "lora_targets": list(names)})
    lora_def = T5ModelDef(lora_cfg)
    fresh = lora_def.init(jax.random.key(1))
    assert "lora_wq" in fresh["decoder"]["blocks"]["cross"] and "lora_w_out" in fresh["encoder"]["blocks"]["mlp"]
    with_adapters = _with_adapters(params, fresh)  # the converted base, the fresh adapters
    inputs = _inputs(seed=5)
    base = np.asarray(T5ModelDef(cfg).apply(params, *inputs))
    np.testing.assert_array_equal(np.asarray(lora_def.apply(with_adapters, *inputs)), base)  # B starts at zero
    rng = np.random.default_rng(0)
    perturbed = jax.tree_util.tree_map_with_path(
        lambda path, x: rng.normal(0, 0.1, x.shape).astype(x.dtype) if path[-1].key == "b" else x, with_adapters)
    adapted = np.asarray(lora_def.apply(perturbed, *inputs))
    assert np.abs(adapted - base).max() > 1e-3
    merged = merged_params(perturbed, lora_cfg)
    np.testing.assert_allclose(np.asarray(T5ModelDef(cfg).apply(merged, *inputs)), adapted, atol=1e-4, rtol=1e-4)


def test_unsupported_configs_and_checkpoints_are_named():
    base = _hf_model("v1.0")
    hf = base.config.to_dict()
    with pytest.raises(HFInteropError, match="feed_forward_proj='gated-silu'"):
        t5_family.config_to_lm({**hf, "feed_forward_proj": "gated-silu"})
    with pytest.raises(HFInteropError, match="field 'd_kv' is missing"):
        t5_family.config_to_lm({k: v for k, v in hf.items() if k != "d_kv"})
    state = _state(base)
    cfg, _ = t5_family.config_from_hf(hf, state)
    missing = {k: v for k, v in state.items() if k != "decoder.block.1.layer.1.EncDecAttention.v.weight"}
    with pytest.raises(HFInteropError, match="'decoder.block.1.layer.1.EncDecAttention.v.weight' is missing"):
        t5_family.params_from_hf(missing, cfg)
    with pytest.raises(HFInteropError, match="DenseReluDense.wi.weight"):  # a relu checkpoint read as gated
        t5_family.params_from_hf(state, dataclasses.replace(cfg, mlp="gated-gelu"))
    with pytest.raises(ConfigError, match="model.lora_targets: 'wi_0'"):
        T5Config.from_config({**dataclasses.asdict(cfg), "lora_rank": 2, "lora_targets": ["wi_0"]})


def test_training_forward_drops_out_by_its_key_and_every_parameter_gets_a_gradient():
    cfg = T5Config(vocab_size=VOCAB, d_model=16, n_layers=1, n_decoder_layers=2, n_heads=2, head_dim=8, d_ff=32,
                   relative_buckets=8, relative_max_distance=16, dropout=0.1)
    model_def = T5ModelDef(cfg)
    params = model_def.init(jax.random.key(0))
    inputs = _inputs(seed=6)

    def loss(params, key):
        return model_def.apply(params, *inputs, dropout_key=key)[..., :VOCAB].mean()

    key = jax.random.key(1)
    assert float(loss(params, key)) == float(loss(params, key)) != float(loss(params, None))
    grads = jax.grad(loss)(params, key)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.abs(np.asarray(g)).max() > 0, jax.tree_util.keystr(path)
