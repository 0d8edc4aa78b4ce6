"""Group Relative Policy Optimization (`task.name='grpo'`): reinforcement fine-tuning from a reward function.

Prompts are sft records (tools/shard_data.py --format sft): the prompt, and its completion as the reference answer
that the verifiable rewards compare against. Each step (`rollout`, run by the trainer on the host before the
jitted step, with the current parameters):

1. the first example of each batch row gives one prompt; the KV-cache generator (lmtrain.model.decode) samples
   G = task.grpo_group_size completions of it (task.grpo_temperature, task.grpo_top_p), at most
   task.grpo_max_new_tokens each, with a key drawn from the checkpointed state's rng and the step: a resumed run
   samples exactly what the straight run sampled;
2. the reward (lmtrain.tasks.rewards, task.grpo_reward) scores each completion;
3. advantages are normalised within each group: A_i = (r_i - mean_g r) / (std_g r + 1e-4), std with ddof=1 as
   the GRPO paper's (and TRL's) torch.std; task.grpo_scale_std=False keeps only the mean-centring (Dr. GRPO);
4. the old policy's per-token log-probabilities (these same sampling parameters) and the reference's are computed
   once; the reference is the frozen starting weights (init_aux), or under LoRA the same model with its adapters
   zeroed: the base, bit for bit, at no extra memory.

The loss per completion token t of sample i, with ratio rho = exp(logp - logp_old):

    l_it = -( min(rho A_i, clip(rho, 1 - eps, 1 + eps) A_i) - beta KL_it ),
    KL_it = exp(ref - logp) - (ref - logp) - 1          (the k3 estimator, >= 0, as in the GRPO paper)

Normalisation: per token over the group. The loss is the sum of l_it over every completion token of every group
in the global batch, divided by their count (DAPO's token-level mean). The GRPO paper averages each sample over
its own tokens first, which weights a token of a short completion more than one of a long one (the length bias
Dr. GRPO points out); a token-level mean weights every token alike, and, being one sum divided once, makes
gradient accumulation (train.grad_accum) equal one big batch, however the groups are split. The trainer's step
divides by the token count (lmtrain.train.step), so the sampled completions' statistics that ride in the batch
(`rollout_stats`) are pre-scaled by tokens / samples to come out as means per sample.

One optimizer step per rollout: the ratio is 1 in value at the step (its gradient is the policy gradient), so
the clipped fraction is 0 unless dropout is on; the clip is there, tested, for the update it would bound.
Log-probabilities are the model's own (temperature 1): the sampling temperature is exploration, not the policy.
Rewards run in Python on the host, so GRPO trains in one process (any number of local devices).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lmtrain.errors import ConfigError
from lmtrain.model import ModelDef
from lmtrain.model.adapters import adapter_method, adapters_on
from lmtrain.model.decode import SamplingConfig, make_generate_fn, sampling_values
from lmtrain.tasks.base import dropout_key
from lmtrain.tasks.lm import LanguageModelling
from lmtrain.tasks.losses import cross_entropy_and_log_z
from lmtrain.tasks.options import GrpoOptions
from lmtrain.tasks.rewards import make_reward

SAMPLING_STREAM = 0x6772706F  # folded into the step's key: rollouts draw other bits than dropout
STATS = ("reward", "reward_group_std", "completion_len")  # per-sample rollout statistics, logged as means
ADV_EPS = 1e-4


# ---------------------------------------------------------------------------------------------- the formulas


def group_advantages(rewards_R: np.ndarray, group_size: int, scale_std: bool) -> np.ndarray:
    """Each sample's reward minus its group's mean (over G consecutive samples), divided by the group's std."""
    r_NxG = np.asarray(rewards_R, np.float64).reshape(-1, group_size)
    centred_NxG = r_NxG - r_NxG.mean(axis=1, keepdims=True)
    if scale_std:
        centred_NxG = centred_NxG / (r_NxG.std(axis=1, ddof=1, keepdims=True) + ADV_EPS)
    return centred_NxG.reshape(-1).astype(np.float32)


