"""LoRA and Hugging Face: merged export (transformers), PEFT adapter export (peft loads it on the exported base) and
PEFT adapter import (a PEFT-made adapter continues training in lmtrain), all within 1e-4 of lmtrain's own logits."""

import dataclasses
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from safetensors import safe_open

from lmtrain.interop import hf_export, hf_import
from lmtrain.interop.families import HFInteropError
from lmtrain.interop.hf_export import export_params
from lmtrain.interop.hf_import import load_hf_model
from lmtrain.interop.lora_export import export_adapter, without_adapters
from lmtrain.interop.lora_import import read_peft_adapter
from lmtrain.model import ModelConfig, ModelDef
from tests.helpers import small_config

TOLERANCE = 1e-4
VOCAB = 99  # not a multiple of 128: the padded vocabulary rows are exercised
ALL = ("q", "k", "v", "o", "up", "down")


def _cfg(family: str, targets=ALL, rank=4, alpha=8.0, head="mlm", **kw) -> ModelConfig:
    extra = {"model.qkv_bias": True, "model.tie_embeddings": True} if family == "qwen2" else {}
    if family == "bert":
        extra = {"model.causal": False, "model.pos_embedding": "learned", "model.type_vocab_size": 2,
                 "model.embed_norm": True, "model.norm": "layernorm", "model.norm_eps": 1e-12,
                 "model.norm_position": "post", "model.mlp": "gelu_exact", "model.use_bias": True,
                 "model.tie_embeddings": True, "model.pooling": "cls", "model.n_kv_heads": 4}
    gate = ("gate",) if family in ("llama", "mistral", "qwen2") and targets == ALL else ()
    config = small_config("gpt2" if family == "gpt2" else "llama", **{
        "model.vocab_size": VOCAB, "model.lora_rank": rank, "model.lora_alpha": alpha,
        "model.lora_targets": tuple(targets) + gate, **extra, **kw})
    cfg = ModelConfig.from_config(config.model)
    if family == "bert":
        return dataclasses.replace(cfg, head=head, num_labels=3 if head == "token_classify" else 0)
    return cfg


