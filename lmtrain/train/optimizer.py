"""Optax optimizers and learning-rate schedules from `config.optimizer`.

The optimizer follows a `ParamPlan` (`lmtrain.param_rules`): weight decay where its decay table says, each
update scaled by the parameter's learning-rate multiplier. Frozen parameters never reach the optimizer.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from lmtrain.config import OPTIMIZERS, SCHEDULES, ConfigError
from lmtrain.param_rules import ParamPlan


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr` (step 0 takes lr / warmup_steps, so no step is wasted at lr 0), then
    cosine, linear, constant or warmup-stable-decay (WSD)."""
    lr, warmup, end = opt_cfg.lr, opt_cfg.warmup_steps, opt_cfg.lr * opt_cfg.min_lr_ratio
    rest = max(total_steps - warmup, 1)
    if opt_cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, rest, alpha=opt_cfg.min_lr_ratio)
    elif opt_cfg.schedule == "linear":
        after = optax.linear_schedule(lr, end, rest)
    elif opt_cfg.schedule == "constant":
        after = optax.constant_schedule(lr)
    elif opt_cfg.schedule == "wsd":
        decay = max(int(rest * opt_cfg.wsd_decay_fraction), 1)
        after = optax.join_schedules(
            [optax.constant_schedule(lr), optax.linear_schedule(lr, end, decay)], [rest - decay]
        )
    else:
        raise ConfigError(f"optimizer.schedule='{opt_cfg.schedule}' is unknown. Choose one of: {', '.join(SCHEDULES)}.")
    if warmup == 0:
        return after
    warm = lambda step: lr * (jnp.minimum(step, warmup - 1) + 1) / warmup  # noqa: E731
    return optax.join_schedules([warm, after], [warmup])


# ---------------------------------------------------------------------------------------------- optimizers


def _scale_per_param(mults):
    """Multiply each parameter's update by its learning-rate multiplier (a static tree of floats)."""

    def update(updates, state, params=None):
        return jax.tree.map(lambda u, m: u * m if m != 1.0 else u, updates, mults), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(opt_cfg, total_steps: int, plan: ParamPlan | None = None, trainable_shapes: Mapping | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer over the trainable parameters, and the learning-rate schedule.

    With a plan, weight decay follows its `decay` table and updates are scaled by `lr_mult`.
    """
    schedule = learning_rate_schedule(opt_cfg, total_steps)
    mask = plan.decay_mask if plan is not None else None
    name = opt_cfg.name
    if name == "adamw":
        core = optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                           weight_decay=opt_cfg.weight_decay, mask=mask)
    elif name == "lion":
        core = optax.lion(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, weight_decay=opt_cfg.weight_decay, mask=mask)
    elif name == "adafactor":
        core = optax.adafactor(schedule, weight_decay_rate=opt_cfg.weight_decay or None, weight_decay_mask=mask,
                               multiply_by_parameter_scale=False)
    elif name == "sgd":
        core = optax.chain(
            optax.add_decayed_weights(opt_cfg.weight_decay, mask) if opt_cfg.weight_decay else optax.identity(),
            optax.sgd(schedule, momentum=opt_cfg.momentum),
        )
    else:
        raise ConfigError(f"optimizer.name='{name}' is unknown. Choose one of: {', '.join(OPTIMIZERS)}.")
    if plan is not None and trainable_shapes is not None and any(m != 1.0 for m in plan.lr_mult.values()):
        core = optax.chain(core, _scale_per_param(plan.lr_scales(trainable_shapes)))
    if opt_cfg.clip_norm:
        core = optax.chain(optax.clip_by_global_norm(opt_cfg.clip_norm), core)
    return core, schedule