def token_objective(logp_BxL, old_logp_BxL, ref_logp_BxL, advantages_B, clip_eps: float, kl_coef: float):
    """(loss_BxL, kl_BxL, clipped_BxL): the per-token GRPO loss, its KL term and where the clip is active."""
    ratio_BxL = jnp.exp(logp_BxL - old_logp_BxL)
    adv_Bx1 = advantages_B[:, None]
    unclipped_BxL = ratio_BxL * adv_Bx1
    clipped_obj_BxL = jnp.clip(ratio_BxL, 1 - clip_eps, 1 + clip_eps) * adv_Bx1
    log_ref_ratio_BxL = ref_logp_BxL - logp_BxL
    kl_BxL = jnp.exp(log_ref_ratio_BxL) - log_ref_ratio_BxL - 1
    loss_BxL = -(jnp.minimum(unclipped_BxL, clipped_obj_BxL) - kl_coef * kl_BxL)
    clipped_BxL = clipped_obj_BxL < unclipped_BxL  # the min took the clipped term
    return loss_BxL, kl_BxL, clipped_BxL


def token_logps(model_def: ModelDef, params, batch: dict, dropout=None):
    """log p(target) per token, float32 [B, L]."""
    logits = model_def.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"], dropout)
    ce_BxL, _ = cross_entropy_and_log_z(logits, batch["targets"], model_def.cfg.vocab_size)
    return -ce_BxL


def adapters_off(params: dict, cfg) -> dict:
    """The parameters with every adapter zeroed: the base model's function (a zero LoRA adds exactly 0)."""
    prefix = adapter_method(cfg).prefix

    def walk(node: dict, inside: bool) -> dict:
        return {k: walk(v, inside or k.startswith(prefix)) if isinstance(v, dict)
                else (jnp.zeros_like(v) if inside or k.startswith(prefix) else v) for k, v in node.items()}

    return walk(params, False)


# ---------------------------------------------------------------------------------------------- rollouts


def first_examples(batch: dict) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, references) of the first packed example of each row: one prompt per row, so a step's shapes
    are fixed."""
    return packed_examples(batch, first_only=True)


def packed_examples(batch: dict, first_only: bool = False) -> tuple[list[list[int]], list[list[int]]]:
    """(prompts, references) of the packed examples of each row. An example's prompt is its inputs up to the first
    target in the loss mask; its reference, the targets in the loss mask (the completion and its EOS)."""
    prompts, references = [], []
    for inputs, targets, mask, segments in zip(batch["inputs"], batch["targets"], batch["loss_mask"],
                                               batch["segment_ids"]):
        for segment in dict.fromkeys(segments.tolist()[:1] if first_only else segments.tolist()):
            if segment == 0:  # padding
                continue
            at = np.flatnonzero(segments == segment)
            in_loss = mask[at] > 0
            first = int(np.argmax(in_loss)) if in_loss.any() else len(at) - 1
            prompts.append(inputs[at[:first + 1]].tolist())
            references.append(targets[at][in_loss].tolist())
    return prompts, references


def completion_rows(prompts: list[list[int]], completions: list[list[int]], length: int) -> dict:
    """Training rows of `length` for prompt + completion: the loss mask covers the completion's tokens only."""
    R = len(prompts)
    rows = {"inputs": np.zeros((R, length), np.int32), "targets": np.zeros((R, length), np.int32),
            "loss_mask": np.zeros((R, length), np.float32), "segment_ids": np.zeros((R, length), np.int32),
            "positions": np.zeros((R, length), np.int32)}
    for r, (prompt, completion) in enumerate(zip(prompts, completions)):
        seq = [*prompt, *completion]
        n = len(seq) - 1
        rows["inputs"][r, :n], rows["targets"][r, :n] = seq[:-1], seq[1:]
        rows["loss_mask"][r, len(prompt) - 1:n] = 1.0
        rows["segment_ids"][r, :n] = 1
        rows["positions"][r, :n] = np.arange(n)
    return rows


def cut_at_end(tokens_RxN: np.ndarray, ends: tuple[int, ...]) -> list[list[int]]:
    """Each row's tokens up to and including its first end token."""
    out = []
    for row in tokens_RxN.tolist():
        end = next((i for i, t in enumerate(row) if t in ends), None)
        out.append(row if end is None else row[:end + 1])
    return out


