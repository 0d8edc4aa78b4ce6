"""dpo and orpo: the losses equal the published formulas written out here, sequence log-probabilities equal
transformers' on an exported model, the LoRA reference is the base bit for bit, resume equals straight, and the
DPO step is the same sharded over the 8 fake devices as on one."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec
from transformers import AutoModelForCausalLM

from lmtrain.config import ConfigError
from lmtrain.data.formats.pref import pair_batch
from lmtrain.interop.hf_export import export_params
from lmtrain.model import ModelConfig, ModelDef
from lmtrain.model.adapters import without_adapters
from lmtrain.parallel.mesh import make_mesh
from lmtrain.parallel.partitioning import axis_rules, logical_to_spec
from lmtrain.tasks import make_task, validate_task_config
from lmtrain.tasks.dpo import pair_logps
from lmtrain.tasks.preference import dpo_loss, orpo_loss
from lmtrain.train.state import create_sharded_state
from lmtrain.train.trainer import Components, train
from tests.helpers import small_config
from tests.interop.test_hf_export import _perturbed_params
from tests.interop.test_hf_import import VOCAB
from tools import shard_data

SEQ = 48


def _log_sigmoid(x):
    return -np.log1p(np.exp(-x))


def _logps(seed=0, n=16):
    rs = np.random.RandomState(seed)
    return [rs.uniform(-60.0, -5.0, n).astype(np.float32) for _ in range(4)]


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0)])
def test_dpo_loss_equals_the_published_formula(loss_type, smoothing):
    pc, pr, rc, rr = _logps()
    beta = 0.3
    loss, chosen_reward, rejected_reward = dpo_loss(pc, pr, rc, rr, beta, smoothing, loss_type)
    h = (pc.astype(np.float64) - rc) - (pr.astype(np.float64) - rr)  # Rafailov et al. (2023), eq. 7
    if loss_type == "ipo":  # Azar et al. (2023), eq. 17
        expected = (h - 1 / (2 * beta)) ** 2
    else:  # cDPO: the label is flipped with probability `smoothing`
        expected = -(1 - smoothing) * _log_sigmoid(beta * h) - smoothing * _log_sigmoid(-beta * h)
    np.testing.assert_allclose(np.asarray(loss), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(chosen_reward), beta * (pc - rc), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(rejected_reward), beta * (pr - rr), rtol=1e-5)


def test_orpo_odds_ratio_term_equals_the_published_formula():
    rs = np.random.RandomState(3)
    chosen, rejected = rs.uniform(-4.0, -0.01, 16), rs.uniform(-4.0, -0.01, 16)
    term, log_odds_ratio = orpo_loss(jnp.asarray(chosen, jnp.float32), jnp.asarray(rejected, jnp.float32), 0.25)
    p_c, p_r = np.exp(chosen), np.exp(rejected)  # Hong et al. (2024), eq. 4-7
    ratio = np.log((p_c / (1 - p_c)) / (p_r / (1 - p_r)))
    np.testing.assert_allclose(np.asarray(log_odds_ratio), ratio, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(term), -0.25 * _log_sigmoid(ratio), rtol=1e-4, atol=1e-6)


def test_dpo_keys_are_checked_with_one_line_errors_naming_the_key():
    for key, value, words in (("task.dpo_beta", 0.0, "task.dpo_beta=0.0 must be > 0"),
                              ("task.dpo_loss", "hinge", "task.dpo_loss='hinge' is unknown"),
                              ("task.dpo_label_smoothing", 0.5, "task.dpo_label_smoothing=0.5"),
                              ("task.orpo_lambda", -1.0, "task.orpo_lambda=-1.0 must be > 0")):
        with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(".", r"\.")):
            validate_task_config(small_config("llama", **{"task.name": "dpo", key: value}))


def _pairs(vocab, n=4, seed=0):
    """Pair examples as the pref format stores them: random prompt and completions, masks on the completions."""
    rs = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        prompt = rs.randint(1, vocab, rs.randint(2, 6))
        seqs = [np.concatenate([prompt, rs.randint(1, vocab, rs.randint(2, 8))]) for _ in range(2)]
        masks = [np.concatenate([np.zeros(len(prompt), np.uint8), np.ones(len(s) - len(prompt), np.uint8)])
                 for s in seqs]
        out.append({"tokens": np.concatenate(seqs), "weights": np.concatenate(masks), "chosen_len": len(seqs[0]),
                    "_seqs": seqs, "_masks": masks})
    return out


def test_ipo_compares_per_token_means_and_orpo_adds_the_chosen_nll():
    """The tasks feed the losses what the papers do: IPO and ORPO per-token mean log-probabilities."""
    cfg = small_config("llama", **{"task.name": "dpo", "task.dpo_loss": "ipo", "task.dpo_beta": 0.5})
    task = make_task(cfg)
    model_def = ModelDef(task.model_config())
    params = model_def.init(jax.random.key(0))
    batch = pair_batch(_pairs(cfg.model.vocab_size), cfg.model.max_seq_len, 4)
    pc, pr, nc, nr = (np.asarray(x, np.float64) for x in pair_logps(model_def, params, batch))
    ref = {"ref_chosen_logp": np.float32(pc - 3.0), "ref_rejected_logp": np.float32(pr + 2.0)}
    terms = task.pair_terms(model_def, params, {**batch, **ref}, None)
    h = (pc / nc - (pc - 3.0) / nc) - (pr / nr - (pr + 2.0) / nr)
    np.testing.assert_allclose(np.asarray(terms["loss"]), (h - 1 / (2 * 0.5)) ** 2, rtol=1e-4)
    orpo = make_task(small_config("llama", **{"task.name": "orpo", "task.orpo_lambda": 0.3}))
    terms = orpo.pair_terms(model_def, params, batch, None)
    p_c, p_r = np.exp(pc / nc), np.exp(pr / nr)
    ratio = np.log(p_c / (1 - p_c)) - np.log(p_r / (1 - p_r))
    np.testing.assert_allclose(np.asarray(terms["loss"]), -pc / nc - 0.3 * _log_sigmoid(ratio), rtol=1e-4)


def test_sequence_logps_equal_transformers_on_an_exported_model(tmp_path):
    cfg = ModelConfig.from_config(small_config("llama", **{"model.vocab_size": VOCAB}).model)
    params = _perturbed_params(cfg)
    export_params(cfg, params, tmp_path)
    pairs = _pairs(VOCAB)
    batch = pair_batch(pairs, 32, 4)
    chosen, rejected, n_c, n_r = jax.jit(lambda p, b: pair_logps(ModelDef(cfg), p, b))(params, batch)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    for r, pair in enumerate(pairs):
        for ours, count, seq, mask in zip((chosen[r], rejected[r]), (n_c[r], n_r[r]), pair["_seqs"], pair["_masks"],
                                          strict=True):
            with torch.no_grad():
                logp = torch.log_softmax(hf(torch.tensor(seq[None])).logits[0].double(), -1).numpy()
            expected = sum(logp[t, seq[t + 1]] for t in range(len(seq) - 1) if mask[t + 1])
            assert abs(float(ours) - expected) <= 1e-4 and int(count) == mask.sum()


def test_under_lora_the_reference_is_the_base_with_adapters_off_bit_for_bit():
    lora = {"task.name": "dpo", "model.lora_rank": 4, "model.lora_targets": ("q", "v", "down")}
    cfg = small_config("llama", **lora)
    task = make_task(cfg)
    model_def = ModelDef(task.model_config())
    params = model_def.init(jax.random.key(0))
    # trained adapters: B away from its zero start, so the policy differs from the base
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.05 if any(getattr(k, "key", None) == "b" for k in path) else x, params)
    assert task.init_aux(model_def, params) is None  # nothing kept: the reference reads the policy's own base
    batch = pair_batch(_pairs(cfg.model.vocab_size), cfg.model.max_seq_len, 4)
    reference = jax.jit(lambda p, b: task.reference_logps(model_def, p, b))(params, batch)
    base_def = ModelDef(ModelConfig.from_config(small_config("llama").model).for_training())  # no LoRA at all
    base = jax.jit(lambda p, b: pair_logps(base_def, p, b)[:2])(without_adapters(params, model_def.cfg), batch)
    for ours, theirs in zip(reference, base, strict=True):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    policy = jax.jit(lambda p, b: pair_logps(model_def, p, b)[:2])(params, batch)
    assert np.abs(np.asarray(policy[0]) - np.asarray(reference[0])).max() > 1e-3


@pytest.fixture(scope="module")
def pref_shards(tokenizer_512, tmp_path_factory):
    root = tmp_path_factory.mktemp("pref")
    rs = np.random.RandomState(0)
    words = "alpha beta gamma delta the of and model data token train user".split()
    records = [{"prompt": " ".join(rs.choice(words, 4)), "chosen": " ".join(rs.choice(words[:4], 3)),
                "rejected": " ".join(rs.choice(words[4:], 3))} for _ in range(64)]
    (root / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert shard_data.main(["--input", str(root / "p.jsonl"), "--format", "pref", "--tokenizer", tokenizer_512,
                            "--output", str(root / "shards"), "--seq-len", str(SEQ), "--quiet"]) == 0
    return tokenizer_512, str(root / "shards")


def _dpo_cfg(pref_shards, **kw):
    tok, shards = pref_shards
    return small_config("llama", **{
        "task.name": "dpo", "data.source": "shards", "data.tokenizer_dir": tok, "data.shards_dir": shards,
        "model.vocab_size": 512, "data.seq_len": SEQ, "model.max_seq_len": SEQ, "optimizer.lr": 3e-3,
        "train.steps": 4, "train.log_every": 1, "train.eval_every": 2, "train.eval_batches": 1,
        "checkpoint.every": 2, "checkpoint.keep": 1, **kw})


def _step_metrics(workdir) -> dict[int, dict]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "loss" in r}


@pytest.mark.heavy  # ~45 s on 2 cores: three short runs; the sharded step test covers the loss in the default run
def test_dpo_resume_equals_straight_and_reports_pair_metrics(pref_shards, tmp_path):
    straight = train(_dpo_cfg(pref_shards), tmp_path / "straight")
    train(_dpo_cfg(pref_shards), tmp_path / "resumed", stop_at_step=2)
    resumed = train(_dpo_cfg(pref_shards), tmp_path / "resumed")
    a, b = _step_metrics(tmp_path / "straight"), _step_metrics(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        for key in ("loss", "reward_accuracy", "margin", "chosen_logp", "rejected_logp"):
            assert a[step][key] == b[step][key], (step, key)
    assert a[1]["loss"] == pytest.approx(np.log(2), abs=1e-6)  # the policy starts as its reference: margin 0
    assert straight.metrics == resumed.metrics
    assert {"val_loss", "val_reward_accuracy", "val_margin", "val_chosen_logp", "val_rejected_logp"} <= set(
        straight.metrics)


def _loss_and_grads(cfg, mesh_shape, batch, params):
    """The DPO loss sums and their gradients on a mesh of `mesh_shape`, parameters and batch sharded as in training."""
    mesh = make_mesh(mesh_shape, jax.devices()[: int(np.prod(mesh_shape))])
    rules = cfg.mesh.axis_rules
    parts = Components.from_config(cfg)
    loss_fn = parts.task.loss_fn(parts.model_def)
    with axis_rules(mesh, rules):
        _, shardings, _ = create_sharded_state(parts.model_def, parts.tx, 0, mesh, rules, parts.plan)
        rows = logical_to_spec(("batch",), rules, mesh)[0]
        batch_shardings = {k: NamedSharding(mesh, PartitionSpec(rows, *[None] * (v.ndim - 1)))
                           for k, v in batch.items()}  # per-row arrays [B, L] and per-pair ones [B]
        grad_fn = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, None)[0]),
                          in_shardings=(shardings["params"], batch_shardings))
        aux_fn = jax.jit(lambda p, b: loss_fn(p, b, None)[1:], in_shardings=(shardings["params"], batch_shardings))
        placed = jax.device_put(params, shardings["params"]), jax.device_put(batch, batch_shardings)
        (loss, grads), (weight, sums) = grad_fn(*placed), aux_fn(*placed)
        return {"loss": float(loss), "weight": float(weight), **{k: float(v) for k, v in sums.items()}}, \
            jax.device_get(grads)


@pytest.mark.multidevice
@pytest.mark.heavy  # ~30 s on 2 cores: compiling for the 8-device mesh
def test_dpo_loss_and_gradients_sharded_equal_unsharded():
    cfg = small_config("llama", **{"task.name": "dpo", "data.seq_len": SEQ, "model.max_seq_len": SEQ})
    parts = Components.from_config(cfg)
    reference = parts.model_def.init(jax.random.key(0))
    aux = parts.task.init_aux(parts.model_def, reference)
    params = jax.tree.map(lambda x: x + 0.01 * jax.random.normal(jax.random.key(1), x.shape, x.dtype), reference)
    pairs = _pairs(cfg.model.vocab_size, n=cfg.data.batch_size - 1)  # and a padding row
    batch = pair_batch(pairs, cfg.data.seq_len, cfg.data.batch_size)
    batch = {k: np.asarray(v) for k, v in jax.jit(parts.task.prepare)(aux, batch).items()}
    ref_sums, ref_grads = _loss_and_grads(cfg, (1, 1, 1), batch, params)
    assert ref_sums["weight"] == cfg.data.batch_size - 1  # pairs, not padding rows
    sums, grads = _loss_and_grads(cfg, (2, 2, 2), batch, params)  # data, FSDP and tensor parallel at once
    for key, value in ref_sums.items():
        assert sums[key] == pytest.approx(value, rel=2e-5, abs=1e-6), key
    for (path, ref), value in zip(jax.tree_util.tree_flatten_with_path(ref_grads)[0], jax.tree.leaves(grads)):
        np.testing.assert_allclose(value, ref, rtol=1e-4, atol=1e-7, err_msg=jax.tree_util.keystr(path))
