"""GRPO: advantages and the clipped objective against formulas written out here, accumulation equal to one batch,
resume equal to straight (the rollout key is checkpointed), the rewards, and the one-line errors."""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

from lmtrain.config import apply_overrides, validate
from lmtrain.errors import ConfigError
from lmtrain.model import ModelConfig, ModelDef
from lmtrain.model.adapters import without_adapters
from lmtrain.tasks import make_task
from lmtrain.tasks.grpo import (
    GroupRelativePolicyOptimization,
    adapters_off,
    first_examples,
    group_advantages,
    packed_examples,
    sampling_key,
    token_logps,
    token_objective,
)
from lmtrain.tasks.rewards import make_reward
from lmtrain.train.trainer import Components, train
from tests.helpers import small_config

G = 4


def _records(n: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        a, b = rng.integers(0, 10, 2)
        yield {"prompt": f"{a}+{b}=", "completion": str(a + b)}


@pytest.fixture(scope="module")
def grpo_shards(tokenizer_512, tmp_path_factory):
    """Short arithmetic prompts with their answers as sft shards: (tokenizer, shards)."""
    from tools import shard_data

    root = tmp_path_factory.mktemp("grpo")
    (root / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records(80, 0)))
    assert shard_data.main(["--input", str(root / "sums.jsonl"), "--format", "sft", "--tokenizer", tokenizer_512,
                            "--output", str(root / "shards"), "--seq-len", "16", "--val-fraction", "0.2",
                            "--quiet"]) == 0
    return tokenizer_512, str(root / "shards")


def _cfg(tok, shards, **kw):
    values = {"task.name": "grpo", "data.source": "shards", "data.tokenizer_dir": tok, "data.shards_dir": shards,
              "model.vocab_size": 512, "data.seq_len": 16, "model.max_seq_len": 16, "data.batch_size": 8,
              "task.grpo_group_size": G, "task.grpo_max_new_tokens": 6, "train.steps": 4, "train.log_every": 1,
              "train.eval_every": 2, "train.eval_batches": 1, "checkpoint.every": 2, "optimizer.lr": 3e-3,
              "task.grpo_eval_prompts": 4, "train.sample_tokens": 0}
    values.update(kw)
    return small_config("llama", **values)


# ---------------------------------------------------------------------------------------------- formulas