def sampling_key(rng_data, step: int) -> jax.Array:
    """The rollout key of a step: from the train state's rng (saved in every checkpoint) and the step."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(rng_data), step), SAMPLING_STREAM)


@dataclasses.dataclass
class Rollout:
    """One step's samples, as text (for rewards and logs) and as training rows."""

    prompts: list[str]
    completions: list[str]
    references: list[str]
    rewards: np.ndarray
    batch: dict


class GroupRelativePolicyOptimization(LanguageModelling):
    name = "grpo"
    formats = ("sft",)
    head = "lm"
    eval_kind = None  # the generic scoring: val_loss of the reference answers, and val_reward (extra_eval)
    on_policy = True
    options = GrpoOptions
    METRIC_MODES = {**LanguageModelling.METRIC_MODES, "val_reward": "max"}

    def __init__(self, cfg):
        super().__init__(cfg)
        t = cfg.task
        self.group_size, self.max_new = int(t.grpo_group_size), int(t.grpo_max_new_tokens)
        self.reward = make_reward(str(t.grpo_reward))  # an unimportable function fails here, before training
        self.tokenizer = None
        self._fns: dict = {}
        self._eval_prompts = None

    # ------------------------------------------------------------------ data, reference
    def make_data(self, workdir, data_index: int, data_count: int):
        if jax.process_count() > 1:
            raise ConfigError("task.name=grpo scores rollouts in Python on one host: train it in one process.")
        if self.cfg.data.source != "shards":
            raise ConfigError("task.name=grpo reads prompts and reference answers from sft shards: set "
                              "data.source=shards and make them with tools/shard_data.py --format sft.")
        if self.max_new >= self.cfg.data.seq_len:
            raise ConfigError(f"task.grpo_max_new_tokens={self.max_new} leaves no room for a prompt in "
                              f"data.seq_len={self.cfg.data.seq_len}; lower it or raise data.seq_len.")
        data = super().make_data(workdir, data_index, data_count)
        self.tokenizer = data.tokenizer
        return data

    def init_aux(self, model_def: ModelDef, start_params: dict):
        """The reference: the starting weights, frozen. Under LoRA none is kept (the adapters are zeroed instead)."""
        return None if adapters_on(model_def.cfg) else start_params

    def reference(self, model_def: ModelDef, aux, params: dict) -> dict:
        return adapters_off(params, model_def.cfg) if aux is None else aux

    # ------------------------------------------------------------------ the on-policy seam
    def _sampling(self, temperature: float, top_p: float) -> SamplingConfig:
        eos = self.tokenizer.eos_token_id if self.tokenizer is not None else None
        return SamplingConfig(max_new_tokens=self.max_new, temperature=temperature, top_p=top_p, eos_id=eos)

    def _fn(self, name: str, model_def: ModelDef):
        if name not in self._fns:
            if name == "generate":
                self._fns[name] = make_generate_fn(model_def, self.max_new, pad_id=0)
            else:
                self._fns[name] = jax.jit(lambda params, batch: token_logps(model_def, params, batch))
        return self._fns[name]

    def sample(self, model_def: ModelDef, params, prompts: list[list[int]], width: int, key,
               sampling: SamplingConfig) -> list[list[int]]:
        """Completions of left-padded prompts of a fixed width (one compiled program for every batch)."""
        too_long = max(len(p) for p in prompts)
        if too_long > width:
            raise ConfigError(f"a prompt of {too_long} tokens plus task.grpo_max_new_tokens={self.max_new} exceeds "
                              f"data.seq_len={width + self.max_new}; shorten the prompts, lower "
                              "task.grpo_max_new_tokens or raise data.seq_len.")
        tokens_RxP = np.zeros((len(prompts), width), np.int32)
        for r, p in enumerate(prompts):
            tokens_RxP[r, width - len(p):] = p
        pad_R = np.asarray([width - len(p) for p in prompts], np.int32)
        new_RxN, _ = self._fn("generate", model_def)(params, tokens_RxP, pad_R, key, sampling_values(sampling))
        return cut_at_end(np.asarray(jax.device_get(new_RxN)), sampling.ends)

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def rollout_of(self, model_def: ModelDef, aux, params, batch: dict, key) -> Rollout:
        host = jax.device_get(batch)
        length, G = host["inputs"].shape[1], self.group_size
        prompts, references = first_examples(host)
        repeated = [p for p in prompts for _ in range(G)]
        sampling = self._sampling(float(self.cfg.task.grpo_temperature), float(self.cfg.task.grpo_top_p))
        completions = self.sample(model_def, params, repeated, length - self.max_new, key, sampling)
        texts = [self._text(p) for p in prompts]
        prompt_texts = [t for t in texts for _ in range(G)]
        ref_texts = [self._text(r) for r in references for _ in range(G)]
        completion_texts = [self._text(c) for c in completions]
        rewards = np.asarray(self.reward(prompt_texts, completion_texts, ref_texts), np.float32)
        rows = completion_rows(repeated, completions, length)
        rows["advantages"] = group_advantages(rewards, G, bool(self.cfg.task.grpo_scale_std))
        logps = self._fn("logps", model_def)
        rows["old_logp"] = np.asarray(logps(params, rows))
        rows["ref_logp"] = np.asarray(logps(self.reference(model_def, aux, params), rows))
        rows["rollout_stats"] = rollout_stats(rewards, [len(c) for c in completions], G, rows["loss_mask"].sum())
        return Rollout(prompt_texts, completion_texts, ref_texts, rewards, rows)

    def rollout(self, model_def: ModelDef, aux, params, batch: dict, rng_data, step: int) -> dict:
        """The seam (lmtrain.tasks.base.Task.rollout): this step's training batch, sampled with `params`."""
        return self.rollout_of(model_def, aux, params, batch, sampling_key(rng_data, step)).batch

    # ------------------------------------------------------------------ loss and evaluation
    def loss_fn(self, model_def: ModelDef):
        eps, beta = float(self.cfg.task.grpo_clip_eps), float(self.cfg.task.grpo_kl_coef)

        def loss_fn(params, batch, rng):
            logp_BxL = token_logps(model_def, params, batch, dropout_key(model_def.cfg, rng))
            loss_BxL, kl_BxL, clipped_BxL = token_objective(logp_BxL, batch["old_logp"], batch["ref_logp"],
                                                            batch["advantages"], eps, beta)
            mask = batch["loss_mask"].astype(jnp.float32)
            sums = {"kl": jnp.sum(kl_BxL * mask), "clip_fraction": jnp.sum(clipped_BxL * mask)}
            sums.update({name: jnp.sum(batch["rollout_stats"][:, i]) for i, name in enumerate(STATS)})
            return jnp.sum(loss_BxL * mask), jnp.sum(mask), sums

        return loss_fn

    def extra_eval(self, model_def, params, data) -> dict[str, float]:
        """val_reward: the mean reward of greedy answers to the first task.grpo_eval_prompts validation prompts."""
        n = int(self.cfg.task.grpo_eval_prompts)
        if not n:
            return {}
        if self._eval_prompts is None:
            self._eval_prompts = validation_prompts(data, n)
        prompts, references, length = self._eval_prompts
        if not prompts:
            return {}
        completions = self.sample(model_def, params, prompts, length - self.max_new, jax.random.key(0),
                                  self._sampling(0.0, 1.0))
        rewards = self.reward([self._text(p) for p in prompts], [self._text(c) for c in completions],
                              [self._text(r) for r in references])
        return {"val_reward": float(np.mean(rewards))}


def rollout_stats(rewards_R: np.ndarray, lengths_R: list[int], group_size: int, n_tokens: float) -> np.ndarray:
    """[R, len(STATS)] per sample, scaled by n_tokens / R: the step divides sums by the token count, which turns
    them into means per sample."""
    group_std_R = np.repeat(rewards_R.reshape(-1, group_size).std(axis=1), group_size)
    stats = np.stack([rewards_R, group_std_R, np.asarray(lengths_R, np.float32)], axis=1)
    return (stats * (n_tokens / len(rewards_R))).astype(np.float32)


def validation_prompts(data, n: int) -> tuple[list[list[int]], list[list[int]], int]:
    """(prompts, references, row length) of the first n validation examples."""
    prompts, references, length = [], [], 0
    for batch in data.eval_batches(0):
        p, r = packed_examples(batch)
        prompts += p
        references += r
        length = batch["inputs"].shape[1]
        if len(prompts) >= n:
            break
    return prompts[:n], references[:n], length
