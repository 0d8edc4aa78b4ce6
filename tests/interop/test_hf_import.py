"""`lmtrain import`: each family's logits equal transformers' logits, sharded or not; bad inputs fail clearly.

The reference models are small RANDOM Hugging Face models built from their config classes (no hub),
with every weight perturbed so that norms and biases are away from their defaults.
"""

import copy
import json
import pathlib

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from lmtrain.config import load_config
from lmtrain.interop import hf_import
from lmtrain.interop.families import HFInteropError
from lmtrain.interop.hf_import import load_hf_model, load_hf_params, model_config_from_hf
from lmtrain.model import ModelConfig, ModelDef
from lmtrain.parallel.mesh import make_mesh
from lmtrain.parallel.partitioning import axis_rules, param_shardings

VOCAB = 99  # not a multiple of 128, so the padded embedding rows are exercised
TOLERANCE = 1e-4

HF_MODELS = {
    "gpt2": lambda: GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
    ),
    # Llama 3 RoPE scaling with all three frequency bands in use (head_dim 16, theta 5e5, original 64).
    "llama": lambda: LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        )
    ),
    # head_dim != hidden_size / heads, and a sliding window shorter than the positions.
    "mistral": lambda: MistralForCausalLM(
        MistralConfig(
            vocab_size=VOCAB, hidden_size=48, head_dim=16, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, sliding_window=32,
            rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
        )
    ),
    "qwen2_tied": lambda: Qwen2ForCausalLM(
        Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    ),
    "qwen2_untied": lambda: Qwen2ForCausalLM(
        Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False)
    ),
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained here on a few sentences (no download), with fewer than VOCAB tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=90, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    text = ["the cat sat on the mat", "a dog ran in the park", "once upon a time there was a tiny model"] * 5
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def random_hf_model(name: str, directory: pathlib.Path, seed: int = 0, dtype=None, max_shard_size=None,
                    tokenizer: bool = False):
    """Save a perturbed random HF model of family `name` into `directory`; return the (float32, eval) torch model."""
    torch.manual_seed(seed)
    model = HF_MODELS[name]().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
            if dtype is not None:  # the float32 reference holds exactly the values that are saved
                p.copy_(p.to(dtype).float())
    directory.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    (copy.deepcopy(model).to(dtype) if dtype is not None else model).save_pretrained(str(directory), **kwargs)
    if tokenizer:
        tiny_tokenizer().save_pretrained(str(directory))
    return model


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def random_ids(batch=2, length=16, seed=0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, VOCAB, (batch, length)).astype(np.int32)


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_imported_logits_equal_transformers(tmp_path, name):
    model = random_hf_model(name, tmp_path)
    cfg, params = load_hf_model(tmp_path)
    ids = random_ids()
    ours = np.asarray(jax.jit(ModelDef(cfg).apply)(params, ids))
    assert ours.shape[-1] == cfg.padded_vocab > VOCAB
    assert max_diff(ours[..., :VOCAB], hf_logits(model, ids)) <= TOLERANCE
    assert not np.any(np.asarray(params["embed"])[VOCAB:]), "padding rows of the embedding must be zero"
    if "head" in params:
        assert not np.any(np.asarray(params["head"]["w"])[:, VOCAB:])


def test_config_translation_carries_rope_scaling_window_and_head_dim(tmp_path):
    random_hf_model("llama", tmp_path / "llama")
    _, llama, _ = model_config_from_hf(tmp_path / "llama")
    assert llama["rope_theta"] == 500000.0 and llama["rope_scaling"] == ("llama3", 8.0, 1.0, 4.0, 64)
    random_hf_model("mistral", tmp_path / "mistral")
    _, mistral, notes = model_config_from_hf(tmp_path / "mistral")
    assert mistral["head_dim"] == 16 and mistral["max_seq_len"] == 32
    assert any("sliding_window=32" in n for n in notes)