def test_group_advantages_are_the_group_normalised_rewards():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, 1.0, 2.0, 0.0])
    want = []
    for g in range(3):
        r = rewards[g * 4:(g + 1) * 4]
        mean = sum(r) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / 3)  # unbiased, as torch.std
        want += [(x - mean) / (std + 1e-4) for x in r]
    np.testing.assert_allclose(group_advantages(rewards, 4, True), want, rtol=1e-6, atol=1e-7)
    centred = [x - sum(rewards[i // 4 * 4:i // 4 * 4 + 4]) / 4 for i, x in enumerate(rewards)]
    np.testing.assert_allclose(group_advantages(rewards, 4, False), centred, rtol=1e-6, atol=1e-7)
    assert not np.any(group_advantages(rewards, 4, True)[4:8])  # equal rewards teach nothing


def test_the_clipped_objective_and_kl_equal_the_formula_token_by_token():
    rng = np.random.default_rng(0)
    B, L, eps, beta = 3, 5, 0.2, 0.1
    logp, old, ref = (rng.normal(-2.0, 0.4, (B, L)) for _ in range(3))
    adv = np.array([1.5, -0.7, 0.3])
    loss, kl, clipped = map(np.asarray, token_objective(logp, old, ref, adv, eps, beta))
    for b in range(B):
        for t in range(L):
            ratio = math.exp(logp[b, t] - old[b, t])
            surrogate = min(ratio * adv[b], max(min(ratio, 1 + eps), 1 - eps) * adv[b])
            k3 = math.exp(ref[b, t] - logp[b, t]) - (ref[b, t] - logp[b, t]) - 1
            np.testing.assert_allclose(loss[b, t], -(surrogate - beta * k3), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(kl[b, t], k3, rtol=1e-5, atol=1e-7)
            outside = ratio > 1 + eps if adv[b] > 0 else ratio < 1 - eps
            assert bool(clipped[b, t]) == outside
    assert clipped.any() and not clipped.all()  # the draw exercises both branches


def test_the_loss_is_the_token_mean_over_every_group(grpo_shards):
    """Per token over the group (DAPO): the step's loss is the summed token losses over the summed tokens."""
    tok, shards = grpo_shards
    cfg = _cfg(tok, shards)
    parts = Components.from_config(cfg)
    params = parts.model_def.init(jax.random.key(0))
    batch = _rollout_batch(np.random.default_rng(3), parts.model_def, params)
    loss_sum, weight, _ = parts.task.loss_fn(parts.model_def)(params, batch, None)
    logp = np.asarray(token_logps(parts.model_def, params, batch))
    mask = batch["loss_mask"]
    per_token = np.asarray(token_objective(logp, batch["old_logp"], batch["ref_logp"], batch["advantages"],
                                           0.2, cfg.task.grpo_kl_coef)[0])
    assert float(weight) == mask.sum()
    np.testing.assert_allclose(float(loss_sum) / float(weight), (per_token * mask).sum() / mask.sum(), rtol=1e-5)
    # not the mean of per-sample means: completions of different lengths make the two differ
    per_sample = ((per_token * mask).sum(1) / mask.sum(1)).mean()
    assert abs(per_sample - float(loss_sum) / float(weight)) > 1e-4


def _rollout_batch(rng, model_def, params, rows=8, length=16):
    """A GRPO training batch with completions of very different lengths and old/ref log-probs off the policy."""
    mask = np.zeros((rows, length), np.float32)
    for r in range(rows):
        start = rng.integers(2, 8)
        mask[r, start:start + rng.integers(1, length - start)] = 1.0
    batch = {"inputs": rng.integers(0, 256, (rows, length), dtype=np.int32),
             "targets": rng.integers(0, 256, (rows, length), dtype=np.int32), "loss_mask": mask,
             "segment_ids": np.ones((rows, length), np.int32),
             "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
             "advantages": rng.normal(0, 1, rows).astype(np.float32),
             "rollout_stats": rng.random((rows, 3)).astype(np.float32)}
    logp = np.asarray(token_logps(model_def, params, batch))
    batch["old_logp"] = (logp + rng.normal(0, 0.3, logp.shape)).astype(np.float32)  # some ratios clip
    batch["ref_logp"] = (logp + rng.normal(0, 0.3, logp.shape)).astype(np.float32)
    return batch


def test_gradient_accumulation_equals_one_big_batch(grpo_shards):
    tok, shards = grpo_shards
    out = {}
    for accum in (1, 4):
        cfg = _cfg(tok, shards, **{"train.grad_accum": accum, "data.batch_size": 8, "optimizer.name": "sgd",
                                   "optimizer.momentum": 0.0, "optimizer.weight_decay": 0.0,
                                   "optimizer.clip_norm": 0.0, "optimizer.lr": 1.0})
        parts = Components.from_config(cfg)
        params = parts.model_def.init(jax.random.key(0))
        batch = _rollout_batch(np.random.default_rng(1), parts.model_def, params)
        state = {"params": params, "opt_state": parts.tx.init(params), "step": np.int32(0),
                 "rng": jax.random.key_data(jax.random.key(1))}
        out[accum] = jax.jit(parts.train_step)(state, batch)
    (s1, m1), (s4, m4) = out[1], out[4]
    assert float(m1["clip_fraction"]) > 0 and float(m1["kl"]) > 0
    for key in ("loss", "kl", "clip_fraction", "reward", "grad_norm"):
        np.testing.assert_allclose(float(m4[key]), float(m1[key]), rtol=1e-5, err_msg=key)
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s4["params"])):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- rollouts


def test_rollouts_sample_groups_from_the_checkpointed_rng_and_score_them(grpo_shards, tmp_path):
    tok, shards = grpo_shards
    cfg = _cfg(tok, shards, **{"task.grpo_temperature": 1.5})
    parts = Components.from_config(cfg)
    task, model_def = parts.task, parts.model_def
    data = task.make_data(tmp_path, 0, 1)
    params = model_def.init(jax.random.key(0))
    batch = next(data.train)
    rng = jax.random.key_data(jax.random.key(7))
    one = task.rollout_of(model_def, params, params, batch, _key(rng, 3))
    again = task.rollout_of(model_def, params, params, batch, _key(rng, 3))
    other = task.rollout_of(model_def, params, params, batch, _key(rng, 4))
    assert one.completions == again.completions and one.completions != other.completions
    prompts, refs = first_examples(batch)
    every_prompt, every_ref = packed_examples(batch)  # what evaluation scores: all the packed examples
    assert len(every_prompt) > len(prompts) and set(map(tuple, prompts)) <= set(map(tuple, every_prompt))
    for prompt, ref in zip(every_prompt, every_ref):  # the shards' sums: each reference is its prompt's answer
        a, b = tok_decode(task, prompt).rstrip("=").split("+")
        assert tok_decode(task, ref) == str(int(a) + int(b)) and ref[-1] == task.tokenizer.eos_token_id
    assert len(one.completions) == G * len(prompts) == one.batch["inputs"].shape[0]
    assert one.prompts[:G] == [tok_decode(task, prompts[0])] * G and one.references[0] == tok_decode(task, refs[0])
    np.testing.assert_array_equal(one.rewards, [float(c.strip() == r.strip())
                                               for c, r in zip(one.completions, one.references)])
    # the loss covers exactly the sampled tokens, and the reference is the starting weights (KL 0 at the start)
    lengths = one.batch["rollout_stats"][:, 2] / (one.batch["loss_mask"].sum() / len(one.completions))
    np.testing.assert_allclose(one.batch["loss_mask"].sum(1), lengths, rtol=1e-5)
    np.testing.assert_array_equal(one.batch["old_logp"], one.batch["ref_logp"])


def _key(rng_data, step):
    return sampling_key(rng_data, step)


def tok_decode(task, ids):
    return task.tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.heavy  # ~60 s: three short runs; the rollout's key from (rng, step) is checked in the default run above
def test_resume_equals_straight(grpo_shards, tmp_path, compile_cache):
    tok, shards = grpo_shards
    cfg = _cfg(tok, shards)
    straight = train(cfg, tmp_path / "straight")
    stopped = train(_cfg(tok, shards), tmp_path / "resumed", stop_at_step=2)
    assert stopped.interrupted
    resumed = train(_cfg(tok, shards), tmp_path / "resumed")
    assert resumed.step == straight.step == 4

    def logged(name):
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    a, b = logged("straight"), logged("resumed")
    keys = ("loss", "kl", "reward", "reward_group_std", "completion_len", "clip_fraction", "grad_norm")
    assert [[r.get(k) for k in keys] for r in a if "loss" in r] == [[r.get(k) for k in keys] for r in b if "loss" in r]
    assert "val_reward" in straight.metrics and straight.metrics == resumed.metrics


# ---------------------------------------------------------------------------------------------- errors


def test_rewards_exact_match_and_regex():
    assert make_reward("exact_match")(["p"] * 3, [" 7", "7 ", "8"], ["7"] * 3) == [1.0, 1.0, 0.0]
    regex = make_reward(r"regex:=\s*(-?\d+)")
    assert regex(["p"] * 4, ["= 12", "x = 12.", "= 13", "twelve"], ["12"] * 4) == [1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("override, match", [
    ("task.grpo_group_size=1", r"task.grpo_group_size=1: .*at least 2"),
    ("task.grpo_kl_coef=-0.1", r"task.grpo_kl_coef=-0.1 must not be negative"),
    ("task.grpo_reward=no_such_module_xyz:score", r"task.grpo_reward='no_such_module_xyz:score' cannot be imported"),
    ("task.grpo_reward=regex:(", r"task.grpo_reward='regex:\(': not a regular expression"),
])
def test_bad_settings_are_one_line_errors_naming_the_key(override, match):
    cfg = small_config("llama", **{"task.name": "grpo"})
    key, value = override.split("=", 1)
    apply_overrides(cfg, {key: value})
    with pytest.raises(ConfigError, match=match):
        validate(cfg, 1)
        make_task(cfg)


def test_a_reward_of_the_wrong_shape_is_an_error_naming_the_key(grpo_shards, tmp_path, monkeypatch):
    """Raised by the rollout inside the training loop; `lmtrain train` prints a ConfigError as one line, exit 2."""
    tok, shards = grpo_shards
    (tmp_path / "bad_reward.py").write_text("def score(prompts, completions):\n    return [1.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    parts = Components.from_config(_cfg(tok, shards, **{"task.grpo_reward": "bad_reward:score"}))
    data = parts.task.make_data(tmp_path, 0, 1)
    params = parts.model_def.init(jax.random.key(0))
    with pytest.raises(ConfigError, match=r"^task.grpo_reward='bad_reward:score' returned 1 values for 32 "
                                          r"completions; return one float per completion.$"):
        parts.task.rollout_of(parts.model_def, params, params, next(data.train), _key(np.zeros(2, np.uint32), 0))


def test_under_lora_the_reference_is_the_base_bit_for_bit():
    """Adapters zeroed, not copied: the reference costs no memory, and equals the model without adapters exactly."""
    lora_cfg = ModelConfig.from_config(small_config("llama", **{"model.lora_rank": 4}).model)
    with_lora, base = ModelDef(lora_cfg), ModelDef(dataclasses.replace(lora_cfg, lora_rank=0))
    params = with_lora.init(jax.random.key(0))
    leaves, treedef = jax.tree.flatten(params)  # random weights and adapters (LoRA's B starts at 0)
    noise = [np.random.default_rng(i).normal(0, 0.2, x.shape).astype(x.dtype) for i, x in enumerate(leaves)]
    params = jax.tree.unflatten(treedef, [x + n for x, n in zip(leaves, noise)])
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (2, 12)).astype(np.int32)
    reference = with_lora.apply(adapters_off(params, lora_cfg), tokens)
    assert np.abs(np.asarray(with_lora.apply(params, tokens) - reference)).max() > 1e-2
    np.testing.assert_array_equal(np.asarray(reference),
                                  np.asarray(base.apply(without_adapters(params, lora_cfg), tokens)))
    assert GroupRelativePolicyOptimization.init_aux(None, with_lora, params) is None