def _perturbed(cfg: ModelConfig, seed=0) -> dict:
    """Every weight away from its default and non-zero adapters (B starts at zero in training)."""
    rs = np.random.RandomState(seed)

    def one(path, s):
        mean = 1.0 if path[-1].key == "scale" else 0.0
        return jnp.asarray(rs.normal(mean, 0.1, s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(one, ModelDef(cfg).shapes)


def _ids(batch=2, length=12) -> np.ndarray:
    return np.random.RandomState(1).randint(0, VOCAB, (batch, length)).astype(np.int32)


def _ours(cfg, params, ids) -> np.ndarray:
    return np.asarray(jax.jit(ModelDef(cfg).apply)(params, ids))[..., :cfg.vocab_size]


def _torch_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def _hf_model(directory):
    import transformers

    architecture = json.loads((directory / "config.json").read_text())["architectures"][0]
    return getattr(transformers, architecture).from_pretrained(str(directory)).eval()


# ---------------------------------------------------------------------------------------------- merged export


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gpt2", "bert"])
def test_merged_export_computes_what_the_unmerged_lora_model_computes(family, tmp_path):
    cfg = _cfg(family)
    params = _perturbed(cfg)
    export_params(cfg, params, tmp_path, source_config={"model_type": family})
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == family and not any("lora" in k for k in config)
    with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
        assert not any("lora" in k for k in f.keys())
    ids = _ids()
    ours = _ours(cfg, params, ids)
    base_cfg, base = without_adapters(cfg, params)
    assert np.abs(ours - _ours(base_cfg, base, ids)).max() > 1e-2  # the adapters change the output
    assert np.abs(ours - _torch_logits(_hf_model(tmp_path), ids)).max() <= TOLERANCE


# ---------------------------------------------------------------------------------------------- adapter export


def _peft_model(base_dir, adapter_dir):
    base = _hf_model(base_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    # PEFT warns about a config key it does not know, a wrong fan_in_fan_out, or tensors it did not load
    messages = [str(w.message) for w in caught]
    suspicious = ("Unexpected keyword", "fan_in_fan_out", "missing", "unexpected")
    assert not [m for m in messages if any(s in m for s in suspicious)], messages
    return model


@pytest.mark.parametrize("family,targets", [
    ("llama", ALL),
    ("llama", ("q", "v")),
    ("gpt2", ALL),
    ("gpt2", ("q", "v", "down")),  # c_attn with two of its three parts adapted
    ("qwen2", ("k", "o", "gate")),
    ("bert", ("q", "o", "down")),  # 'output.dense' alone is ambiguous in BERT: a regex target_modules
])
def test_peft_loads_the_adapter_on_the_exported_base_with_equal_logits(family, targets, tmp_path):
    cfg = _cfg(family, targets, head="token_classify")  # BERT: a tagger whose head trains fully (modules_to_save)
    params = _perturbed(cfg)
    base_cfg, base = without_adapters(cfg, params)
    export_params(base_cfg, base, tmp_path / "base", source_config={"model_type": family})
    export_adapter(cfg, params, tmp_path / "adapter", base_model=str(tmp_path / "base"),
                   source_config={"model_type": family})
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    assert config["fan_in_fan_out"] == (family == "gpt2")
    ids = _ids()
    model = _peft_model(tmp_path / "base", tmp_path / "adapter")
    assert np.abs(_ours(cfg, params, ids) - _torch_logits(model, ids)).max() <= TOLERANCE
    # PEFT's own merge (fan_in_fan_out transposes for Conv1D) gives the same model too
    merged = model.merge_and_unload()
    assert np.abs(_ours(cfg, params, ids) - _torch_logits(merged, ids)).max() <= TOLERANCE


def test_adapter_names_shapes_and_fused_c_attn_layout(tmp_path):
    cfg = _cfg("llama", ("q", "o"))
    export_adapter(cfg, _perturbed(cfg), tmp_path / "llama")
    config = json.loads((tmp_path / "llama" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "o_proj"] and config["task_type"] == "CAUSAL_LM"
    d, hd, nh = cfg.d_model, cfg.resolved_head_dim, cfg.n_heads
    with safe_open(str(tmp_path / "llama" / "adapter_model.safetensors"), "np") as f:
        shapes = {k: f.get_tensor(k).shape for k in f.keys()}
    assert shapes["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"] == (4, d)
    assert shapes["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"] == (nh * hd, 4)
    assert shapes["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"] == (4, nh * hd)
    assert len(shapes) == 2 * 2 * cfg.n_layers

    cfg = _cfg("gpt2", ("q", "v", "o"))
    params = _perturbed(cfg)
    export_adapter(cfg, params, tmp_path / "gpt2")
    config = json.loads((tmp_path / "gpt2" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["c_attn", "attn.c_proj"]
    assert config["rank_pattern"] == {"c_attn": 8} and config["alpha_pattern"] == {"c_attn": 16.0}  # alpha/r kept
    with safe_open(str(tmp_path / "gpt2" / "adapter_model.safetensors"), "np") as f:
        a = f.get_tensor("base_model.model.transformer.h.1.attn.c_attn.lora_A.weight")
        b = f.get_tensor("base_model.model.transformer.h.1.attn.c_attn.lora_B.weight")
    assert a.shape == (8, d) and b.shape == (3 * d, 8)
    lora_q, lora_v = params["blocks"]["attn"]["lora_wq"], params["blocks"]["attn"]["lora_wv"]
    np.testing.assert_array_equal(a[:4], np.asarray(lora_q["a"][1]).T)
    np.testing.assert_array_equal(b[:d, :4], np.asarray(lora_q["b"][1]).reshape(4, d).T)
    np.testing.assert_array_equal(b[2 * d:, 4:], np.asarray(lora_v["b"][1]).reshape(4, d).T)
    assert not b[:d, 4:].any() and not b[d:2 * d].any() and not b[2 * d:, :4].any()  # block-diagonal, no k


def test_adapters_that_peft_cannot_hold_are_refused(tmp_path):
    cfg = _cfg("llama", rank=0)
    with pytest.raises(HFInteropError, match="no LoRA adapters"):
        export_adapter(cfg, _perturbed(cfg), tmp_path / "out")
    cfg = _cfg("bert", head="mlm")  # the trained MLM bias belongs to cls.predictions, which holds the tied decoder
    with pytest.raises(HFInteropError, match="cls.predictions, a module with sub-modules"):
        export_adapter(cfg, _perturbed(cfg), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- adapter import


def _lora_flat(params) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
            if "lora_" in jax.tree_util.keystr(p)}


@pytest.mark.parametrize("family,targets", [("gpt2", ("q", "v", "down")), ("llama", ALL), ("bert", ("q", "o", "down"))])
def test_lmtrain_adapter_export_imports_back_exactly(family, targets, tmp_path):
    cfg = _cfg(family, targets, head="token_classify")
    params = _perturbed(cfg)
    base_cfg, base = without_adapters(cfg, params)
    export_params(base_cfg, base, tmp_path / "base", source_config={"model_type": family})
    export_adapter(cfg, params, tmp_path / "adapter", source_config={"model_type": family})
    adapter = read_peft_adapter(tmp_path / "adapter", tmp_path / "base")
    assert (adapter.rank, adapter.alpha, set(adapter.targets)) == (4, 8.0, set(cfg.lora_targets))  # c_attn: q, v again
    want = _lora_flat(params)
    for path, (a, b) in adapter.lora.items():
        block, name = path.split("/")[1:]
        np.testing.assert_array_equal(a, want[f"['blocks']['{block}']['lora_{name}']['a']"])
        np.testing.assert_array_equal(b, want[f"['blocks']['{block}']['lora_{name}']['b']"])
    assert len(adapter.lora) * 2 == len(want)


def _peft_adapter(base_dir, adapter_dir, seed=0, **lora_kw):
    """A PEFT-made adapter on the HF model in base_dir, with random (non-zero) A and B, saved as PEFT saves it."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(_hf_model(base_dir), peft.LoraConfig(**lora_kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(adapter_dir))
    return model.eval()


def _imported(workdir):
    """(model config, params) of an imported WORKDIR's init_params, as training starts from them."""
    from lmtrain.config import load_config
    from lmtrain.train.checkpoint import load_init_params
    from lmtrain.workdir import workdir_model_config

    cfg = load_config(str(workdir / "config.json"))
    model_cfg = workdir_model_config(cfg, workdir)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), ModelDef(model_cfg).shapes)
    params, fresh, unused = load_init_params(str(workdir), target)
    assert not fresh and not unused
    return cfg, model_cfg, params


def _lm_batch(ids):
    b, n = ids.shape
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((b, n - 1), np.float32),
            "segment_ids": np.ones((b, n - 1), np.int32),
            "positions": np.broadcast_to(np.arange(n - 1, dtype=np.int32), (b, n - 1)).copy()}


@pytest.fixture(scope="module")
def imported_peft(tmp_path_factory):
    """A llama base exported by lmtrain, a PEFT-made adapter on it, and `lmtrain import BASE WORK --adapter ADAPTER`."""
    root = tmp_path_factory.mktemp("peft_import")
    base_cfg = dataclasses.replace(_cfg("llama", rank=0), vocab_size=512)  # lmtrain's built-in text tokenizes to 512
    export_params(base_cfg, _perturbed(base_cfg), root / "base")
    _peft_adapter(root / "base", root / "adapter", r=4, lora_alpha=16, lora_dropout=0.05,
                  target_modules=["q_proj", "v_proj", "down_proj"])
    assert hf_import.main([str(root / "base"), str(root / "work"), "--adapter", str(root / "adapter")]) == 0
    return root


@pytest.mark.slow
def test_a_peft_adapter_imports_with_equal_logits_loss_and_gradients(imported_peft):
    from lmtrain.tasks import make_task

    root = imported_peft
    reference = peft.PeftModel.from_pretrained(_hf_model(root / "base"), str(root / "adapter"), is_trainable=True)
    cfg, model_cfg, params = _imported(root / "work")
    assert (model_cfg.lora_rank, model_cfg.lora_alpha, model_cfg.lora_dropout) == (4, 16.0, 0.05)
    assert model_cfg.lora_targets == ("q", "v", "down")
    assert json.loads((root / "work" / "hf_adapter_config.json").read_text())["target_modules"]
    ids = np.random.RandomState(2).randint(0, 512, (2, 13)).astype(np.int32)
    assert np.abs(_ours(model_cfg, params, ids[:, :-1]) - _torch_logits(reference.eval(), ids[:, :-1])).max() <= TOLERANCE

    # the first step's loss and gradients are PEFT's: training continues where PEFT left off
    loss_fn = make_task(cfg).loss_fn(ModelDef(model_cfg))

    def mean_loss(p):
        _, n, metrics = loss_fn(p, _lm_batch(ids), None)
        return metrics["loss"] / n

    loss, grads = jax.value_and_grad(mean_loss)(params)
    reference.train()
    for module in reference.modules():  # dropout off on both sides: the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    out = reference(torch.tensor(ids, dtype=torch.long), labels=torch.tensor(ids, dtype=torch.long))
    out.loss.backward()
    assert abs(float(loss) - out.loss.item()) <= 1e-5
    torch_grads = dict(reference.named_parameters())
    for layer in range(model_cfg.n_layers):
        peft_b = torch_grads[f"base_model.model.model.layers.{layer}.self_attn.q_proj.lora_B.default.weight"].grad
        ours_b = np.asarray(grads["blocks"]["attn"]["lora_wq"]["b"][layer]).reshape(4, -1).T
        np.testing.assert_allclose(ours_b, peft_b.numpy(), atol=1e-6)
        peft_a = torch_grads[f"base_model.model.model.layers.{layer}.mlp.down_proj.lora_A.default.weight"].grad
        np.testing.assert_allclose(np.asarray(grads["blocks"]["mlp"]["lora_w_out"]["a"][layer]).T, peft_a.numpy(),
                                   atol=1e-6)


@pytest.mark.slow
def test_an_imported_peft_adapter_trains_with_the_base_frozen(imported_peft, tmp_path):
    import shutil

    from lmtrain.config import config_from_dict
    from lmtrain.train.checkpoint import stored_leaves
    from lmtrain.train.trainer import train
    from lmtrain.workdir import restore_params

    workdir = tmp_path / "work"
    shutil.copytree(imported_peft / "work", workdir)
    cfg, _, params = _imported(workdir)
    config = json.loads(json.dumps(cfg.to_dict(), default=list))
    config["train"]["init_from"] = str(workdir / "init_params")
    overrides = {"data.source": "builtin", "data.max_docs": 40, "data.seq_len": 16, "data.batch_size": 8,
                 "train.steps": 2, "train.eval_every": 0, "checkpoint.every": 2, "train.sample_tokens": 0,
                 "logging.progress_bar": False, "logging.tensorboard": False, "logging.loss_curve_png": False,
                 "optimizer.lr": 1e-2, "optimizer.warmup_steps": 1}
    for key, value in overrides.items():
        section, leaf = key.split(".")
        config[section][leaf] = value
    train(config_from_dict(config, "test"), workdir)
    stored = stored_leaves(workdir / "checkpoints" / "2" / "state", "params")
    assert stored and all(any(str(k).startswith("lora_") for k in key) for key in stored)  # adapters only
    _, tuned = restore_params(workdir)
    np.testing.assert_array_equal(np.asarray(tuned["blocks"]["attn"]["wq"]), np.asarray(params["blocks"]["attn"]["wq"]))
    np.testing.assert_array_equal(np.asarray(tuned["blocks"]["mlp"]["w_out"]), np.asarray(params["blocks"]["mlp"]["w_out"]))
    assert np.abs(np.asarray(tuned["blocks"]["attn"]["lora_wq"]["b"]) -
                  np.asarray(params["blocks"]["attn"]["lora_wq"]["b"])).max() > 0  # the adapters trained


def test_a_peft_adapter_on_gpt2_c_attn_imports_with_equal_logits(tmp_path):
    """PEFT trains c_attn as one projection (a dense B): each of q, k, v gets the whole A and its rows of B."""
    base_cfg = _cfg("gpt2", rank=0)
    export_params(base_cfg, _perturbed(base_cfg), tmp_path / "base")
    reference = _peft_adapter(tmp_path / "base", tmp_path / "adapter", r=3, lora_alpha=6, fan_in_fan_out=True,
                              target_modules=["c_attn", "c_fc"])
    adapter = read_peft_adapter(tmp_path / "adapter", tmp_path / "base")
    assert (adapter.rank, adapter.alpha, adapter.targets) == (3, 6.0, ("q", "k", "v", "up"))
    cfg = dataclasses.replace(base_cfg, lora_rank=3, lora_alpha=6.0, lora_targets=adapter.targets)
    _, base = load_hf_model(tmp_path / "base")
    params = adapter.add_to(base, cfg, jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]),
                                                    ModelDef(cfg).shapes))
    ids = _ids()
    assert np.abs(_ours(cfg, params, ids) - _torch_logits(reference, ids)).max() <= TOLERANCE