def test_bfloat16_and_multi_file_checkpoints(tmp_path):
    """bf16 weights (which safetensors' numpy reader cannot return) in a sharded checkpoint with an index."""
    model = random_hf_model("llama", tmp_path, dtype=torch.bfloat16, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    cfg, params = load_hf_model(tmp_path)
    ids = random_ids()
    # The bf16 weights upcast exactly, so the float32 models agree as tightly as for float32 checkpoints.
    ours = np.asarray(jax.jit(ModelDef(cfg).apply)(params, ids))[..., :VOCAB]
    assert max_diff(ours, hf_logits(model, ids)) <= TOLERANCE


@pytest.mark.multidevice
def test_sharded_import_on_8_devices_gives_the_same_logits(tmp_path):
    assert jax.device_count() >= 8, "tests/conftest.py should give 8 fake CPU devices"
    model = random_hf_model("llama", tmp_path)
    family, fields, _ = model_config_from_hf(tmp_path)
    cfg = ModelConfig.from_config(fields)
    model_def = ModelDef(cfg)
    rules = load_config("tiny").mesh.axis_rules
    mesh = make_mesh((2, 2, 2))
    shardings = param_shardings(model_def.logical_axes, mesh, rules, model_def.shapes)
    params = load_hf_params(tmp_path, cfg, family, shardings)

    wq = params["blocks"]["attn"]["wq"]  # [layers, embed(fsdp), heads(tensor), head_dim]
    assert wq.sharding == shardings["blocks"]["attn"]["wq"]
    assert {s.data.shape for s in wq.addressable_shards} == {(2, 32, 2, 16)}
    assert params["embed"].addressable_shards[0].data.shape == (cfg.padded_vocab // 2, 32)

    ids = random_ids(batch=4)
    with axis_rules(mesh, rules):
        ours = jax.jit(model_def.apply)(params, ids)
    assert max_diff(np.asarray(ours)[..., :VOCAB], hf_logits(model, ids)) <= TOLERANCE


def test_import_writes_a_workdir_the_trainer_reads(tmp_path, capsys):
    from lmtrain.train.checkpoint import load_init_params

    hf_dir, workdir = tmp_path / "hf", tmp_path / "work"
    random_hf_model("qwen2_tied", hf_dir, tokenizer=True)
    assert hf_import.main([str(hf_dir), str(workdir)]) == 0
    out = capsys.readouterr().out
    tokenizer, shards = workdir.resolve() / "tokenizer", workdir.resolve() / "shards"
    assert f"python tools/shard_data.py --input 'data/*.jsonl' --tokenizer {tokenizer} --output {shards}" in out
    assert (f"lmtrain train --config {workdir.resolve() / 'config.json'} --workdir {workdir.resolve()} "
            f"--config.data.shards_dir={shards}") in out

    cfg = load_config(str(workdir / "config.json"))
    assert cfg.model.qkv_bias and cfg.model.tie_embeddings and cfg.model.vocab_size == VOCAB
    assert cfg.train.init_from == str(workdir.resolve() / "init_params")
    # The config asks for the user's data, tokenized with this model's tokenizer; never the built-in corpus.
    assert (cfg.data.source, cfg.data.shards_dir, cfg.data.tokenizer_dir) == ("shards", "", str(tokenizer))
    assert cfg.data.seq_len <= cfg.model.max_seq_len
    assert json.loads((workdir / "hf_config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]

    model_cfg = ModelConfig.from_config(cfg.model)
    model_def = ModelDef(model_cfg)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), model_def.shapes)
    restored, fresh, unused = load_init_params(cfg.train.init_from, target)
    assert fresh == [] and unused == []
    _, direct = load_hf_model(hf_dir)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(direct), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(workdir / "tokenizer"))
    assert tok.decode(tok.encode("the cat sat")).strip() == "the cat sat"
    assert hf_import.main([str(hf_dir), str(workdir)]) == 2, "an existing WORKDIR is not overwritten without --force"


# ---------------------------------------------------------------------------------------------- bad inputs


def _rewrite_weights(directory: pathlib.Path, edit) -> None:
    from lmtrain.storage.safetensors import SafetensorsReader

    path = directory / "model.safetensors"
    reader = SafetensorsReader([path])
    tensors = {name: reader.read(name) for name in reader.names()}
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _import_error(directory: pathlib.Path) -> str:
    with pytest.raises(HFInteropError) as info:
        load_hf_model(directory)
    return str(info.value)


def test_unsupported_architecture_is_named_with_the_supported_ones(tmp_path):
    random_hf_model("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(architectures=["FalconForCausalLM"], model_type="falcon")
    (tmp_path / "config.json").write_text(json.dumps(config))
    message = _import_error(tmp_path)
    assert "FalconForCausalLM" in message
    for supported in ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        assert supported in message


def test_missing_tensor_is_named(tmp_path):
    random_hf_model("llama", tmp_path)
    _rewrite_weights(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    message = _import_error(tmp_path)
    assert "'model.layers.1.mlp.up_proj.weight' is missing" in message


def test_extra_tensor_is_named(tmp_path):
    random_hf_model("gpt2", tmp_path)
    _rewrite_weights(tmp_path, lambda t: t.update({"transformer.h.0.attn.q_norm.weight": np.ones(32, np.float32)}))
    message = _import_error(tmp_path)
    assert "unexpected tensor 'transformer.h.0.attn.q_norm.weight'" in message and "model.safetensors" in message


def test_shape_mismatch_is_named(tmp_path):
    random_hf_model("qwen2_untied", tmp_path)
    _rewrite_weights(tmp_path, lambda t: t.update({"model.layers.0.self_attn.k_proj.bias": np.zeros(12, np.float32)}))
    message = _import_error(tmp_path)
    assert "'model.layers.0.self_attn.k_proj.bias' has shape [12]" in message and "implies [8]" in message


def test_unsupported_setting_is_named(tmp_path):
    random_hf_model("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert "'yarn' is not supported" in _import_error(tmp_path)


def test_rope_scaling_next_to_default_rope_parameters_follows_transformers(tmp_path):
    """transformers takes a non-empty rope_scaling in place of rope_parameters: here Llama 3 scaling, which the
    default rope_parameters beside it must not cancel (lmtrain used to import no scaling)."""
    random_hf_model("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["rope_scaling"] = config["rope_parameters"]
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    reference = LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert reference.config.rope_parameters["rope_type"] == "llama3"  # what transformers makes of it
    cfg, params = load_hf_model(tmp_path)
    assert cfg.rope_scaling == ("llama3", 8.0, 1.0, 4.0, 64) and cfg.rope_theta == 500000.0
    ids = random_ids()
    ours = np.asarray(jax.jit(ModelDef(cfg).apply)(params, ids))
    assert max_diff(ours[..., :VOCAB], hf_logits(reference, ids)) <= TOLERANCE

    config["rope_scaling"] = {"type": "linear", "factor": 4.0}  # transformers: linear x4; lmtrain cannot
    (tmp_path / "config.json").write_text(json.dumps(config))
    message = _import_error(tmp_path)
    assert "RoPE scaling type 'linear' is not supported (read from 'rope_scaling')" in message
    assert str(tmp_path / "config.json") in message and "\n" not in message


def test_pickle_checkpoint_is_refused_without_being_opened(tmp_path, capsys):
    random_hf_model("gpt2", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    # Not a valid pickle at all: if lmtrain tried to unpickle it, the error would be a different one.
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x05 this would run code if unpickled")
    message = _import_error(tmp_path)
    assert "pytorch_model.bin" in message and "never unpickles" in message and "safetensors" in message
    assert hf_import.main([str(tmp_path), str(tmp_path / "work")]) == 2
    assert "pytorch_model.bin" in capsys.readouterr().err


def test_training_an_imported_workdir_without_shards_asks_for_them(tmp_path, capsys):
    from lmtrain.train import trainer

    hf_dir, workdir = tmp_path / "hf", tmp_path / "work"
    random_hf_model("gpt2", hf_dir, tokenizer=True)
    assert hf_import.main([str(hf_dir), str(workdir)]) == 0
    capsys.readouterr()
    assert trainer.main(["--config", str(workdir / "config.json"), "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert "data.shards_dir" in err and "Traceback" not in err
    steps = [p.name for p in (workdir / "checkpoints").iterdir()] if (workdir / "checkpoints").exists() else []
    assert not any(name.isdigit() for name in steps), "nothing was trained on another corpus"


def test_no_tokenizer_is_said_in_the_next_steps(tmp_path, capsys):
    hf_dir, workdir = tmp_path / "hf", tmp_path / "work"
    random_hf_model("gpt2", hf_dir)
    assert hf_import.main([str(hf_dir), str(workdir)]) == 0
    assert "the model came without a tokenizer.json" in capsys.readouterr().out
    assert load_config(str(workdir / "config.json")).data.tokenizer_dir == ""


@pytest.mark.slow
def test_the_printed_path_shards_with_the_model_tokenizer_and_trains_from_the_imported_weights(tmp_path, capsys):
    """What `lmtrain import` prints works: shard_data with WORKDIR/tokenizer, then `lmtrain train` begins at the
    imported parameters (train.init_from) on those shards."""
    from lmtrain.train import trainer
    from lmtrain.workdir import restore_params
    from tools import shard_data

    hf_dir, workdir = tmp_path / "hf", tmp_path / "work"
    random_hf_model("llama", hf_dir, tokenizer=True)
    assert hf_import.main([str(hf_dir), str(workdir)]) == 0
    shard_cmd, train_cmd = [line.split() for line in capsys.readouterr().out.splitlines()
                            if line.lstrip().startswith(("python tools/shard_data.py", "lmtrain train"))]
    shard_args = [a for a in shard_cmd[2:] if a not in ("--input", "'data/*.jsonl'")]
    assert shard_data.main([*shard_args, "--builtin", "--max-docs", "40", "--workers", "1", "--quiet"]) == 0
    # One step at a learning rate far below float32's resolution of the weights (~1e-8 relative): the checkpoint
    # then holds exactly the parameters training started from.
    overrides = {"train.steps": "1", "optimizer.lr": "1e-30", "optimizer.warmup_steps": "0", "data.batch_size": "8",
                 "train.sample_tokens": "0", "train.eval_every": "0", "logging.tensorboard": "false",
                 "logging.loss_curve_png": "false"}
    assert trainer.main([*train_cmd[2:], "--no-progress", *(f"--config.{k}={v}" for k, v in overrides.items())]) == 0
    _, trained = restore_params(workdir)
    _, direct = load_hf_model(hf_dir)
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(direct), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bfloat16_import_stores_what_the_config_says(tmp_path, capsys):
    """`--param-dtype bfloat16`: config model.param_dtype and the stored init_params are bfloat16, holding the
    HF weights rounded once (the trainer keeps float32 master weights from them)."""
    import orbax.checkpoint as ocp

    from lmtrain.train.checkpoint import load_init_params

    hf_dir, workdir = tmp_path / "hf", tmp_path / "work"
    random_hf_model("qwen2_untied", hf_dir)
    assert hf_import.main([str(hf_dir), str(workdir), "--param-dtype", "bfloat16"]) == 0
    cfg = load_config(str(workdir / "config.json"))
    assert cfg.model.param_dtype == "bfloat16"
    with ocp.StandardCheckpointer() as ckptr:
        stored = ckptr.metadata(str(workdir / "init_params")).item_metadata
    assert {str(m.dtype) for m in jax.tree.leaves(stored)} == {"bfloat16"}

    model_def = ModelDef(ModelConfig.from_config(cfg.model))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), model_def.shapes)
    restored, fresh, unused = load_init_params(cfg.train.init_from, target)
    assert fresh == [] and unused == []
    _, direct = load_hf_model(hf_dir)  # float32
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(direct), strict=True):
        assert a.dtype == jax.numpy.bfloat16
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(jax.numpy.bfloat16)))


def test_import_from_and_into_gs_through_the_fake_gcs(fake_gcs, tmp_path, capsys):
    """A Hugging Face directory on gs:// reads like a local one, and the WORKDIR can be on gs:// too."""
    from lmtrain.paths import as_path
    from lmtrain.train.checkpoint import load_init_params

    random_hf_model("qwen2_untied", tmp_path / "hf", tokenizer=True)
    remote_hf = as_path(f"{fake_gcs.url}/hf")
    for f in (tmp_path / "hf").iterdir():
        (remote_hf / f.name).write_bytes(f.read_bytes())
    cfg, params = load_hf_model(str(remote_hf))
    local_cfg, local_params = load_hf_model(tmp_path / "hf")
    assert cfg == local_cfg
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(local_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    workdir = f"{fake_gcs.url}/work"
    assert hf_import.main([str(remote_hf), workdir]) == 0
    names = fake_gcs.object_names()
    assert "work/config.json" in names and "work/tokenizer/tokenizer.json" in names
    assert any(n.startswith("work/init_params/") for n in names)
    config = load_config(str(fake_gcs.objects_dir / "work" / "config.json"))
    assert config.train.init_from == f"{workdir}/init_params" and config.data.tokenizer_dir == f"{workdir}/tokenizer"
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), ModelDef(cfg).shapes)
    restored, fresh, unused = load_init_params(config.train.init_from, target)
    assert fresh == [] and unused == []
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(local_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
