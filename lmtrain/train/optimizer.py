"""Optax optimizers and learning-rate schedules built from `config.optimizer`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from lmtrain.config import OPTIMIZERS, SCHEDULES, ConfigError

# Parameter names that weight decay skips by default: norms, biases and embeddings.
_NO_DECAY_LEAVES = ("scale", "bias", "bq", "bk", "bv", "bo", "b_in", "b_out")
_NO_DECAY_TOP = ("embed", "pos_embed")


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine, linear, constant or warmup-stable-decay (WSD)."""
    lr, warmup, end = opt_cfg.lr, opt_cfg.warmup_steps, opt_cfg.lr * opt_cfg.min_lr_ratio
    rest = max(total_steps - warmup, 1)
    warm = optax.linear_schedule(0.0, lr, max(warmup, 1))
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
    return optax.join_schedules([warm, after], [warmup])


def weight_decay_mask(params: dict, decay_everything: bool = False) -> dict:
    """True where weight decay applies: matrices, but not norms, biases or embeddings (unless asked)."""

    def decays(path, _):
        if decay_everything:
            return True
        names = [getattr(k, "key", None) for k in path]
        return not (names[-1] in _NO_DECAY_LEAVES or names[0] in _NO_DECAY_TOP)

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(opt_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = learning_rate_schedule(opt_cfg, total_steps)
    mask = lambda params: weight_decay_mask(params, opt_cfg.decay_norms_biases_embeddings)  # noqa: E731
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
    if opt_cfg.clip_norm:
        core = optax.chain(optax.clip_by_global_norm(opt_cfg.clip_norm), core)
    return core, schedule


def global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
