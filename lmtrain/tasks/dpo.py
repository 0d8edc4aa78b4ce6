"""Direct preference optimization (`task.name='dpo'`) on preference pairs (--format pref).

The policy is trained so that its log-probability ratio to a frozen reference prefers the chosen completion:
the sigmoid loss with task.dpo_beta and optional label smoothing, or IPO (lmtrain.tasks.preference.dpo_loss).
The reference is the model training starts from (the seed's initialisation, then train.init_from): a frozen
copy of those weights is the task's aux, and prepare(aux, batch) adds the reference's log-probabilities of
both completions to every batch. Under LoRA the reference is the base with the adapters switched off: the
same arrays as the policy's frozen base, so it costs no memory, computed inside the loss without gradient.
A resumed run rebuilds the same reference from the same start, so resume stays exact.
"""

from __future__ import annotations

import dataclasses

import jax

from lmtrain.model import ModelDef
from lmtrain.model.adapters import adapters_on, without_adapters
from lmtrain.tasks.base import dropout_key
from lmtrain.tasks.options import DpoOptions
from lmtrain.tasks.preference import PreferenceTask, dpo_loss, sequence_logps


def pair_logps(model_def: ModelDef, params: dict, batch: dict, rng=None):
    """sequence_logps of the model `params` on a pair batch."""
    logits = model_def.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"],
                             dropout_key(model_def.cfg, rng))
    return sequence_logps(logits, batch, model_def.cfg.vocab_size)


def base_model(model_def: ModelDef) -> ModelDef:
    """The model without adapters, which reads `without_adapters(params)`: the LoRA run's reference."""
    return ModelDef(dataclasses.replace(model_def.cfg, lora_rank=0))


class DirectPreferenceOptimization(PreferenceTask):
    name = "dpo"
    head = "lm"
    generates_text = True
    options = DpoOptions  # task.dpo_beta, task.dpo_loss, task.dpo_label_smoothing
    _reference: ModelDef | None = None

    def init_aux(self, model_def: ModelDef, start_params: dict):
        if adapters_on(model_def.cfg):
            return None  # the reference is the policy's own base (reference_logps), nothing to keep
        self._reference = model_def
        return {"params": start_params}

    def prepare(self, aux, batch: dict) -> dict:
        if aux is None:  # LoRA: lmtrain eval still calls prepare; the loss reads the base itself
            return batch
        chosen_B, rejected_B, _, _ = pair_logps(self._reference, aux["params"], batch)
        return {**batch, "ref_chosen_logp": chosen_B, "ref_rejected_logp": rejected_B}

    def reference_logps(self, model_def: ModelDef, params: dict, batch: dict):
        """The reference's (chosen, rejected) log-probabilities: from prepare, or under LoRA the base's."""
        if "ref_chosen_logp" in batch:
            return batch["ref_chosen_logp"], batch["ref_rejected_logp"]
        chosen_B, rejected_B, _, _ = pair_logps(base_model(model_def), without_adapters(params, model_def.cfg), batch)
        return jax.lax.stop_gradient(chosen_B), jax.lax.stop_gradient(rejected_B)

    def pair_terms(self, model_def: ModelDef, params: dict, batch: dict, rng) -> dict:
        t = self.cfg.task
        chosen_B, rejected_B, n_chosen_B, n_rejected_B = pair_logps(model_def, params, batch, rng)
        ref_chosen_B, ref_rejected_B = self.reference_logps(model_def, params, batch)
        logps = (chosen_B, rejected_B, ref_chosen_B, ref_rejected_B)
        if t.dpo_loss == "ipo":  # IPO compares per-token means, so long completions do not dominate
            n = (n_chosen_B, n_rejected_B, n_chosen_B, n_rejected_B)
            logps = tuple(lp / jax.numpy.maximum(k, 1.0) for lp, k in zip(logps, n, strict=True))
        loss_B, chosen_reward_B, rejected_reward_B = dpo_loss(*logps, t.dpo_beta, t.dpo_label_smoothing, t.dpo_loss)
        return {"loss": loss_B, "chosen_reward": chosen_reward_B, "rejected_reward": rejected_reward_B,
                "chosen_logp": jax.lax.stop_gradient(chosen_B), "rejected_logp": jax.lax.stop_gradient(rejected_B)}