def _write_adapter(directory, config: dict, tensors: dict | None = None):
    from lmtrain.storage.safetensors import write_tensors

    directory.mkdir(parents=True, exist_ok=True)
    base = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    (directory / "adapter_config.json").write_text(json.dumps({**base, **config}))
    if tensors is None:
        tensors = {f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{f}.weight": np.zeros(s, np.float32)
                   for i in range(2) for f, s in (("A", (2, 64)), ("B", (64, 2)))}
    write_tensors(directory / "adapter_model.safetensors", tensors, {"format": "pt"})


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_base")
    cfg = _cfg("llama", rank=0)
    export_params(cfg, _perturbed(cfg), root)
    return root


@pytest.mark.parametrize("config,tensors,message", [
    ({"target_modules": ["lm_head"]}, None, "matches lm_head, which is not a projection lmtrain can adapt"),
    ({"target_modules": ["qq_proj"]}, None, r"matches no projection of this llama base model \(its projections: "),
    ({"target_modules": r"model\.layers\.0\.self_attn\.q_proj"}, None, "in some blocks only"),
    ({"use_dora": True}, None, "use_dora=True: DoRA"),
    ({"peft_type": "IA3"}, None, "peft_type is 'IA3'"),
    ({"target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 4}}, {
        **{f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{f}.weight": np.zeros(s, np.float32)
           for i in range(2) for f, s in (("A", (2, 64)), ("B", (64, 2)))},
        **{f"base_model.model.model.layers.{i}.self_attn.v_proj.lora_{f}.weight": np.zeros(s, np.float32)
           for i in range(2) for f, s in (("A", (4, 64)), ("B", (32, 4)))}}, "one rank and one scale"),
    ({}, {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((2, 64), np.float32)},
     "q_proj.lora_B.weight' is missing"),
    ({}, {f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{f}.weight": np.zeros(s, np.float32)
          for i in range(2) for f, s in (("A", (2, 32)), ("B", (64, 2)))}, r"lora_A \[2, 32\].*imply \[2, 64\]"),
    ({}, {**{f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{f}.weight": np.zeros(s, np.float32)
             for i in range(2) for f, s in (("A", (2, 64)), ("B", (64, 2)))},
          "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight": np.zeros((2, 64), np.float32)},
     "tensor 'base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight' belongs to no module"),
])
def test_bad_adapters_are_one_line_errors_and_write_nothing(llama_base, tmp_path, capsys, config, tensors, message):
    _write_adapter(tmp_path / "adapter", config, tensors)
    with pytest.raises(HFInteropError, match=message):
        read_peft_adapter(tmp_path / "adapter", llama_base)
    capsys.readouterr()
    assert hf_import.main([str(llama_base), str(tmp_path / "work"), "--adapter", str(tmp_path / "adapter")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmtrain import: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "work").exists()


def test_a_family_without_lora_names_is_a_clear_error(llama_base, tmp_path, monkeypatch):
    from lmtrain.interop import families

    _write_adapter(tmp_path / "adapter", {})
    without_names = dataclasses.replace(families.FAMILIES["llama"], lora_modules={})
    monkeypatch.setitem(families.FAMILIES, "llama", without_names)
    with pytest.raises(HFInteropError, match="LoRA adapters of the llama family are not supported: lmtrain does not "
                                             "know its module names"):
        read_peft_adapter(tmp_path / "adapter", llama_base)
    cfg = _cfg("llama", ("q",))
    with pytest.raises(HFInteropError, match="module names"):
        export_adapter(cfg, _perturbed(cfg), tmp_path / "out")


@pytest.mark.slow
def test_lmtrain_export_of_a_lora_run_merged_adapter_and_base(tmp_path, capsys):
    """The CLI on a trained GPT-2 LoRA run: the merged export, and PEFT's adapter on the --base export, compute
    lmtrain's logits."""
    from lmtrain.train.trainer import train
    from lmtrain.workdir import restore_params

    run = tmp_path / "run"
    train(small_config("gpt2", **{"model.vocab_size": 512, "data.max_docs": 40, "train.steps": 2, "train.eval_every": 0,
                                  "checkpoint.every": 2, "model.lora_rank": 4, "model.lora_targets": ("c_attn", "c_fc"),
                                  "optimizer.lr": 1e-2, "checkpoint.async_save": False}), run)
    out = {name: tmp_path / name for name in ("merged", "adapter", "base")}
    assert hf_export.main([str(run), str(out["merged"])]) == 0
    assert hf_export.main([str(run), str(out["adapter"]), "--adapter", "--base-model", "my-gpt2"]) == 0
    assert "peft.PeftModel.from_pretrained" in capsys.readouterr().out
    assert hf_export.main([str(run), str(out["base"]), "--base"]) == 0
    config = json.loads((out["adapter"] / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "my-gpt2" and config["target_modules"] == ["c_attn", "c_fc"]
    assert sorted(p.name for p in out["adapter"].iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    cfg, params = restore_params(run)
    from lmtrain.workdir import workdir_model_config

    model_cfg = workdir_model_config(cfg, run)
    ids = np.random.RandomState(3).randint(0, 512, (2, 12)).astype(np.int32)
    ours = _ours(model_cfg, params, ids)
    assert np.abs(ours - _torch_logits(_hf_model(out["merged"]), ids)).max() <= TOLERANCE
    assert np.abs(ours - _torch_logits(_peft_model(out["base"], out["adapter"]), ids)).max() <= TOLERANCE
    base_cfg, base = without_adapters(model_cfg, params)
    assert np.abs(_ours(base_cfg, base, ids) - _torch_logits(_hf_model(out["base"]), ids)).max() <= TOLERANCE

    # an adapter export is replaced only with --force, like a model export
    assert hf_export.main([str(run), str(out["adapter"]), "--adapter"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert hf_export.main([str(run), str(out["adapter"]), "--adapter", "--force"]) == 0
    assert json.loads((out["adapter"] / "adapter_config.json").read_text())["base_model_name_or_path"] is None
