"""What the preference tasks (dpo, orpo, reward) share: pair batches (lmtrain.data.formats.pref: one pair per
row, chosen as segment 1, rejected as segment 2), the sequence log-probabilities of both completions, the
published losses on them, and the pair metrics.

A task gives per-pair terms (`pair_terms`): the loss, the implicit rewards of chosen and rejected, and extra
per-pair values to report. Everything is summed over the pairs of the global batch and divided by their number
(`weights` is 0 on padding rows), so gradient accumulation equals one big batch. Metrics: reward_accuracy (the
share of pairs whose chosen completion gets the higher reward), margin (the mean reward difference) and the
task's own (chosen_logp and rejected_logp: the mean summed log-probability of each completion).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmtrain.errors import ConfigError
from lmtrain.model import ModelDef
from lmtrain.tasks.base import Task
from lmtrain.tasks.losses import cross_entropy_and_log_z

CHOSEN, REJECTED = 1, 2  # the segment ids of a pair row's two sequences


def sequence_logps(logits_BxLxV, batch: dict, vocab_size: int):
    """(chosen, rejected, chosen tokens, rejected tokens), each [B]: the summed log-probability of each
    completion's tokens (the masked-in targets of its segment), float32, and how many tokens it has."""
    ce_BxL, _ = cross_entropy_and_log_z(logits_BxLxV, batch["targets"], vocab_size)
    mask_BxL = batch["loss_mask"].astype(jnp.float32)
    out = []
    for segment in (CHOSEN, REJECTED):
        in_seg = (batch["segment_ids"] == segment) * mask_BxL
        out.append((-jnp.sum(ce_BxL * in_seg, -1), jnp.sum(in_seg, -1)))
    (chosen_B, n_chosen_B), (rejected_B, n_rejected_B) = out
    return chosen_B, rejected_B, n_chosen_B, n_rejected_B


def dpo_loss(policy_chosen_B, policy_rejected_B, ref_chosen_B, ref_rejected_B, beta: float,
             label_smoothing: float = 0.0, loss_type: str = "sigmoid"):
    """(loss, chosen reward, rejected reward), each [B], from the log-probabilities of the policy and the reference.

    sigmoid (Rafailov et al. 2023, with cDPO's label smoothing e): with h = (pi_c - ref_c) - (pi_r - ref_r),
    loss = -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h). ipo (Azar et al. 2023): (h - 1 / (2 beta))^2,
    given per-token mean log-probabilities (the caller divides, as TRL does). Rewards: beta (pi - ref).
    """
    chosen_ratio_B, rejected_ratio_B = policy_chosen_B - ref_chosen_B, policy_rejected_B - ref_rejected_B
    h_B = chosen_ratio_B - rejected_ratio_B
    if loss_type == "ipo":
        loss_B = jnp.square(h_B - 1.0 / (2.0 * beta))
    else:
        loss_B = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h_B)
                  - label_smoothing * jax.nn.log_sigmoid(-beta * h_B))
    return loss_B, beta * jax.lax.stop_gradient(chosen_ratio_B), beta * jax.lax.stop_gradient(rejected_ratio_B)


def orpo_loss(chosen_mean_B, rejected_mean_B, lam: float):
    """(odds-ratio term, log odds ratio), each [B], from per-token mean log-probabilities (Hong et al. 2024):
    -lam log sigmoid(log odds(chosen) - log odds(rejected)), log odds(p) = log p - log(1 - p)."""
    def log_odds(mean_logp_B):
        return mean_logp_B - jnp.log(-jnp.expm1(mean_logp_B))  # log(1 - p) without cancelling near p = 1

    log_odds_ratio_B = log_odds(chosen_mean_B) - log_odds(rejected_mean_B)
    return -lam * jax.nn.log_sigmoid(log_odds_ratio_B), log_odds_ratio_B


class PreferenceTask(Task):
    """The pair tasks' common part; a subclass gives `pair_terms`."""

    formats = ("pref",)
    METRIC_MODES = {"val_loss": "min", "val_reward_accuracy": "max", "val_margin": "max"}

    def make_data(self, workdir, data_index: int, data_count: int):
        if self.cfg.data.source != "shards":
            raise ConfigError(f"task.name={self.name} trains on preference pairs: set data.source=shards and make them "
                              "with tools/shard_data.py --format pref (or --builtin-task pref for the demo).")
        return super().make_data(workdir, data_index, data_count)

    def pair_terms(self, model_def: ModelDef, params: dict, batch: dict, rng) -> dict:
        """Per-pair [B] arrays: "loss", "chosen_reward", "rejected_reward", and any others to report (summed)."""
        raise NotImplementedError

    def _sums(self, model_def: ModelDef, params: dict, batch: dict, rng) -> tuple:
        terms = self.pair_terms(model_def, params, batch, rng)
        w_B = batch["weights"]
        chosen_B, rejected_B = terms.pop("chosen_reward"), terms.pop("rejected_reward")
        loss_sum = jnp.sum(terms.pop("loss") * w_B)
        sums = {"reward_accuracy": jnp.sum((chosen_B > rejected_B) * w_B), "margin": jnp.sum((chosen_B - rejected_B) * w_B),
                **{k: jnp.sum(v * w_B) for k, v in terms.items()}}
        return loss_sum, jnp.sum(w_B), sums

    def loss_fn(self, model_def: ModelDef):
        def loss_fn(params, batch, rng):
            return self._sums(model_def, params, batch, rng)

        return loss_fn

    def eval_step(self, model_def: ModelDef):
        def eval_step(params, batch):
            loss_sum, pairs, sums = self._sums(model_def, params, batch, None)
            return {"loss_sum": loss_sum, "pairs": pairs, **sums}

        return eval_step

    def eval_metrics(self, sums: dict) -> dict[str, float]:
        pairs = float(sums.get("pairs", 0))
        if not pairs:
            return {}
        return {"val_loss": float(sums["loss_sum"]) / pairs,
                **{f"val_{k}": float(v) / pairs for k, v in sums.items() if k not in ("loss_sum", "pairs")}}
