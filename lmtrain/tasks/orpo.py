"""Odds-ratio preference optimization (`task.name='orpo'`, Hong et al. 2024) on preference pairs (--format pref).

No reference model: the loss is the chosen completion's per-token mean NLL plus task.orpo_lambda times
-log sigmoid of the log odds ratio of the chosen to the rejected completion (per-token mean log-probabilities),
averaged over pairs, so it fine-tunes and aligns in one stage. The rewards reported are lambda times each
completion's mean log-probability, as TRL reports them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lmtrain.model import ModelDef
from lmtrain.tasks.dpo import pair_logps
from lmtrain.tasks.options import OrpoOptions
from lmtrain.tasks.preference import PreferenceTask, orpo_loss


class OddsRatioPreferenceOptimization(PreferenceTask):
    name = "orpo"
    head = "lm"
    generates_text = True
    options = OrpoOptions  # task.orpo_lambda

    def pair_terms(self, model_def: ModelDef, params: dict, batch: dict, rng) -> dict:
        lam = self.cfg.task.orpo_lambda
        chosen_B, rejected_B, n_chosen_B, n_rejected_B = pair_logps(model_def, params, batch, rng)
        chosen_mean_B, rejected_mean_B = chosen_B / jnp.maximum(n_chosen_B, 1.0), rejected_B / jnp.maximum(n_rejected_B, 1.0)
        odds_term_B, log_odds_ratio_B = orpo_loss(chosen_mean_B, rejected_mean_B, lam)
        stop = jax.lax.stop_gradient
        return {"loss": -chosen_mean_B + odds_term_B, "chosen_reward": lam * stop(chosen_mean_B),
                "rejected_reward": lam * stop(rejected_mean_B), "log_odds_ratio": stop(log_odds_ratio_B),
                "chosen_logp": stop(chosen_B), "rejected_logp": stop(rejected_B)}
